"""Detectron2 integration of dinov2od.

Importing this package registers the ``DINOv2DETR`` meta-architecture in
``META_ARCH_REGISTRY``, the ``build_dinov2_backbone`` builder in ``BACKBONE_REGISTRY``, and
the built-in ``shapes_train`` / ``shapes_val`` datasets (generated on first use).

Laid out as Detectron2 is (the training driver, ``engine.trainer``, on top: nothing here imports it):
``config`` (yacs keys and builders, config loading); ``modeling`` (``meta_arch``, ``backbone``);
``data`` (``dataset_mapper``, ``data_cache``, ``metadata``, ``datasets``: your data, the start-up
check, the size advice and the synthetic shapes); ``checkpoint`` (crash-safe files, exact resume,
the run folder); ``evaluation`` (``evaluator``, the result pictures ``plots``, ``report``,
``visualize``); ``engine`` (``trainer``: the one driver, for lazy and yacs configs;
``train_loop``, ``amp``, ``ema``, ``launch``, ``predictor`` for lazy configs).
"""
from .config import add_dinov2od_config
from .data import DetrDatasetMapper, build_detr_augmentation, register_coco_dataset, register_shapes
from .engine import DetrTrainerLoop, EMAHook, ModelEMA
from .modeling import DINOv2DETR, DINOv2FeaturePyramid, build_dinov2_backbone

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
