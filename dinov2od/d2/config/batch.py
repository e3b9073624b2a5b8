"""The batch arithmetic (images per GPU x GPUs x accumulation = effective batch) and the schedule:
which of the iterations and the epochs sets it, and epochs converted to iterations."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Sequence

from detectron2.data import MetadataCatalog

from .datasets import dataset_names
from .style import is_lazy

logger = logging.getLogger("dinov2od")

__all__ = ["BatchPlan", "batch_plan", "epochs_to_iterations", "resolve_batch"]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How a training step's images are made up: ``images_per_gpu`` on each of ``world_size``
    processes (GPUs), ``accumulate_steps`` micro-batches per optimizer step."""

    images_per_gpu: int
    world_size: int
    accumulate_steps: int

    @property
    def total_batch_size(self) -> int:
        """Images of one micro-batch over all processes (``total_batch_size`` / ``IMS_PER_BATCH``)."""
        return self.images_per_gpu * self.world_size

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step."""
        return self.total_batch_size * self.accumulate_steps

    def __str__(self) -> str:
        gpus = "GPU" if self.world_size == 1 else "GPUs"
        return (f"{self.images_per_gpu} images/GPU x {self.world_size} {gpus} x {self.accumulate_steps} "
                f"accumulation = {self.effective_batch}")


def batch_plan(images_per_gpu: int, effective_batch: int, world_size: int, accumulate_steps: int = 1,
               names: Sequence[str] = ("images_per_gpu", "effective_batch")) -> BatchPlan:
    """The batch arithmetic, in one place: images per GPU x GPUs x accumulation = effective batch.

    Args:
        images_per_gpu: images each process loads per micro-batch (> 0).
        effective_batch: images per optimizer step; 0 keeps ``accumulate_steps`` (the effective
            batch then grows with the GPU count).
        world_size: the number of processes (GPUs) of the job.
        accumulate_steps: micro-batches per step when ``effective_batch`` is 0.
        names: the config keys of the first two arguments, for the error message.

    Returns:
        e.g. ``batch_plan(8, 64, 4)`` -> 8 images/GPU x 4 GPUs x 2 accumulation = 64.

    Raises:
        ValueError: the numbers cannot meet (``effective_batch`` is not a multiple of
            ``images_per_gpu x world_size``), naming them.
    """
    if int(images_per_gpu) <= 0 or int(world_size) <= 0:
        raise ValueError(f"{names[0]}={images_per_gpu} on {world_size} GPUs: both must be positive.")
    if not effective_batch:
        if int(accumulate_steps) <= 0:
            raise ValueError(f"accumulate_steps={accumulate_steps} must be positive.")
        return BatchPlan(int(images_per_gpu), int(world_size), int(accumulate_steps))
    per_step = images_per_gpu * world_size
    if effective_batch <= 0 or effective_batch % per_step:
        fits = [n for n in range(1, effective_batch + 1) if effective_batch % (images_per_gpu * n) == 0]
        raise ValueError(
            f"{names[1]}={effective_batch} cannot be made of {names[0]}={images_per_gpu} x {world_size} GPUs "
            f"({per_step} images per micro-batch): {effective_batch} is not a multiple of {per_step}. Run on a "
            f"GPU count that fits ({', '.join(map(str, fits)) or 'none'}), or change {names[0]} or {names[1]} "
            f"so that {names[1]} is a multiple of {names[0]} x GPUs."
        )
    return BatchPlan(int(images_per_gpu), int(world_size), effective_batch // per_step)


def resolve_batch(cfg, world_size: Optional[int] = None) -> Optional[BatchPlan]:
    """Derive the loader's batch over all processes and the gradient accumulation from the batch per
    GPU, in place, and log the arithmetic ("8 images/GPU x 4 GPUs x 2 accumulation = 64").

    * lazy ``train.images_per_gpu`` (+ ``train.effective_batch``), yacs ``SOLVER.IMS_PER_GPU``
      (+ ``SOLVER.EFFECTIVE_BATCH``): ``dataloader.train.total_batch_size`` / ``SOLVER.IMS_PER_BATCH``
      = images per GPU x ``world_size``, and with an effective batch ``train.accumulate_steps`` /
      ``SOLVER.ACCUMULATE_STEPS`` = effective batch / that (:func:`batch_plan`); the values in
      the config are overwritten.
    * unset (None / 0, the default): the total batch and accumulation stay as the config gives them.

    Args:
        cfg: a lazy or (unfrozen) yacs config.
        world_size: the job's process count (default: the current process group's).

    Returns:
        the plan (None when the batch per GPU is off and the total batch does not split evenly).
    """
    from detectron2.utils import comm

    world_size = comm.get_world_size() if world_size is None else int(world_size)
    if is_lazy(cfg):
        t = cfg.get("train", None) or {}
        per_gpu, effective, accumulate = t.get("images_per_gpu", None), t.get("effective_batch", None), \
            t.get("accumulate_steps", 1)
        names = ("train.images_per_gpu", "train.effective_batch")
        loader = cfg.get("dataloader", {}).get("train", None)
        total = loader.get("total_batch_size", None) if loader is not None else None
    else:
        s = cfg.SOLVER
        per_gpu, effective, accumulate, total = s.IMS_PER_GPU, s.EFFECTIVE_BATCH, s.ACCUMULATE_STEPS, s.IMS_PER_BATCH
        names = ("SOLVER.IMS_PER_GPU", "SOLVER.EFFECTIVE_BATCH")
        if per_gpu and s.REFERENCE_WORLD_SIZE:
            raise ValueError(
                f"SOLVER.IMS_PER_GPU={per_gpu} and SOLVER.REFERENCE_WORLD_SIZE={s.REFERENCE_WORLD_SIZE} both scale "
                "the batch with the GPU count: set REFERENCE_WORLD_SIZE 0 (or IMS_PER_GPU 0 for Detectron2's rescaling).")
    if not per_gpu:
        if effective:
            raise ValueError(f"{names[1]}={effective} needs {names[0]} (the images each GPU loads per micro-batch), "
                             f"e.g. {names[0]}=8.")
        if not total or total % world_size or (not is_lazy(cfg) and cfg.SOLVER.REFERENCE_WORLD_SIZE):
            return None  # Detectron2's own rules (and messages) apply
        plan = BatchPlan(total // world_size, world_size, int(accumulate or 1))
        logger.info("Batch: %s (the total batch of the config; %s sets it per GPU)", plan, names[0])
        return plan
    plan = batch_plan(int(per_gpu), int(effective or 0), world_size, int(accumulate or 1), names)
    if is_lazy(cfg):
        cfg.dataloader.train.total_batch_size = plan.total_batch_size
        cfg.train.accumulate_steps = plan.accumulate_steps
        derived = "dataloader.train.total_batch_size=%d, train.accumulate_steps=%d"
    else:
        cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUMULATE_STEPS = plan.total_batch_size, plan.accumulate_steps
        derived = "SOLVER.IMS_PER_BATCH %d, SOLVER.ACCUMULATE_STEPS %d"
    logger.info("Batch: %s (" + derived + ")", plan, plan.total_batch_size, plan.accumulate_steps)
    return plan


def _epochs(value) -> float:
    """``train.epochs`` / ``SOLVER.MAX_EPOCHS`` as a number; None, 0 and "None" (as an override
    types it) are 0, off."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return 0
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"train.epochs / SOLVER.MAX_EPOCHS must be a number of epochs, got {value!r}") from None


