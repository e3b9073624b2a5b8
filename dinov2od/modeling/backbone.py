"""ViT backbones (Hugging Face ``transformers``) with LoRA adapters (``peft``).

:class:`ViTBackbone` is the one backbone interface the neck, decoder and detector see; it holds
what every family shares (block loop, masks, taps, windows, LoRA, freezing).
:class:`DINOv2Backbone` is the DINOv2 family, :class:`~dinov2od.modeling.dinov3.DINOv3Backbone`
the DINOv3 one; :func:`build_backbone` picks one by ``family`` (the one config field).

The DINOv2 ViT itself is ``transformers.Dinov2Model`` or ``Dinov2WithRegistersModel``; this
module only runs its blocks in a loop of its own so that it can

* pad any input to a multiple of the patch size and carry a padding mask,
* interpolate the position embeddings to *each image's* valid patch grid,
* mask padded patches as attention keys (so batched == one-by-one results),
* tap the outputs of several blocks (``out_indices``) and stop after the last tap.

It reads the module names of both ``transformers`` 4.x (``attention.attention.query``,
``attention.output.dense``) and 5.x (``attention.q_proj``, ``attention.o_proj``).

Architectures are known in code (:data:`ARCHS`), so constructing never downloads;
weights load only when ``pretrained`` is given (see :mod:`.weights`).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2od.layers.cpu_attention import cpu_attention, cpu_attention_enabled
from dinov2od.layers.fused_linear import fused_linear_enabled, linear
from dinov2od.layers.resize import bicubic_resize_matrix
from dinov2od.modeling.inference import InferenceBlockParts, inference_block_parts

logger = logging.getLogger("dinov2od")

__all__ = ["ARCHS", "BACKBONE_FAMILIES", "DINOv2Backbone", "ViTBackbone", "apply_rope", "build_backbone",
           "build_dinov2_config", "pad_to_multiple", "sincos_pos_embed_2d"]

PATCH_SIZE = 14

# Architecture hyper-parameters of the released DINOv2 ViTs (and a "tiny" preset for CPU
# tests/demos, which has no released weights).
ARCHS: Dict[str, Dict] = {
    "tiny": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=2,
                 image_size=224),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                  use_swiglu_ffn=True),
}
_COMMON = dict(patch_size=PATCH_SIZE, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
               hidden_act="gelu", qkv_bias=True)

# User-facing LoRA target names -> module path inside a block, per transformers layout.
_TARGETS_V4 = {"query": "attention.attention.query", "key": "attention.attention.key",
               "value": "attention.attention.value", "output": "attention.output.dense",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_TARGETS_V5 = {"query": "attention.q_proj", "key": "attention.k_proj",
               "value": "attention.v_proj", "output": "attention.o_proj",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_TARGET_ALIASES = {"q": "query", "q_proj": "query", "k": "key", "k_proj": "key", "v": "value",
                   "v_proj": "value", "o_proj": "output", "dense": "output", "proj": "output"}


def sincos_pos_embed_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """2-D sine-cosine position embeddings of an (h, w) grid -> (h * w, dim), row-major.

    The first half of the channels encodes the column (x), the second the row (y); each half is
    ``sin`` then ``cos`` at ``dim // 4`` geometric frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1).float()


def build_dinov2_config(arch: str = "small", registers: bool = False, **overrides):
    """Build a ``Dinov2Config`` (or ``Dinov2WithRegistersConfig``) without any download.

    Args:
        arch: one of :data:`ARCHS` (``tiny``, ``small``, ``base``, ``large``, ``giant``).
        registers: the "with registers" variant (4 register tokens).
        **overrides: config fields to change, e.g. ``hidden_size``; ``intermediate_size`` is
            accepted and turned into ``mlp_ratio``.
    """
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown DINOv2 arch {arch!r}; choose one of {sorted(ARCHS)}")
    fields = {**_COMMON, **ARCHS[arch], **overrides}
    if "intermediate_size" in fields:
        fields["mlp_ratio"] = fields.pop("intermediate_size") / fields["hidden_size"]
    if float(fields["mlp_ratio"]).is_integer():  # transformers 5 validates mlp_ratio as int
        fields["mlp_ratio"] = int(fields["mlp_ratio"])
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError(
            f"hidden_size={fields['hidden_size']} must be divisible by "
            f"num_attention_heads={fields['num_attention_heads']} (arch={arch!r}, overrides={overrides})"
        )
    if registers:
        fields.setdefault("num_register_tokens", 4)
        return Dinov2WithRegistersConfig(**fields)
    return Dinov2Config(**fields)


