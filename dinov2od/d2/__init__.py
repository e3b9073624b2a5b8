"""Detectron2 integration of dinov2od.

Importing this package registers the ``DINOv2DETR`` meta-architecture in
``META_ARCH_REGISTRY``, the ``build_dinov2_backbone`` builder in ``BACKBONE_REGISTRY``, and
the built-in ``shapes_train`` / ``shapes_val`` datasets (generated on first use).

Modules: ``meta_arch``, ``backbone``, ``config`` (yacs keys and builders), ``dataset_mapper``,
``datasets``; training: ``trainer`` (the one driver, for lazy and yacs configs),
``train_loop`` (one iteration), ``amp`` (mixed precision), ``ema``, ``checkpoint`` (crash-safe
files, exact resume); after training: ``evaluation``, ``predictor`` (lazy configs),
``visualize`` (drawing).
"""
from .backbone import DINOv2FeaturePyramid, build_dinov2_backbone
from .config import add_dinov2od_config
from .dataset_mapper import DetrDatasetMapper, build_detr_augmentation
from .datasets import register_coco_dataset, register_shapes
from .ema import EMAHook, ModelEMA
from .meta_arch import DINOv2DETR
from .train_loop import DetrTrainerLoop

register_shapes()

__all__ = [
    "DINOv2DETR",
    "DINOv2FeaturePyramid",
    "build_dinov2_backbone",
    "DetrDatasetMapper",
    "DetrTrainerLoop",
    "EMAHook",
    "ModelEMA",
    "add_dinov2od_config",
    "build_detr_augmentation",
    "register_coco_dataset",
    "register_shapes",
]
