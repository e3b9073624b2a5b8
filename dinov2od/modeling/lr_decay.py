"""Layer-wise learning-rate decay for a fine-tuned ViT backbone (BEiT, ViTDet; RF-DETR uses 0.8).

Blocks near the input hold the most general pretrained features and get the smallest learning
rate. With ``L`` blocks, a parameter of layer ``l`` gets ``decay ** (L + 1 - l)`` times the base
LR, where the patch/position embeddings and the class/register tokens are layer 0, block ``i``
(0-based) is layer ``i + 1``, and everything else (the ViT's final norm, the neck, the decoder,
the heads) is layer ``L + 1``, factor 1, as in ViTDet.

LoRA adapters get factor 1 by default: the decay protects *pretrained* weights from being
rewritten too fast, and an adapter starts at zero with nothing pretrained to protect. In the
frozen + LoRA recipe the adapters are the backbone's only way to adapt, and ``0.8 ** 12 = 0.07``
at the first block would nearly switch its adapters off. ``decay_lora=True`` treats them like the
weights of their block instead.

Used through Detectron2's ``get_default_optimizer_params(model, ..., lr_factor_func=f)``, which
calls ``f(name)`` for each trainable parameter (``name`` as in ``model.named_parameters()``)::

    f = backbone_lr_decay(0.8, model=model)   # or backbone_lr_decay(0.8, num_layers=12)
    f("detector.backbone.vit.encoder.layer.0.mlp.fc1.weight")  # 0.8 ** 12
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Optional

from torch import nn

__all__ = ["backbone_lr_decay", "num_vit_layers", "vit_lr_decay_factor"]

# DINOv2: vit.encoder.layer.<i>; DINOv3: vit.layer.<i> (transformers 4) or vit.model.layer.<i> (5)
_BLOCK = re.compile(r"(?:^|\.)vit\.(?:encoder\.|model\.)?layer\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)vit\.embeddings\.")


def vit_lr_decay_factor(name: str, decay: float, num_layers: int, decay_lora: bool = False) -> float:
    """LR factor of the parameter ``name`` (see the module docstring).

    Args:
        name: parameter name, e.g. ``detector.backbone.vit.encoder.layer.3.mlp.fc1.weight``.
        decay: the per-layer factor (1 = no decay).
        num_layers: L, the ViT's number of blocks.
        decay_lora: decay LoRA adapters like their block (default: factor 1).

    Returns:
        ``decay ** (num_layers + 1 - layer)``; 1 outside the ViT's embeddings and blocks.

    Raises:
        ValueError: a block index >= ``num_layers`` (``num_layers`` is not the ViT's depth).
    """
    if "lora_" in name and not decay_lora:
        return 1.0
    if _EMBEDDINGS.search(name):
        layer = 0
    else:
        block = _BLOCK.search(name)
        if block is None:
            return 1.0
        layer = int(block.group(1)) + 1
        if layer > num_layers:
            raise ValueError(f"{name} is in block {layer - 1} but num_layers={num_layers}; set num_layers to "
                             "the ViT's depth (or pass model= to read it)")
    return float(decay) ** (num_layers + 1 - layer)


def num_vit_layers(model: nn.Module) -> int:
    """Number of ViT blocks in ``model`` (the largest ``vit.encoder.layer.<i>`` / ``vit.layer.<i>`` index + 1).

    Raises:
        ValueError: the model has no such parameters.
    """
    found = [int(m.group(1)) for m in (_BLOCK.search(n) for n, _ in model.named_parameters()) if m]
    if not found:
        raise ValueError("backbone LR decay: the model has no DINOv2 ViT blocks nor DINOv3 ones (no "
                         "'vit.encoder.layer.<i>.' or 'vit.layer.<i>.' parameters); use decay=1.0 for this model")
    return max(found) + 1


def backbone_lr_decay(decay: float = 1.0, num_layers: Optional[int] = None, model: Optional[nn.Module] = None,
                      decay_lora: bool = False) -> Callable[[str], float]:
    """``lr_factor_func`` for ``get_default_optimizer_params``: name -> LR factor.

    Args:
        decay: per-layer factor in (0, 1]; 1 gives factor 1 everywhere (no decay).
        num_layers: the ViT's depth; or None to read it from ``model``.
        model: the model whose parameters will be optimized (read when ``num_layers`` is None).
        decay_lora: see :func:`vit_lr_decay_factor`.

    Returns:
        a function of one parameter name.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"backbone LR decay={decay} must be in (0, 1] (1 = off; RF-DETR uses 0.8)")
    if decay == 1.0:
        return _no_decay
    if num_layers is None:
        if model is None:
            raise ValueError("backbone_lr_decay needs num_layers or the model to read the ViT's depth from")
        num_layers = num_vit_layers(model)
    return functools.partial(vit_lr_decay_factor, decay=float(decay), num_layers=int(num_layers),
                             decay_lora=decay_lora)


def _no_decay(name: str) -> float:
    return 1.0
