"""The one door to the fast paths: the model code calls these entries, this module picks the kernel.

=========================  ==================================================================
entry                      kernels it chooses between (first that applies)
=========================  ==================================================================
:func:`linear`             oneDNN bfloat16 matmul, bias and activation fused (bfloat16 weights
                           at CPU inference, :func:`.fused_linear.bf16_linear`); oneDNN
                           float32 matmul, bias and activation fused (CPU float32 inference);
                           ``F.linear`` + the activation
:func:`attention`          ``dinov2od._C``'s AVX-512 float32 or bfloat16 kernel
                           (:mod:`.cpu_attention`); on the CPU, 16-bit inputs attended in float32
                           (by the float32 kernel or torch's); ``F.scaled_dot_product_attention``
:func:`deformable_sampling` the compiled CPU or CUDA kernel (:mod:`._ext`); the PyTorch path
                           (:func:`.ms_deform_attn.ms_deform_attn`)
:func:`block_kernel`       which fused ViT block runs (float32, bfloat16 or none: the block as
                           written); the block calls :func:`linear` and :func:`attention`
:func:`linear_module`,     an ``nn.Linear`` / convolution module through the same choice: under
:func:`conv_module`        CPU bfloat16 autocast at inference (:func:`weight_dtype`) on weights
                           cast once (:func:`cast_once`), else the module itself
=========================  ==================================================================

Each choice reads one :class:`~.inference_options.InferenceOptions` (:func:`~.inference_options.
current_options`: defaults < environment < process-wide setting < ``with inference_options(...)``)
and the tensors; a fast path runs only where it computes the function of the plain path (or, in
bfloat16, the products CPU autocast makes): CPU, no gradient to keep, not tracing, exporting or
compiling, the kernel built and the CPU able to run it. The switches, their environment variables
and what each path costs or saves: docs/speed.md.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2od.layers import cpu_attention as _attn
from dinov2od.layers import fused_linear as _fl
from dinov2od.layers.inference_options import current_options

__all__ = ["attention", "attention_kernel", "block_kernel", "cached", "cast_once", "cast_pair", "conv_module", "deformable_sampling",
           "linear", "linear_kernel", "linear_module", "self_attention_kernel", "weight_dtype"]



def deformable_sampling(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                        attention_weights: Tensor) -> Tensor:
    """The deformable-sampling entry: :func:`dinov2od.layers.ms_deform_attn.ms_deform_attn` (the compiled
    CPU or CUDA kernel where built and the ``compiled_msda`` option is on, else the PyTorch path)."""
    from dinov2od.layers.ms_deform_attn import ms_deform_attn  # (that module imports this one)

    return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

_ACTIVATIONS = ("gelu", "relu", None)


def _bf16_weight_ok(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """bfloat16 weights (cast once by the caller) at CPU inference with the oneDNN op present."""
    if weight.dtype != torch.bfloat16 or x.device.type != "cpu" or not _fl._OP_AVAILABLE \
            or not torch.backends.mkldnn.enabled:
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or _fl._compiling():
        return False
    if not current_options().fused_linear:
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))


def linear_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> str:
    """Which kernel :func:`linear` runs: ``"onednn-bf16"``, ``"onednn"`` or ``"torch"``."""
    if _bf16_weight_ok(x, weight, bias):
        return "onednn-bf16"
    if _fl.fused_linear_enabled(x, weight, bias):
        return "onednn"
    return "torch"


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
    """``activation(F.linear(x, weight, bias))``: the one linear (+ activation) entry.

    Args:
        x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None.
            bfloat16 weights (copies cast once, e.g. :func:`dinov2od.modeling.inference.cached_block_parts`)
            run oneDNN's bfloat16 product at CPU inference (``x`` cast to bfloat16; the result is bfloat16).
        activation: None, ``"gelu"`` (exact, erf) or ``"relu"``.

    Returns:
        (..., out_features)
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {sorted(map(str, _ACTIVATIONS))}")
    kernel = linear_kernel(x, weight, bias)
    if kernel == "onednn-bf16":
        return _fl.bf16_linear(x, weight, bias, activation)
    if kernel == "onednn":
        return _fl.onednn_linear(x, weight, bias, activation)
    out = F.linear(x, weight, bias)
    if activation == "gelu":
        return F.gelu(out)
    if activation == "relu":
        return F.relu(out)
    return out


def attention_kernel(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, p_drop: float = 0.0) -> str:
    """Which kernel :func:`attention` runs: ``"avx512"``, ``"avx512-bf16"``, ``"upcast"`` (16-bit CPU
    inputs attended in float32, by the ``"avx512"`` kernel where it applies to the float32 copies, else
    torch's) or ``"torch"``."""
    if _attn.cpu_attention_enabled(q, k, v, mask, p_drop):
        return "avx512"
    if _attn.cpu_attention_bf16_enabled(q, k, v, mask, p_drop):
        return "avx512-bf16"
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        return "upcast"
    return "torch"


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, p_drop: float = 0.0) -> Tensor:
    """Softmax attention, the one attention entry: ``F.scaled_dot_product_attention(q, k, v, mask, p_drop)``.

    On the CPU, 16-bit inputs are attended in float32 where dinov2od's bfloat16 kernel does not
    apply (torch's CPU attention kernel is slower in bfloat16 than in float32; docs/speed.md). The
    AVX-512 kernels return a (B, H, T, Dh) view of a (B, T, H, Dh) tensor: the layout the output
    projection reads.

    Args:
        q, k, v: (B, H, T, Dh); mask: bool, broadcastable to (B, H, T, T), True where attended, or None.

    Returns:
        (B, H, T, Dh), in the dtype of ``q``.
    """
    kernel = attention_kernel(q, k, v, mask, p_drop)
    if kernel == "avx512":
        return _attn.cpu_attention(q, k, v).transpose(1, 2)
    if kernel == "avx512-bf16":
        return _attn.cpu_attention_bf16(q, k, v).transpose(1, 2)
    if kernel == "upcast":
        with torch.autocast("cpu", enabled=False):
            qf, kf, vf = q.float(), k.float(), v.float()
            if _attn.cpu_attention_enabled(qf, kf, vf, mask, p_drop):  # (autocast is off in this block)
                return _attn.cpu_attention(qf, kf, vf).transpose(1, 2).to(q.dtype)
            return F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, dropout_p=p_drop).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)


