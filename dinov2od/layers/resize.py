"""Bicubic resizing written as a matrix product, so that each image of a batch can have its own
output size inside one traced (ONNX) graph.

``F.interpolate(x, mode="bicubic")`` takes the output size as Python ints: a traced graph freezes
them. Resizing one axis is linear, ``y = A x`` with ``A`` (out, in), and ``A`` depends on the
output size only through a few element-wise formulas, so it can be computed from a size *tensor*.
:func:`bicubic_resize_matrix` builds ``A`` exactly as PyTorch's CPU kernels weigh their inputs:

* ``antialias=False`` (``upsample_bicubic2d``, ``align_corners=False``): source coordinate
  ``scale * (i + 0.5) - 0.5``, Keys' cubic convolution with ``a = -0.75`` on the 4 nearest inputs,
  indices clamped to the border;
* ``antialias=True`` (``_upsample_bicubic2d_aa``): a cubic filter with ``a = -0.5`` whose support
  widens by ``scale`` when downsampling, weights normalized to sum to one.

Here ``scale`` is input length / output length, or ``1 / scale_factor`` when the caller of
``F.interpolate`` gives a scale factor (Meta's DINOv2 does: ``scale_factor = (h + 0.1) / M``).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bicubic_resize_matrix"]


def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at distances x (any sign)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| < 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 <= |x| < 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_resize_matrix(out_sizes: Tensor, padded_len, in_len: int, scales: Tensor,
                          antialias: bool = False) -> Tensor:
    """Per-image matrices that resize one axis of length ``in_len`` bicubically.

    Args:
        out_sizes: (B,) int output length of each image (<= ``padded_len``).
        padded_len: rows of the result (an int, or a 0-dim tensor while tracing); rows at and
            after an image's ``out_sizes`` are zero, as zero padding of the resized output.
        in_len: input length (a Python int).
        scales: (B,) float input/output scale of each image (see the module docstring).
        antialias: PyTorch's ``antialias=True`` filter.

    Returns:
        (B, padded_len, in_len) float64: ``A[b] @ x`` equals
        ``F.interpolate(x, size or scale, mode="bicubic", align_corners=False, antialias=...)``
        along that axis for image b, zero-padded to ``padded_len``.
    """
    scales = scales.to(torch.float64)[:, None, None]  # (B, 1, 1)
    i = torch.arange(padded_len, device=out_sizes.device, dtype=torch.float64)[None, :, None]  # (1, P, 1)
    j = torch.arange(in_len, device=out_sizes.device, dtype=torch.float64)[None, None, :]  # (1, 1, N)
    if antialias:
        support_scale = torch.clamp(scales, min=1.0)  # the filter widens when downsampling
        weights = _cubic((j + 0.5 - scales * (i + 0.5)) / support_scale, -0.5)  # (B, P, N)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    else:
        src = scales * (i + 0.5) - 0.5  # (B, P, 1)
        base = torch.floor(src)
        t = src - base
        weights = torch.zeros_like(src * j)
        for k in range(4):  # taps at base - 1 .. base + 2, clamped to the border
            tap = torch.clamp(base - 1 + k, 0, in_len - 1)
            weights = weights + _cubic(t + 1 - k, -0.75) * (tap == j).to(weights.dtype)
    rows_valid = i < out_sizes.to(torch.float64)[:, None, None]
    return weights * rows_valid.to(weights.dtype)
