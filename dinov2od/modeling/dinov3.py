"""DINOv3 ViT backbone (``transformers.DINOv3ViTModel``) behind the one backbone interface.

DINOv3 (Meta, 2025) differs from DINOv2 in what the blocks see, not in what they are: 16-px
patches, no learned position embeddings but a 2-D rotary embedding (RoPE) on the queries and keys
of the patch tokens, 4 storage ("register") tokens, LayerScale, no bias on the keys
(Meta's ``mask_k_bias``) and a SwiGLU MLP in the "+" and 7B models. :class:`DINOv3Backbone` runs
the blocks of a ``DINOv3ViTModel`` in :class:`~dinov2od.modeling.backbone.ViTBackbone`'s loop, so
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

Architectures are known in code (:data:`DINOV3_ARCHS`), so constructing never downloads; weights
load only when ``pretrained`` is given (see :mod:`.weights`).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .backbone import ViTBackbone

__all__ = ["DINOV3_ARCHS", "DINOv3Backbone", "build_dinov3_config", "rope_sincos"]

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
        freeze, drop_path_rate, apply_layernorm, window_size, window_blocks: as for
            :class:`~dinov2od.modeling.backbone.DINOv2Backbone`. The LoRA targets keep their
            names: ``query``/``key``/``value``/``output`` are ``q_proj``/``k_proj``/``v_proj``/
            ``o_proj``, ``fc1`` is the MLP's input projection(s) (``up_proj``, and ``gate_proj``
            in SwiGLU models), ``fc2`` its output projection (``down_proj``).
    """

    family, display_name = "dinov3", "DINOv3"

    def __init__(
        self,
        arch: Optional[str] = None,
        arch_overrides: Optional[dict] = None,
        pretrained: Optional[str] = None,
        out_indices: Optional[Sequence[int]] = None,
        num_taps: int = 4,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: Sequence[str] = ("query", "value"),
        lora_blocks: Optional[Sequence[int]] = None,
        freeze: bool = True,
        drop_path_rate: float = 0.0,
        apply_layernorm: bool = True,
        window_size: Optional[int] = None,
        window_blocks: Optional[Sequence[int]] = None,
        rope_train_augment: bool = True,
    ):
        super().__init__()
        from .weights import load_dinov3_vit

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
