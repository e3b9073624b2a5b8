"""Dataset registration: the built-in "shapes" dataset and your own COCO-format data (a folder in
Roboflow's or COCO's layout, or a json + image folder), with the start-up check."""
from .builtin import register_shapes, subset_dataset_dicts
from .folder import (
    DatasetError,
    check_coco_dataset,
    find_coco_splits,
    read_coco_categories,
    register_coco_dataset,
    register_coco_folder,
)
from .shapes import SHAPES_CLASSES, ensure_shapes_split, generate_shapes_image

__all__ = [
    "DatasetError",
    "SHAPES_CLASSES",
    "check_coco_dataset",
    "ensure_shapes_split",
    "find_coco_splits",
    "generate_shapes_image",
    "read_coco_categories",
    "register_coco_dataset",
    "register_coco_folder",
    "register_shapes",
    "subset_dataset_dicts",
]
