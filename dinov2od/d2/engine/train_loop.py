"""One training iteration: Detectron2's :class:`SimpleTrainer` with what DETR training needs and
Detectron2's ``AMPTrainer`` lacks. Each extra is written down where it lives:

* gradient accumulation over micro-batches, all-reducing DDP gradients only on the last one
  (``no_sync``): :meth:`DetrTrainerLoop._micro_step`;
* clipping the norm of all gradients together, after unscaling fp16 gradients:
  :meth:`dinov2od.d2.engine.amp.MixedPrecision.step`;
* autocast on the model's device, CPU included, in fp16 or bf16: :mod:`dinov2od.d2.engine.amp`;
* a non-finite loss stops every rank together, before any weight changes:
  :meth:`DetrTrainerLoop._check_finite`;
* a non-finite gradient norm stops training before the optimizer step, and non-finite weights
  after a step stop it before the EMA update and any checkpoint: :meth:`DetrTrainerLoop._apply_step`.

Hooks, writers, checkpoints and the LR schedule stay Detectron2's own.
"""
from __future__ import annotations

import contextlib
import time
import math
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from dinov2od.layers.precision import check_cpu_autocast

from .amp import MixedPrecision

__all__ = ["DetrTrainerLoop", "total_norm", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _grouped(tensors: List[torch.Tensor]) -> Dict[tuple, List[torch.Tensor]]:
    """``tensors`` by (device, dtype), the unit of torch's ``_foreach`` kernels."""
    groups: Dict[tuple, List[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def total_norm(tensors: List[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The ``norm_type``-norm of all ``tensors`` together, as ``clip_grad_norm_`` computes it
    (one ``_foreach_norm`` per device and dtype), as a 0-d float32 tensor left on the device (no sync)."""
    if not tensors:
        return torch.zeros(())
    device = tensors[0].device
    norms = []
    for group in _grouped(tensors).values():
        try:
            norms.extend(torch._foreach_norm(group, norm_type))
        except (RuntimeError, TypeError):  # a torch without this norm in _foreach_norm
            norms.extend(torch.linalg.vector_norm(t, norm_type) for t in group)
    return torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]), norm_type)


def _all_finite(tensors: List[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite (one sync).

    The common case costs one norm: a finite norm means finite elements. A non-finite norm can
    also come from finite values beyond ~1e19 overflowing the sum of squares, so it is
    confirmed element-wise."""
    if not tensors or math.isfinite(float(total_norm(tensors))):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class DetrTrainerLoop(SimpleTrainer):
    """:class:`SimpleTrainer` with accumulation, whole-model clipping, AMP anywhere, a non-finite stop.

    One iteration = one optimizer step over ``accumulate_steps`` micro-batches (each from the
    data loader), so ``max_iter``, the LR schedule and checkpoints count optimizer steps.
    """

    def __init__(
        self,
        model: nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        accumulate_steps: int = 1,
        clip_max_norm: float = 0.0,
        clip_norm_type: float = 2.0,
        amp_enabled: bool = False,
        amp_precision: str = "float16",
    ):
        """
        Args:
            model, data_loader, optimizer: as in :class:`SimpleTrainer`.
            accumulate_steps: micro-batches per optimizer step (>= 1).
            clip_max_norm: clip the ``clip_norm_type``-norm of all gradients together to this;
                0 disables.
            clip_norm_type: the p of that norm.
            amp_enabled: run the forward pass in autocast.
            amp_precision: "float16"/"fp16" (on CUDA with a GradScaler) or "bfloat16"/"bf16".
        """
        super().__init__(model, data_loader, optimizer)
        if accumulate_steps < 1:
            raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}.")
        self.accumulate_steps = int(accumulate_steps)
        self.clip_max_norm = float(clip_max_norm)
        self.clip_norm_type = float(clip_norm_type)
        device_type = next(model.parameters()).device.type
        self.amp = MixedPrecision(amp_enabled, amp_precision, device_type)
        if self.amp.enabled:  # bfloat16 on a CPU without native bf16 is refused, naming the CPU's flags
            check_cpu_autocast(device_type, self.amp.dtype)

    def _check_finite(self, loss_dict: Dict[str, torch.Tensor]) -> None:
        """Raise FloatingPointError naming the iteration and every non-finite loss term.

        Runs before the backward pass, so the weights and the last saved checkpoint are those
        of the last good step. The flag is all-reduced: a rank whose loss is finite stops too,
        instead of waiting forever in the next all-reduce of gradients.
        """
        bad = {k: float(v.detach()) for k, v in loss_dict.items() if not torch.isfinite(v).all()}
        flag = torch.tensor([1.0 if bad else 0.0], device=next(iter(loss_dict.values())).device)
        if comm.get_world_size() > 1:
            torch.distributed.all_reduce(flag)
        if flag.item() > 0:
            where = ", ".join(f"{k}={v}" for k, v in bad.items()) or "on another rank"
            raise FloatingPointError(
                f"Non-finite loss at iteration {self.iter}: {where}. Training stopped before the "
                "optimizer step; the last saved checkpoint is intact. Lower the learning rate, "
                "enable gradient clipping, or check the data of this iteration."
            )

    def _micro_step(self, data, last: bool) -> Dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; gradients of earlier micro-batches are kept.

        Under DDP, the gradients are all-reduced only in the backward of the last micro-batch
        (``no_sync`` before it), once per optimizer step.
        """
        sync = contextlib.nullcontext()
        if not last and isinstance(self.model, DistributedDataParallel):
            sync = self.model.no_sync()
        with sync:
            with self.amp.autocast():
                loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            self._check_finite(loss_dict)
            self.amp.backward(sum(loss_dict.values()) / self.accumulate_steps)
        return {k: v.detach() for k, v in loss_dict.items()}

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
        self._write_metrics(summed, data_time)
        grad_norm = self._apply_step()
        if grad_norm is not None and comm.is_main_process():
            get_event_storage().put_scalar("grad_norm", grad_norm)

    def _apply_step(self) -> Optional[float]:
        """Clip and apply the gradients, unless they or the weights they give are not finite.

        A non-finite gradient norm raises FloatingPointError *before* the optimizer step, so the
        weights, the optimizer state and the last saved checkpoint stay those of the last good
        step. Under fp16 with a GradScaler, the scaler checks the gradients itself and skips such
        a step (lowering its scale), as AMP intends; without a scaler (fp32, bf16) nothing else
        would. The norm is the one clipping computes anyway (without clipping, one more
        ``_foreach_norm``); all ranks hold the same all-reduced gradients, so they stop together.
        After the step, non-finite trainable weights (a step that overflowed) raise before the
        hooks run, so neither the EMA nor a checkpoint ever takes them.

        Returns:
            the gradient norm before clipping (None without clipping).
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.amp.scaler.is_enabled():
            grad_norm = self.amp.step(self.optimizer, params, self.clip_max_norm, self.clip_norm_type)
        else:
            grads = [p.grad for p in params]
            norm = total_norm(grads, self.clip_norm_type)
            grad_norm = float(norm)
            if not math.isfinite(grad_norm):
                raise FloatingPointError(
                    f"Non-finite gradient norm ({grad_norm}) at iteration {self.iter}: training stopped "
                    f"before the optimizer step; the weights and the last saved checkpoint are intact. "
                    f"{self._non_finite_grads(params)}Lower the learning rate, enable gradient clipping "
                    "(it bounds a finite norm, not this one), or check the data of this iteration."
                )
            if self.clip_max_norm > 0 and grads:  # clip_grad_norm_'s scaling, with the norm checked above
                coef = torch.clamp(self.clip_max_norm / (norm + 1e-6), max=1.0)
                for group in _grouped(grads).values():
                    torch._foreach_mul_(group, coef.to(group[0].device))
            self.amp.step(self.optimizer, params, 0.0)  # no scaler: the optimizer's own step
            grad_norm = grad_norm if self.clip_max_norm > 0 else None
        trainable = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not _all_finite([p.detach() for p in trainable]):
            names = self._names([p for p in trainable if not torch.isfinite(p.detach()).all()])
            raise FloatingPointError(
                f"Non-finite weights after the optimizer step of iteration {self.iter} ({names}): "
                "training stopped before the EMA update and before any checkpoint was written; the "
                "last saved checkpoint is intact. Lower the learning rate or enable gradient clipping."
            )
        return grad_norm

    def _names(self, params: List[torch.Tensor], limit: int = 5) -> str:
        """The model's names of ``params`` (the first ``limit``, and how many in all)."""
        ids = {id(p) for p in params}
        names = [n for n, p in unwrap_model(self.model).named_parameters() if id(p) in ids]
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    def _non_finite_grads(self, params: List[torch.Tensor]) -> str:
        bad = [p for p in params if not torch.isfinite(p.grad).all()]
        return f"Non-finite gradients of: {self._names(bad)}. " if bad else ""

    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["grad_scaler"] = self.amp.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.amp.load_state_dict(state_dict["grad_scaler"])
