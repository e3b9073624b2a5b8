"""The one training driver, :class:`DetrTrainer`, and the two ways configs feed it.

:class:`DetrTrainer` takes built objects (model, optimizer, train loader, LR schedule, an
evaluation function) and :class:`TrainSettings`, and does everything else the same way for both
config styles: DDP (Detectron2's ``create_ddp_model``), the training loop
(:class:`~dinov2od.d2.engine.train_loop.DetrTrainerLoop`), EMA, crash-safe checkpoints, the hooks,
resume (with the data stream's position and the random states), evaluation (of the EMA weights
when enabled) and the EMA export. Adding a hook is editing :meth:`DetrTrainer.build_hooks`.

* :class:`LazyTrainer` builds those objects from a lazy config (``configs/*.py``);
* :class:`Trainer` builds them from a yacs config with Detectron2's ``DefaultTrainer`` class
  methods (``build_model``, ``build_optimizer``, ``test(cfg, model, evaluators)``, ...), which
  subclasses can override as usual.

``Trainer.eval_only(cfg, resume)`` / ``LazyTrainer.eval_only(cfg, resume)`` load weights (the
last checkpoint with ``resume``) and evaluate, as ``--eval-only`` does.
"""
from __future__ import annotations

import logging
import os
import weakref
from functools import partial
from typing import Callable, Optional

import torch

from detectron2.config import instantiate
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, default_writers, hooks
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm

from ..checkpoint.checkpointer import CrashSafeCheckpointer
from ..checkpoint.resume import RNGStateHook, position_train_loader
from ..config import build_optimizer_from_cfg, check_config_datasets, check_num_classes
from ..data.data_cache import cached_dataset_dicts
from ..data.dataset_mapper import DetrDatasetMapper
from ..data.metadata import set_model_classes
from ..evaluation.evaluator import eval_context, run_evaluation
from .ema import EMAExportHook, EMAHook, ModelEMA
from .launch import check_ranks_agree
from .settings import TrainSettings
from .train_loop import DetrTrainerLoop, unwrap_model

__all__ = ["DetrTrainer", "LazyTrainer", "Trainer", "unwrap_model", "wrap_model_for_ddp"]

logger = logging.getLogger("dinov2od")


def wrap_model_for_ddp(model, device: str, **kwargs):
    """Detectron2's ``create_ddp_model`` (``fp16_compression`` and all DDP options), CPU included.

    On the CPU (gloo) DDP takes no ``device_ids``; on CUDA, Detectron2 uses the local rank's GPU.
    """
    if torch.device(device).type == "cpu":
        kwargs["device_ids"] = None
    return create_ddp_model(model, **kwargs)


def check_weights_to_evaluate(settings: TrainSettings, resume: bool) -> None:
    """Refuse an evaluation with no weights to load: evaluating the random initialisation is never silent.

    Raises:
        ValueError: no ``train.init_checkpoint`` / ``MODEL.WEIGHTS``, and (with ``resume``) no
            ``last_checkpoint`` in the output folder; naming both ways to give weights.
    """
    if settings.init_checkpoint:
        return
    if resume and os.path.isfile(os.path.join(settings.output_dir, "last_checkpoint")):
        return
    where = (f"and the output folder {settings.output_dir} has no checkpoint to resume (no last_checkpoint)"
             if resume else "and --resume was not given")
    raise ValueError(
        f"--eval-only has no weights to evaluate: train.init_checkpoint / MODEL.WEIGHTS is empty {where}; it "
        "would evaluate the untrained model. Give the weights: train.init_checkpoint=PATH.pth (lazy) / "
        "MODEL.WEIGHTS PATH.pth (yacs), or --resume with train.output_dir / OUTPUT_DIR set to the folder of "
        "the training to evaluate.")


