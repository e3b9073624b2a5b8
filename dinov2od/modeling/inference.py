"""What a ViT block computes, gathered for the fused CPU inference path of the backbone.

:func:`inference_block_parts` reads one transformers ViT block (DINOv2 or DINOv3, either
transformers layout, with or without peft LoRA adapters) into plain tensors: the q/k/v weights
concatenated into one (B T, D) x (D, 3D) product, every active LoRA adapter merged into the weight
it adapts (``W + scaling * B @ A``, peft's own ``get_delta_weight``), the layer-scale vectors, and
the MLP's linears with their activation. Nothing is cached or written back: the parts are rebuilt
at each call from the current parameters (a concatenation of the q/k/v weights per block, small
against the block's products), so training, checkpoints and adapters never see them.

The bfloat16 path (CPU bfloat16 autocast on a CPU with native bfloat16) takes bfloat16 copies of
the same parts from :func:`cached_block_parts`: made once and kept on the block until any of its
parameters or adapter settings change (the key holds every parameter's storage and version counter
and the LoRA modules' active adapters, scalings and merge state), so that the weights are not cast
again at every call, as autocast does.

Where a block holds something these parts cannot express (a gated MLP, DoRA or a LoRA bias, an
unknown module), it returns None and the block runs as written.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from dinov2od.layers.kernels import cached, cast_pair

__all__ = ["InferenceBlockParts", "block_parts", "cached_block_parts", "effective_linear", "inference_block_parts"]

Linear = Tuple[Tensor, Optional[Tensor]]
# (first linear, activation, second linear) of a plain MLP: DINOv2 in transformers 4.x and 5.x, DINOv3
_MLP_LAYOUTS = (("fc1", "activation", "fc2"), ("fc1", "activation_fn", "fc2"), ("up_proj", "act_fn", "down_proj"))


class InferenceBlockParts(NamedTuple):
    qkv_weight: Tensor  # (3D, D)
    qkv_bias: Optional[Tensor]  # (3D,)
    out: Linear  # output projection
    scale1: Optional[Tensor]  # layer-scale vectors (None: call the module)
    scale2: Optional[Tensor]
    mlp: Optional[Tuple[Linear, Union[str, nn.Module], Linear]]  # fc1, "gelu" or the activation module, fc2


def effective_linear(module: nn.Module) -> Optional[Linear]:
    """``(weight, bias)`` with ``module(x) == F.linear(x, weight, bias)`` at inference: an
    ``nn.Linear``, or a peft LoRA ``Linear`` with its active plain-LoRA adapters merged. None for
    anything else (DoRA and other LoRA variants, LoRA biases, other module types)."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    base_getter = getattr(module, "get_base_layer", None)
    if base_getter is None or not hasattr(module, "lora_A") or not hasattr(module, "get_delta_weight"):
        return None
    base = base_getter()
    if type(base) is not nn.Linear:
        return None
    weight = base.weight
    if module.disable_adapters or module.merged:  # merged: the base weight holds the adapters already
        return weight, base.bias
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False) \
                or module.lora_B[name].bias is not None:
            return None
        weight = weight + module.get_delta_weight(name)
    return weight, base.bias


def _activation(act: nn.Module) -> Optional[Union[str, nn.Module]]:
    """"gelu" where ``act`` is the exact (erf) GELU that oneDNN fuses; the module itself otherwise."""
    try:
        from transformers.activations import GELUActivation
    except ImportError:  # pragma: no cover - transformers is a dependency
        GELUActivation = ()
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if GELUActivation and type(act) is GELUActivation:
        return "gelu"
    return act


def _layer_scale(module: nn.Module) -> Optional[Tensor]:
    lam = getattr(module, "lambda1", None)
    return lam if isinstance(lam, Tensor) and lam.dim() == 1 else None


def inference_block_parts(layer: nn.Module, attention_parts) -> Optional[InferenceBlockParts]:
    """The parts of one ViT block (see the module doc), or None where one cannot be read.

    Args:
        layer: a transformers DINOv2/DINOv3 block (``norm1, attention, layer_scale1, norm2, mlp,
            layer_scale2``).
        attention_parts: the family's ``(q, k, v, output, dropout)`` of ``layer.attention``.
    """
    q, k, v, o = (effective_linear(m) for m in attention_parts[:4])
    if q is None or k is None or v is None or o is None:
        return None
    weight = torch.cat([q[0], k[0], v[0]], 0)
    if q[1] is None and k[1] is None and v[1] is None:
        bias = None
    else:
        bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in (q, k, v)])
    mlp = layer.mlp
    mlp_parts = None
    for names in _MLP_LAYOUTS:
        if all(hasattr(mlp, n) for n in names) and not hasattr(mlp, "gate_proj"):
            fc1, fc2 = effective_linear(getattr(mlp, names[0])), effective_linear(getattr(mlp, names[2]))
            if fc1 is not None and fc2 is not None:
                mlp_parts = (fc1, _activation(getattr(mlp, names[1])), fc2)
            break
    return InferenceBlockParts(weight, bias, o, _layer_scale(layer.layer_scale1), _layer_scale(layer.layer_scale2),
                               mlp_parts)


def _parts_key(layer: nn.Module, dtype: torch.dtype) -> tuple:
    """What the parts of ``layer`` depend on: each parameter's storage and version counter (an
    optimizer step or a load_state_dict bumps it), and each LoRA module's adapter state."""
    key = [dtype]
    for p in layer.parameters():
        key.append((p.data_ptr(), p._version, tuple(p.shape)))
    for m in layer.modules():
        if hasattr(m, "lora_A"):
            key.append((tuple(m.active_adapters), bool(m.disable_adapters), bool(m.merged),
                        tuple(sorted(getattr(m, "scaling", {}).items()))))
    return tuple(key)


def cached_block_parts(layer: nn.Module, attention_parts, dtype: torch.dtype) -> Optional[InferenceBlockParts]:
    """:func:`inference_block_parts` of ``layer`` with every weight, bias and layer scale in
    ``dtype`` (layer scales stay float32: they scale the float32 residual stream), kept on the
    layer until what they are made of changes (see the module doc). None where the block cannot
    be read."""
    def build() -> Optional[InferenceBlockParts]:
        parts = inference_block_parts(layer, attention_parts)
        if parts is None:
            return None
        mlp = None
        if parts.mlp is not None:
            fc1, act, fc2 = parts.mlp
            mlp = (cast_pair(*fc1, dtype), act, cast_pair(*fc2, dtype))
        scale = (lambda t: None if t is None else t.detach().float())
        return InferenceBlockParts(*cast_pair(parts.qkv_weight, parts.qkv_bias, dtype), cast_pair(*parts.out, dtype),
                                   scale(parts.scale1), scale(parts.scale2), mlp)

    return cached(layer, f"block_parts:{dtype}", (), build, key=_parts_key(layer, dtype))


def block_parts(layer: nn.Module, attention_parts, dtype: torch.dtype) -> Optional[InferenceBlockParts]:
    """The parts the fused block runs in ``dtype`` (what :func:`dinov2od.layers.kernels.block_kernel`
    chose): float32, :func:`inference_block_parts` (rebuilt at each call); bfloat16,
    :func:`cached_block_parts` where the MLP is absent or GELU (oneDNN fuses it). None: run the
    block as written."""
    if dtype == torch.float32:
        return inference_block_parts(layer, attention_parts)
    parts = cached_block_parts(layer, attention_parts, dtype)
    if parts is None or not (parts.mlp is None or parts.mlp[1] == "gelu"):
        return None
    return parts
