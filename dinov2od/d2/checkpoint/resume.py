"""What an exact resume needs besides the checkpoint files: the random states, and the position in the
training data stream.

* :class:`RNGStateHook`: the process's random states go into every checkpoint and come back on resume.
* :func:`position_train_loader`: the train loader starts where the interrupted run stopped, and
  each sample's augmentation is drawn from random states seeded by its position in the stream,
  so it does not depend on the number of loader workers or on where a run was resumed.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["RNGStateHook", "numpy_state_from_plain", "numpy_state_to_plain", "position_train_loader"]

logger = logging.getLogger(__name__)


class RNGStateHook(HookBase):
    """Save the process's random states with each checkpoint and restore them on resume.

    Trainer hooks' ``state_dict`` is written into every checkpoint by Detectron2, so a resumed
    run continues the same random streams (dropout, main-process randomness) as an uninterrupted
    one. The loaded states are applied in ``before_train`` *after* the data loader's iterator
    exists (creating it draws from the torch generator, which the uninterrupted run did at
    iteration 0, not at the resume point).
    """

    def __init__(self):
        self._pending: Optional[dict] = None

    def state_dict(self) -> dict:
        """The states as tensors, numbers and strings (``torch.load(weights_only=True)`` reads them)."""
        return {"torch": torch.get_rng_state(), "numpy": numpy_state_to_plain(np.random.get_state()),
                "python": random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state, numpy=numpy_state_from_plain(state["numpy"]))

    def before_train(self) -> None:
        if self._pending is None:
            return
        loop = getattr(self.trainer, "_trainer", self.trainer)  # the driver wraps the loop
        if hasattr(loop, "_data_loader_iter"):
            loop._data_loader_iter  # noqa: B018  (creates the iterator now)
        torch.set_rng_state(self._pending["torch"])
        np.random.set_state(self._pending["numpy"])
        random.setstate(self._pending["python"])
        self._pending = None


def numpy_state_to_plain(state) -> dict:
    """``np.random.get_state()`` (a tuple holding a numpy array) as a dict of a tensor and numbers."""
    algorithm, keys, pos, has_gauss, cached_gaussian = state
    return {"algorithm": str(algorithm), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def numpy_state_from_plain(state):
    """The tuple ``np.random.set_state`` takes, from :func:`numpy_state_to_plain`'s dict (a tuple,
    as checkpoints of earlier versions hold, is returned as it is)."""
    if not isinstance(state, dict):
        return state
    keys = state["keys"].numpy() if isinstance(state["keys"], torch.Tensor) else np.asarray(state["keys"])
    return (state["algorithm"], keys.astype(np.uint32), int(state["pos"]), int(state["has_gauss"]),
            float(state["cached_gaussian"]))


# ---------------------------------------------------------------------------- data stream position
class _IndexAt(int):
    """A dataset index that also carries its position in this rank's sample stream."""

    def __new__(cls, index: int, position: int):
        obj = super().__new__(cls, index)
        obj.position = position
        return obj


class _PositionedSampler(Sampler):
    """The indices of ``sampler`` from position ``start`` on, each tagged with its position."""

    def __init__(self, sampler, start: int):
        self.sampler = sampler
        self.start = start

    def __iter__(self):
        stream = itertools.islice(iter(self.sampler), self.start, None)
        return (_IndexAt(i, p) for p, i in enumerate(stream, self.start))


@contextlib.contextmanager
def _rngs_seeded(seed: int):
    """Seed python/numpy/torch (CPU) random states for a block, then restore the previous ones."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class _SeededByPosition(Dataset):
    """Map each sample with random states seeded by (the sampler's seed, its global position).

    Global position = position on this rank * world size + rank: the sample's place in the
    stream that Detectron2's training samplers deal out to the ranks in turn. A 2-process run
    and a 1-process run at the same total batch thus augment the same images the same way.
    """

    def __init__(self, dataset, seed: int, rank: int, world_size: int):
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        position = getattr(idx, "position", None)
        if position is None:
            return self.dataset[idx]
        global_position = position * self.world_size + self.rank
        seed = int(np.random.SeedSequence([self.seed, global_position]).generate_state(1)[0])
        with _rngs_seeded(seed):
            return self.dataset[int(idx)]


def position_train_loader(data_loader, start_sample: int) -> bool:
    """Make a Detectron2 train loader start ``start_sample`` samples into this rank's stream,
    with each sample's augmentation seeded by its stream position.

    Called once, before the loader is iterated, in an uninterrupted run (``start_sample=0``) and
    in a resumed one alike, so both see the same images augmented the same way, whatever the
    number of loader workers. Exact when the loader has no aspect-ratio grouping (its buckets
    are not part of the checkpoint).

    Args:
        data_loader: a loader from :func:`build_detection_train_loader` (not iterated yet).
        start_sample: samples of this rank's stream to skip (iterations * images per rank per
            iteration).

    Returns:
        whether the loader's sampler was found (else the loader is left as it is, with a warning).
    """
    obj = data_loader
    for _ in range(4):  # DataLoader -> [AspectRatioGroupedDataset -> DataLoader] -> ToIterableDataset
        if hasattr(obj, "sampler") and hasattr(obj, "shard_sampler"):
            seed = int(getattr(obj.sampler, "_seed", 0))
            obj.sampler = _PositionedSampler(obj.sampler, start_sample)
            obj.dataset = _SeededByPosition(obj.dataset, seed, comm.get_rank(), comm.get_world_size())
            return True
        obj = getattr(obj, "dataset", None)
        if obj is None:
            break
    logger.warning(
        "Could not find the train loader's sampler (a loader not built by build_detection_train_loader?); "
        "a resumed run restarts its data stream instead of continuing it."
    )
    return False