def _evaluate_weights(model, settings: TrainSettings, evaluate: Callable, resume: bool) -> dict:
    """Load the last checkpoint (``resume``) or ``settings.init_checkpoint``, then evaluate (the callers
    have run :func:`check_weights_to_evaluate` before building the model)."""
    ema = ModelEMA(model, settings.ema_decay) if settings.ema_enabled else None
    checkpointer = CrashSafeCheckpointer(model, settings.output_dir, **({"ema": ema} if ema else {}))
    path = settings.init_checkpoint
    if resume and checkpointer.has_checkpoint():
        path = checkpointer.get_checkpoint_file()  # a missing file: the newest complete one beside it
    checkpointer.load(path)  # the EMA entry too, when the file has one
    if path:  # without a file each rank keeps its own initialisation (no DDP broadcast here)
        check_ranks_agree(0, path, settings.output_dir, model, resume and path != settings.init_checkpoint)
    if ema is not None and ema.num_updates == 0:
        logger.warning("%s has no EMA weights; evaluating the model's own.", path or "(no checkpoint)")
        ema = None
    with eval_context(ema if settings.eval_ema else None):
        if settings.eval_quantize:
            return evaluate(_quantized(model, settings.eval_quantize))
        return evaluate(model)


def _quantized(model, mode: str):
    """The int8 copy that ``train.eval_quantize`` / ``TEST.QUANTIZE`` asks for."""
    from dinov2od.modeling.quantize import quantize_dynamic_int8

    scopes = {"int8": "all", "int8-backbone": "backbone"}
    if mode not in scopes:
        raise ValueError(f"train.eval_quantize / TEST.QUANTIZE = {mode!r}: expected '' (fp32), "
                         f"{' or '.join(repr(k) for k in scopes)}")
    logger.info("Evaluating an int8 dynamic-quantized copy of the model (%s)", mode)
    return quantize_dynamic_int8(model, scopes[mode])


