"""Training-loop pieces Detectron2 0.7 lacks: gradient accumulation, full-model gradient
clipping, device-agnostic AMP (fp16/bf16, CPU or CUDA), a named non-finite-loss stop, and an
exponential moving average (EMA) of the weights with an evaluation hook for it.

Everything else (hooks, writers, checkpointing, LR schedule) is Detectron2's own.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
import time
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import HookBase, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = [
    "DetrTrainerLoop",
    "EMAHook",
    "ModelEMA",
    "RNGStateHook",
    "skip_train_samples",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

_PRECISIONS = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _make_grad_scaler(enabled: bool):
    """A GradScaler for CUDA fp16 (disabled scalers are no-ops with a loadable state)."""
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        try:
            return torch.amp.GradScaler("cuda", enabled=enabled)
        except TypeError:  # older signature
            pass
    return torch.cuda.amp.GradScaler(enabled=enabled)


class DetrTrainerLoop(SimpleTrainer):
    """Detectron2's :class:`SimpleTrainer` with the extras DETR training needs.

    One iteration = one optimizer step over ``accumulate_steps`` micro-batches (each from the
    data loader), so ``max_iter``, the LR schedule and checkpoints count optimizer steps.
    Each loss term is checked before the backward pass: a non-finite term raises
    :class:`FloatingPointError` naming the iteration and the term, before any weight changes,
    so the last saved checkpoint is the last good state.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        accumulate_steps: int = 1,
        clip_max_norm: float = 0.0,
        amp_enabled: bool = False,
        amp_precision: str = "float16",
    ):
        """
        Args:
            model, data_loader, optimizer: as in :class:`SimpleTrainer`.
            accumulate_steps: micro-batches per optimizer step (>= 1).
            clip_max_norm: clip the L2 norm of all gradients together to this; 0 disables.
            amp_enabled: run forward in autocast.
            amp_precision: "float16"/"fp16" (CUDA; uses a GradScaler) or "bfloat16"/"bf16".
        """
        super().__init__(model, data_loader, optimizer)
        if accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}.")
        if amp_precision not in _PRECISIONS:
            raise ValueError(f"amp precision {amp_precision!r} is not one of {sorted(_PRECISIONS)}.")
        self.accumulate_steps = int(accumulate_steps)
        self.clip_max_norm = float(clip_max_norm)
        self.amp_enabled = bool(amp_enabled)
        self.amp_dtype = _PRECISIONS[amp_precision]
        self.device_type = _model_device(model).type
        use_scaler = self.amp_enabled and self.amp_dtype == torch.float16 and self.device_type == "cuda"
        self.grad_scaler = _make_grad_scaler(use_scaler)

    def _autocast(self):
        if not self.amp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    def _check_finite(self, loss_dict: Dict[str, torch.Tensor]) -> None:
        """Raise FloatingPointError naming the iteration and every non-finite loss term."""
        bad = {k: float(v.detach()) for k, v in loss_dict.items() if not torch.isfinite(v).all()}
        flag = torch.tensor([1.0 if bad else 0.0], device=next(iter(loss_dict.values())).device)
        if comm.get_world_size() > 1:  # every rank stops together
            torch.distributed.all_reduce(flag)
        if flag.item() > 0:
            where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
            raise FloatingPointError(
                f"Non-finite loss at iteration {self.iter}: {where}. Training stopped before the "
                "optimizer step; the last saved checkpoint is intact. Lower the learning rate, "
                "enable gradient clipping, or check the data of this iteration."
            )

    def _micro_step(self, data, last: bool) -> Dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; gradients of earlier micro-batches are kept."""
        sync = contextlib.nullcontext()
        if not last and isinstance(self.model, DistributedDataParallel):
            sync = self.model.no_sync()  # all-reduce only on the last micro-batch
        with sync:
            with self._autocast():
                loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            self._check_finite(loss_dict)
            losses = sum(loss_dict.values()) / self.accumulate_steps
            self.grad_scaler.scale(losses).backward()
        return {k: v.detach() for k, v in loss_dict.items()}

    def _clip_gradients(self) -> Optional[float]:
        if self.clip_max_norm <= 0:
            return None
        self.grad_scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return float(torch.nn.utils.clip_grad_norm_(params, self.clip_max_norm))

    def run_step(self) -> None:
        assert self.model.training, "[DetrTrainerLoop] model was changed to eval mode!"
        self.optimizer.zero_grad(set_to_none=True)
        data_time = 0.0
        summed: Dict[str, torch.Tensor] = {}
        for k in range(self.accumulate_steps):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            loss_dict = self._micro_step(data, last=k == self.accumulate_steps - 1)
            for name, v in loss_dict.items():
                summed[name] = summed.get(name, 0) + v / self.accumulate_steps
        self.after_backward()
        grad_norm = self._clip_gradients()
        self._write_metrics(summed, data_time)
        if grad_norm is not None and comm.is_main_process():
            get_event_storage().put_scalar("grad_norm", grad_norm)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self):
        ret = super().state_dict()
        ret["grad_scaler"] = self.grad_scaler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


class ModelEMA:
    """Exponential moving average of a model's trainable parameters and floating buffers.

    ``decay`` ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates ``n``.
    It is a Detectron2 checkpointable (``state_dict`` / ``load_state_dict``), so
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
        self.decay = decay
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in self._tracked()}

    def _tracked(self) -> Iterator:
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                yield name, p
        for name, b in self.model.named_buffers():
            if b.is_floating_point():
                yield name, b

    @torch.no_grad()
    def update(self) -> None:
        """Blend the model's current weights into the average."""
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, v in self._tracked():
            self.shadow[name].mul_(d).add_(v.detach(), alpha=1 - d)

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


