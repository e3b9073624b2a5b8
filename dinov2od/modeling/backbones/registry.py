"""Backbone families by name: ``@register_backbone("name")`` and :func:`build_backbone`.

A family is a :class:`~.base.ViTBackbone` subclass whose constructor takes the shared options
(:data:`~.base.SHARED_OPTIONS`: ``arch``, ``pretrained``, taps, LoRA, windows ...) and options of
its own, each with a default::

    @register_backbone("mine")
    class MyBackbone(ViTBackbone):
        archs = {...}  # arch name -> config fields
        def __init__(self, arch=None, ..., my_option=1.0): ...

    build_backbone(family="mine", arch="small", my_option=2.0)
    DINOv2ObjectDetector(num_classes=80, backbone=dict(family="mine", arch="small"))

:data:`BACKBONES` is what the detector, the Detectron2 config (``MODEL.DINOV2OD.BACKBONE.FAMILY``)
and the benchmark read; the built-in families are ``"dinov2"`` and ``"dinov3"``.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Type

from .base import SHARED_OPTIONS, ViTBackbone

__all__ = ["BACKBONES", "build_backbone", "family_options", "register_backbone"]

#: registered families: name (lower case) -> ViTBackbone subclass
BACKBONES: Dict[str, Type[ViTBackbone]] = {}

_OPTION_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def family_options(cls: Type[ViTBackbone]) -> Dict[str, Any]:
    """The keyword options of a family's constructor with their defaults (``inspect.Parameter.empty``
    where there is none); a constructor taking ``**kwargs`` adds its parent family's options."""
    options: Dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass is ViTBackbone or not issubclass(klass, ViTBackbone):
            break
        if "__init__" not in vars(klass):
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]  # without self
        for p in params:
            if p.kind in _OPTION_KINDS:
                options.setdefault(p.name, p.default)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return options


def _own_options(cls: Type[ViTBackbone]) -> Dict[str, Any]:
    """The options only this family takes (beyond the shared ones), with their defaults."""
    return {k: v for k, v in family_options(cls).items() if k not in SHARED_OPTIONS}


def register_backbone(name: str) -> Callable[[Type[ViTBackbone]], Type[ViTBackbone]]:
    """Class decorator: register a :class:`~.base.ViTBackbone` family under ``name`` (case-insensitive)
    and set its ``family`` attribute.

    Raises:
        TypeError: the class is no ViTBackbone, lacks a shared option, or has an option without a
            default (configs pass every option to every family).
        ValueError: another class holds ``name`` already.
    """
    key = str(name).lower()

    def register(cls: Type[ViTBackbone]) -> Type[ViTBackbone]:
        if not (isinstance(cls, type) and issubclass(cls, ViTBackbone)):
            raise TypeError(f"register_backbone({name!r}) decorates a ViTBackbone subclass, not {cls!r}")
        options = family_options(cls)
        missing = [o for o in SHARED_OPTIONS if o not in options]
        no_default = [k for k, v in options.items() if v is inspect.Parameter.empty]
        if missing or no_default:
            raise TypeError(
                f"backbone family {key!r} ({cls.__qualname__}): its constructor must take every shared "
                f"option {list(SHARED_OPTIONS)} and give each option a default; missing {missing}, "
                f"without a default {no_default}"
            )
        old = BACKBONES.get(key)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"backbone family {key!r} is registered already ({old.__module__}.{old.__qualname__})")
        cls.family = key
        BACKBONES[key] = cls
        return cls

    return register


def build_backbone(family: str = "dinov2", **kwargs) -> ViTBackbone:
    """The backbone of a registered family (:data:`BACKBONES`): ``"dinov2"``
    (:class:`~.dinov2.DINOv2Backbone`), ``"dinov3"`` (:class:`~.dinov3.DINOv3Backbone`) or your own.

    Args:
        family: the family's name (case-insensitive).
        **kwargs: the family's keyword arguments. Options of *other* families only (``registers``,
            ``pos_embed_init``, ``pos_interpolation`` for DINOv2; ``rope_train_augment`` for
            DINOv3) are dropped when they hold their defaults and refused otherwise, so one config
            carries the options of every family.

    Returns:
        the backbone, with ``build_kwargs``: the arguments given here (so a detector built on it
        can record its constructor arguments, :attr:`DINOv2ObjectDetector.constructor_args`).

    Raises:
        ValueError: an unknown family, an option no family takes (naming the family's options), or
            another family's option set to a value other than its default.
    """
    given = {"family": family, **kwargs}  # recorded on the backbone: how to build it again
    name = str(family).lower()
    if name not in BACKBONES:
        raise ValueError(f"backbone family={family!r} is unknown; choose one of {list(BACKBONES)} "
                         "(families are registered with @register_backbone)")
    cls = BACKBONES[name]
    accepted = family_options(cls)
    for key in [k for k in kwargs if k not in accepted]:
        owners = {other: _own_options(c)[key] for other, c in BACKBONES.items() if key in _own_options(c)}
        if not owners:
            raise ValueError(
                f"backbone option {key}= is unknown to family='{name}' ({cls.__name__}); "
                f"its options: {sorted(accepted)}"
            )
        value = kwargs.pop(key)
        if all(value != default for default in owners.values()):
            where = " or ".join(f"family='{o}'" for o in owners)
            defaults = " / ".join(dict.fromkeys(repr(d) for d in owners.values()))
            raise ValueError(
                f"backbone option {key}= applies to {where} only, not family='{name}'; "
                f"remove it (or leave it at {defaults})"
            )
    backbone = cls(**kwargs)
    backbone.build_kwargs = given  # DINOv2ObjectDetector.constructor_args reads it
    return backbone
