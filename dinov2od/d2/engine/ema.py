"""An exponential moving average (EMA) of the weights, its hook, and its export for predictors.

The EMA is saved inside every training checkpoint (key ``"ema"``). After the last iteration (before
the evaluation after training, so a failed evaluation still leaves it: :class:`EMAExportHook`), its
weights are also written as a plain weights file, ``model_final_ema.pth``, which ``DefaultPredictor``
and ``tools/predict.py`` load like any checkpoint. That export is never tagged as
``last_checkpoint``: the tag always names a full training checkpoint, so ``--resume`` continues
with the optimizer, scheduler and EMA state.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Dict, Iterator, Optional

import torch
from torch import nn

from detectron2.engine import HookBase
from detectron2.utils import comm

from dinov2od.modeling.checkpoint_io import export_for_inference

from ..checkpoint.checkpointer import atomic_save, non_finite_entries
from .train_loop import unwrap_model

__all__ = ["EMA_WEIGHTS_FILE", "EMAExportHook", "EMAHook", "ModelEMA", "export_ema_weights"]

EMA_WEIGHTS_FILE = "model_final_ema.pth"


class ModelEMA:
    """Exponential moving average of a model's trainable parameters and saved floating buffers.

    Update ``n`` (from 1) blends with decay ``d_n = min(decay, (1 + n) / (10 + n))``:
    ``shadow = d_n * shadow + (1 - d_n) * weights``, so early averages follow the weights closely.
    It is a Detectron2 checkpointable (``state_dict`` / ``load_state_dict``):
    ``DetectionCheckpointer(model, ema=ema)`` saves it under the key ``"ema"``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997):
        """
        Args:
            model: the model (a DDP wrapper is unwrapped).
            decay: the EMA decay per update, in (0, 1).
        """
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}.")
        self.model = unwrap_model(model)
        self._saved_buffers = {n for n, _ in self.model.named_buffers()} & set(self.model.state_dict())
        self.decay = decay
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self._tracked()}

    def _tracked(self) -> Iterator:
        """Trainable parameters and the floating buffers saved in ``state_dict`` (statistics such as
        BatchNorm's). Non-persistent buffers are constants (e.g. the pixel mean): averaging them
        would only add rounding error."""
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield name, p
        for name, b in self.model.named_buffers():
            if b.is_floating_point() and name in self._saved_buffers:
                yield name, b

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average over from the model's current weights (e.g. after loading weights)."""
        self.num_updates = 0
        for name, v in self._tracked():
            self.shadow[name].copy_(v)

    @torch.no_grad()
    def update(self) -> None:
        """Blend the model's current weights into the average."""
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, v in self._tracked():
            self.shadow[name].mul_(d).add_(v.detach(), alpha=1 - d)

    def averaged_state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's ``state_dict`` with the averaged values in place of the tracked entries."""
        return {k: self.shadow.get(k, v) for k, v in self.model.state_dict().items()}

    @contextlib.contextmanager
    def apply_to_model(self):
        """Temporarily load the averaged weights into the model (e.g. to evaluate it)."""
        tracked = dict(self._tracked())
        backup = {k: v.detach().clone() for k, v in tracked.items()}
        with torch.no_grad():
            for k, v in tracked.items():
                v.copy_(self.shadow[k])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for k, v in tracked.items():
                    v.copy_(backup[k])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}...; was it saved from another model?")
        self.num_updates = int(state["num_updates"])
        for k in self.shadow:
            self.shadow[k].copy_(state["shadow"][k])


class EMAHook(HookBase):
    """Update a :class:`ModelEMA` after every optimizer step."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def after_step(self) -> None:
        self.ema.update()


class EMAExportHook(HookBase):
    """Write ``model_final_ema.pth`` (:func:`export_ema_weights`) once training has done its last
    iteration, in ``after_train`` before the evaluation after training (place it before ``EvalHook``):
    an evaluation that fails, or is killed, still leaves the file.

    Nothing is written when training stopped early (an error in an iteration, a non-finite loss
    or gradient: ``TrainerBase`` leaves ``iter`` below ``max_iter``) or while a ``FloatingPointError``
    propagates; non-finite EMA weights are refused by :func:`export_ema_weights` itself.
    """

    def __init__(self, ema: ModelEMA, output_dir: str):
        self.ema = ema
        self.output_dir = output_dir

    def after_train(self) -> None:
        if self.trainer.iter < self.trainer.max_iter:  # TrainerBase sets iter = max_iter after the last one
            return
        if isinstance(sys.exc_info()[1], FloatingPointError):
            return
        export_ema_weights(self.ema, self.output_dir)


def export_ema_weights(ema: Optional[ModelEMA], output_dir: str) -> Optional[str]:
    """Write the EMA weights as a plain weights file, ``<output_dir>/model_final_ema.pth``.

    The file holds only ``{"model": averaged weights}`` (what ``DefaultPredictor`` loads). It is
    written crash-safely and does not touch ``last_checkpoint``; non-finite weights raise
    FloatingPointError and write nothing. The same weights are also written as
    ``model_final_ema.safetensors`` with ``model_final_ema.json`` beside it (classes, the detector's
    constructor arguments, input settings, the run's ``config.yaml``:
    :func:`~dinov2od.modeling.checkpoint_io.export_for_inference`), the format to share them in.

    Returns:
        the path written (the ``.pth``), or None without EMA or off the main process.
    """
    if ema is None or not comm.is_main_process():
        return None
    path = os.path.join(output_dir, EMA_WEIGHTS_FILE)
    weights = ema.averaged_state_dict()
    bad = non_finite_entries(weights)
    if bad:
        raise FloatingPointError(
            f"Refusing to write {path}: the EMA weights are not finite ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); nothing was written."
        )
    atomic_save({"model": weights}, path)
    config = os.path.join(output_dir, "config.yaml")  # written by train_net.py (default_setup)
    export_for_inference(ema.model, os.path.splitext(path)[0] + ".safetensors", weights, ema_updates=ema.num_updates,
                         config_file="config.yaml" if os.path.isfile(config) else None)
    return path
