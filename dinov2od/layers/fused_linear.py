"""Linear-layer kernels for CPU inference: oneDNN's matmul with the bias and activation fused in.

At CPU fp32 inference ``F.linear`` goes through ``addmm``, which first copies the bias into the
output (an extra pass over it) and then calls the BLAS; an activation after it is one more pass.
oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op torch's own inductor uses for
linear + pointwise fusion on the CPU) adds the bias and applies GELU/ReLU while the output tile is
in cache (measured: docs/speed.md).

:func:`onednn_linear` (float32) is taken only where it computes the same function with no autograd,
trace or autocast to preserve (:func:`fused_linear_enabled`: CPU, float32, no gradient needed, not
tracing/scripting/exporting/compiling, no CPU autocast, the op present in this torch build);
:func:`bf16_linear` (bfloat16 weights cast once) where :func:`bf16_linear_enabled` holds. The model
calls neither directly: :func:`dinov2od.layers.kernels.linear` picks. The inference option
``fused_linear`` turns both off (A/B timing, debugging; docs/speed.md's switch table).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dinov2od.layers.inference_options import ENV_VARIABLES, current_options

__all__ = ["ENV", "bf16_linear", "bf16_linear_enabled", "fused_linear_enabled", "onednn_linear"]

ENV = ENV_VARIABLES["fused_linear"]  # DINOV2OD_FUSED_LINEAR (read in dinov2od.layers.inference_options)
_ACTIVATIONS = {None: ("none", ""), "gelu": ("gelu", "none"), "relu": ("relu", "")}


def _op_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_OP_AVAILABLE = _op_available()


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")  # torch >= 2.4
        return True
    except TypeError:
        return False


_AUTOCAST_TAKES_DEVICE = _autocast_takes_device()  # probed once: torch.compile cannot trace a try/except TypeError


def _cpu_autocast_on() -> bool:
    return torch.is_autocast_enabled("cpu") if _AUTOCAST_TAKES_DEVICE else torch.is_autocast_cpu_enabled()


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def fused_linear_enabled(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether :func:`linear` takes the oneDNN path for input ``x`` and ``params`` (its weight and
    bias; see the module doc)."""
    if not _OP_AVAILABLE or not torch.backends.mkldnn.enabled:
        return False
    params = [p for p in params if p is not None]
    if x.device.type != "cpu" or any(t.dtype != torch.float32 for t in (x, *params)):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _compiling():
        return False  # (under torch.compile the compiler fuses on its own; the plain ops trace cleanly)
    if not current_options().fused_linear:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)):
        return False
    return not _cpu_autocast_on()


def _cpu_autocast_dtype() -> torch.dtype:
    if _AUTOCAST_TAKES_DEVICE:
        return torch.get_autocast_dtype("cpu")
    return torch.get_autocast_cpu_dtype()


def bf16_linear_enabled(x: Tensor) -> bool:
    """Whether the ViT blocks' bfloat16 inference path applies to input ``x``: CPU bfloat16 autocast
    on a CPU with native bfloat16 (avx512_bf16 or AMX), no gradient, not tracing/scripting/exporting/
    compiling, the ``fused_linear`` option on and the oneDNN op present. There each linear runs as
    oneDNN's bfloat16 matmul (bias and GELU fused) on bfloat16 copies of the weights made once
    (:func:`dinov2od.modeling.inference.cached_block_parts`), instead of autocast casting every
    weight at every call; the products are the same bfloat16 products autocast makes."""
    if not _OP_AVAILABLE or not torch.backends.mkldnn.enabled or x.device.type != "cpu":
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _compiling():
        return False
    if not current_options().fused_linear or torch.is_grad_enabled():
        return False
    if not _cpu_autocast_on() or _cpu_autocast_dtype() != torch.bfloat16:
        return False
    from dinov2od.layers.precision import native_cpu_bf16

    return native_cpu_bf16()


def bf16_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """``activation(x @ weight.T + bias)`` in bfloat16 by oneDNN (``weight``, ``bias``: bfloat16
    already; check :func:`bf16_linear_enabled` first). Returns bfloat16."""
    attr, algorithm = _ACTIVATIONS[activation]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), weight, bias,
                                             attr, [], algorithm)
    return out.view(*x.shape[:-1], weight.shape[0])


def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """``activation(x @ weight.T + bias)`` by oneDNN, bias and activation fused (check
    :func:`fused_linear_enabled` first; the entry the model calls is :func:`dinov2od.layers.kernels.linear`)."""
    attr, algorithm = _ACTIVATIONS[activation]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight.contiguous(), bias,
                                             attr, [], algorithm)
    return out.view(*x.shape[:-1], weight.shape[0])