def self_attention_kernel(x: Tensor, head_dim: int) -> bool:
    """Whether q/k/v projected from ``x`` under the current autocast would run dinov2od's bfloat16
    attention kernel (CPU bfloat16 autocast at inference, the ``cpu_attention`` option on, the
    kernel built): then a caller holding an ``nn.MultiheadAttention`` projects them itself and calls
    :func:`attention`; elsewhere it calls the module."""
    return (head_dim in _attn.BF16_HEAD_DIMS and current_options().cpu_attention and _fl.bf16_linear_enabled(x)
            and _attn.cpu_attention_bf16_available())


def weight_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype to keep copies of the weights in for :func:`linear` on ``x``: ``torch.bfloat16``
    under CPU bfloat16 autocast at inference on a CPU with native bfloat16 (products as autocast
    makes them, weights cast once instead of at every call), else None (use the weights as they are)."""
    return torch.bfloat16 if _fl.bf16_linear_enabled(x) else None


def block_kernel(x: Tensor, training: bool) -> Optional[torch.dtype]:
    """Which fused ViT block runs on tokens ``x`` (the block's q/k/v as one product with the LoRA
    deltas merged, its linears through :func:`linear`): ``torch.float32`` (CPU float32 inference),
    ``torch.bfloat16`` (CPU bfloat16 autocast at inference on a CPU with native bfloat16; weights
    cast once), or None (the block as written: training, gradients, other devices, the
    ``fused_blocks`` or ``fused_linear`` option off)."""
    if training or not current_options().fused_blocks:
        return None
    if not torch.is_grad_enabled() and _fl.fused_linear_enabled(x):
        return torch.float32
    return weight_dtype(x)


_CACHE_ATTR = "_dinov2od_cast_once"


def tensors_key(tensors: Sequence[Optional[Tensor]]) -> tuple:
    """What a copy made from ``tensors`` depends on: each one's storage, version counter, shape, dtype
    and device (an optimizer step, ``load_state_dict``, ``.to()`` or an in-place edit changes it)."""
    return tuple(None if t is None else (t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device) for t in tensors)


def cached(owner: nn.Module, name: str, tensors: Sequence[Optional[Tensor]], build: Callable[[], object],
           key: Optional[tuple] = None):
    """``build()``, kept on ``owner`` under ``name`` until one of ``tensors`` changes
    (:func:`tensors_key`), or, where the caller gives it, until ``key`` changes."""
    key = tensors_key(tensors) if key is None else key
    store = owner.__dict__.setdefault(_CACHE_ATTR, {})
    hit = store.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    store[name] = (key, value)
    return value


def cast_pair(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """Detached copies of a weight (contiguous) and bias in ``dtype``."""
    return weight.detach().to(dtype).contiguous(), (None if bias is None else bias.detach().to(dtype))


def cast_once(module: nn.Module, dtype: torch.dtype, names: Tuple[str, str] = ("weight", "bias")
              ) -> Tuple[Tensor, Optional[Tensor]]:
    """``module``'s weight and bias (attributes ``names``) in ``dtype``, cast once and kept until they
    change (:func:`cached`): what :func:`weight_dtype` asks for instead of autocast's cast at every call."""
    w, b = (getattr(module, n) for n in names)
    return cached(module, f"{names[0]}:{dtype}", (w, b), lambda: cast_pair(w, b, dtype))


def linear_module(module: nn.Module, x: Tensor, activation: Optional[str] = None) -> Tensor:
    """``activation(module(x))`` for a linear layer: where :func:`weight_dtype` asks for bfloat16
    (CPU bfloat16 autocast at inference), :func:`linear` on weights cast once (:func:`cast_once`):
    one bfloat16 product with the bias and activation fused, no per-call weight cast; elsewhere, and
    for anything but an ``nn.Linear`` (LoRA, int8), the module itself."""
    dtype = weight_dtype(x) if isinstance(module, nn.Linear) else None
    if dtype is None:
        out = module(x)
        if activation == "relu":
            return out.relu()
        return F.gelu(out) if activation == "gelu" else out
    return linear(x, *cast_once(module, dtype), activation)


def conv_module(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` for an ``nn.Conv2d`` or ``nn.ConvTranspose2d``, with weights cast once where
    :func:`weight_dtype` asks for bfloat16 (autocast then casts only ``x``, if it is not bfloat16 yet)."""
    dtype = weight_dtype(x)
    if dtype is None or type(module) not in (nn.Conv2d, nn.ConvTranspose2d):
        return module(x)
    weight, bias = cast_once(module, dtype)
    if type(module) is nn.Conv2d:
        return module._conv_forward(x, weight, bias)
    if module.padding_mode != "zeros" or module.output_padding != (0,) * len(module.output_padding):
        return module(x)
    return F.conv_transpose2d(x, weight, bias, module.stride, module.padding, 0, module.groups, module.dilation)
