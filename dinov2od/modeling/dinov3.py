"""Deprecated alias of :mod:`dinov2od.modeling.backbones.dinov3` (kept for one release).

:data:`DINOV3_ARCHS`, :data:`DINOV3_PATCH_SIZE`, :class:`DINOv3Backbone`, :func:`build_dinov3_config`,
:func:`rope_periods` and :func:`rope_sincos` moved there. Import them from ``dinov2od.modeling`` or
``dinov2od.modeling.backbones.dinov3``.
"""
import warnings

from .backbones.dinov3 import (
    DINOV3_ARCHS,
    DINOV3_PATCH_SIZE,
    DINOv3Backbone,
    build_dinov3_config,
    rope_periods,
    rope_sincos,
)

__all__ = ["DINOV3_ARCHS", "DINOV3_PATCH_SIZE", "DINOv3Backbone", "build_dinov3_config", "rope_periods",
           "rope_sincos"]

warnings.warn("dinov2od.modeling.dinov3 is deprecated and will be removed in the next release; import from "
              "dinov2od.modeling or dinov2od.modeling.backbones.dinov3", DeprecationWarning, stacklevel=2)
