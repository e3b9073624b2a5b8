"""Loading a config (lazy or yacs) the way every tool does: overrides checked and applied, the
batch per GPU resolved, the config's own data registered and checked, epochs made iterations."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

from detectron2.config import CfgNode, LazyConfig, get_cfg

from .batch import _schedule_origin, epochs_to_iterations, resolve_batch
from .datasets import resolve_dataset
from .keys import add_dinov2od_config, resolve_preset
from .model import flatten
from .overrides import (UnknownKeyError, _override_key, _python_none, _unknown_keys_message, _yacs_keys,
                        check_lazy_overrides)
from .style import config_style
from .weights import check_backbone_weights

logger = logging.getLogger("dinov2od")

__all__ = ["load_config"]


def load_config(path: str, overrides: Sequence[str] = (), resolve_data: bool = True, batch: bool = True,
                world_size: Optional[int] = None, check_weights: bool = False):
    """Load a lazy (``.py``, or a lazy run's saved ``config.yaml``) or yacs (``.yaml``) config, apply
    the command line's overrides, derive the batch from the batch per GPU (:func:`resolve_batch`),
    then register and check the config's own data (``dataset.root`` / ``DATASETS.ROOT``, see
    :func:`~.datasets.resolve_dataset`) and convert epochs to iterations
    (:func:`~.batch.epochs_to_iterations`).

    Args:
        path: the config file.
        overrides: ``key=value`` (lazy) or ``KEY VALUE`` (yacs) items.
        resolve_data: register and check the config's datasets; prediction and export, which need
            no data, pass False (the classes then come from the checkpoint). The batch is only
            resolved with the data.
        batch: resolve the batch per GPU (``--eval-only`` passes False: no training batch).
        world_size: the job's process count for the batch (default: the current process group's).
        check_weights: first make sure that the backbone's pretrained weights can be had
            (:func:`check_backbone_weights`: a hub id that is not cached while the hub is off or
            does not answer stops here, before the data); ``tools/train_net.py`` passes True.

    Returns:
        an OmegaConf ``DictConfig`` (lazy) or an unfrozen yacs ``CfgNode``.
    """
    if config_style(path) == "lazy":
        cfg = LazyConfig.load(path)
        overrides = [str(o).strip() for o in overrides]
        check_lazy_overrides(cfg, overrides, path)  # an unknown key: an error before anything is built
        typed = [_override_key(o).lstrip("+") for o in overrides]
        cfg = LazyConfig.apply_overrides(cfg, [_python_none(o.lstrip("+")) for o in overrides])
    else:
        cfg = get_cfg()
        add_dinov2od_config(cfg)
        cfg.merge_from_file(path)
        overrides = list(overrides)
        try:
            cfg.merge_from_list(overrides)
        except (KeyError, AssertionError) as e:  # yacs: "Non-existent key: SOLVER.MAX_ITR"
            if "Non-existent key" not in str(e):
                raise
            bad = str(e).rsplit(": ", 1)[-1].strip("'\" ")
            raise UnknownKeyError(_unknown_keys_message([bad], _yacs_keys(cfg), path, lazy=False)) from None
        typed = [str(k) for k in overrides[0::2]]
        # the preset's values go to the keys neither the files nor the command line set
        files = set(flatten(CfgNode.load_yaml_with_base(path, allow_unsafe=True)))  # the keys the files set
        written = resolve_preset(cfg, files | set(typed))
        if written:
            logger.info("preset: %s", ", ".join(f"{k} {v}" for k, v in written.items()))
    schedule = _schedule_origin(cfg, typed, path)
    if check_weights:
        check_backbone_weights(cfg, path)
    if resolve_data:
        if batch:
            resolve_batch(cfg, world_size)
        resolve_dataset(cfg)
        epochs_to_iterations(cfg)
        if schedule is not None:
            logger.info(schedule())
    return cfg