def apply_rope(q: Tensor, k: Tensor, sin: Tensor, cos: Tensor) -> Tuple[Tensor, Tensor]:
    """Rotate the last N tokens of queries and keys (rotary position embedding, "rotate half").

    Channel ``c`` of the first half pairs with channel ``c`` of the second half:
    ``x * cos + [-x2, x1] * sin``. The leading (class/register) tokens are left as they are. The
    rotation runs in at least float32 (as Meta's DINOv3 does under mixed precision).

    Args:
        q, k: (B, heads, T, Dh).
        sin, cos: (B, N, Dh) with N <= T.

    Returns:
        q, k rotated, in their own dtype.
    """
    n = sin.shape[1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    sin, cos = sin[:, None].to(dtype), cos[:, None].to(dtype)

    def rotate(x: Tensor) -> Tensor:
        head, tail = x[:, :, :-n], x[:, :, -n:].to(dtype)
        x1, x2 = tail.chunk(2, dim=-1)
        tail = tail * cos + torch.cat([-x2, x1], -1) * sin
        return torch.cat([head, tail.to(x.dtype)], 2)

    return rotate(q), rotate(k)


def pad_to_multiple(images: Tensor, masks: Optional[Tensor], multiple: int) -> Tuple[Tensor, Tensor]:
    """Pad images (bottom/right) to a multiple of ``multiple``; zero every padded pixel.

    Args:
        images: (B, 3, H, W).
        masks: (B, H, W) bool, True at padded pixels, or None (no padding yet).

    Returns:
        images (B, 3, H', W') with zeros wherever the mask is True, and masks (B, H', W').
    """
    b, _, h, w = images.shape
    if masks is None:
        masks = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
    ph, pw = (-h) % multiple, (-w) % multiple
    if torch.jit.is_tracing() or ph or pw:  # traced: the pad amounts are graph values
        images = F.pad(images, (0, pw, 0, ph))
        masks = F.pad(masks, (0, pw, 0, ph), value=True)
    images = images.masked_fill(masks[:, None], 0.0)
    return images, masks


def valid_sizes_from_mask(masks: Tensor) -> Tensor:
    """(B, H, W) bool padding mask -> (B, 2) int64 valid ``(height, width)`` in pixels.

    Raises:
        ValueError: if an image's valid region is empty or not a top-left rectangle.
    """
    valid = ~masks
    heights = valid.any(2).sum(1)
    widths = valid.any(1).sum(1)
    if torch.jit.is_tracing():  # the check below is data-dependent control flow
        return torch.stack([heights, widths], 1)
    ys = torch.arange(masks.shape[1], device=masks.device)
    xs = torch.arange(masks.shape[2], device=masks.device)
    rect = (ys[None, :, None] < heights[:, None, None]) & (xs[None, None, :] < widths[:, None, None])
    bad = ((rect != valid).flatten(1).any(1) | (heights == 0) | (widths == 0)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"masks for image(s) {bad.tolist()} do not describe a non-empty top-left valid region "
            "(masks must be True exactly at the bottom/right padding); pad images at the bottom and "
            "right and set masks[i, h_i:, :] = masks[i, :, w_i:] = True"
        )
    return torch.stack([heights, widths], 1)


class ViTBackbone(nn.Module):
    """The one backbone interface: a ViT run block by block, tapped, masked and LoRA-adapted.

    Every family (:class:`DINOv2Backbone`, :class:`~dinov2od.modeling.dinov3.DINOv3Backbone`) gives
    the neck, decoder, detector and Detectron2 layer the same attributes and call:
    ``embed_dim``, ``num_taps``, ``patch_size``, ``out_indices``, ``family`` (``"dinov2"``,
    ``"dinov3"``) and ``forward(images, masks) -> (features, patch_mask)``. This class holds what the families
    share: the block loop (padding masks as attention keys, taps, stop after the last tap,
    windowed attention), peft LoRA injection, freezing and parameter logging. A family holds
    its ViT (a transformers model) in ``self.vit``, calls :meth:`_finish_init` (which reads
    ``patch_size``, ``embed_dim``, ``num_heads`` and ``num_register_tokens`` from its config), and
    implements:

    * ``_layers`` (the blocks) and ``_final_norm`` (the norm applied to taps);
    * ``_embed(images, patch_valid_hw)`` -> (B, 1 + R + Hp*Wp, D) tokens;
    * ``_attention_parts(attention)`` -> its q/k/v/output projections and dropout;
    * ``_lora_layout()`` -> block sub-module path(s) per LoRA target name;
    * optionally ``_rope(patch_valid_hw, hp, wp)`` -> per-image rotary ``(sin, cos)``.
    """

    family = "vit"  # the family key of build_backbone
    display_name = "ViT"  # the name used in log messages

    def _finish_init(self, *, out_indices, num_taps, apply_layernorm, window_size, window_blocks,
                     lora_targets, lora_rank, lora_alpha, lora_dropout, lora_blocks, freeze) -> None:
        """Sizes (from ``self.vit.config``), taps, windows, LoRA and trainability."""
        cfg = self.vit.config
        self.patch_size = int(cfg.patch_size)
        self.embed_dim = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_register_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)
        depth = len(self._layers)
        self.out_indices = self._resolve_out_indices(out_indices, num_taps, depth)
        self.apply_layernorm = apply_layernorm
        self.window_size, self.window_blocks = self._resolve_windows(window_size, window_blocks, depth)
        self.lora_targets = tuple(_canonical_target(t) for t in lora_targets)
        if lora_rank > 0:
            self._inject_lora(lora_rank, lora_alpha, lora_dropout, lora_blocks, depth)
        self._set_trainable(freeze)
        self._log_parameter_counts()

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _resolve_out_indices(out_indices, num_taps: int, depth: int) -> Tuple[int, ...]:
        if out_indices is None:
            if not 1 <= num_taps <= depth:
                raise ValueError(f"num_taps={num_taps} must be in [1, {depth}] (the ViT has {depth} blocks)")
            return tuple((i + 1) * depth // num_taps - 1 for i in range(num_taps))
        idx = tuple(int(i) for i in out_indices)
        if not idx or any(not 0 <= i < depth for i in idx) or list(idx) != sorted(set(idx)):
            raise ValueError(
                f"out_indices={list(out_indices)} must be distinct increasing 0-based block "
                f"indices in [0, {depth - 1}]"
            )
        return idx

    def _resolve_windows(self, window_size, window_blocks, depth: int) -> Tuple[Optional[int], Tuple[int, ...]]:
        if window_size is None:
            if window_blocks:
                raise ValueError("window_blocks needs window_size (patches per window side)")
            return None, ()
        if int(window_size) < 1:
            raise ValueError(f"window_size={window_size} must be >= 1 patch")
        if window_blocks is None:
            blocks = tuple(i for i in range(depth) if i not in self.out_indices)
        else:
            blocks = tuple(int(i) for i in window_blocks)
            if any(not 0 <= i < depth for i in blocks):
                raise ValueError(f"window_blocks={list(window_blocks)} must be block indices in [0, {depth - 1}]")
        return int(window_size), blocks

    def _layers_path(self) -> str:
        """Module path of the block list inside ``self.vit`` (``encoder.layer``, ``model.layer`` ...)."""
        return next(name for name, m in self.vit.named_modules() if m is self._layers)

    def _inject_lora(self, rank, alpha, dropout, blocks, depth) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        layout = self._lora_layout()
        blocks = list(range(depth)) if blocks is None else [int(b) for b in blocks]
        if any(not 0 <= b < depth for b in blocks):
            raise ValueError(f"lora_blocks={blocks} must be 0-based block indices in [0, {depth - 1}]")
        paths = [p for t in self.lora_targets for p in layout[t]]
        regex = r"%s\.(%s)\.(%s)" % (
            self._layers_path().replace(".", r"\."),
            "|".join(str(b) for b in blocks),
            "|".join(p.replace(".", r"\.") for p in paths),
        )
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=regex)
        inject_adapter_in_model(config, self.vit)
        self.lora_config = dict(rank=rank, alpha=alpha, dropout=dropout, targets=self.lora_targets,
                                blocks=blocks)

    def _set_trainable(self, freeze: bool) -> None:
        for name, p in self.vit.named_parameters():
            p.requires_grad_(not freeze or "lora_" in name)
        # Parameters that forward never reads stay frozen, so every trainable parameter gets a
        # gradient (DDP without find_unused_parameters): the mask token, the blocks after the
        # last tap (never run), and the final norm when it is not applied.
        unused = [p for p in (getattr(self.vit.embeddings, "mask_token", None),) if isinstance(p, nn.Parameter)]
        unused += [p for layer in self._layers[self.out_indices[-1] + 1:] for p in layer.parameters()]
        if not self.apply_layernorm:
            unused += list(self._final_norm.parameters())
        for p in unused:
            p.requires_grad_(False)
        if self.out_indices[-1] + 1 < len(self._layers):
            logger.info("%s backbone: blocks %d-%d come after the last tap and are not run",
                        self.display_name, self.out_indices[-1] + 1, len(self._layers) - 1)

    def _log_parameter_counts(self) -> None:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info(
            "%s backbone: %s parameters, %s trainable (%.2f%%)",
            self.display_name, f"{total:,}", f"{trainable:,}", 100.0 * trainable / max(total, 1),
        )

    # ------------------------------------------------------------------ forward pieces
    @property
    def num_taps(self) -> int:
        return len(self.out_indices)

    def _rope(self, patch_valid_hw: Tensor, hp: int, wp: int) -> Optional[Tuple[Tensor, Tensor]]:
        """Rotary ``(sin, cos)`` per patch, each (B, Hp*Wp, head_dim); None: the family has no RoPE."""
        return None

    def _attention(self, layer: nn.Module, x: Tensor, key_valid: Optional[Tensor],
                   rope: Optional[Tuple[Tensor, Tensor]] = None, windows=None) -> Tensor:
        """Multi-head self-attention of one block with padded keys masked.

        Args:
            x: (B, T, D) normed tokens; key_valid: (B, T) bool, or None when no key is padded
                (then the unmasked, fused attention kernel runs).
            rope: rotary ``(sin, cos)``, each (B, N, head_dim), for the last N (patch) tokens.
            windows: None (global attention), or ``(hp, wp, patch_valid)``: attend within windows
                (see :meth:`_window_attention`; each patch keeps its rotary position in the image).
        """
        att = layer.attention
        q_proj, k_proj, v_proj, o_proj, p_drop = self._attention_parts(att)
        b, t, _ = x.shape
        heads = self.num_heads
        q, k, v = (proj(x).view(b, t, heads, -1).transpose(1, 2) for proj in (q_proj, k_proj, v_proj))
        out = o_proj(self._attend(q, k, v, key_valid, rope, windows, p_drop if self.training else 0.0))
        if hasattr(att, "output"):
            out = att.output.dropout(out)
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor],
                rope: Optional[Tuple[Tensor, Tensor]], windows, p_drop: float) -> Tensor:
        """(B, heads, T, Dh) queries, keys, values -> (B, T, heads * Dh) attended values."""
        b, _, t, _ = q.shape
        if rope is not None:
            q, k = apply_rope(q, k, *rope)
        if windows is None:
            mask = None if key_valid is None else key_valid[:, None, None, :]
            out = _sdpa(q, k, v, mask, p_drop)
        elif self.window_copies == "once" and not torch.jit.is_tracing():
            return self._window_attention_tokens_first(q, k, v, *windows, p_drop).view(b, t, -1)
        else:
            out = self._window_attention(q, k, v, *windows, p_drop)
        return out.transpose(1, 2).reshape(b, t, -1)

    def _window_mask(self, q: Tensor, patch_valid: Optional[Tensor], hp: int, wp: int, num_prefix: int,
                     ragged: bool) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The key mask of the windows, (B * n, 1, 1, P + ws*ws) (prefix tokens always valid), and
        each window's valid patches, (B * n, ws*ws); both None when every slot holds a valid patch
        (not ``ragged``, nothing padded)."""
        if not ragged and patch_valid is None:
            return None, None
        ws, b = self.window_size, q.shape[0]
        ph, pw = (-hp) % ws, (-wp) % ws
        nh, nw = (hp + ph) // ws, (wp + pw) // ws
        valid = patch_valid if patch_valid is not None else q.new_ones(b, hp, wp, dtype=torch.bool)
        valid = F.pad(valid, (0, pw, 0, ph), value=False)
        win_valid = valid.view(b, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(b * nh * nw, ws * ws)
        mask = torch.cat([win_valid.new_ones(b * nh * nw, num_prefix), win_valid], 1)[:, None, None, :]
        return mask, win_valid

    # "once": the windowed attention moves every activation once on the way into the windows and
    # once on the way out (:meth:`_window_attention_tokens_first`); "cat": the first formulation
    # (reshape + cat each way, then a transpose: twice the copies), kept for tracing and as the
    # reference the tests hold the other to.
    window_copies = "once"

    def _window_attention_tokens_first(self, q: Tensor, k: Tensor, v: Tensor, hp, wp,
                                       patch_valid: Optional[Tensor], p_drop: float) -> Tensor:
        """:meth:`_window_attention` (same function) with fewer copies: each of q, k, v is written
        once into its windows (prefix tokens and patches in one buffer instead of a reshape and
        a cat), and the windows' outputs once into a (B, T, heads, Dh) buffer, which is already
        the layout of the output projection's input (no transpose copy after).

        Returns:
            (B, P + Hp*Wp, heads, Dh)
        """
        ws = self.window_size
        b, heads, t, dh = q.shape
        num_prefix = t - hp * wp
        ph, pw = (-hp) % ws, (-wp) % ws
        nh, nw = (hp + ph) // ws, (wp + pw) // ws
        n, span = nh * nw, num_prefix + ws * ws

        def windows(z: Tensor) -> Tensor:  # (B, heads, P + Hp*Wp, Dh) -> (B * n, heads, P + ws*ws, Dh)
            grid = z[:, :, num_prefix:].unflatten(2, (hp, wp))
            if ph or pw:
                grid = F.pad(grid, (0, 0, 0, pw, 0, ph))
            grid = grid.unflatten(3, (nw, ws)).unflatten(2, (nh, ws)).permute(0, 2, 4, 1, 3, 5, 6)
            out = z.new_empty(b, nh, nw, heads, span, dh)
            out[..., :num_prefix, :] = z[:, None, None, :, :num_prefix]
            out[..., num_prefix:, :].unflatten(-2, (ws, ws)).copy_(grid)
            return out.view(b * n, heads, span, dh)

        mask, win_valid = self._window_mask(q, patch_valid, hp, wp, num_prefix, bool(ph or pw))
        out = _sdpa(windows(q), windows(k), windows(v), mask, p_drop).unflatten(0, (b, nh, nw))
        result = out.new_empty(b, t, heads, dh)
        prefix = _window_prefix_mean(out[..., :num_prefix, :].reshape(b, n, heads, num_prefix, dh), win_valid)
        result[:, :num_prefix] = prefix.transpose(1, 2)
        grid = out[..., num_prefix:, :].unflatten(-2, (ws, ws)).permute(0, 1, 4, 2, 5, 3, 6)  # (B, nh, ws, nw, ws, heads, Dh)
        if ph or pw:
            grid = grid.reshape(b, nh * ws, nw * ws, heads, dh)[:, :hp, :wp]
            result[:, num_prefix:].unflatten(1, (hp, wp)).copy_(grid)
        else:
            result[:, num_prefix:].unflatten(1, (nh, ws, nw, ws)).copy_(grid)
        return result

    def _window_attention(self, q: Tensor, k: Tensor, v: Tensor, hp, wp, patch_valid: Optional[Tensor],
                          p_drop: float) -> Tensor:
        """Attention inside non-overlapping ``window_size`` x ``window_size`` windows of patches.

        Windows are anchored at the top-left patch (padding never moves one); a grid that is not a
        multiple of the window is padded for the attention only (masked keys). The prefix (class
        and register) tokens attend and are attended to in every window; their output is the mean
        over the windows that hold at least one image patch. Only the attention is windowed: the
        projections, norms and MLP run on the tokens as they are, so padded window slots cost
        nothing there.

        Args:
            q, k, v: (B, heads, P + Hp*Wp, Dh); patch_valid: (B, Hp, Wp) bool or None (all valid).

        Returns:
            (B, heads, P + Hp*Wp, Dh)
        """
        ws = self.window_size
        b, heads, t, dh = q.shape
        num_prefix = t - hp * wp
        ph, pw = (-hp) % ws, (-wp) % ws
        ragged = torch.jit.is_tracing() or bool(ph) or bool(pw)  # windows reach past the grid
        nh, nw = (hp + ph) // ws, (wp + pw) // ws
        n = nh * nw

        def windows(z: Tensor) -> Tensor:  # (B, heads, P + Hp*Wp, Dh) -> (B * n, heads, P + ws*ws, Dh)
            grid = z[:, :, num_prefix:].reshape(b, heads, hp, wp, dh)
            if ragged:
                grid = F.pad(grid, (0, 0, 0, pw, 0, ph))
            grid = grid.view(b, heads, nh, ws, nw, ws, dh).permute(0, 2, 4, 1, 3, 5, 6)
            grid = grid.reshape(b * n, heads, ws * ws, dh)
            prefix = z[:, None, :, :num_prefix].expand(b, n, heads, num_prefix, dh)
            return torch.cat([prefix.reshape(b * n, heads, num_prefix, dh), grid], 2)

        mask, win_valid = self._window_mask(q, patch_valid, hp, wp, num_prefix, ragged)
        out = _sdpa(windows(q), windows(k), windows(v), mask, p_drop)
        prefix = _window_prefix_mean(out[:, :, :num_prefix].reshape(b, n, heads, num_prefix, dh), win_valid)
        grid = out[:, :, num_prefix:].reshape(b, nh, nw, heads, ws, ws, dh).permute(0, 3, 1, 4, 2, 5, 6)
        grid = grid.reshape(b, heads, nh * ws, nw * ws, dh)
        if ragged:
            grid = grid[:, :, :hp, :wp]
        return torch.cat([prefix, grid.reshape(b, heads, hp * wp, dh)], 2)

    def _block(self, layer: nn.Module, x: Tensor, key_valid: Optional[Tensor],
               rope: Optional[Tuple[Tensor, Tensor]] = None, windows=None) -> Tensor:
        """One pre-norm ViT block: x + ls1 * attn(norm1 x); x + ls2 * mlp(norm2 x)."""
        if not self.training and not torch.is_grad_enabled() and fused_linear_enabled(x):
            parts = inference_block_parts(layer, self._attention_parts(layer.attention))
            if parts is not None:
                return self._block_inference(layer, parts, x, key_valid, rope, windows)
        x = x + layer.drop_path(layer.layer_scale1(self._attention(layer, layer.norm1(x), key_valid, rope, windows)))
        return x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))

    def _block_inference(self, layer: nn.Module, parts: "InferenceBlockParts", x: Tensor,
                         key_valid: Optional[Tensor], rope: Optional[Tuple[Tensor, Tensor]], windows) -> Tensor:
        """:meth:`_block` at CPU fp32 inference, same function: one fused q/k/v product with the
        LoRA deltas merged, oneDNN linears with bias (and GELU) fused, ``addcmul`` residuals."""
        b, t, _ = x.shape
        qkv = linear(layer.norm1(x), parts.qkv_weight, parts.qkv_bias).view(b, t, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, Dh)
        out = linear(self._attend(q, k, v, key_valid, rope, windows, 0.0), *parts.out)
        x = torch.addcmul(x, parts.scale1, out) if parts.scale1 is not None else x + layer.layer_scale1(out)
        if parts.mlp is None:
            out = layer.mlp(layer.norm2(x))
        else:
            (w1, b1), act, (w2, b2) = parts.mlp
            out = linear(layer.norm2(x), w1, b1, "gelu" if act == "gelu" else None)
            out = linear(out if act == "gelu" else act(out), w2, b2)
        return torch.addcmul(x, parts.scale2, out) if parts.scale2 is not None else x + layer.layer_scale2(out)

    def forward(self, images: Tensor, masks: Optional[Tensor] = None) -> Tuple[List[Tensor], Tensor]:
        """
        Args:
            images: (B, 3, H, W) ImageNet-normalized RGB, any H, W.
            masks: (B, H, W) bool, True at padded pixels; None = no padding.

        Returns:
            features: one (B, D, Hp, Wp) map per tap (Hp = ceil(H / 14)), zero at padded patches.
            patch_mask: (B, Hp, Wp) bool, True at patches that hold no valid pixel.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}")
        if masks is None and not torch.jit.is_tracing():  # zero-pad to whole patches, every patch valid
            p = self.patch_size
            images = F.pad(images, (0, (-images.shape[-1]) % p, 0, (-images.shape[-2]) % p))
            valid_hw = None
        else:
            images, masks = pad_to_multiple(images, masks, self.patch_size)
            valid_hw = valid_sizes_from_mask(masks)
        features, patch_mask = self.forward_padded(images, valid_hw)
        if patch_mask is None:
            b, _, hp, wp = features[0].shape
            patch_mask = torch.zeros(b, hp, wp, dtype=torch.bool, device=images.device)
        return features, patch_mask

    def forward_padded(self, images: Tensor, valid_hw: Optional[Tensor] = None) -> Tuple[List[Tensor], Optional[Tensor]]:
        """The backbone on a batch padded already: the detector pads once and calls this.

        Args:
            images: (B, 3, H, W) ImageNet-normalized RGB, H and W multiples of the patch size,
                zero at padded pixels.
            valid_hw: (B, 2) valid ``(height, width)`` of each image in pixels, or None when
                every image fills the batch up to its last (partial) patch: then no attention
                mask is built and the unmasked attention kernel runs.

        Returns:
            features: one (B, D, Hp, Wp) map per tap, zero at padded patches.
            patch_mask: (B, Hp, Wp) bool, True at patches that hold no valid pixel; None when
                ``valid_hw`` is None.
        """
        p = self.patch_size
        b, _, h, w = images.shape
        hp, wp = h // p, w // p
        patch_valid_hw = patch_valid = key_valid = None
        num_prefix = 1 + self.num_register_tokens
        if valid_hw is not None:
            patch_valid_hw = (valid_hw + p - 1) // p  # ceil
            full = patch_valid_hw.new_tensor([hp, wp]) if not torch.jit.is_tracing() else None
            if full is not None and bool((patch_valid_hw == full).all()):
                patch_valid_hw = None  # padding only inside the last patches: no patch is masked
        if patch_valid_hw is not None:
            ys = torch.arange(hp, device=images.device)
            xs = torch.arange(wp, device=images.device)
            patch_valid = (ys[None, :, None] < patch_valid_hw[:, 0, None, None]) & (
                xs[None, None, :] < patch_valid_hw[:, 1, None, None]
            )  # (B, Hp, Wp)
            key_valid = torch.cat([patch_valid.new_ones(b, num_prefix), patch_valid.flatten(1)], 1)

        x = self._embed(images, patch_valid_hw)
        grid_hw = patch_valid_hw if patch_valid_hw is not None else \
            torch.tensor([[hp, wp]], device=images.device).expand(b, 2)
        rope = self._rope(grid_hw, hp, wp)
        features = []
        for i, layer in enumerate(self._layers[: self.out_indices[-1] + 1]):
            windows = (hp, wp, patch_valid) if i in self.window_blocks else None
            x = self._block(layer, x, key_valid, rope, windows)
            if i in self.out_indices:
                f = self._final_norm(x) if self.apply_layernorm else x
                f = f[:, num_prefix:].reshape(b, hp, wp, -1).permute(0, 3, 1, 2)
                features.append(f if patch_valid is None else f * patch_valid[:, None].to(f.dtype))
        return features, (None if patch_valid is None else ~patch_valid)


