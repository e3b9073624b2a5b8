"""Deprecated alias of the loaders in :mod:`dinov2od.modeling.backbones` (kept for one release).

The DINOv2 loader and conversions (:data:`HUB_IDS`, :func:`load_vit`, :func:`load_official_checkpoint`,
:func:`official_to_hf_state_dict`, :func:`hf_to_official_state_dict`) moved to
:mod:`dinov2od.modeling.backbones.dinov2`; the DINOv3 ones (:data:`DINOV3_HUB_IDS`,
:func:`load_dinov3_vit`, :func:`load_official_dinov3_checkpoint`,
:func:`dinov3_official_to_hf_state_dict`) to :mod:`dinov2od.modeling.backbones.dinov3`; what both
share (:class:`PretrainedWeightsUnavailable`, :func:`is_random_init`, :func:`resolve_local_path`,
:data:`PROJECT_ROOT`) to :mod:`dinov2od.modeling.backbones.loading`.
"""
import warnings

from .backbones.dinov2 import (
    HUB_IDS,
    hf_to_official_state_dict,
    load_official_checkpoint,
    load_vit,
    official_to_hf_state_dict,
)
from .backbones.dinov3 import (
    DINOV3_HUB_IDS,
    dinov3_official_to_hf_state_dict,
    load_dinov3_vit,
    load_official_dinov3_checkpoint,
)
from .backbones.loading import PROJECT_ROOT, PretrainedWeightsUnavailable, is_random_init, resolve_local_path

__all__ = [
    "DINOV3_HUB_IDS",
    "HUB_IDS",
    "PROJECT_ROOT",
    "PretrainedWeightsUnavailable",
    "dinov3_official_to_hf_state_dict",
    "hf_to_official_state_dict",
    "is_random_init",
    "load_dinov3_vit",
    "load_official_checkpoint",
    "load_official_dinov3_checkpoint",
    "load_vit",
    "official_to_hf_state_dict",
    "resolve_local_path",
]

warnings.warn("dinov2od.modeling.weights is deprecated and will be removed in the next release; import from "
              "dinov2od.modeling or dinov2od.modeling.backbones (.dinov2, .dinov3, .loading)",
              DeprecationWarning, stacklevel=2)
