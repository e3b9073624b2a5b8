"""The generic ViT backbone: the one interface every family implements, and what they share.

:class:`ViTBackbone` is the backbone the neck, decoder and detector see. It runs a family's
transformers ViT block by block, in a loop of its own, so that it can

* pad any input to a multiple of the patch size and carry a padding mask,
* mask padded patches as attention keys (so batched == one-by-one results),
* attend within windows in chosen blocks (two formulations of the same function),
* apply a family's rotary position embedding (:func:`apply_rope`),
* tap the outputs of several blocks (``out_indices``) and stop after the last tap,

and it injects peft LoRA adapters, freezes and logs. The families (:mod:`.dinov2`, :mod:`.dinov3`)
supply the ViT, its embeddings and its module names; :mod:`.registry` builds one by name. The fused
CPU inference block reads its parts from :mod:`dinov2od.modeling.inference`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2od.layers.kernels import attention, block_kernel, linear
from dinov2od.modeling.inference import InferenceBlockParts, block_parts

from .options import BackboneOptions

logger = logging.getLogger("dinov2od")

__all__ = ["LORA_TARGETS", "SHARED_OPTIONS", "ViTBackbone", "apply_rope", "pad_to_multiple", "valid_sizes_from_mask"]

# User-facing LoRA target names (each family maps them to module paths inside its blocks) and aliases.
LORA_TARGETS = ("query", "key", "value", "output", "fc1", "fc2")
_TARGET_ALIASES = {"q": "query", "q_proj": "query", "k": "key", "k_proj": "key", "v": "value",
                   "v_proj": "value", "o_proj": "output", "dense": "output", "proj": "output"}

# The keyword options every family's constructor takes (each family adds its own, with defaults):
# the fields of BackboneOptions, where their defaults are declared.
SHARED_OPTIONS = tuple(f.name for f in dataclasses.fields(BackboneOptions))

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

    Every family (:class:`~dinov2od.modeling.backbones.dinov2.DINOv2Backbone`,
    :class:`~dinov2od.modeling.backbones.dinov3.DINOv3Backbone`, or one of your own) gives
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

    A family is registered with :func:`~dinov2od.modeling.backbones.registry.register_backbone`;
    its constructor takes :data:`SHARED_OPTIONS` plus options of its own, each with a default.
    """

    family = "vit"  # the family key of build_backbone (set by register_backbone)
    display_name = "ViT"  # the name used in log messages
    archs: Dict[str, dict] = {}  # the family's architecture table: arch name -> config fields
    default_patch_size: Optional[int] = None  # the patch size of its released ViTs (a config may change it)

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
            out = attention(q, k, v, mask, p_drop)
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
        out = attention(windows(q), windows(k), windows(v), mask, p_drop).unflatten(0, (b, nh, nw))
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
        out = attention(windows(q), windows(k), windows(v), mask, p_drop)
        prefix = _window_prefix_mean(out[:, :, :num_prefix].reshape(b, n, heads, num_prefix, dh), win_valid)
        grid = out[:, :, num_prefix:].reshape(b, nh, nw, heads, ws, ws, dh).permute(0, 3, 1, 4, 2, 5, 6)
        grid = grid.reshape(b, heads, nh * ws, nw * ws, dh)
        if ragged:
            grid = grid[:, :, :hp, :wp]
        return torch.cat([prefix, grid.reshape(b, heads, hp * wp, dh)], 2)

    def _block(self, layer: nn.Module, x: Tensor, key_valid: Optional[Tensor],
               rope: Optional[Tuple[Tensor, Tensor]] = None, windows=None) -> Tensor:
        """One pre-norm ViT block: x + ls1 * attn(norm1 x); x + ls2 * mlp(norm2 x). At CPU inference
        the fused block (:meth:`_block_inference`) where ``dinov2od.layers.kernels.block_kernel`` picks one."""
        dtype = block_kernel(x, self.training)
        parts = None if dtype is None else block_parts(layer, self._attention_parts(layer.attention), dtype)
        if parts is not None:
            return self._block_inference(layer, parts, x, key_valid, rope, windows)
        x = x + layer.drop_path(layer.layer_scale1(self._attention(layer, layer.norm1(x), key_valid, rope, windows)))
        return x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))

    def _block_inference(self, layer: nn.Module, parts: "InferenceBlockParts", x: Tensor,
                         key_valid: Optional[Tensor], rope: Optional[Tuple[Tensor, Tensor]], windows) -> Tensor:
        """:meth:`_block` at inference, same function (in bfloat16: the products autocast makes): one
        q/k/v product with the LoRA deltas merged, linears with bias (and GELU) fused
        (``dinov2od.layers.kernels.linear``: bfloat16 parts run bfloat16 products), ``addcmul``
        residuals. The residual stream stays float32 (``x.float()``: a no-op in float32)."""
        b, t, _ = x.shape
        x = x.float()
        qkv = linear(layer.norm1(x), parts.qkv_weight, parts.qkv_bias).view(b, t, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, Dh)
        out = linear(self._attend(q, k, v, key_valid, rope, windows, 0.0), *parts.out)
        # (addcmul promotes a bfloat16 ``out`` to the float32 residual stream; the stream stays float32, the
        # precision of autocast's, which the float64-reference tests hold the blocks to)
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


def _window_prefix_mean(prefix: Tensor, win_valid: Optional[Tensor]) -> Tensor:
    """(B, n, heads, P, Dh) prefix-token outputs of the n windows -> (B, heads, P, Dh): their mean
    over the windows that hold at least one image patch (all of them when ``win_valid`` is None)."""
    if win_valid is None:
        return prefix.mean(1)
    b, n = prefix.shape[:2]
    used = win_valid.view(b, n, -1).any(-1).to(prefix.dtype)[:, :, None, None, None]  # (B, n, 1, 1, 1)
    return (prefix * used).sum(1) / used.sum(1).clamp(min=1)


def _canonical_target(name: str) -> str:
    key = _TARGET_ALIASES.get(name, name)
    if key not in LORA_TARGETS:
        raise ValueError(
            f"unknown LoRA target {name!r}; choose among {sorted(LORA_TARGETS)} (or q_proj/k_proj/v_proj/o_proj)"
        )
    return key
