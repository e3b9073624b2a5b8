"""Training and evaluation drivers for ``tools/train_net.py``: lazy configs and yacs configs.

Both routes use the same training loop (:class:`~dinov2od.d2.engine.DetrTrainerLoop`), the same
hooks (Detectron2's plus EMA and RNG state) and the same evaluation (``COCOEvaluator`` through
``inference_on_dataset``), so a model behaves the same whichever config style built it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import weakref
from collections import OrderedDict
from typing import List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase, default_writers, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.solver import get_default_optimizer_params
from detectron2.utils import comm

from .dataset_mapper import DetrDatasetMapper
from .engine import DetrTrainerLoop, EMAHook, ModelEMA, RNGStateHook, skip_train_samples, unwrap_model

__all__ = [
    "Trainer",
    "check_num_classes",
    "create_ddp_model",
    "do_test_lazy",
    "do_train_lazy",
    "eval_context",
    "export_ema_weights",
]

logger = logging.getLogger("dinov2od")


def check_num_classes(model, dataset_names) -> None:
    """Raise a clear error when a dataset's class count differs from the model's ``num_classes``.

    Args:
        model: the meta-architecture (or a DDP wrapper of it).
        dataset_names: a name or list of registered dataset names.
    """
    num_classes = unwrap_model(model).num_classes
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"Dataset {name!r} has {len(classes)} classes ({list(classes)[:10]}"
                f"{'...' if len(classes) > 10 else ''}) but the model has num_classes={num_classes}. "
                f"Set num_classes={len(classes)} in the config (lazy: `num_classes` at the top of the "
                "model config, e.g. `model.num_classes=N`; yacs: MODEL.DINOV2OD.NUM_CLASSES)."
            )


def create_ddp_model(model, device: str, **kwargs):
    """Detectron2's ``create_ddp_model`` that also works on the CPU (gloo, no device ids)."""
    if comm.get_world_size() == 1:
        return model
    if torch.device(device).type == "cpu":
        kwargs["device_ids"] = None
    else:
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    kwargs.pop("fp16_compression", None)
    return DistributedDataParallel(model, **kwargs)


@contextlib.contextmanager
def eval_context(ema: Optional[ModelEMA]):
    """Evaluate with the EMA weights when an EMA is given, else with the model's own."""
    if ema is None:
        yield
    else:
        with ema.apply_to_model():
            yield


def _run_evaluation(model, data_loader, evaluator, ema, dataset_name: str) -> OrderedDict:
    with eval_context(ema):
        results = inference_on_dataset(model, data_loader, evaluator)
    if comm.is_main_process():
        logger.info("Evaluation results for %s%s:", dataset_name, " (EMA weights)" if ema else "")
        print_csv_format(results)
    return results


def export_ema_weights(model, ema: Optional[ModelEMA], output_dir: str) -> Optional[str]:
    """Save the EMA weights as a plain checkpoint (``model_final_ema.pth``) for predictors.

    ``DefaultPredictor`` loads only a checkpoint's ``"model"`` entry; this file holds the EMA
    weights there, so predictors see what evaluation saw.

    Returns:
        the path written, or None without EMA or off the main process.
    """
    if ema is None or not comm.is_main_process():
        return None
    with ema.apply_to_model():
        DetectionCheckpointer(model, output_dir).save("model_final_ema")
    return os.path.join(output_dir, "model_final_ema.pth")


# ---------------------------------------------------------------------------- lazy configs
def _lazy_ema(cfg, model) -> Optional[ModelEMA]:
    ema_cfg = cfg.train.get("ema", {})
    if not ema_cfg.get("enabled", False):
        return None
    return ModelEMA(model, decay=ema_cfg.get("decay", 0.9997))


def do_test_lazy(cfg, model, ema: Optional[ModelEMA] = None) -> OrderedDict:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``."""
    if cfg.dataloader.get("evaluator", None) is None:
        return OrderedDict()
    if cfg.dataloader.evaluator.get("output_dir", None) is None:
        cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    use_ema = ema if cfg.train.get("ema", {}).get("eval_ema", True) else None
    name = cfg.dataloader.test.dataset.names
    return _run_evaluation(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator), use_ema, str(name)
    )


def build_lazy_model(cfg):
    """Instantiate ``cfg.model`` on ``cfg.train.device`` and check it against the datasets."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    names = [cfg.dataloader.train.dataset.names] if "train" in cfg.dataloader else []
    if "test" in cfg.dataloader:
        names.append(cfg.dataloader.test.dataset.names)
    flat: List[str] = []
    for n in names:
        flat.extend([n] if isinstance(n, str) else list(n))
    check_num_classes(model, flat)
    return model


def lazy_eval_only(cfg, model) -> OrderedDict:
    """Load ``cfg.train.init_checkpoint`` (and its EMA weights, when enabled) and evaluate."""
    ema = _lazy_ema(cfg, model)
    checkpointables = {"ema": ema} if ema is not None else {}
    DetectionCheckpointer(model, **checkpointables).load(cfg.train.init_checkpoint)
    if ema is not None and ema.num_updates == 0:  # (a loaded "ema" entry is popped from ckpt)
        logger.warning("%s has no EMA weights; evaluating the model's own.", cfg.train.init_checkpoint)
        ema = None
    return do_test_lazy(cfg, model, ema)


