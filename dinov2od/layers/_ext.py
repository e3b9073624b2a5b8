"""Loader and autograd wrapper for the compiled multi-scale deformable attention op.

``dinov2od._C`` is built by ``setup.py`` (``pip install -e . --no-build-isolation``): a CPU
kernel always, CUDA kernels when built with a CUDA toolkit (``FORCE_CUDA=1``). It is imported
lazily, on the first call that could use it. A missing or broken build (not compiled, built
against another torch, undefined symbols) never raises: it emits one warning naming the cause
and the fix, and the caller falls back to the PyTorch path.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["available_for", "load_extension", "load_error", "ms_deform_attn_compiled"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FIX = (
    "rebuild it against the installed torch with `pip install -e . --no-build-isolation` "
    "(from the dinov2od repository root; FORCE_CUDA=1 for the CUDA kernels), or set "
    "DINOV2OD_COMPILED_MSDA=0 to use the PyTorch path without this warning"
)


class _State:
    """Process-wide load result; ``warned`` keeps each warning to one per process."""

    tried = False
    module: Optional[ModuleType] = None
    error: Optional[BaseException] = None
    warned: set = set()


def _import_C() -> ModuleType:
    return importlib.import_module("dinov2od._C")


def _reset() -> None:
    """Forget the load result and the warnings given (for tests)."""
    _State.tried, _State.module, _State.error, _State.warned = False, None, None, set()


def _warn_once(key: str, message: str) -> None:
    if key not in _State.warned:
        _State.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def load_extension() -> Optional[ModuleType]:
    """Import ``dinov2od._C`` once; returns it, or None (see :func:`load_error`)."""
    if not _State.tried:
        _State.tried = True
        try:
            _State.module = _import_C()
        except Exception as exc:  # ImportError, OSError (undefined symbol, ABI mismatch), ...
            _State.module, _State.error = None, exc
    return _State.module


def load_error() -> Optional[BaseException]:
    """Why :func:`load_extension` returned None (None if it loaded or was not tried)."""
    return _State.error


def available_for(value: Tensor) -> bool:
    """Whether a compiled kernel exists for ``value``'s device and dtype.

    Warns once per process when the extension is missing or broken, and once when CUDA
    tensors meet a build without CUDA kernels.
    """
    if value.dtype not in SUPPORTED_DTYPES or value.device.type not in ("cpu", "cuda"):
        return False
    module = load_extension()
    if module is None:
        err = _State.error
        _warn_once(
            "load",
            "dinov2od: the compiled multi-scale deformable attention op could not be loaded "
            f"({type(err).__name__}: {err}); falling back to the slower PyTorch path. Fix: {FIX}.",
        )
        return False
    if value.device.type == "cuda" and not module.with_cuda():
        _warn_once(
            "cuda",
            "dinov2od: dinov2od._C was built without CUDA kernels; CUDA tensors use the slower "
            f"PyTorch path. Fix: {FIX}.",
        )
        return False
    return True


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd over the compiled forward/backward; gradients of the int64 index tensors are None."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        module = load_extension()
        out = module.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output) -> Tuple[Optional[Tensor], ...]:
        value, shapes, starts, locations, weights = ctx.saved_tensors
        grad_value, grad_loc, grad_weights = load_extension().ms_deform_attn_backward(
            value, shapes, starts, locations, weights, grad_output
        )
        # the kernel computes location/weight gradients in float32 (float64 for float64 value)
        return (
            grad_value if ctx.needs_input_grad[0] else None,
            None,
            None,
            grad_loc.to(locations.dtype) if ctx.needs_input_grad[3] else None,
            grad_weights.to(weights.dtype) if ctx.needs_input_grad[4] else None,
        )


def ms_deform_attn_compiled(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The compiled op (check :func:`available_for` first); same contract as the PyTorch path.

    Args:
        value: (N, S, M, D) float16/bfloat16/float32/float64.
        spatial_shapes: (L, 2) int64 ``(H_l, W_l)``.
        level_start_index: (L,) int64.
        sampling_locations: (N, Lq, M, L, P, 2), any floating dtype (used in float32, or
            float64 for a float64 value).
        attention_weights: (N, Lq, M, L, P), likewise.

    Returns:
        (N, Lq, M * D) in ``value``'s dtype, accumulated in float32 (float64 for float64).
    """
    if load_extension() is None:
        raise RuntimeError(f"dinov2od._C is not available ({_State.error}); {FIX}")
    # autocast must not re-cast inside; the kernel handles mixed dtypes itself
    with torch.autocast(device_type=value.device.type, enabled=False):
        return _MSDeformAttnFunction.apply(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
