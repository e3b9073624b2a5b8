"""Mixed precision for the training loop, all in one place: autocast, the GradScaler, and the
optimizer step around them (unscale, clip, step unless an fp16 gradient overflowed, update).

This module imports only torch, so ``tools/gpu_check.sh`` runs its CUDA test
(``tests/d2/test_amp_cuda.py``) on the GPU machine, which has no Detectron2.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Optional

import torch

__all__ = ["PRECISIONS", "MixedPrecision"]

logger = logging.getLogger(__name__)

PRECISIONS = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _grad_scaler(enabled: bool):
    """A CUDA GradScaler (a disabled one is a no-op whose state still saves and loads)."""
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        try:
            return torch.amp.GradScaler("cuda", enabled=enabled)
        except TypeError:  # torch < 2.3: no device argument
            pass
    return torch.cuda.amp.GradScaler(enabled=enabled)


class MixedPrecision:
    """Autocast and loss scaling for one training loop, on any device.

    Detectron2's ``AMPTrainer`` autocasts only on CUDA and only in fp16. Here the forward pass runs
    in ``torch.autocast`` on the model's own device type (CPU included) in fp16 or bf16. fp16
    gradients overflow beyond 65504, so on CUDA fp16 the loss is scaled (a ``GradScaler``); bf16
    has fp32's range and needs no scaling.

    Usage per optimizer step: ``with mp.autocast(): loss = ...``; ``mp.backward(loss)`` for each
    micro-batch; then ``mp.step(optimizer, params, max_norm)``.
    """

    def __init__(self, enabled: bool = False, precision: str = "float16", device_type: str = "cuda"):
        """
        Args:
            enabled: run the forward pass in autocast.
            precision: "float16"/"fp16" or "bfloat16"/"bf16".
            device_type: the model's device type ("cuda", "cpu", ...).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"amp precision {precision!r} is not one of {sorted(PRECISIONS)}.")
        self.enabled = bool(enabled)
        self.dtype = PRECISIONS[precision]
        self.device_type = device_type
        self.scaler = _grad_scaler(self.enabled and self.dtype == torch.float16 and device_type == "cuda")

    def autocast(self):
        """The context for the forward pass (and the loss)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the (scaled, under fp16) loss; gradients add up across micro-batches."""
        self.scaler.scale(loss).backward()

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        params: Iterable[torch.Tensor],
        max_norm: float = 0.0,
        norm_type: float = 2.0,
    ) -> Optional[float]:
        """Clip and apply the accumulated gradients.

        The gradients are unscaled *before* clipping, so ``max_norm`` bounds the true gradient
        norm of all ``params`` together (one norm over the whole model, not one per parameter).
        Under fp16, a step whose gradients overflowed is skipped and the scale is lowered.

        Args:
            optimizer: the optimizer to step.
            params: the parameters whose gradients are clipped together.
            max_norm: clip threshold; 0 disables clipping.
            norm_type: the p of the p-norm.

        Returns:
            the gradient norm before clipping (None without clipping).
        """
        norm = None
        if max_norm > 0:
            self.scaler.unscale_(optimizer)
            norm = float(torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type))
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler.is_enabled() and not state:
            logger.info("The checkpoint has no loss-scaler state (saved without fp16); starting a fresh scale.")
            return
        self.scaler.load_state_dict(state)
