"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021).

The op follows Deformable DETR's signature::

    value               (N, S, M, D)        S = sum of H_l * W_l over levels
    spatial_shapes      (L, 2) int64        (H_l, W_l) per level
    level_start_index   (L,)   int64        offset of each level in S
    sampling_locations  (N, Lq, M, L, P, 2) normalized (x, y) in [0, 1]
    attention_weights   (N, Lq, M, L, P)
    -> output           (N, Lq, M * D)

A location ``(x, y)`` samples level ``l`` at pixel coordinates
``(x * W_l - 0.5, y * H_l - 0.5)`` with bilinear interpolation; samples outside
the map read zeros. :func:`ms_deform_attn_pytorch` is the reference path: it runs
everywhere (CPU, GPU, ONNX export) and defines the op's semantics for the compiled
kernels.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2od.layers.inference_options import ENV_VARIABLES, current_options
from dinov2od.layers.kernels import linear_module

__all__ = [
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "MultiScaleDeformableAttention",
    "level_start_index_from_shapes",
    "level_shapes",
]

# Environment variable that turns the compiled kernel off everywhere (=0: debugging, export): the inference
# option compiled_msda=False (read in dinov2od.layers.inference_options).
ENV = ENV_VARIABLES["compiled_msda"]


def level_start_index_from_shapes(spatial_shapes: Tensor) -> Tensor:
    """(L, 2) level shapes -> (L,) start offset of each level in the flattened value."""
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def level_shapes(spatial_shapes: Tensor) -> List[Tuple]:
    """(L, 2) level shapes -> ``[(H_l, W_l), ...]``: Python ints, or 0-dim tensors while tracing
    (ONNX export), so that the sizes stay values of the graph instead of constants."""
    if torch.jit.is_tracing():
        return [(spatial_shapes[lvl, 0], spatial_shapes[lvl, 1]) for lvl in range(len(spatial_shapes))]
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


def _check_op_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}")
    n, s, m, _ = value.shape
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2), got shape {tuple(spatial_shapes.shape)}")
    num_levels = spatial_shapes.shape[0]
    total = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    if total != s:
        raise ValueError(
            f"value has S={s} tokens but spatial_shapes {spatial_shapes.tolist()} sum to {total}"
        )
    if level_start_index.shape != (num_levels,):
        raise ValueError(
            f"level_start_index must be ({num_levels},), got shape {tuple(level_start_index.shape)}"
        )
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must be (N, Lq, M, L, P, 2), "
            f"got shape {tuple(sampling_locations.shape)}"
        )
    sn, lq, sm, sl, p, _ = sampling_locations.shape
    if (sn, sm, sl) != (n, m, num_levels):
        raise ValueError(
            f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} with {num_levels} levels"
        )
    if attention_weights.shape != (n, lq, m, num_levels, p):
        raise ValueError(
            f"attention_weights must be {(n, lq, m, num_levels, p)}, "
            f"got {tuple(attention_weights.shape)}"
        )