class DINOv2Backbone(ViTBackbone):
    """DINOv2 ViT with LoRA adapters, returning feature maps tapped from several blocks.

    Args:
        arch: ``"tiny"``, ``"small"``, ``"base"``, ``"large"`` or ``"giant"``; None infers it
            from ``pretrained`` (and defaults to ``"small"`` without it).
        registers: use the "with registers" ViT (``Dinov2WithRegistersModel``).
        arch_overrides: config fields replacing the arch's, e.g. ``dict(hidden_size=48,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)``.
        pretrained: None (random init), a Hugging Face id (``"facebook/dinov2-base"``), a local
            ``save_pretrained`` folder, or an official DINOv2 ``.pth`` checkpoint.
        out_indices: 0-based indices of the blocks whose outputs are tapped; None taps
            ``num_taps`` evenly spaced blocks ending with the last one.
        num_taps: number of taps when ``out_indices`` is None.
        lora_rank: LoRA rank r; 0 disables LoRA.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_targets: block sub-modules that get adapters, among ``query``, ``key``, ``value``,
            ``output``, ``fc1``, ``fc2``.
        lora_blocks: 0-based blocks that get adapters; None = all blocks.
        freeze: freeze the ViT's own weights (LoRA adapters stay trainable). ``False``
            fine-tunes everything (e.g. a random-init ViT).
        drop_path_rate: stochastic depth of the ViT.
        apply_layernorm: apply the ViT's final LayerNorm to each tapped output.
        window_size: if set, ``window_blocks`` attend within non-overlapping windows of
            ``window_size`` x ``window_size`` patches (anchored at the top-left, so padding
            never moves a window) instead of globally; the class/register tokens are copied into
            every window and averaged afterwards over the windows that hold image patches.
        window_blocks: 0-based windowed blocks; None = every block that is not tapped.
        pos_embed_init: how a *random-init* ViT's position embeddings start: ``"sincos"``
            (fixed-frequency 2-D sine-cosine values, as MAE/ViTDet, still trained), which gives a
            from-scratch ViT a usable notion of where each patch is from the first step, or
            ``"random"`` (transformers' truncated normal). Ignored when weights are loaded.
        pos_interpolation: how the position embeddings are resized to a patch grid other than
            the stored one. ``"meta"`` (default) reproduces Meta's ``dinov2`` code, which the
            released weights were trained with: the models without registers interpolate with
            ``scale_factor=((h + 0.1) / M, (w + 0.1) / M)`` (``interpolate_offset=0.1``, bicubic,
            no antialias), the register models with ``size=(h, w)`` and antialias.
            ``"transformers"`` reproduces ``transformers``' ``Dinov2Model``, which uses
            ``size=(h, w)`` for both (antialias for the register models only); the two agree for
            the register models and whenever the grid is the stored ``M x M``.
    """

    family, display_name = "dinov2", "DINOv2"

    def __init__(
        self,
        arch: Optional[str] = None,
        registers: bool = False,
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
        pos_embed_init: str = "sincos",
        pos_interpolation: str = "meta",
    ):
        super().__init__()
        from .weights import is_random_init, load_vit

        if pos_embed_init not in ("sincos", "random"):
            raise ValueError(f"pos_embed_init={pos_embed_init!r} must be 'sincos' or 'random'")
        if pos_interpolation not in ("meta", "transformers"):
            raise ValueError(f"pos_interpolation={pos_interpolation!r} must be 'meta' or 'transformers'")
        self.pos_interpolation = pos_interpolation
        overrides = dict(arch_overrides or {})
        if drop_path_rate:
            overrides["drop_path_rate"] = drop_path_rate
        self.vit = load_vit(arch, registers, overrides, pretrained)
        if pos_embed_init == "sincos" and is_random_init(pretrained):
            with torch.no_grad():
                pe = self.vit.embeddings.position_embeddings  # (1, 1 + N, D)
                n = int(math.isqrt(pe.shape[1] - 1))
                pe[0, 0].zero_()
                pe[0, 1:].copy_(sincos_pos_embed_2d(n, n, pe.shape[-1]).to(pe.dtype))
        self._finish_init(
            out_indices=out_indices, num_taps=num_taps, apply_layernorm=apply_layernorm,
            window_size=window_size, window_blocks=window_blocks, lora_targets=lora_targets,
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_blocks=lora_blocks,
            freeze=freeze)

    @property
    def _layers(self) -> nn.ModuleList:
        return self.vit.encoder.layer

    @property
    def _final_norm(self) -> nn.Module:
        return self.vit.layernorm

    def _lora_layout(self) -> Dict[str, Tuple[str, ...]]:
        layout = _TARGETS_V5 if hasattr(self._layers[0].attention, "q_proj") else _TARGETS_V4
        if "fc1" in self.lora_targets or "fc2" in self.lora_targets:
            if not hasattr(self._layers[0].mlp, "fc1"):
                raise ValueError("lora_targets fc1/fc2 need the plain MLP; the giant arch uses SwiGLU")
        return {k: (v,) for k, v in layout.items()}

    @staticmethod
    def _attention_parts(att: nn.Module):
        """(q, k, v, output) projections and attention dropout of a block, in either layout."""
        if hasattr(att, "q_proj"):  # transformers >= 5
            return att.q_proj, att.k_proj, att.v_proj, att.o_proj, att.attention_dropout
        sa = att.attention  # transformers 4.x
        p_drop = sa.dropout_prob if hasattr(sa, "dropout_prob") else sa.dropout.p
        return sa.query, sa.key, sa.value, att.output.dense, p_drop

    # ------------------------------------------------------------------ forward pieces
    def _pos_embed_grid(self, h: int, w: int, dtype) -> Tensor:
        """Position embeddings of the patches interpolated to an (h, w) grid -> (h, w, D).

        Follows Meta's ``DinoVisionTransformer.interpolate_pos_encoding`` (or transformers', see
        ``pos_interpolation``): bicubic in float32, no resize when the grid is the stored one.
        """
        pos = self.vit.embeddings.position_embeddings[0, 1:]  # (M * M, D)
        m = int(math.isqrt(pos.shape[0]))
        grid = pos.reshape(m, m, -1)
        if (h, w) == (m, m):
            return grid.to(dtype)
        registers = self.num_register_tokens > 0
        if registers or self.pos_interpolation == "transformers":
            resize = dict(size=(h, w))
        else:  # Meta's interpolate_offset=0.1: the scale, not only the size, sets the sampling grid
            resize = dict(scale_factor=((h + 0.1) / m, (w + 0.1) / m))
        grid = F.interpolate(grid.permute(2, 0, 1)[None].float(), mode="bicubic", align_corners=False,
                             antialias=registers, **resize)
        if grid.shape[-2:] != (h, w):  # pragma: no cover - floor((h + 0.1) / m * m) is h
            raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
        return grid[0].permute(1, 2, 0).to(dtype)

    def _pos_embed_traced(self, patch_valid_hw: Tensor, hp, wp, dtype) -> Tensor:
        """:meth:`_pos_embed_grid` of each image's valid grid, zero-padded to (Hp, Wp), as matrix
        products whose sizes are graph values (for tracing/ONNX; see :mod:`dinov2od.layers.resize`).

        Returns:
            (B, Hp, Wp, D).
        """
        pos = self.vit.embeddings.position_embeddings[0, 1:]  # (M * M, D)
        m = int(math.isqrt(pos.shape[0]))
        sizes = patch_valid_hw.to(torch.float64)  # (B, 2)
        registers = self.num_register_tokens > 0
        if registers or self.pos_interpolation == "transformers":
            scales = m / sizes
        else:  # Meta: scale_factor (h + 0.1) / M, except that the stored M x M grid is kept as is
            stored = (patch_valid_hw == m).all(1, keepdim=True)
            scales = torch.where(stored, torch.ones_like(sizes), m / (sizes + 0.1))
        a_h = bicubic_resize_matrix(patch_valid_hw[:, 0], hp, m, scales[:, 0], antialias=registers)  # (B, Hp, M)
        a_w = bicubic_resize_matrix(patch_valid_hw[:, 1], wp, m, scales[:, 1], antialias=registers)  # (B, Wp, M)
        grid = pos.reshape(m, m, -1).to(torch.float64)
        out = torch.einsum("bim,mnd->bind", a_h, grid)
        return torch.einsum("bind,bjn->bijd", out, a_w).to(dtype)

    def _embed(self, images: Tensor, patch_valid_hw: Optional[Tensor]) -> Tensor:
        """(B, 3, H, W) padded images -> (B, 1 + R + Hp*Wp, D) tokens with position embeddings.

        Args:
            patch_valid_hw: (B, 2) valid patch grid of each image, or None: every image fills it.
        """
        emb = self.vit.embeddings
        x = emb.patch_embeddings.projection(images)  # (B, D, Hp, Wp)
        b, d, hp, wp = x.shape
        x = x.permute(0, 2, 3, 1)  # (B, Hp, Wp, D)
        if torch.jit.is_tracing():  # sizes are graph values: resize with matrix products
            if patch_valid_hw is None:
                patch_valid_hw = torch.stack([torch.as_tensor(hp), torch.as_tensor(wp)])[None].expand(b, 2)
            pos = self._pos_embed_traced(patch_valid_hw, hp, wp, x.dtype)
        elif patch_valid_hw is None:  # one grid for the whole batch
            pos = self._pos_embed_grid(hp, wp, x.dtype)
        else:  # one interpolation per distinct valid grid, zero-padded to (Hp, Wp), gathered per image
            sizes, inverse = torch.unique(patch_valid_hw, dim=0, return_inverse=True)
            grids = [F.pad(self._pos_embed_grid(h, w, x.dtype), (0, 0, 0, wp - w, 0, hp - h))
                     for h, w in sizes.tolist()]
            pos = torch.stack(grids)[inverse]
        x = (x + pos).flatten(1, 2)  # (B, Hp*Wp, D)
        cls = (emb.cls_token + emb.position_embeddings[:, :1]).to(x.dtype).expand(b, -1, -1)
        tokens = [cls]
        if self.num_register_tokens:
            tokens.append(emb.register_tokens.to(x.dtype).expand(b, -1, -1))
        return emb.dropout(torch.cat(tokens + [x], 1))

