"""The DINOv3 family: architecture table, config, backbone, RoPE, checkpoint conversion and loader.

DINOv3 (Meta, 2025) differs from DINOv2 in what the blocks see, not in what they are: 16-px
patches, no learned position embeddings but a 2-D rotary embedding (RoPE) on the queries and keys
of the patch tokens, 4 storage ("register") tokens, LayerScale, no bias on the keys
(Meta's ``mask_k_bias``) and a SwiGLU MLP in the "+" and 7B models. :class:`DINOv3Backbone` runs
the blocks of a ``DINOv3ViTModel`` (``transformers``) in :class:`~.base.ViTBackbone`'s loop, so
it keeps what the DINOv2 backbone guarantees: padded keys are masked, each image's RoPE
coordinates come from its own *valid* patch grid (a padded batch equals one-by-one inference),
taps, stop after the last tap, windowed attention, peft LoRA with the same target names, and
``freeze=False``.

RoPE, as Meta's ``RopePositionEmbedding`` with the hub builders' settings (base 100, coordinates
normalized per axis, float32): a patch in row ``r`` and column ``c`` of an ``h x w`` grid sits at
``y = 2 (r + 0.5) / h - 1``, ``x = 2 (c + 0.5) / w - 1``; with ``Dh/4`` periods
``p_i = base ** (4 i / Dh)`` its angles are ``2 pi y / p_i`` and ``2 pi x / p_i``, laid out
``[y-angles, x-angles]`` twice over the head dimension. In training mode only, the released
models' augmentation (``pos_embed_rescale=2``: one log-uniform factor in [1/2, 2] per forward,
and ``shift``/``jitter`` when a config sets them) scales the coordinates, as Meta and
``transformers`` do (``rope_train_augment=False`` turns it off).

Architectures are known in code (:data:`DINOV3_ARCHS`), so constructing never downloads. Weights
load only when ``pretrained`` is given (sources: :mod:`.loading`): the hub ids of
:data:`DINOV3_HUB_IDS`, ``save_pretrained`` folders of ``DINOv3ViTModel``, and Meta's official
``.pth`` files (``dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth`` ...), remapped
(:func:`dinov3_official_to_hf_state_dict`): ``storage_tokens`` -> ``embeddings.register_tokens``,
``blocks.N.attn.qkv`` (fused, its bias multiplied by ``bias_mask``, which zeroes the key bias:
Meta's ``mask_k_bias``) -> ``q_proj``/``k_proj``/``v_proj``, ``attn.proj`` -> ``o_proj``,
``ls1.gamma`` -> ``layer_scale1.lambda1``, ``mlp.fc1``/``fc2`` -> ``up_proj``/``down_proj``, SwiGLU
``mlp.w1``/``w2``/``w3`` -> ``gate_proj``/``up_proj``/``down_proj``. ``rope_embed.periods`` is checked
against the config's RoPE base, and ``cls_norm``/``local_cls_norm`` (they normalize only the class
and storage tokens) are dropped. A checkpoint of another architecture (or family) is refused with a
message saying which it is. ``drop_path_rate`` applies to every source (:data:`.loading.RUNTIME_FIELDS`).
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import ViTBackbone
from .loading import (
    hf_folder,
    is_official_checkpoint,
    load_converted,
    load_hf_model,
    official_depth,
    read_hf_config,
    read_official_state_dict,
    resolve_pretrained,
)
from .options import BackboneOptions
from .registry import register_backbone

logger = logging.getLogger("dinov2od")

__all__ = ["DINOV3_ARCHS", "DINOV3_HUB_IDS", "DINOV3_PATCH_SIZE", "DINOv3Backbone", "build_dinov3_config",
           "dinov3_official_to_hf_state_dict", "load_dinov3_vit", "load_official_dinov3_checkpoint", "rope_periods",
           "rope_sincos"]

DINOV3_PATCH_SIZE = 16

# The released DINOv3 ViTs as transformers configs (Meta's hub builders: dinov3_vits16, _vits16plus,
# _vitb16, _vitl16, _vith16plus, _vit7b16), and a "tiny" preset for CPU tests/demos (no weights).
# SwiGLU widths are Meta's: int(D * ffn_ratio * 2 / 3) rounded up to a multiple of 8 (64 for 7B).
DINOV3_ARCHS: Dict[str, Dict] = {
    "tiny": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=192),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "small_plus": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       use_gated_mlp=True, hidden_act="silu"),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "huge_plus": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120,
                      use_gated_mlp=True, hidden_act="silu"),
    "7b": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, intermediate_size=8192,
               use_gated_mlp=True, hidden_act="silu", query_bias=False, value_bias=False),
}
_COMMON = dict(patch_size=DINOV3_PATCH_SIZE, image_size=224, rope_theta=100.0, num_register_tokens=4,
               layerscale_value=1e-5, layer_norm_eps=1e-5, hidden_act="gelu", query_bias=True, key_bias=False,
               value_bias=True, proj_bias=True, mlp_bias=True, use_gated_mlp=False, pos_embed_rescale=2.0)


# The released DINOv3 ViTs on the Hugging Face hub (LVD-1689M web images; SAT-493M satellite images).
DINOV3_HUB_IDS = {
    "facebook/dinov3-vits16-pretrain-lvd1689m": "small",
    "facebook/dinov3-vits16plus-pretrain-lvd1689m": "small_plus",
    "facebook/dinov3-vitb16-pretrain-lvd1689m": "base",
    "facebook/dinov3-vitl16-pretrain-lvd1689m": "large",
    "facebook/dinov3-vith16plus-pretrain-lvd1689m": "huge_plus",
    "facebook/dinov3-vit7b16-pretrain-lvd1689m": "7b",
    "facebook/dinov3-vitl16-pretrain-sat493m": "large",
    "facebook/dinov3-vit7b16-pretrain-sat493m": "7b",
}


def build_dinov3_config(arch: str = "small", **overrides):
    """Build a ``DINOv3ViTConfig`` without any download.

    Args:
        arch: one of :data:`DINOV3_ARCHS` (``tiny``, ``small``, ``small_plus``, ``base``, ``large``,
            ``huge_plus``, ``7b``).
        **overrides: config fields to change, e.g. ``hidden_size``, ``intermediate_size``,
            ``num_register_tokens``, ``use_gated_mlp``.
    """
    from transformers import DINOv3ViTConfig

    if arch not in DINOV3_ARCHS:
        raise ValueError(f"unknown DINOv3 arch {arch!r}; choose one of {sorted(DINOV3_ARCHS)}")
    fields = {**_COMMON, **DINOV3_ARCHS[arch], **overrides}
    if fields.get("use_gated_mlp") and "hidden_act" not in {**DINOV3_ARCHS[arch], **overrides}:
        fields["hidden_act"] = "silu"  # Meta's SwiGLU always gates with SiLU
    dim, heads = fields["hidden_size"], fields["num_attention_heads"]
    if dim % heads or (dim // heads) % 4:
        raise ValueError(
            f"hidden_size={dim} must be divisible by num_attention_heads={heads} with a head width "
            f"divisible by 4 (2-D RoPE) (arch={arch!r}, overrides={overrides})"
        )
    return DINOv3ViTConfig(**fields)


def rope_periods(head_dim: int, base: float) -> Tensor:
    """The ``head_dim / 4`` RoPE periods ``base ** (4 i / head_dim)`` in float32, as Meta computes them."""
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return float(base) ** exponents


def rope_sincos(grid_hw: Tensor, hp: int, wp: int, periods: Tensor, scale: Optional[Tensor] = None,
                shift: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """RoPE ``(sin, cos)`` of each image's patch grid, laid on a common (Hp, Wp) grid, float32.

    Image ``i``'s coordinates are normalized by its own grid ``grid_hw[i] = (h_i, w_i)``; patches
    beyond it (padding) get coordinates past 1, which nothing reads (they are masked keys).

    Args:
        grid_hw: (B, 2) ``(h_i, w_i)`` in patches, each <= (Hp, Wp).
        hp, wp: the common grid.
        periods: (head_dim / 4,) float32.
        scale, shift: (2,) multipliers and offsets of the (y, x) coordinates (training augmentation);
            None = none.

    Returns:
        sin, cos: each (B, Hp * Wp, head_dim), row-major.
    """
    hw = grid_hw.to(device=periods.device, dtype=torch.float32)
    ys = (torch.arange(hp, dtype=torch.float32, device=periods.device) + 0.5)[None] / hw[:, :1]  # (B, Hp)
    xs = (torch.arange(wp, dtype=torch.float32, device=periods.device) + 0.5)[None] / hw[:, 1:]  # (B, Wp)
    b = hw.shape[0]
    coords = torch.stack([ys[:, :, None].expand(b, hp, wp), xs[:, None, :].expand(b, hp, wp)], -1)  # (y, x)
    coords = 2.0 * coords - 1.0  # (B, Hp, Wp, 2), the valid grid in (-1, 1)
    if shift is not None:
        coords = coords + shift
    if scale is not None:
        coords = coords * scale
    angles = 2 * math.pi * coords[..., None] / periods  # (B, Hp, Wp, 2, Dh/4)
    angles = angles.flatten(3).repeat(1, 1, 1, 2).flatten(1, 2)  # (B, Hp*Wp, Dh): [y, x, y, x] blocks
    return angles.sin(), angles.cos()


@register_backbone("dinov3")
class DINOv3Backbone(ViTBackbone):
    """DINOv3 ViT with LoRA adapters, returning feature maps tapped from several blocks.

    Args:
        arch: ``"small"``, ``"small_plus"``, ``"base"``, ``"large"``, ``"huge_plus"``, ``"7b"``
            (the released ViTs) or ``"tiny"`` (width 96, 4 blocks, for CPU tests); None infers it
            from ``pretrained`` (and defaults to ``"small"`` without it).
        arch_overrides: ``DINOv3ViTConfig`` fields replacing the arch's, e.g. ``dict(hidden_size=32,
            num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)``.
        pretrained: None (random init), a Hugging Face id
            (``"facebook/dinov3-vitb16-pretrain-lvd1689m"``), a local ``save_pretrained`` folder, or
            an official DINOv3 ``.pth`` checkpoint (``dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth``).
        rope_train_augment: in training mode, randomly shift/jitter/rescale the RoPE coordinates
            as the checkpoint's config says (the released models: rescale by a log-uniform factor
            in [1/2, 2]), as Meta and ``transformers`` do; False keeps them fixed.
        out_indices, num_taps, lora_rank, lora_alpha, lora_dropout, lora_targets, lora_blocks,
        freeze, drop_path_rate, apply_layernorm, window_size, window_blocks: the options both
            families share, with their defaults, in
            :class:`~dinov2od.modeling.backbones.options.BackboneOptions`. The LoRA targets keep their
            names: ``query``/``key``/``value``/``output`` are ``q_proj``/``k_proj``/``v_proj``/
            ``o_proj``, ``fc1`` is the MLP's input projection(s) (``up_proj``, and ``gate_proj``
            in SwiGLU models), ``fc2`` its output projection (``down_proj``).
    """

    display_name, archs, default_patch_size = "DINOv3", DINOV3_ARCHS, DINOV3_PATCH_SIZE

    def __init__(
        self,
        arch: Optional[str] = BackboneOptions.arch,
        arch_overrides: Optional[dict] = BackboneOptions.arch_overrides,
        pretrained: Optional[str] = BackboneOptions.pretrained,
        out_indices: Optional[Sequence[int]] = BackboneOptions.out_indices,
        num_taps: int = BackboneOptions.num_taps,
        lora_rank: int = BackboneOptions.lora_rank,
        lora_alpha: float = BackboneOptions.lora_alpha,
        lora_dropout: float = BackboneOptions.lora_dropout,
        lora_targets: Sequence[str] = BackboneOptions.lora_targets,
        lora_blocks: Optional[Sequence[int]] = BackboneOptions.lora_blocks,
        freeze: bool = BackboneOptions.freeze,
        drop_path_rate: float = BackboneOptions.drop_path_rate,
        apply_layernorm: bool = BackboneOptions.apply_layernorm,
        window_size: Optional[int] = BackboneOptions.window_size,
        window_blocks: Optional[Sequence[int]] = BackboneOptions.window_blocks,
        rope_train_augment: bool = True,
    ):
        super().__init__()
        overrides = dict(arch_overrides or {})
        if drop_path_rate:
            overrides["drop_path_rate"] = drop_path_rate
        self.vit = load_dinov3_vit(arch, overrides, pretrained)
        self.rope_train_augment = bool(rope_train_augment)
        self._finish_init(
            out_indices=out_indices, num_taps=num_taps, apply_layernorm=apply_layernorm,
            window_size=window_size, window_blocks=window_blocks, lora_targets=lora_targets,
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_blocks=lora_blocks,
            freeze=freeze)

    @property
    def _layers(self) -> nn.ModuleList:
        return self.vit.model.layer if hasattr(self.vit, "model") else self.vit.layer  # transformers 5 / 4

    @property
    def _final_norm(self) -> nn.Module:
        return self.vit.norm

    def _lora_layout(self) -> Dict[str, Tuple[str, ...]]:
        gated = hasattr(self._layers[0].mlp, "gate_proj")
        return {"query": ("attention.q_proj",), "key": ("attention.k_proj",), "value": ("attention.v_proj",),
                "output": ("attention.o_proj",),
                "fc1": ("mlp.gate_proj", "mlp.up_proj") if gated else ("mlp.up_proj",),
                "fc2": ("mlp.down_proj",)}

    @staticmethod
    def _attention_parts(att: nn.Module):
        return att.q_proj, att.k_proj, att.v_proj, att.o_proj, att.dropout

    def _embed(self, images: Tensor, patch_valid_hw: Tensor) -> Tensor:
        """(B, 3, H, W) padded images -> (B, 1 + R + Hp*Wp, D): class, storage and patch tokens."""
        emb = self.vit.embeddings
        x = emb.patch_embeddings(images).flatten(2).transpose(1, 2)  # (B, Hp*Wp, D)
        b = x.shape[0]
        tokens = [emb.cls_token.to(x.dtype).expand(b, -1, -1)]
        if self.num_register_tokens:
            tokens.append(emb.register_tokens.to(x.dtype).expand(b, -1, -1))
        return torch.cat(tokens + [x], 1)

    def _rope_augmentation(self, device) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Training-time (scale, shift) of the (y, x) coordinates, drawn once per forward."""
        cfg = self.vit.config
        if not (self.training and self.rope_train_augment):
            return None, None
        scale, shift = torch.ones(2, device=device), None
        if cfg.pos_embed_shift:
            shift = torch.empty(2, device=device).uniform_(-cfg.pos_embed_shift, cfg.pos_embed_shift)
        if cfg.pos_embed_jitter:
            log_j = math.log(cfg.pos_embed_jitter)
            scale = scale * torch.empty(2, device=device).uniform_(-log_j, log_j).exp()
        if cfg.pos_embed_rescale:
            log_r = math.log(cfg.pos_embed_rescale)
            scale = scale * torch.empty(1, device=device).uniform_(-log_r, log_r).exp()
        return scale, shift

    def _rope(self, patch_valid_hw: Tensor, hp: int, wp: int) -> Tuple[Tensor, Tensor]:
        """Per-image RoPE from each image's valid patch grid -> (sin, cos), each (B, Hp*Wp, Dh) float32."""
        device = patch_valid_hw.device
        periods = rope_periods(self.embed_dim // self.num_heads, self.vit.config.rope_theta).to(device)
        scale, shift = self._rope_augmentation(device)
        return rope_sincos(patch_valid_hw, hp, wp, periods, scale, shift)


# ---------------------------------------------------------------------- loading
_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                       "intermediate_size", "use_gated_mlp", "num_register_tokens")


