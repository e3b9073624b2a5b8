"""What the training driver (:class:`~dinov2od.d2.engine.trainer.DetrTrainer`) reads from a config
besides the objects it is given, from either config style (:meth:`TrainSettings.from_lazy`,
:meth:`TrainSettings.from_yacs`)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from ..config import dataset_names

__all__ = ["TrainSettings"]


@dataclasses.dataclass
class TrainSettings:
    """What the driver reads from a config besides the objects it is given."""

    output_dir: str
    max_iter: int
    ims_per_batch: int  # images per iteration over all processes (per micro-batch)
    device: str = "cuda"
    init_checkpoint: str = ""  # weights to start from (or to evaluate)
    accumulate_steps: int = 1
    clip_max_norm: float = 0.0  # 0: the loop does not clip
    clip_norm_type: float = 2.0
    amp_enabled: bool = False
    amp_precision: str = "float16"
    ema_enabled: bool = False
    ema_decay: float = 0.9997
    eval_ema: bool = True
    checkpoint_period: int = 5000
    max_to_keep: Optional[int] = None
    eval_period: int = 0  # 0: only after training
    eval_after_train: bool = True
    eval_quantize: str = ""  # --eval-only: "int8" evaluates an int8 copy (dinov2od.modeling.quantize), CPU
    log_period: int = 20
    ddp: dict = dataclasses.field(default_factory=dict)  # create_ddp_model's keyword arguments
    train_dataset: str = ""  # its classes (names, original ids) are stored in the model and its checkpoints

    @classmethod
    def from_lazy(cls, cfg) -> "TrainSettings":
        t = cfg.train
        ema, clip, ckpt = t.get("ema", {}), t.get("clip_grad", {}), t.checkpointer
        return cls(
            output_dir=t.output_dir,
            max_iter=t.max_iter,
            ims_per_batch=cfg.dataloader.train.total_batch_size,
            device=t.device,
            init_checkpoint=t.init_checkpoint,
            accumulate_steps=t.get("accumulate_steps", 1),
            clip_max_norm=clip.get("max_norm", 0.0),
            clip_norm_type=clip.get("norm_type", 2.0),
            amp_enabled=t.amp.enabled,
            amp_precision=t.amp.get("precision", "float16"),
            ema_enabled=ema.get("enabled", False),
            ema_decay=ema.get("decay", 0.9997),
            eval_ema=ema.get("eval_ema", True),
            checkpoint_period=ckpt.period,
            max_to_keep=ckpt.get("max_to_keep", None),
            eval_period=t.eval_period,
            eval_after_train=t.get("eval_after_train", True),
            eval_quantize=t.get("eval_quantize", ""),
            log_period=t.log_period,
            ddp=dict(t.ddp),
            train_dataset=(dataset_names(cfg)["train"] or [""])[0],
        )

    @classmethod
    def from_yacs(cls, cfg) -> "TrainSettings":
        s, clip = cfg.SOLVER, cfg.SOLVER.CLIP_GRADIENTS
        full_model = clip.ENABLED and clip.FULL_MODEL
        if full_model and clip.CLIP_TYPE != "norm":
            raise ValueError(
                f"SOLVER.CLIP_GRADIENTS.FULL_MODEL clips the norm of all gradients together, but "
                f"CLIP_TYPE is {clip.CLIP_TYPE!r}; set CLIP_TYPE 'norm' (or FULL_MODEL False for "
                "Detectron2's per-parameter clipping)."
            )
        return cls(
            output_dir=cfg.OUTPUT_DIR,
            max_iter=s.MAX_ITER,
            ims_per_batch=s.IMS_PER_BATCH,
            device=cfg.MODEL.DEVICE,
            init_checkpoint=cfg.MODEL.WEIGHTS,
            accumulate_steps=s.ACCUMULATE_STEPS,
            clip_max_norm=clip.CLIP_VALUE if full_model else 0.0,
            clip_norm_type=clip.NORM_TYPE,
            amp_enabled=s.AMP.ENABLED,
            amp_precision=s.AMP.PRECISION,
            ema_enabled=s.EMA.ENABLED,
            ema_decay=s.EMA.DECAY,
            eval_ema=s.EMA.EVAL_EMA,
            checkpoint_period=s.CHECKPOINT_PERIOD,
            eval_period=cfg.TEST.EVAL_PERIOD,
            eval_quantize=cfg.TEST.QUANTIZE,
            log_period=s.LOG_PERIOD,
            ddp={"broadcast_buffers": False},  # DefaultTrainer's
            train_dataset=(dataset_names(cfg)["train"] or [""])[0],
        )
