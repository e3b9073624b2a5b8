"""The model's options as config values, derived from their declarations in :mod:`dinov2od.modeling`.

:func:`model_defaults` reads every option's default from where it is written (the dataclasses
:class:`~dinov2od.modeling.DecoderOptions`, :class:`~dinov2od.modeling.BackboneOptions`,
:class:`~dinov2od.modeling.CriterionOptions`, :class:`~dinov2od.modeling.MatcherOptions`, the
backbone families' own options and the constructors' signatures) plus :data:`CONFIG_MODEL`, the
few choices the configs make differently from the plain constructors. Both config styles are built
from it: :func:`lazy_model` for ``configs/common/models/dinov2_detr.py``, and the defaults of the
yacs keys (:mod:`.keys`). :func:`apply_preset` / :func:`preset_changes` reach the presets of
:data:`dinov2od.modeling.PRESETS` from lazy and yacs configs.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict

from detectron2.config import LazyCall as L

from dinov2od.modeling import (
    BACKBONES,
    PRESETS,
    CriterionOptions,
    DecoderOptions,
    DINOv2ObjectDetector,
    HungarianMatcher,
    MatcherOptions,
    SetCriterion,
    build_backbone,
)
from dinov2od.modeling.backbones.registry import family_options

__all__ = ["CONFIG_MODEL", "apply_preset", "lazy_model", "model_defaults", "preset_changes"]

#: what the configs' model sets differently from the plain constructors' defaults (paths under
#: ``model.``): the ViT-B/14 (the plain API infers ViT-S/14 when no weights are named), and an
#: empty ``arch_overrides`` mapping that the command line can fill key by key
#: (``model.detector.backbone.arch_overrides.hidden_size=48``)
CONFIG_MODEL: Dict[str, Any] = {
    "detector.backbone.arch": "base",
    "detector.backbone.arch_overrides": {},
}

#: the families whose own options every config carries (a config passes them to any family)
CONFIG_FAMILIES = ("dinov2", "dinov3")

_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _signature_defaults(fn, skip=()) -> Dict[str, Any]:
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params
            if p.kind in _KEYWORD and p.default is not p.empty and p.name not in skip}


def _fields(cls, skip=()) -> Dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in skip}


def _backbone_defaults() -> Dict[str, Any]:
    out = _signature_defaults(build_backbone)  # family
    for family in CONFIG_FAMILIES:
        for name, value in family_options(BACKBONES[family]).items():
            if name in out and out[name] != value:
                raise ValueError(f"backbone option {name}: the families' defaults differ ({out[name]!r}, {value!r})")
            out[name] = value
    return out


def model_defaults() -> Dict[str, Any]:
    """Every option of the configs' model with its default, as the lazy model config's tree of
    plain values (no ``_target_``, no interpolation).

    Returns:
        ``{"num_classes": 80, "detector": {..., "backbone": {...}}, "criterion": {..., "matcher":
        {...}}, "size_divisibility": 14, ...}``.
    """
    from dinov2od.d2.modeling.meta_arch import DINOv2DETR

    detector = _signature_defaults(DINOv2ObjectDetector.__init__,
                                   skip=("backbone", "neck", "decoder", "pixel_mean", "pixel_std"))
    detector.update(_fields(DecoderOptions, skip=("num_levels", "num_layers")))  # the neck's, num_decoder_layers
    detector["backbone"] = _backbone_defaults()
    criterion = _fields(CriterionOptions, skip=tuple(CriterionOptions.base_weights()))
    criterion["weight_dict"] = CriterionOptions.base_weights()
    criterion["matcher"] = _fields(MatcherOptions)
    tree = {"num_classes": detector.pop("num_classes"), "detector": detector, "criterion": criterion,
            **_signature_defaults(DINOv2DETR.__init__, skip=("detector", "criterion", "num_classes"))}
    for path, value in CONFIG_MODEL.items():
        *parents, leaf = path.split(".")
        node = tree
        for name in parents:
            node = node[name]
        node[leaf] = value
    return tree


def lazy_model():
    """The lazy model config (``L(DINOv2DETR)(...)``) with every option at :func:`model_defaults`;
    ``num_classes`` is set once and read by the detector and the loss by interpolation, the loss's
    ``two_stage`` follows the detector's, ``num_aux_layers`` is derived by ``DINOv2DETR``."""
    from dinov2od.d2.modeling.meta_arch import DINOv2DETR

    tree = model_defaults()
    detector, criterion = tree.pop("detector"), tree.pop("criterion")
    backbone, matcher = detector.pop("backbone"), criterion.pop("matcher")
    return L(DINOv2DETR)(
        detector=L(DINOv2ObjectDetector)(num_classes="${..num_classes}", backbone=L(build_backbone)(**backbone),
                                         **detector),
        criterion=L(SetCriterion)(
            num_classes="${..num_classes}",
            matcher=L(HungarianMatcher)(**matcher),
            num_aux_layers=None,  # None: the detector's decoder layers - 1 (DINOv2DETR sets it)
            two_stage="${..detector.two_stage}",
            **criterion,
        ),
        **tree,
    )


def preset_changes(name: str, key: str = "preset") -> Dict[str, Any]:
    """The values a preset of :data:`dinov2od.modeling.PRESETS` sets, by lazy path
    (``{"model.detector.backbone.window_size": 16, ...}``).

    Raises:
        KeyError: an unknown preset, naming ``key`` and the presets.
    """
    if name not in PRESETS:
        raise KeyError(f"{key}={name!r} is no preset; the presets (dinov2od.modeling.PRESETS): {sorted(PRESETS)}")
    return flatten(PRESETS[name], "model.detector.")


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested dict (a preset, a yaml file's contents) as ``{"dotted.path": leaf value}``."""
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def apply_preset(model, name: str) -> None:
    """Set a preset's values on a lazy model config (``model`` is the config's ``model`` node), in place."""
    for path, value in preset_changes(name).items():
        *parents, leaf = path[len("model."):].split(".")
        node = model
        for part in parents:
            node = node[part]
        node[leaf] = value
