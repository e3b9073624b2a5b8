"""int8 dynamic quantization of the linear layers, for CPU inference.

:func:`quantize_dynamic_int8` returns a copy of a model whose ``nn.Linear`` layers run in int8
(torch's ``torch.ao.quantization.quantize_dynamic``: weights quantized once, per output channel;
activations quantized at each call from their range; the x86/fbgemm int8 kernels, with VNNI where
the CPU has it). LoRA adapters are merged into the weights they adapt first (peft's ``merge``), so the
quantized linear is the adapted one. The copy is for inference only (no gradients, CPU only); the
model given is left as it was.

Its speed and the demo's AP with and without it: docs/speed.md, "int8 dynamic quantization".
"""
from __future__ import annotations

import copy
import logging
import warnings
from typing import Tuple

import torch
from torch import nn

logger = logging.getLogger("dinov2od")

__all__ = ["QUANTIZE_SCOPES", "merge_lora_adapters", "quantize_dynamic_int8"]

# What to quantize: the ViT's linears only, or every linear layer of the model.
QUANTIZE_SCOPES: Tuple[str, ...] = ("backbone", "all")


def merge_lora_adapters(model: nn.Module) -> int:
    """Merge every peft LoRA layer of ``model`` into its base layer and put the base layer in its
    place (in place). Returns the number of layers merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return 0
    merged = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                if not child.merged and not child.disable_adapters:
                    child.merge()
                setattr(parent, name, child.get_base_layer())
                merged += 1
    return merged


def _backbone_of(model: nn.Module) -> nn.Module:
    for attr in ("detector", "backbone"):
        while hasattr(model, attr):
            model = getattr(model, attr)
    return model


def quantize_dynamic_int8(model: nn.Module, scope: str = "all") -> nn.Module:
    """An int8 copy of ``model`` for CPU inference (see the module doc).

    Args:
        model: a :class:`~dinov2od.modeling.DINOv2ObjectDetector`, Detectron2's ``DINOv2DETR``,
            or any module, on the CPU.
        scope: ``"all"``: every ``nn.Linear``; ``"backbone"``: the ViT's only (the detector's
            ``backbone``; the neck, decoder and heads stay fp32).

    Returns:
        the quantized copy, in eval mode.

    Raises:
        ValueError: the model is not on the CPU, or ``scope`` is unknown.
        RuntimeError: this torch build has no int8 CPU engine.
    """
    if scope not in QUANTIZE_SCOPES:
        raise ValueError(f"scope={scope!r}: expected one of {QUANTIZE_SCOPES}")
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise ValueError(f"int8 dynamic quantization runs on the CPU; the model is on {sorted(devices)}: "
                         "move it with model.cpu() first (or evaluate with MODEL.DEVICE / train.device 'cpu')")
    quantize_dynamic = getattr(getattr(torch.ao, "quantization", None), "quantize_dynamic", None)
    if quantize_dynamic is None:  # deprecated since torch 2.9 in favour of torchao; still present in 2.14
        raise RuntimeError(f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic; its successor "
                           "is torchao (quantize_(model, Int8DynamicActivationInt8WeightConfig())), not wired here")
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "onednn", "qnnpack")):
        raise RuntimeError(f"this torch build has no int8 CPU engine (supported: {engines})")
    model = copy.deepcopy(model).eval()
    merged = merge_lora_adapters(model)
    target = _backbone_of(model) if scope == "backbone" else model
    before = sum(type(m) is nn.Linear for m in target.modules())  # (MultiheadAttention's out_proj stays fp32)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():  # torch >= 2.9: "torch.ao.quantization is deprecated" (it still works)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        quantize_dynamic(target, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    logger.info("int8 dynamic quantization (%s): %d linear layers, %d LoRA adapters merged first, engine %s",
                scope, before, merged, torch.backends.quantized.engine)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