def _schedule_origin(cfg, typed: Sequence[str], path: str):
    """Settle which of the iterations and the epochs sets the schedule: what the command line gives
    wins over the config file (an explicit max_iter turns the file's epochs off); both on the
    command line is an error. Returns a function that, once the epochs are converted, gives the
    one log line that says which set it (None when the config has no schedule)."""
    lazy = is_lazy(cfg)
    if lazy and "train" not in cfg:
        return None
    it_key, ep_key = ("train.max_iter", "train.epochs") if lazy else ("SOLVER.MAX_ITER", "SOLVER.MAX_EPOCHS")

    def fmt(key, value):
        return f"{key}={value}" if lazy else f"{key} {value}"

    def values():
        if lazy:
            return cfg.train.get("max_iter", None), _epochs(cfg.train.get("epochs", None))
        return cfg.SOLVER.MAX_ITER, _epochs(cfg.SOLVER.MAX_EPOCHS)

    max_iter, epochs = values()
    typed_iter, typed_epochs = it_key in typed, ep_key in typed
    if typed_iter and typed_epochs and epochs > 0:
        raise ValueError(
            f"{fmt(it_key, max_iter)} and {fmt(ep_key, epochs)} are both on the command line: give one, "
            f"{it_key} for a number of iterations or {ep_key} for passes over the training set "
            f"({fmt(ep_key, 0)} turns the epochs off).")
    if typed_iter:
        if epochs > 0:  # the file's epochs would overwrite what the user typed
            if lazy:
                cfg.train.epochs = None
            else:
                cfg.SOLVER.MAX_EPOCHS = 0
            return lambda: (f"schedule: {fmt(it_key, max_iter)} from the command line "
                            f"({fmt(ep_key, epochs)} from {path} not used)")
        return lambda: f"schedule: {fmt(it_key, max_iter)} from the command line"
    if epochs > 0:
        where = "the command line" if typed_epochs else path
        return lambda: (f"schedule: {fmt(ep_key, epochs)} from {where} sets {fmt(it_key, values()[0])} "
                        f"({fmt(it_key, max_iter)} from {path} not used)")
    return lambda: f"schedule: {fmt(it_key, max_iter)} from {path}"