def ms_deform_attn_pytorch(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference implementation with ``F.grid_sample`` (see the module docstring).

    Works for any batch size, non-square levels, float32/float64; under autocast it
    computes in float32 and returns ``value``'s dtype.
    """
    out_dtype = value.dtype
    compute_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=value.device.type, enabled=False):
        value = value.to(compute_dtype)
        sampling_locations = sampling_locations.to(compute_dtype)
        attention_weights = attention_weights.to(compute_dtype)

        n, _, m, d = value.shape
        _, lq, _, num_levels, p, _ = sampling_locations.shape
        shapes = level_shapes(spatial_shapes)
        if torch.jit.is_tracing():  # slice with graph values (split would freeze the sizes)
            value_per_level, start = [], 0
            for h, w in shapes:
                value_per_level.append(value[:, start:start + h * w])
                start = start + h * w
        else:
            value_per_level = value.split([h * w for h, w in shapes], dim=1)
        # grid_sample's align_corners=False maps g in [-1, 1] to pixel (g + 1) / 2 * W - 0.5,
        # i.e. x * W - 0.5 for x in [0, 1], which is the op's convention.
        grids = 2 * sampling_locations - 1
        sampled = []
        for lvl, (h, w) in enumerate(shapes):
            # (N, H*W, M, D) -> (N*M, D, H, W)
            v = value_per_level[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
            # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
            g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, p, 2)
            # (N*M, D, Lq, P)
            sampled.append(
                F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
            )
        # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
        weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
        out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
        out = out.view(n, m * d, lq).transpose(1, 2)
    return out.to(out_dtype).contiguous()


def _use_pytorch_path(force_pytorch: Optional[bool]) -> bool:
    if torch.jit.is_tracing():  # export: the graph holds the PyTorch path's ops
        return True
    if force_pytorch is not None:
        return force_pytorch
    return not current_options().compiled_msda


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    force_pytorch: Optional[bool] = None,
) -> Tensor:
    """Multi-scale deformable attention; see the module docstring for shapes.

    Dispatches to the compiled kernel for the tensors' device when one is built, and
    to :func:`ms_deform_attn_pytorch` otherwise, or when ``force_pytorch=True``, the inference option
    ``compiled_msda=False`` or the environment variable ``DINOV2OD_COMPILED_MSDA=0`` asks for it
    (:mod:`dinov2od.layers.inference_options`).
    """
    if not torch.jit.is_tracing():  # the checks read sizes as Python ints
        _check_op_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not _use_pytorch_path(force_pytorch):
        from . import _ext

        if _ext.available_for(value):
            return _ext.ms_deform_attn_compiled(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights
            )
    return ms_deform_attn_pytorch(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention module (batch-first).

    Args:
        embed_dim: query and value width C.
        num_heads: attention heads M (``embed_dim % num_heads == 0``).
        num_levels: feature levels L.
        num_points: sampling points P per head and level.
        dropout: dropout on the output.
        value_proj_ratio: width of the value projection relative to ``embed_dim``.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        dropout: float = 0.0,
        value_proj_ratio: float = 1.0,
    ):
        super().__init__()
        value_dim = int(embed_dim * value_proj_ratio)
        if embed_dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"embed_dim={embed_dim} (value width {value_dim}) must be divisible by "
                f"num_heads={num_heads}"
            )
        self.embed_dim, self.value_dim = embed_dim, value_dim
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, value_dim)
        self.output_proj = nn.Linear(value_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.force_pytorch: Optional[bool] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start as one ring of points per head, pointing in M evenly spaced
        # directions, the k-th point k units away; attention starts uniform.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Optional[Tensor] = None,
        key_padding_mask: Optional[Tensor] = None,
        projected_value: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: (N, Lq, C) queries (position embedding already added).
            reference_points: (N, Lq, L, 2) points ``(x, y)`` or (N, Lq, L, 4) boxes
                ``(cx, cy, w, h)``, normalized to [0, 1] per level; a (N, Lq, 2|4) tensor is
                broadcast to every level.
            value: (N, S, C) flattened multi-scale features.
            spatial_shapes: (L, 2) int64 ``(H_l, W_l)``.
            level_start_index: (L,) int64; derived from ``spatial_shapes`` if omitted.
            key_padding_mask: (N, S) bool, True at padded positions (they contribute zero).
            projected_value: (N, S, value_dim) ``value_proj(value)`` with padded positions zeroed,
                computed by the caller (a decoder projects one memory for all its layers in one
                product); then ``value`` and ``key_padding_mask`` are not read.

        Returns:
            (N, Lq, C)
        """
        n, lq, _ = query.shape
        if level_start_index is None:
            level_start_index = level_start_index_from_shapes(spatial_shapes)
        if reference_points.dim() == 3:
            reference_points = reference_points[:, :, None].expand(-1, -1, self.num_levels, -1)
        m, num_levels, p = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape[0] != num_levels:
            raise ValueError(
                f"module was built for {num_levels} levels, got {spatial_shapes.shape[0]} feature levels"
            )

        if projected_value is None:
            v = linear_module(self.value_proj, value)
            if key_padding_mask is not None:
                v = v.masked_fill(key_padding_mask[..., None], 0.0)
        else:
            v = projected_value
        v = v.view(n, -1, m, self.value_dim // m)

        offsets = linear_module(self.sampling_offsets, query).view(n, lq, m, num_levels, p, 2)
        weights = linear_module(self.attention_weights, query).view(n, lq, m, num_levels * p)
        # softmax in at least float32 (bfloat16 weights would round the small ones away; the kernel reads float32)
        weights = weights.softmax(-1, dtype=torch.promote_types(weights.dtype, torch.float32)).view(n, lq, m, num_levels, p)

        ref = reference_points[:, :, None, :, None]  # (N, Lq, 1, L, 1, 2|4)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level
            normalizer = spatial_shapes.flip(-1).to(offsets.dtype)  # (W, H)
            locations = ref + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are relative to the reference box's half size: center + offset * size / (2 P).
            # Center and scale are laid out per point first (small), so that the one fused op over
            # all heads broadcasts 2P-long rows instead of pairs (faster on the CPU: fewer, longer rows)
            center = ref[..., :2].expand(-1, -1, -1, -1, p, -1).contiguous()
            scale = (ref[..., 2:] * (0.5 / p)).expand(-1, -1, -1, -1, p, -1).contiguous()
            locations = torch.addcmul(center, offsets, scale)
        else:
            raise ValueError(
                "reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), "
                f"got shape {tuple(reference_points.shape)}"
            )
        out = ms_deform_attn(
            v, spatial_shapes, level_start_index, locations, weights, force_pytorch=self.force_pytorch
        )
        return self.dropout(linear_module(self.output_proj, out))