def do_train_lazy(cfg, model, resume: bool = False):
    """Train with a lazy config (Detectron2's ``lazyconfig_train_net`` loop plus our extras).

    Returns:
        (model, ema) after training; the last evaluation is in the log and ``metrics.json``.
    """
    model.train()
    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, cfg.train.device, **cfg.train.ddp)
    amp = cfg.train.amp
    trainer = DetrTrainerLoop(
        model,
        train_loader,
        optim,
        accumulate_steps=cfg.train.get("accumulate_steps", 1),
        clip_max_norm=cfg.train.get("clip_grad", {}).get("max_norm", 0.0),
        amp_enabled=amp.enabled,
        amp_precision=amp.get("precision", "float16"),
    )
    ema = _lazy_ema(cfg, model)
    checkpointer = DetectionCheckpointer(
        model, cfg.train.output_dir, trainer=trainer, **({"ema": ema} if ema is not None else {})
    )
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            EMAHook(ema) if ema is not None else None,
            RNGStateHook(),
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
            if comm.is_main_process()
            else None,
            hooks.EvalHook(
                cfg.train.eval_period,
                lambda: do_test_lazy(cfg, model, ema),
                eval_after_train=cfg.train.get("eval_after_train", True),
            ),
            hooks.PeriodicWriter(
                default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period
            )
            if comm.is_main_process()
            else None,
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    per_rank = cfg.dataloader.train.total_batch_size // comm.get_world_size()
    skip_train_samples(train_loader, start_iter * per_rank * trainer.accumulate_steps)
    trainer.train(start_iter, cfg.train.max_iter)
    export_ema_weights(unwrap_model(model), ema, cfg.train.output_dir)
    return unwrap_model(model), ema


# ---------------------------------------------------------------------------- yacs configs
class Trainer(DefaultTrainer):
    """:class:`DefaultTrainer` for yacs configs, with the same loop and hooks as the lazy route."""

    def __init__(self, cfg):  # pylint: disable=super-init-not-called
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        check_num_classes(model, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, cfg.MODEL.DEVICE, broadcast_buffers=False)
        s = cfg.SOLVER
        self._trainer = DetrTrainerLoop(
            model,
            data_loader,
            optimizer,
            accumulate_steps=s.ACCUMULATE_STEPS,
            clip_max_norm=s.CLIP_GRADIENTS.CLIP_VALUE if s.CLIP_GRADIENTS.ENABLED else 0.0,
            amp_enabled=s.AMP.ENABLED,
            amp_precision=s.AMP.PRECISION,
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.ema = ModelEMA(model, s.EMA.DECAY) if s.EMA.ENABLED else None
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **({"ema": self.ema} if self.ema else {})
        )
        self.start_iter = 0
        self.max_iter = s.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def train(self):
        super().train()
        export_ema_weights(self._trainer.model if not isinstance(self._trainer.model, DistributedDataParallel)
                           else self._trainer.model.module, self.ema, self.cfg.OUTPUT_DIR)
        return getattr(self, "_last_eval_results", None)

    def resume_or_load(self, resume: bool = True):
        super().resume_or_load(resume)
        per_rank = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        skip_train_samples(self._trainer.data_loader, self.start_iter * per_rank * self._trainer.accumulate_steps)

    def build_hooks(self):
        cfg = self.cfg
        ret = [
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            EMAHook(self.ema) if self.ema is not None else None,
            RNGStateHook(),
        ]
        if comm.is_main_process():
            ret.append(hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD))

        def test_and_save_results():
            self._last_eval_results = self.test(cfg, self.model, ema=self.ema)
            return self._last_eval_results

        ret.append(hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results))
        if comm.is_main_process():
            ret.append(hooks.PeriodicWriter(self.build_writers(), period=cfg.SOLVER.LOG_PERIOD))
        return ret

    @classmethod
    def test(cls, cfg, model, evaluators=None, ema: Optional[ModelEMA] = None):
        results = OrderedDict()
        use_ema = ema if cfg.SOLVER.EMA.EVAL_EMA else None
        for name in cfg.DATASETS.TEST:
            results[name] = _run_evaluation(
                model, cls.build_test_loader(cfg, name), cls.build_evaluator(cfg, name), use_ema, name
            )
        return next(iter(results.values())) if len(results) == 1 else results

    @classmethod
    def build_optimizer(cls, cfg, model):
        from dinov2od.modeling import backbone_lr_decay

        s = cfg.SOLVER
        params = get_default_optimizer_params(
            model, base_lr=s.BASE_LR, weight_decay=s.WEIGHT_DECAY, weight_decay_norm=0.0,
            lr_factor_func=backbone_lr_decay(s.BACKBONE_LR_DECAY, model=model))
        if s.OPTIMIZER.upper() != "ADAMW":
            raise ValueError(f"SOLVER.OPTIMIZER={s.OPTIMIZER!r} is not supported; use 'ADAMW'.")
        return torch.optim.AdamW(params, lr=s.BASE_LR, betas=tuple(s.BETAS), weight_decay=s.WEIGHT_DECAY)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @property
    def model(self):
        return self._trainer.model