def epochs_to_iterations(cfg) -> None:
    """``train.epochs`` / ``SOLVER.MAX_EPOCHS`` > 0: ``max_iter`` from the training images with boxes
    (``ceil(epochs * images / (batch * accumulate_steps))``), in place; yacs ``STEPS`` are scaled
    with ``MAX_ITER``. The derived value is logged."""
    from dinov2od.d2.data.datasets import check_coco_dataset

    lazy = is_lazy(cfg)
    epochs = _epochs(cfg.get("train", {}).get("epochs", None) if lazy else cfg.SOLVER.MAX_EPOCHS)
    if epochs <= 0:
        return
    names = dataset_names(cfg)["train"]
    images = 0
    for name in names:
        meta = MetadataCatalog.get(name)
        if not meta.get("json_file", None):
            raise ValueError(f"train.epochs / SOLVER.MAX_EPOCHS needs the size of {name!r}, which names no json_file.")
        json_file = meta.get("dinov2od_source_json", meta.json_file)  # the user's file (errors name it)
        images += check_coco_dataset(json_file, meta.image_root, check_files=False).num_images_with_boxes
    if lazy:
        batch, accumulate = cfg.dataloader.train.total_batch_size, cfg.train.get("accumulate_steps", 1)
    else:
        batch, accumulate = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUMULATE_STEPS
    max_iter = max(1, math.ceil(epochs * images / (batch * accumulate)))
    how = f"{epochs} epochs x {images} training images with boxes / ({batch} images x {accumulate} accumulation)"
    if lazy:
        cfg.train.max_iter = max_iter
        logger.info("train.max_iter=%d: %s", max_iter, how)
        return
    old = cfg.SOLVER.MAX_ITER
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = tuple(max(1, round(s * max_iter / old)) for s in cfg.SOLVER.STEPS if s < old)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max_iter // 10)
    logger.info("SOLVER.MAX_ITER=%d: %s; STEPS scaled to %s", max_iter, how, cfg.SOLVER.STEPS)
