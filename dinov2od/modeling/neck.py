"""Neck: tapped ViT tokens -> a masked multi-scale feature pyramid.

Design (a ViTDet "simple feature pyramid" fed by several taps, as RF-DETR's projector):

1. **Fuse taps.** The K tapped block outputs (each (B, D, Hp, Wp) at stride 14) are
   concatenated on channels and projected per patch by a 1x1 conv to the decoder width C,
   then a channels-only LayerNorm. Earlier blocks carry more local detail, later ones
   more semantics; a per-patch linear mix keeps both.
2. **Resample.** From this single stride-14 map, each level is made by a scale factor:
   ``2.0`` -> 2x2 transposed conv (stride 7 px), ``1.0`` -> identity (14 px),
   ``0.5`` -> 2x2 stride-2 conv (28 px), ``0.25`` -> two of them (56 px), each step
   followed by LayerNorm + GELU; then a 3x3 conv + LayerNorm per level.

Padding: every spatial conv reads zeros at padded positions (features are zeroed by the
mask before each one, odd sizes are zero-padded to even before a stride-2 conv), and only
channel-wise norms are used (no BatchNorm/GroupNorm statistics over space), so the valid
part of each level is the same whether an image is alone or in a padded batch. Level masks
follow the same resampling: nearest repeat for upsampling, "padded only if every covered
cell is padded" for downsampling.

Single-level mode: ``scale_factors=(1.0,)``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2od.layers.kernels import conv_module

__all__ = ["SimpleFeaturePyramid", "LayerNorm2d", "ConvSpatialPrior"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (per position)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _zero_pad(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Zero (B, C, H, W) features where the (B, H, W) mask is True (no-op for mask None)."""
    return x if mask is None else x.masked_fill(mask[:, None], 0.0)


def _pad_even(x: Tensor, value=0.0) -> Tensor:
    """Pad the last two dims of x (bottom/right) to even sizes."""
    h, w = x.shape[-2:]
    if torch.jit.is_tracing() or h % 2 or w % 2:  # traced: the pad amounts are graph values
        x = F.pad(x, (0, w % 2, 0, h % 2), value=value)
    return x


def downsample_mask(mask: Optional[Tensor], factor: int = 2) -> Optional[Tensor]:
    """(B, H, W) -> (B, ceil(H/f), ceil(W/f)); a cell is padded iff all f x f inputs are.

    None (nothing padded) stays None.
    """
    if mask is None:
        return None
    valid = (~mask).float()[:, None]
    h, w = valid.shape[-2:]
    valid = F.pad(valid, (0, (-w) % factor, 0, (-h) % factor))
    return F.max_pool2d(valid, factor)[:, 0] < 0.5


class _Down(nn.Module):
    """Halve resolution: zero padding, pad to even, 2x2 stride-2 conv, LayerNorm, GELU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 2, stride=2)
        self.norm = LayerNorm2d(c)

    def forward(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        x = conv_module(self.conv, _pad_even(_zero_pad(x, mask)))
        return F.gelu(self.norm(x)), downsample_mask(mask)


class _Up(nn.Module):
    """Double resolution: 2x2 stride-2 transposed conv, LayerNorm, GELU."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.norm = LayerNorm2d(c)

    def forward(self, x: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        x = conv_module(self.conv, _zero_pad(x, mask))
        if mask is not None:
            mask = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)
        return F.gelu(self.norm(x)), mask


