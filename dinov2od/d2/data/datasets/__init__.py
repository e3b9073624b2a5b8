"""Dataset registration: the built-in "shapes" dataset and your own data (a folder in Roboflow's or
COCO's layout, a json + image folder, a YOLO or a Pascal VOC folder), with the start-up check."""
from .builtin import register_shapes, subset_dataset_dicts
from .check import check_coco_dataset
from .folder import (
    DatasetError,
    check_mode,
    find_coco_splits,
    read_coco_categories,
    register_coco_dataset,
    register_coco_folder,
)
from .formats import detect_format, find_dataset_splits
from .shapes import SHAPES_CLASSES, ensure_shapes_split, generate_shapes_image
from .voc import read_voc
from .yolo import read_yolo

__all__ = [
    "DatasetError",
    "SHAPES_CLASSES",
    "check_coco_dataset",
    "check_mode",
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
