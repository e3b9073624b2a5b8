"""The detector as Detectron2 components: the meta-architecture registered in ``META_ARCH_REGISTRY``
(:mod:`.meta_arch`) and the backbone registered in ``BACKBONE_REGISTRY`` (:mod:`.backbone`), each a
``@configurable`` class that lazy configs and yacs configs (``DefaultPredictor``) both build."""
from .backbone import DINOv2FeaturePyramid, build_dinov2_backbone
from .meta_arch import DINOv2DETR

__all__ = ["DINOv2DETR", "DINOv2FeaturePyramid", "build_dinov2_backbone"]
