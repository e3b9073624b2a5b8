"""Resume restores every random state it checkpoints: python's, numpy's and torch's.

A tiny Detectron2 training run whose step draws one number from each generator (and records it)
is checkpointed by :class:`CrashSafeCheckpointer` with :class:`RNGStateHook` registered, as the
project's trainer does. A second run, started from a differently seeded process state, loads the
checkpoint written at iteration 2 (an actual file) and continues: each generator's draws of
iterations 3-5 must equal the uninterrupted run's. The exception/SIGKILL resume tests of
d2/test_checkpoint.py draw from torch only (dropout), so they cannot see numpy or python.
"""

import itertools
import os
import random

import numpy as np
import torch
from torch import nn

from detectron2.engine import SimpleTrainer, hooks

from dinov2od.d2.checkpoint import CrashSafeCheckpointer, RNGStateHook

MAX_ITER, PERIOD = 6, 3  # checkpoints after iterations 2 and 5


class Drawing(nn.Module):
    """A model whose every training step draws from python's, numpy's and torch's generators."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.draws = []

    def forward(self, data):
        d = (random.random(), float(np.random.rand()), float(torch.rand(())))
        self.draws.append(d)
        return {"loss": (self.w * torch.tensor(d)).sum() + (self.w ** 2).sum()}


def _seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _trainer(out):
    model = Drawing()
    trainer = SimpleTrainer(model, itertools.count(), torch.optim.SGD(model.parameters(), lr=0.1))
    checkpointer = CrashSafeCheckpointer(model, out, trainer=trainer)
    trainer.register_hooks([RNGStateHook(), hooks.PeriodicCheckpointer(checkpointer, PERIOD)])
    return trainer, checkpointer


def test_resumed_run_continues_each_random_stream(tmp_path):
    out = str(tmp_path)
    _seed(123)
    full, _ = _trainer(out)
    full.train(0, MAX_ITER)
    uninterrupted = full.model.draws
    assert len(uninterrupted) == MAX_ITER

    ckpt = os.path.join(out, "model_0000002.pth")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["trainer"]["hooks"]["RNGStateHook"]
    assert set(state) == {"python", "numpy", "torch"}

    _seed(999)  # a new process: its generators are anywhere
    resumed, checkpointer = _trainer(out)
    start = checkpointer.load(ckpt).get("iteration", -1) + 1
    assert start == PERIOD and resumed.iter == PERIOD - 1
    resumed.train(start, MAX_ITER)
    again = resumed.model.draws
    assert len(again) == MAX_ITER - PERIOD
    for i, name in enumerate(("python", "numpy", "torch")):
        assert [d[i] for d in again] == [d[i] for d in uninterrupted[PERIOD:]], f"{name}'s random state was not resumed"
    # the resumed weights equal the uninterrupted ones (they depend on every draw)
    assert torch.equal(resumed.model.w, full.model.w)