def _model_class():
    from transformers import DINOv3ViTModel

    return DINOv3ViTModel


def load_dinov3_vit(arch: Optional[str], overrides: dict, pretrained: Optional[str]) -> nn.Module:
    """Build a ``DINOv3ViTModel`` (random init) or load it from ``pretrained`` (module docstring)."""
    pretrained = resolve_pretrained(pretrained)
    if pretrained is None:
        return _model_class()(build_dinov3_config(arch or "small", **overrides))
    if is_official_checkpoint(pretrained):
        return load_official_dinov3_checkpoint(pretrained, arch, overrides)
    return _load_hf(pretrained, arch, overrides)


def _config_mismatch(config, expected) -> Dict[str, Tuple]:
    return {f: (getattr(config, f), getattr(expected, f)) for f in _ARCH_FIELDS
            if getattr(config, f) != getattr(expected, f)}


def _guess_arch(fields: dict) -> Optional[str]:
    gated = bool(fields.get("use_gated_mlp"))
    for name, preset in DINOV3_ARCHS.items():
        if name != "tiny" and (preset["hidden_size"], preset["num_hidden_layers"], bool(preset.get("use_gated_mlp"))) \
                == (fields["hidden_size"], fields["num_hidden_layers"], gated):
            return name
    return None


def _load_hf(pretrained: str, arch: Optional[str], overrides: dict) -> nn.Module:
    """Load a Hugging Face id or ``save_pretrained`` folder of a DINOv3 ViT; refuse anything else."""
    folder = hf_folder(pretrained, "DINOv3", "DINOv3ViTModel", DINOV3_HUB_IDS,
                       "facebook/dinov3-vitb16-pretrain-lvd1689m")
    if not os.path.isdir(pretrained) and arch is None and pretrained in DINOV3_HUB_IDS:
        arch = DINOV3_HUB_IDS[pretrained]
    config = read_hf_config(folder, "DINOv3", "DINOv3ViTModel")
    if config.model_type != "dinov3_vit":
        hint = "; load DINOv2 weights with family='dinov2'" if config.model_type.startswith("dinov2") else ""
        raise ValueError(
            f"pretrained={pretrained!r} holds a {config.model_type!r} model, not a DINOv3 ViT "
            f"(model_type 'dinov3_vit'){hint}"
        )
    if arch is not None:
        diff = _config_mismatch(config, build_dinov3_config(arch, **overrides))
        if diff:
            found = _guess_arch(config.to_dict()) or "unknown"
            raise ValueError(
                f"pretrained={pretrained!r} is a DINOv3 {found!r} but the backbone asks for arch={arch!r}; "
                f"differing fields (checkpoint, requested): {diff}. Pass the matching arch, or arch=None "
                "to take the checkpoint's."
            )
    model = load_hf_model(_model_class(), folder, "DINOv3", overrides)
    logger.info("Loaded DINOv3 weights from %s", pretrained)
    return model


