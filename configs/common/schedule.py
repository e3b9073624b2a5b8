"""LR multipliers: linear warmup, then a step drop late in training (DETR style).

The multipliers are functions of the training progress (iteration / ``train.max_iter``), so
overriding ``train.max_iter`` on the command line stretches the whole schedule with it.
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler


def step_schedule(drop_at: float = 0.8, warmup: float = 0.01, gamma: float = 0.1):
    """Constant LR with a linear warmup and one drop by ``gamma``.

    Args:
        drop_at: fraction of training after which the LR drops (e.g. 40/50 epochs = 0.8).
        warmup: fraction of training spent in the linear warmup.
        gamma: LR factor after the drop.
    """
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[1.0, gamma],
            milestones=[int(round(drop_at * 1000))],
            num_updates=1000,  # milestones in thousandths of training
        ),
        warmup_length=warmup,
        warmup_method="linear",
        warmup_factor=0.001,
    )
