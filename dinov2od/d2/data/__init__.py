"""The data side: the dataset mapper (:mod:`.dataset_mapper`), the parsed train set cached once per
machine (:mod:`.data_cache`), the classes that travel with a model (:mod:`.metadata`), and the
datasets (:mod:`.datasets`: registration of your own data in COCO, YOLO or Pascal VOC layout with
the start-up check and the size advice, and the synthetic "shapes" demo data and its generator)."""
from .dataset_mapper import DetrDatasetMapper, build_detr_augmentation, read_image
from .datasets import register_coco_dataset, register_coco_folder, register_shapes

__all__ = [
    "DetrDatasetMapper",
    "build_detr_augmentation",
    "read_image",
    "register_coco_dataset",
    "register_coco_folder",
    "register_shapes",
]
