"""Building blocks in plain PyTorch (no Detectron2 import)."""
from .box_ops import (
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    check_boxes_xyxy,
    generalized_box_iou,
)
from .constants import IMAGENET_MEAN, IMAGENET_STD
from .mlp import MLP
from .ms_deform_attn import (
    MultiScaleDeformableAttention,
    level_shapes,
    level_start_index_from_shapes,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)
from .position_encoding import PositionEmbeddingSine, coordinate_to_sine_embedding
from .resize import bicubic_resize_matrix

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MLP",
    "MultiScaleDeformableAttention",
    "PositionEmbeddingSine",
    "bicubic_resize_matrix",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "check_boxes_xyxy",
    "coordinate_to_sine_embedding",
    "generalized_box_iou",
    "level_shapes",
    "level_start_index_from_shapes",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
]
