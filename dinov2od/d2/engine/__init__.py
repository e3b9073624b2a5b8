"""Training: the one driver for lazy and yacs configs (:mod:`.trainer`, with :mod:`.settings`), one
iteration (:mod:`.train_loop`), mixed precision (:mod:`.amp`), EMA (:mod:`.ema`), launching on one
machine, under ``torchrun`` or SLURM (:mod:`.launch`), and a predictor for lazy configs
(:mod:`.predictor`).

Only the loop and the EMA are named here; the driver and the predictor are imported from their
modules (``from dinov2od.d2.engine.trainer import LazyTrainer, Trainer``), so importing
``dinov2od.d2`` does not load them.
"""
from .ema import EMAExportHook, EMAHook, ModelEMA
from .train_loop import DetrTrainerLoop, unwrap_model

__all__ = ["DetrTrainerLoop", "EMAExportHook", "EMAHook", "ModelEMA", "unwrap_model"]
