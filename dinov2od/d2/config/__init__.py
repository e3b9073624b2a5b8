"""Configs of dinov2od, lazy and yacs, in Detectron2's sense of ``config/``.

* :mod:`.model` — the model's options as config values, derived from their declarations in
  :mod:`dinov2od.modeling` (:func:`lazy_model` builds ``configs/common/models/dinov2_detr.py``),
  and the presets (:func:`apply_preset`);
* :mod:`.keys` — the yacs keys (:data:`KEYS`, ``add_dinov2od_config``) and :func:`model_arguments`;
* :mod:`.builders` — the model's pieces and the optimizer from a yacs config;
* :mod:`.style` — lazy or yacs; :mod:`.loading` — :func:`load_config`, what every tool calls;
* :mod:`.overrides` — unknown command-line keys named, with the nearest known ones;
* :mod:`.batch` — images per GPU x GPUs x accumulation, and epochs as iterations;
* :mod:`.datasets` — a config's datasets: registered from ``dataset.root`` and checked;
* :mod:`.weights` — the backbone's pretrained weights, checked before anything else.
"""
from .batch import BatchPlan, batch_plan, epochs_to_iterations, resolve_batch
from .builders import (build_backbone_from_cfg, build_criterion_from_cfg, build_detector_from_cfg,
                       build_optimizer_from_cfg)
from .datasets import (check_config_datasets, check_datasets, check_num_classes, dataset_classes, dataset_names,
                       resolve_dataset)
from .keys import MODEL_KEYS, add_dinov2od_config, model_arguments
from .loading import load_config
from .model import CONFIG_MODEL, apply_preset, lazy_model, model_defaults, preset_changes
from .overrides import UnknownKeyError, check_lazy_overrides
from .style import config_style, is_lazy
from .weights import WeightsUnavailableError, backbone_option, check_backbone_weights

__all__ = [
    "CONFIG_MODEL",
    "KEYS",
    "MODEL_KEYS",
    "BatchPlan",
    "UnknownKeyError",
    "WeightsUnavailableError",
    "add_dinov2od_config",
    "apply_preset",
    "backbone_option",
    "batch_plan",
    "build_backbone_from_cfg",
    "build_criterion_from_cfg",
    "build_detector_from_cfg",
    "build_optimizer_from_cfg",
    "check_backbone_weights",
    "check_config_datasets",
    "check_datasets",
    "check_lazy_overrides",
    "check_num_classes",
    "config_style",
    "dataset_classes",
    "dataset_names",
    "epochs_to_iterations",
    "is_lazy",
    "lazy_model",
    "load_config",
    "model_arguments",
    "model_defaults",
    "preset_changes",
    "resolve_batch",
    "resolve_dataset",
]

# Tracebacks name the errors where users import them from (as before the package was split).
UnknownKeyError.__module__ = WeightsUnavailableError.__module__ = __name__


def __getattr__(name: str):
    if name == "KEYS":  # built on first use (.keys)
        from .keys import KEYS

        return KEYS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
