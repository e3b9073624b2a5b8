"""Dataset registration: the built-in "shapes" dataset and a helper for custom COCO-format data."""
from .builtin import register_coco_dataset, register_shapes, subset_dataset_dicts
from .shapes import SHAPES_CLASSES, ensure_shapes_split, generate_shapes_image

__all__ = [
    "SHAPES_CLASSES",
    "ensure_shapes_split",
    "generate_shapes_image",
    "register_coco_dataset",
    "register_shapes",
    "subset_dataset_dicts",
]
