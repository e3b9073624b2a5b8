"""The options every backbone family takes, with their defaults: the one place they are written.

Each family's constructor takes the fields of :class:`BackboneOptions` (their defaults read from
here, ``lora_rank: int = BackboneOptions.lora_rank``) plus options of its own, each with a default
in its signature (DINOv2: ``registers``, ``pos_embed_init``, ``pos_interpolation``; DINOv3:
``rope_train_augment``). The lazy model config and the yacs keys are derived from these values
(``dinov2od.d2.config.model``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

__all__ = ["BackboneOptions"]


@dataclasses.dataclass(frozen=True)
class BackboneOptions:
    """The options shared by every backbone family (:data:`~.base.SHARED_OPTIONS`).

    Attributes:
        arch: the family's architecture name (``"small"``, ``"base"`` ...); None infers it from
            ``pretrained`` (``"small"`` without weights: the plain API's ViT-S; the configs name
            ViT-B).
        arch_overrides: config fields replacing the arch's, e.g. ``dict(hidden_size=48)``.
        pretrained: None (random init), a Hugging Face id, a local ``save_pretrained`` folder, or
            Meta's official ``.pth`` checkpoint.
        out_indices: 0-based indices of the tapped blocks; None taps ``num_taps`` evenly spaced
            blocks ending with the last one.
        num_taps: number of taps when ``out_indices`` is None.
        lora_rank: LoRA rank r; 0 disables LoRA.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_targets: block sub-modules that get adapters, among ``query``, ``key``, ``value``,
            ``output``, ``fc1``, ``fc2``.
        lora_blocks: 0-based blocks that get adapters; None = every block.
        freeze: freeze the ViT's own weights (LoRA adapters stay trainable).
        drop_path_rate: stochastic depth of the ViT.
        apply_layernorm: the ViT's final LayerNorm on every tapped output.
        window_size: if set, ``window_blocks`` attend within non-overlapping windows of
            ``window_size`` x ``window_size`` patches (anchored at the top-left, so padding never
            moves a window) instead of globally; the class/register tokens are copied into every
            window and averaged afterwards over the windows that hold image patches. None: global
            attention in every block.
        window_blocks: 0-based windowed blocks; None = every block that is not tapped.
    """

    arch: Optional[str] = None
    arch_overrides: Optional[dict] = None
    pretrained: Optional[str] = None
    out_indices: Optional[Sequence[int]] = None
    num_taps: int = 4
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Sequence[str] = ("query", "value")
    lora_blocks: Optional[Sequence[int]] = None
    freeze: bool = True
    drop_path_rate: float = 0.0
    apply_layernorm: bool = True
    window_size: Optional[int] = None
    window_blocks: Optional[Sequence[int]] = None
