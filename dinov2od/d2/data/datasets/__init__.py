"""Dataset registration: the built-in "shapes" dataset and your own data (a folder in Roboflow's or
COCO's layout, a json + image folder, a YOLO or a Pascal VOC folder), with the start-up check."""
from .builtin import register_shapes, subset_dataset_dicts
from .folder import (
    DatasetError,
    check_coco_dataset,
    find_coco_splits,
    read_coco_categories,
    register_coco_dataset,
    register_coco_folder,
)
from .formats import detect_format, find_dataset_splits, read_voc, read_yolo
from .shapes import SHAPES_CLASSES, ensure_shapes_split, generate_shapes_image

__all__ = [
    "DatasetError",
    "SHAPES_CLASSES",
    "check_coco_dataset",
    "detect_format",
    "find_dataset_splits",
    "ensure_shapes_split",
    "find_coco_splits",
    "generate_shapes_image",
    "read_coco_categories",
    "read_voc",
    "read_yolo",
    "register_coco_dataset",
    "register_coco_folder",
    "register_shapes",
    "subset_dataset_dicts",
]