class DetrTrainer(TrainerBase):
    """The training driver: one set of hooks, EMA, checkpoints and resume for every config style.

    Checkpoints hold ``model``, ``ema`` (when enabled), ``iteration`` and ``trainer`` (the hooks'
    state: LR schedule and random states; and ``_trainer``: optimizer and loss scaler), in the
    layout of Detectron2's ``DefaultTrainer``.
    """

    def __init__(self, model, optimizer, data_loader, lr_scheduler, settings: TrainSettings, evaluate: Callable):
        """
        Args:
            model: the meta-architecture, on its device (wrapped in DDP here when distributed).
            optimizer: its optimizer.
            data_loader: an infinite Detectron2 train loader (not iterated yet).
            lr_scheduler: a torch LR scheduler of ``optimizer``, or an fvcore ``ParamScheduler``
                of the LR multiplier over training progress (lazy configs' ``lr_multiplier``).
            settings: see :class:`TrainSettings`.
            evaluate: ``evaluate(model) -> results dict`` (run with the EMA weights loaded when
                ``settings.eval_ema``).
        """
        TrainerBase.__init__(self)
        self.settings = settings
        model = wrap_model_for_ddp(model, settings.device, **settings.ddp)
        self._trainer = DetrTrainerLoop(
            model,
            data_loader,
            optimizer,
            accumulate_steps=settings.accumulate_steps,
            clip_max_norm=settings.clip_max_norm,
            clip_norm_type=settings.clip_norm_type,
            amp_enabled=settings.amp_enabled,
            amp_precision=settings.amp_precision,
        )
        self.scheduler = lr_scheduler
        self.ema = ModelEMA(model, settings.ema_decay) if settings.ema_enabled else None
        self.checkpointer = CrashSafeCheckpointer(
            model, settings.output_dir, trainer=weakref.proxy(self), **({"ema": self.ema} if self.ema else {})
        )
        self._evaluate = evaluate
        self.start_iter = 0
        self.max_iter = settings.max_iter
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> list:
        """The hooks, in order: timing, LR, EMA, random states, checkpoints, the EMA export,
        evaluation, writers.

        Evaluation runs after checkpointing and the EMA export (a failed evaluation leaves
        ``model_final.pth`` and ``model_final_ema.pth``), writers last (so evaluation results are written).
        """
        s, main = self.settings, comm.is_main_process()
        return [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=self.scheduler),
            EMAHook(self.ema) if self.ema is not None else None,
            RNGStateHook(),
            hooks.PeriodicCheckpointer(self.checkpointer, s.checkpoint_period, max_to_keep=s.max_to_keep)
            if main
            else None,
            EMAExportHook(self.ema, s.output_dir) if self.ema is not None and main else None,
            hooks.EvalHook(s.eval_period, self.evaluate, eval_after_train=s.eval_after_train),
            hooks.PeriodicWriter(self.build_writers(), period=s.log_period) if main else None,
        ]

    def build_writers(self) -> list:
        return default_writers(self.settings.output_dir, self.max_iter)

    def evaluate(self) -> dict:
        """Evaluate the model now (its EMA weights when enabled and ``eval_ema``)."""
        ema = self.ema if self.settings.eval_ema else None
        if ema is not None:
            logger.info("Evaluating the EMA weights.")
        with eval_context(ema):
            self._last_eval_results = self._evaluate(self.model)
        return self._last_eval_results

    def resume_or_load(self, resume: bool = True) -> None:
        """Resume from ``last_checkpoint`` in the output folder (with ``resume`` and when it exists:
        every state, from the next iteration), else load ``settings.init_checkpoint``'s weights.

        First removes the temporary files of a save that was killed. The checkpoint must fit the
        model; fine-tuning (not resuming) may change the class count (``CrashSafeCheckpointer``).
        In a distributed job every rank must then hold the same iteration and weights, else all
        stop with one message (:func:`~dinov2od.d2.engine.launch.check_ranks_agree`: e.g. an output
        folder that is not shared between machines).
        """
        self.checkpointer.remove_temporary_files()
        resuming = resume and self.checkpointer.has_checkpoint()
        self.checkpointer.allow_class_change = not resuming
        if resuming:  # last_checkpoint's file, or when it is gone the newest complete one (with a warning)
            path = self.checkpointer.get_checkpoint_file()
            self.checkpointer.load(path)
        else:
            path = self.settings.init_checkpoint
            self.checkpointer.load(path, checkpointables=[])
        if resuming:
            self.start_iter = self.iter + 1
        if self.ema is not None and self.ema.num_updates == 0:  # no EMA state was loaded
            self.ema.restart()  # average from the loaded weights, not from the random init
        check_ranks_agree(self.start_iter, path, self.settings.output_dir, self.model, resuming)

    def train(self) -> Optional[dict]:
        """Train from ``start_iter`` to ``max_iter``. Once the last iteration is done the EMA weights
        are exported (``model_final_ema.pth``, :class:`~dinov2od.d2.engine.ema.EMAExportHook`) before the
        evaluation after training, so an evaluation that fails (its error is raised) leaves them.

        Returns:
            the last evaluation results (None without evaluation).
        """
        if self.settings.train_dataset:  # after loading: an init checkpoint may hold other classes
            set_model_classes(self.model, self.settings.train_dataset)
        per_rank = self.settings.ims_per_batch // comm.get_world_size()
        position_train_loader(self._trainer.data_loader, self.start_iter * per_rank * self.settings.accumulate_steps)
        TrainerBase.train(self, self.start_iter, self.max_iter)
        return getattr(self, "_last_eval_results", None)

    def run_step(self) -> None:
        self._trainer.iter = self.iter
        self._trainer.run_step()

    def state_dict(self) -> dict:
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        TrainerBase.load_state_dict(self, state_dict)
        # checkpoints of the earlier lazy driver held the loop's state at the top level
        self._trainer.load_state_dict(state_dict.get("_trainer", state_dict))

    @property
    def model(self):
        return self._trainer.model

    @property
    def optimizer(self):
        return self._trainer.optimizer

    @property
    def data_loader(self):
        return self._trainer.data_loader


# ---------------------------------------------------------------------------- lazy configs
def build_lazy_model(cfg, splits=("train", "test")):
    """Check the datasets (files and class count), then instantiate ``cfg.model`` on ``cfg.train.device``.

    Args:
        splits: the dataloader splits whose datasets are checked (``--eval-only``: test only).
    """
    names = check_config_datasets(cfg, splits)
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    check_num_classes(model, names)
    return model