_FAMILY_ONLY_KWARGS = {
    "dinov2": dict(registers=False, pos_embed_init="sincos", pos_interpolation="meta"),
    "dinov3": dict(rope_train_augment=True),
}
BACKBONE_FAMILIES = tuple(_FAMILY_ONLY_KWARGS)


def build_backbone(family: str = "dinov2", **kwargs) -> ViTBackbone:
    """The backbone of a family: ``"dinov2"`` (:class:`DINOv2Backbone`) or ``"dinov3"`` (``DINOv3Backbone``).

    Args:
        family: ``"dinov2"`` or ``"dinov3"`` (case-insensitive).
        **kwargs: the family's keyword arguments. Those of the *other* family (``registers``,
            ``pos_embed_init``, ``pos_interpolation`` for DINOv2; ``rope_train_augment`` for
            DINOv3) are dropped when they hold their defaults and refused otherwise.
    """
    name = str(family).lower()
    if name not in _FAMILY_ONLY_KWARGS:
        raise ValueError(f"backbone family={family!r} is unknown; choose one of {list(BACKBONE_FAMILIES)}")
    for other, defaults in _FAMILY_ONLY_KWARGS.items():
        if other == name:
            continue
        for key, default in defaults.items():
            if key in kwargs and kwargs.pop(key) != default:
                raise ValueError(
                    f"backbone option {key}= applies to family='{other}' only, not family='{name}'; "
                    f"remove it (or leave it at {default!r})"
                )
    if name == "dinov3":
        from .dinov3 import DINOv3Backbone

        return DINOv3Backbone(**kwargs)
    return DINOv2Backbone(**kwargs)