class RNGStateHook(HookBase):
    """Save the process's random states with each checkpoint and restore them on resume.

    Trainer hooks' ``state_dict`` is written into every checkpoint by Detectron2, so a resumed
    run continues the same random streams (dropout, main-process augmentation) as an
    uninterrupted one. The loaded states are applied in ``before_train`` *after* the data
    loader's iterator exists (creating it draws from the torch generator, which the
    uninterrupted run did at iteration 0, not at the resume point).
    """

    def __init__(self):
        self._pending: Optional[dict] = None

    def state_dict(self) -> dict:
        return {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def before_train(self) -> None:
        if self._pending is None:
            return
        loop = getattr(self.trainer, "_trainer", self.trainer)  # DefaultTrainer wraps the loop
        if hasattr(loop, "_data_loader_iter"):
            loop._data_loader_iter  # noqa: B018  (creates the iterator now)
        torch.set_rng_state(self._pending["torch"])
        np.random.set_state(self._pending["numpy"])
        random.setstate(self._pending["python"])
        self._pending = None


class _SkipSampler(Sampler):
    """Yield the indices of ``sampler`` after dropping the first ``num_skip``."""

    def __init__(self, sampler, num_skip: int):
        self.sampler = sampler
        self.num_skip = num_skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.num_skip, None)


def skip_train_samples(data_loader, num_skip: int) -> bool:
    """Make a Detectron2 train loader start ``num_skip`` samples (per rank) into its stream.

    Used on resume so that the resumed run sees the same images as an uninterrupted run. Exact
    when the loader has no aspect-ratio grouping and ``num_workers`` <= 1.

    Args:
        data_loader: a loader from :func:`build_detection_train_loader` (not iterated yet).
        num_skip: samples to drop (iterations * images per rank per iteration).

    Returns:
        whether the loader's sampler was found and wrapped.
    """
    obj = data_loader
    for _ in range(4):  # DataLoader -> [AspectRatioGroupedDataset] -> [MapDataset] -> ToIterableDataset
        if hasattr(obj, "sampler") and hasattr(obj, "shard_sampler"):
            if num_skip > 0:
                obj.sampler = _SkipSampler(obj.sampler, num_skip)
            return True
        obj = getattr(obj, "dataset", None)
        if obj is None:
            break
    logger.warning("Could not find the train loader's sampler; a resumed run restarts its data stream.")
    return False