class SimpleFeaturePyramid(nn.Module):
    """Fuse ViT taps and build a feature pyramid (see the module docstring).

    Args:
        in_channels: ViT width D.
        num_taps: number of tapped blocks K.
        out_channels: decoder width C.
        scale_factors: one per level, each a power of two in {4, 2, 1, 0.5, 0.25, 0.125};
            the level's stride is ``patch_size / factor``.
        patch_size: the ViT patch size (stride of the taps).
    """

    def __init__(
        self,
        in_channels: int,
        num_taps: int,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (2.0, 1.0, 0.5, 0.25),
        patch_size: int = 14,
    ):
        super().__init__()
        allowed = (4.0, 2.0, 1.0, 0.5, 0.25, 0.125)
        if not scale_factors or any(float(s) not in allowed for s in scale_factors):
            raise ValueError(f"scale_factors={list(scale_factors)} must be non-empty, each in {allowed}")
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.strides = tuple(patch_size / s for s in self.scale_factors)
        self.out_channels = out_channels
        self.num_taps = num_taps
        self.fuse = nn.Sequential(nn.Conv2d(in_channels * num_taps, out_channels, 1), LayerNorm2d(out_channels))
        self.resample = nn.ModuleList()
        self.output = nn.ModuleList()
        for s in self.scale_factors:
            n = abs(int(round(math.log2(s))))  # number of 2x resampling steps
            steps = [(_Up if s > 1 else _Down)(out_channels) for _ in range(n)]
            self.resample.append(nn.ModuleList(steps))
            self.output.append(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.output_norm = nn.ModuleList(LayerNorm2d(out_channels) for _ in self.scale_factors)

    @property
    def num_levels(self) -> int:
        return len(self.scale_factors)

    def forward(self, features: List[Tensor], mask: Optional[Tensor],
                prior: Optional[List[Tensor]] = None) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
        """
        Args:
            features: K maps (B, D, Hp, Wp) from the backbone taps.
            mask: (B, Hp, Wp) bool, True at padded patches, or None when nothing is padded
                (then no masking work is done and every level's mask is None).
            prior: optional L maps (B, C, H_l, W_l) added to each level before its 3x3 conv
                (a :class:`ConvSpatialPrior`'s output).

        Returns:
            maps: L maps (B, C, H_l, W_l), zero at padded positions.
            masks: L bool masks (B, H_l, W_l), True at padded positions (None when ``mask`` is None).
        """
        if len(features) != self.num_taps:
            raise ValueError(f"the neck was built for {self.num_taps} taps, got {len(features)} feature maps")
        # (bf16 inference: the convolutions' weights are cast once, dinov2od.layers.kernels.conv_module)
        x = self.fuse[1](conv_module(self.fuse[0], _zero_pad(torch.cat(features, 1), mask)))
        maps, masks = [], []
        for i, (steps, conv, norm) in enumerate(zip(self.resample, self.output, self.output_norm)):
            y, m = x, mask
            for step in steps:
                y, m = step(y, m)
            if prior is not None:
                y = y + prior[i]
            y = norm(conv_module(conv, _zero_pad(y, m)))
            maps.append(_zero_pad(y, m))
            masks.append(m)
        return maps, masks


class ConvSpatialPrior(nn.Module):
    """A small convolutional stem on the image, added to the pyramid levels.

    The idea of ViT-Adapter's spatial prior module: convolutions give local (edge, corner)
    features that a plain ViT, and above all a randomly initialized one, lacks. Layout:
    a 3x3 conv at full resolution, average pooling over ``patch_size / 2`` px cells (the
    pyramid's finest stride, aligned with the patch grid), a 1x1 conv to ``channels``, two
    3x3 conv + LayerNorm + GELU blocks, then per level 2x2 average pooling down to the level's
    stride and a zero-initialized 1x1 conv to the decoder width (so a pretrained model starts
    unchanged). Padding is handled as in :class:`SimpleFeaturePyramid`: features are zeroed at
    padded cells before every spatial conv, so a padded batch gives each image's own result.

    Args:
        out_channels: decoder width C.
        scale_factors: the pyramid's factors; each must be <= 2 (stride >= patch_size / 2).
        patch_size: the ViT patch size (even).
        channels: width of the stem.
    """

    def __init__(self, out_channels: int, scale_factors: Sequence[float], patch_size: int = 14,
                 channels: int = 64):
        super().__init__()
        if patch_size % 2:
            raise ValueError(f"the spatial prior needs an even patch size, got {patch_size}")
        if any(float(s) > 2.0 for s in scale_factors):
            raise ValueError(f"the spatial prior's finest stride is patch_size / 2; scale_factors="
                             f"{list(scale_factors)} asks for a finer level")
        self.cell = patch_size // 2
        self.halvings = tuple(int(round(math.log2(2.0 / float(s)))) for s in scale_factors)
        self.pixel = nn.Conv2d(3, channels // 2, 3, padding=1)
        self.proj = nn.Conv2d(channels // 2, channels, 1)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(2))
        self.norms = nn.ModuleList(LayerNorm2d(channels) for _ in range(2))
        self.out = nn.ModuleList(nn.Conv2d(channels, out_channels, 1) for _ in scale_factors)
        for conv in self.out:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, images: Tensor, masks: Optional[Tensor]) -> List[Tensor]:
        """
        Args:
            images: (B, 3, H, W), H and W multiples of the patch size, zero at padded pixels.
            masks: (B, H, W) bool, True at padded pixels; None when nothing is padded.

        Returns:
            one (B, C, H_l, W_l) map per level, zero at padded cells.
        """
        x = F.avg_pool2d(F.gelu(self.pixel(images)), self.cell)
        m = downsample_mask(masks, self.cell)
        x = F.gelu(self.proj(x))
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(_zero_pad(x, m))))
        levels = [(_zero_pad(x, m), m)]  # entry h: stride (patch_size / 2) * 2**h
        while len(levels) <= max(self.halvings):
            y, ym = levels[-1]
            levels.append((F.avg_pool2d(_pad_even(y), 2), downsample_mask(ym)))
        return [_zero_pad(out(levels[h][0]), levels[h][1]) for h, out in zip(self.halvings, self.out)]
