"""ViT backbones behind one interface, by family.

* :mod:`.options` — :class:`BackboneOptions`, the options every family takes and their defaults;
* :mod:`.base` — :class:`ViTBackbone`, the generic ViT every family is (padding helpers, the block
  loop, windowed attention, RoPE, taps, LoRA, freezing);
* :mod:`.registry` — ``@register_backbone(name)``, :data:`BACKBONES`, :func:`build_backbone`;
* :mod:`.loading` — where weights come from (hub ids, ``save_pretrained`` folders, official
  ``.pth`` files), shared by the families;
* :mod:`.dinov2`, :mod:`.dinov3` — one module per family: architecture table, config, backbone,
  checkpoint conversion and loader.

Each module imports only the ones listed before it (``options`` < ``base`` < ``registry``; ``loading`` alone;
the families import ``base``, ``loading`` and ``registry``), so none imports one that imports it
back. Importing this package registers the built-in families.
"""
from .base import SHARED_OPTIONS, ViTBackbone, apply_rope, pad_to_multiple, valid_sizes_from_mask
from .dinov2 import (
    ARCHS,
    HUB_IDS,
    DINOv2Backbone,
    build_dinov2_config,
    hf_to_official_state_dict,
    official_to_hf_state_dict,
    sincos_pos_embed_2d,
)
from .dinov3 import (
    DINOV3_ARCHS,
    DINOV3_HUB_IDS,
    DINOv3Backbone,
    build_dinov3_config,
    dinov3_official_to_hf_state_dict,
    rope_sincos,
)
from .loading import PretrainedWeightsUnavailable, resolve_local_path
from .options import BackboneOptions
from .registry import BACKBONES, build_backbone, family_options, register_backbone

#: the built-in families (every registered one: :data:`BACKBONES`)
BACKBONE_FAMILIES = tuple(BACKBONES)

__all__ = [
    "ARCHS",
    "BackboneOptions",
    "BACKBONES",
    "BACKBONE_FAMILIES",
    "DINOV3_ARCHS",
    "DINOV3_HUB_IDS",
    "DINOv2Backbone",
    "DINOv3Backbone",
    "HUB_IDS",
    "PretrainedWeightsUnavailable",
    "SHARED_OPTIONS",
    "ViTBackbone",
    "apply_rope",
    "build_backbone",
    "build_dinov2_config",
    "build_dinov3_config",
    "dinov3_official_to_hf_state_dict",
    "family_options",
    "hf_to_official_state_dict",
    "official_to_hf_state_dict",
    "pad_to_multiple",
    "register_backbone",
    "resolve_local_path",
    "rope_sincos",
    "sincos_pos_embed_2d",
    "valid_sizes_from_mask",
]