def evaluate_lazy(cfg, model) -> dict:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``."""
    if cfg.dataloader.get("evaluator", None) is None:
        return {}
    if cfg.dataloader.evaluator.get("output_dir", None) is None:
        cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    name = cfg.dataloader.test.dataset.names
    return run_evaluation(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator), str(name))


class LazyTrainer(DetrTrainer):
    """:class:`DetrTrainer` from a lazy config (``model``, ``optimizer``, ``dataloader``,
    ``lr_multiplier``, ``train``)."""

    def __init__(self, cfg, model=None):
        """
        Args:
            cfg: the lazy config.
            model: the built ``cfg.model`` (built here when None).
        """
        model = model if model is not None else build_lazy_model(cfg)
        model.train()
        cfg.optimizer.params.model = model
        super().__init__(
            model,
            instantiate(cfg.optimizer),
            instantiate(cfg.dataloader.train),
            instantiate(cfg.lr_multiplier),
            TrainSettings.from_lazy(cfg),
            partial(evaluate_lazy, cfg),
        )

    @classmethod
    def eval_only(cls, cfg, resume: bool = False) -> dict:
        """Load ``train.init_checkpoint`` (the last checkpoint with ``resume``) and evaluate."""
        settings = TrainSettings.from_lazy(cfg)
        check_weights_to_evaluate(settings, resume)  # before the model is built
        return _evaluate_weights(build_lazy_model(cfg, ("test",)), settings, partial(evaluate_lazy, cfg), resume)


# ---------------------------------------------------------------------------- yacs configs
class Trainer(DetrTrainer):
    """:class:`DetrTrainer` from a yacs config, with ``DefaultTrainer``'s class methods.

    ``build_model``, ``build_lr_scheduler``, ``test(cfg, model, evaluators=None)`` and
    ``auto_scale_workers`` are Detectron2's (taken from ``DefaultTrainer``, bound to this class, so
    ``test`` calls this class's loaders and evaluator); ``build_optimizer``, ``build_train_loader``,
    ``build_test_loader`` and ``build_evaluator`` are dinov2od's. Subclasses override any of them as
    usual. Training, hooks, checkpoints and resume are :class:`DetrTrainer`'s (one parent:
    ``Trainer`` -> ``DetrTrainer`` -> Detectron2's ``TrainerBase``).
    """

    build_model = classmethod(DefaultTrainer.build_model.__func__)
    build_lr_scheduler = classmethod(DefaultTrainer.build_lr_scheduler.__func__)
    test = classmethod(DefaultTrainer.test.__func__)
    auto_scale_workers = staticmethod(DefaultTrainer.auto_scale_workers)

    def __init__(self, cfg):
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        self.cfg = cfg
        check_config_datasets(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        super().__init__(
            model,
            optimizer,
            self.build_train_loader(cfg),
            self.build_lr_scheduler(cfg, optimizer),
            TrainSettings.from_yacs(cfg),
            partial(self.test, cfg),
        )

    def train(self) -> Optional[dict]:
        results = super().train()
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            verify_results(self.cfg, results)
        return results

    @classmethod
    def eval_only(cls, cfg, resume: bool = False) -> dict:
        """Load ``MODEL.WEIGHTS`` (the last checkpoint in ``OUTPUT_DIR`` with ``resume``) and evaluate."""
        settings = TrainSettings.from_yacs(cfg)
        check_weights_to_evaluate(settings, resume)  # before the model is built
        check_config_datasets(cfg, ("test",))
        model = cls.build_model(cfg)
        return _evaluate_weights(model, settings, partial(cls.test, cfg), resume)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer_from_cfg(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        if cfg.DATALOADER.CACHE_DATASET and not (cfg.MODEL.KEYPOINT_ON or cfg.MODEL.LOAD_PROPOSALS):
            # parsed once per machine, memory-mapped by every rank (dinov2od.d2.data.data_cache)
            dataset = cached_dataset_dicts(
                cfg.DATASETS.TRAIN, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, cfg.DATALOADER.CACHE_DIR or None
            )
            return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, True), dataset=dataset)
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return COCOEvaluator(dataset_name, output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"))
