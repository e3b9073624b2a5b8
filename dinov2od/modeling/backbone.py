"""Deprecated alias of :mod:`dinov2od.modeling.backbones` (kept for one release).

Its names moved: :class:`ViTBackbone`, :func:`pad_to_multiple`, :func:`valid_sizes_from_mask`,
:func:`apply_rope` to :mod:`dinov2od.modeling.backbones.base`; :data:`ARCHS`, :data:`PATCH_SIZE`,
:class:`DINOv2Backbone`, :func:`build_dinov2_config`, :func:`sincos_pos_embed_2d` to
:mod:`dinov2od.modeling.backbones.dinov2`; :func:`build_backbone` and :data:`BACKBONE_FAMILIES` to
:mod:`dinov2od.modeling.backbones` (the registry). Import them from ``dinov2od.modeling``.
"""
import warnings

from .backbones import BACKBONE_FAMILIES, build_backbone
from .backbones.base import ViTBackbone, apply_rope, pad_to_multiple, valid_sizes_from_mask
from .backbones.dinov2 import ARCHS, PATCH_SIZE, DINOv2Backbone, build_dinov2_config, sincos_pos_embed_2d

__all__ = ["ARCHS", "BACKBONE_FAMILIES", "DINOv2Backbone", "PATCH_SIZE", "ViTBackbone", "apply_rope",
           "build_backbone", "build_dinov2_config", "pad_to_multiple", "sincos_pos_embed_2d",
           "valid_sizes_from_mask"]

warnings.warn("dinov2od.modeling.backbone is deprecated and will be removed in the next release; import from "
              "dinov2od.modeling or dinov2od.modeling.backbones", DeprecationWarning, stacklevel=2)
