"""Which style a config is: lazy (a ``.py`` file, or a lazy run's saved ``config.yaml``) or yacs."""
from __future__ import annotations

import os

import yaml

from detectron2.config import CfgNode as CN

__all__ = ["config_style", "is_lazy"]


def is_lazy(cfg) -> bool:
    """Whether ``cfg`` is a lazy config (else yacs)."""
    return not isinstance(cfg, CN)


def config_style(path: str) -> str:
    """``"lazy"`` or ``"yacs"``: by extension for ``.py``, by content for YAML (a lazy run's saved
    ``config.yaml`` has lower-case ``model``/``train``/``dataloader`` sections, yacs upper-case ones).
    """
    if path.endswith(".py"):
        return "lazy"
    if not path.endswith((".yaml", ".yml")):
        raise ValueError(f"A config is a lazy config (.py or a saved config.yaml) or a yacs .yaml, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    lazy_sections = {"model", "train", "dataloader", "optimizer", "lr_multiplier"}
    return "lazy" if isinstance(content, dict) and lazy_sections & set(content) else "yacs"
