"""ViT softmax attention at CPU inference through ``dinov2od._C``'s AVX-512 kernels (chosen by
:func:`dinov2od.layers.kernels.attention`, the entry the model calls).

``softmax(q k^T / sqrt(64)) v`` for (B, H, T, 64) q, k, v without a mask or dropout, the shape of
every DINOv2 and DINOv3 ViT's attention but DINOv3-7B's. The kernel (``layers/csrc/cpu/
attention_cpu.cpp``) packs each head's keys and values once, computes a block of query rows'
scores against all keys with an 8 x 32 AVX-512 register tile, an exact softmax per row (no online
rescaling) and the weighted values with another 8 x 32 tile, and writes the (B, T, H, 64) layout the
output projection reads (no transpose copy after). Its speed against torch's own CPU kernel
(``F.scaled_dot_product_attention``): docs/speed.md (``tools/benchmark.py --section model``
measures both in the same rounds).

It is taken only where it computes the same function with nothing to preserve: the conditions of
:func:`dinov2od.layers.fused_linear.fused_linear_enabled` (CPU, float32, no gradient, not
tracing/exporting/compiling, no autocast, the ``fused_linear`` option on), no mask, no dropout,
head dim 64, a CPU with AVX-512 (avx512f, avx512dq) and a build that has the kernel. Everywhere else
the caller runs torch's kernel.

**bfloat16.** A second kernel takes (B, H, T, 64) or (B, H, T, 32) bfloat16 q, k, v (what the ViT's bfloat16 q/k/v
product gives under CPU bfloat16 autocast) on CPUs with avx512_bf16: the same tiles with VDPBF16PS
(pairs of bfloat16 multiplied, float32 accumulation), a float32 softmax whose probabilities are
rounded to bfloat16 for the product with V (as torch's bfloat16 attention does), float32 1/sum,
bfloat16 output (its speed: docs/speed.md). Its error against a float64 computation on the same
bfloat16 inputs is torch's (the output's rounding). It also takes head dim 32, the decoder's
self-attention (256 wide, 8 heads; :func:`dinov2od.modeling.decoder.decoder_self_attention`).
:func:`cpu_attention_bf16_enabled` holds its conditions (bfloat16 CPU tensors, no gradient, not
tracing/exporting/compiling, the ``fused_linear`` and ``cpu_attention`` options on, no mask or
dropout, head dim 64 or 32, a CPU with avx512_bf16 and a build that has the kernel). The inference
option ``cpu_attention`` turns this kernel alone off
(``with inference_options(cpu_attention=False)`` or ``DINOV2OD_CPU_ATTENTION=0``, see
:mod:`dinov2od.layers.inference_options`; A/B timing, debugging; torch's FLOP counter, which cannot
see it, counts the model with it off).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from dinov2od.layers._ext import load_extension
from dinov2od.layers.fused_linear import _compiling, fused_linear_enabled
from dinov2od.layers.inference_options import ENV_VARIABLES, current_options

__all__ = ["ENV", "cpu_attention", "cpu_attention_available", "cpu_attention_bf16", "cpu_attention_bf16_available",
           "cpu_attention_bf16_enabled", "cpu_attention_enabled"]

ENV = ENV_VARIABLES["cpu_attention"]  # DINOV2OD_CPU_ATTENTION (read in dinov2od.layers.inference_options)
HEAD_DIM = 64
BF16_HEAD_DIMS = (32, 64)  # the bfloat16 kernel's: the ViTs' 64 and the decoder self-attention's 32


def cpu_attention_available() -> bool:
    """Whether ``dinov2od._C`` loads, has the kernel, and this CPU runs it (AVX-512)."""
    module = load_extension()
    return module is not None and hasattr(module, "attention_available") and bool(module.attention_available())


def cpu_attention_enabled(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, p_drop: float = 0.0) -> bool:
    """Whether :func:`cpu_attention` applies to these inputs (see the module doc)."""
    if mask is not None or p_drop or q.dim() != 4 or q.shape[-1] != HEAD_DIM:
        return False
    if not current_options().cpu_attention:
        return False
    if q.shape != k.shape or q.shape != v.shape or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    return fused_linear_enabled(q, k, v) and cpu_attention_available()


def cpu_attention_bf16_available() -> bool:
    """Whether ``dinov2od._C`` loads, has the bfloat16 kernel, and this CPU runs it (avx512_bf16)."""
    module = load_extension()
    return module is not None and hasattr(module, "attention_bf16_available") and bool(module.attention_bf16_available())


def cpu_attention_bf16_enabled(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
                               p_drop: float = 0.0) -> bool:
    """Whether :func:`cpu_attention_bf16` applies to these inputs (see the module doc)."""
    import torch

    if mask is not None or p_drop or q.dim() != 4 or q.shape[-1] not in BF16_HEAD_DIMS or q.device.type != "cpu":
        return False
    if any(t.dtype != torch.bfloat16 for t in (q, k, v)):
        return False
    if q.shape != k.shape or q.shape != v.shape or any(t.stride(-1) != 1 for t in (q, k, v)):
        return False
    options = current_options()
    if not (options.cpu_attention and options.fused_linear):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _compiling():
        return False
    return cpu_attention_bf16_available()


def cpu_attention_bf16(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, H, T, D) bfloat16 CPU q, k, v, D 64 or 32 -> (B, T, H, D) bfloat16 attended values (check
    :func:`cpu_attention_bf16_enabled` first)."""
    return load_extension().attention_forward_bf16(q, k, v)


def cpu_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, H, T, 64) float32 CPU q, k, v -> (B, T, H, 64) attended values (check
    :func:`cpu_attention_enabled` first)."""
    return load_extension().attention_forward(q, k, v)