def _infer_official_config(sd: Dict[str, Tensor]) -> dict:
    """DINOv3ViTConfig fields an official state dict determines (the head count only via its RoPE periods)."""
    if "pos_embed" in sd:
        raise ValueError(
            "the .pth file is an official DINOv2 checkpoint (learned position embeddings), not DINOv3; "
            "load it with family='dinov2' (DINOv2Backbone)"
        )
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise ValueError(
            "the .pth file is not an official DINOv3 ViT checkpoint (no cls_token / patch_embed.proj.weight "
            f"/ blocks.0.attn.qkv.weight); first keys: {list(sd)[:8]}"
        )
    dim = sd["cls_token"].shape[-1]
    gated = "blocks.0.mlp.w1.weight" in sd
    has_bias = "blocks.0.attn.qkv.bias" in sd
    mask = sd.get("blocks.0.attn.qkv.bias_mask")
    fields = dict(
        hidden_size=dim,
        num_hidden_layers=official_depth(sd),
        patch_size=sd["patch_embed.proj.weight"].shape[-1],
        use_gated_mlp=gated,
        intermediate_size=sd["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0],
        num_register_tokens=int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
        query_bias=has_bias, value_bias=has_bias,
        key_bias=has_bias and (mask is None or bool(mask[dim:2 * dim].any())),
        proj_bias="blocks.0.attn.proj.bias" in sd,
        mlp_bias=("blocks.0.mlp.w1.bias" if gated else "blocks.0.mlp.fc1.bias") in sd,
    )
    if "rope_embed.periods" in sd:
        fields["num_attention_heads"] = dim // (4 * sd["rope_embed.periods"].numel())
    return fields


def dinov3_official_to_hf_state_dict(sd: Dict[str, Tensor], v5_layout: bool, key_bias: bool) -> Dict[str, Tensor]:
    """Rename an official DINOv3 state dict to the ``DINOv3ViTModel`` layout.

    Args:
        sd: official keys (``blocks.N.attn.qkv.weight`` ...), already unwrapped.
        v5_layout: the transformers >= 5 block path (``model.layer.N``; 4.x: ``layer.N``).
        key_bias: keep the key bias (False: it is masked to zero, Meta's ``mask_k_bias``).

    Returns:
        the renamed dict; ``rope_embed.periods``, ``bias_mask`` and the class-token norms are
        dropped, other unknown keys are kept under their own names (then reported as unexpected).

    Raises:
        ValueError: a ``bias_mask`` that is not 0/1 (an uninitialized Meta model).
    """
    top = {"cls_token": "embeddings.cls_token", "storage_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
           "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj",
             "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.up_proj", "mlp.w3": "mlp.down_proj"}
    layers = "model.layer" if v5_layout else "layer"
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k == "mask_token":
            out["embeddings.mask_token"] = v.reshape(1, 1, -1)
        elif k == "rope_embed.periods" or k.startswith(("cls_norm.", "local_cls_norm.")) or k.endswith(".bias_mask"):
            continue
        elif not (m := re.match(r"blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$", k)):
            out[k] = v
        elif m.group(2) == "attn.qkv":
            prefix, suffix = f"{layers}.{m.group(1)}.attention.", m.group(3)
            if suffix == ".bias":
                mask = sd.get(k + "_mask")
                if mask is not None:
                    if not torch.isin(mask, torch.tensor([0.0, 1.0], dtype=mask.dtype)).all():
                        raise ValueError(f"{k}_mask holds values other than 0 and 1: {mask.unique()[:6].tolist()}")
                    v = v * mask.to(v.dtype)
            for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                if part != "k" or suffix == ".weight" or key_bias:
                    out[f"{prefix}{part}_proj{suffix}"] = chunk
        elif m.group(2) in block:
            out[f"{layers}.{m.group(1)}.{block[m.group(2)]}{m.group(3) or ''}"] = v
        else:
            out[k] = v
    return out


def _resolve_official_config(path: str, found: dict, arch: Optional[str], overrides: dict):
    """The config to load ``found`` (fields read off a checkpoint) into; refuse another architecture."""
    guessed = _guess_arch(found)
    if arch is None:
        if guessed is None:
            raise ValueError(
                f"{path}: a DINOv3 of width {found['hidden_size']}, depth {found['num_hidden_layers']} "
                f"(SwiGLU={found['use_gated_mlp']}) matches no released arch; pass arch=... with "
                "arch_overrides describing it"
            )
        arch = guessed
    bias_fields = ("query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias")
    config = build_dinov3_config(arch, **{**overrides, **{f: found[f] for f in bias_fields}})
    want = {f: getattr(config, f) for f in _ARCH_FIELDS if f in found}
    diff = {f: (found[f], v) for f, v in want.items() if found[f] != v}
    if diff:
        raise ValueError(
            f"{path} is a DINOv3 checkpoint of another architecture ({guessed or 'unknown'!r}) than "
            f"arch={arch!r}; differing (checkpoint, requested): {diff}. Pass the arch that matches the "
            "checkpoint, or arch=None to infer it."
        )
    return arch, config


def load_official_dinov3_checkpoint(path: str, arch: Optional[str], overrides: dict) -> nn.Module:
    """Build a ``DINOv3ViTModel`` and load one of Meta's official DINOv3 ``.pth`` files into it.

    Raises:
        PretrainedWeightsUnavailable: the file does not exist.
        ValueError: the checkpoint is not a DINOv3 ViT, is another architecture than ``arch``, uses
            RoPE periods the config does not give, or lacks weights the model needs.
    """
    sd = read_official_state_dict(path, "DINOv3")
    found = _infer_official_config(sd)
    arch, config = _resolve_official_config(path, found, arch, overrides)
    if "rope_embed.periods" in sd:
        stored = sd["rope_embed.periods"].float()
        expected = rope_periods(config.hidden_size // config.num_attention_heads, config.rope_theta)
        if not torch.allclose(stored, expected, rtol=1e-2, atol=0):
            raise ValueError(
                f"{path}: its RoPE periods {stored[:4].tolist()}... are not base**(4i/head_dim) with "
                f"base={config.rope_theta} (transformers' DINOv3ViTModel has only rope_theta); pass "
                "arch_overrides=dict(rope_theta=...) if the base differs"
            )
    model = _model_class()(config)
    hf_sd = dinov3_official_to_hf_state_dict(sd, v5_layout=hasattr(model, "model"), key_bias=config.key_bias)
    load_converted(model, hf_sd, path, "DINOv3")
    logger.info("Loaded official DINOv3 checkpoint %s (arch=%s)", path, arch)
    return model