def _window_prefix_mean(prefix: Tensor, win_valid: Optional[Tensor]) -> Tensor:
    """(B, n, heads, P, Dh) prefix-token outputs of the n windows -> (B, heads, P, Dh): their mean
    over the windows that hold at least one image patch (all of them when ``win_valid`` is None)."""
    if win_valid is None:
        return prefix.mean(1)
    b, n = prefix.shape[:2]
    used = win_valid.view(b, n, -1).any(-1).to(prefix.dtype)[:, :, None, None, None]  # (B, n, 1, 1, 1)
    return (prefix * used).sum(1) / used.sum(1).clamp(min=1)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], p_drop: float) -> Tensor:
    """``F.scaled_dot_product_attention``; on the CPU, 16-bit inputs are attended in float32: torch's
    CPU attention kernel is several times slower in bfloat16 than in float32 (measured with torch 2.3
    on a CPU with avx512_bf16, where bf16 matrix products are twice as fast as fp32 ones). At CPU fp32
    inference with AVX-512, the kernel of :mod:`dinov2od.layers.cpu_attention` (1.3x faster; its
    result is a (B, H, T, Dh) view of a (B, T, H, Dh) tensor, the output projection's layout)."""
    if cpu_attention_enabled(q, k, v, mask, p_drop):
        return cpu_attention(q, k, v).transpose(1, 2)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  dropout_p=p_drop).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)


def _canonical_target(name: str) -> str:
    key = _TARGET_ALIASES.get(name, name)
    if key not in _TARGETS_V4:
        raise ValueError(
            f"unknown LoRA target {name!r}; choose among {sorted(_TARGETS_V4)} (or q_proj/k_proj/v_proj/o_proj)"
        )
    return key
