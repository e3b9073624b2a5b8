"""Command-line overrides: an unknown key is an error that names it and the nearest known keys."""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, List, Optional, Sequence

from detectron2.config import CfgNode as CN

__all__ = ["UnknownKeyError", "check_lazy_overrides"]


class UnknownKeyError(KeyError):
    """A command-line override names a key that the config does not have."""

    def __str__(self) -> str:  # KeyError's own would quote the message and escape its newlines
        return str(self.args[0]) if self.args else ""


def _python_none(item: str) -> str:
    """``key=None`` as the config files write it means None; Hydra's override grammar would read it
    as the string "None" (its None is ``null``), which then fails far from the command line."""
    key, sep, value = item.partition("=")
    return f"{key}=null" if sep and value.strip() == "None" else item


def _override_key(item: str) -> str:
    """The dotted key of a lazy override ``key=value`` (with its ``+`` when it adds a key)."""
    return item.split("=", 1)[0].strip()


def _lazy_target(node: dict):
    """The callable of a ``LazyCall`` node (a saved config.yaml names it as a string), or None."""
    target = node.get("_target_")
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:
            return None
    return target if callable(target) else None


def _kwargs_followed(target) -> Optional[set]:
    """The names the project's ``**kwargs`` callables pass on: the detector's decoder options, the
    backbone families' options (None: a callable whose ``**kwargs`` is not followed)."""
    from dinov2od.modeling import BACKBONES, DecoderOptions, DINOv2ObjectDetector, build_backbone
    from dinov2od.modeling.backbones.registry import family_options

    if isinstance(target, type) and issubclass(target, DINOv2ObjectDetector):
        return {f.name for f in dataclasses.fields(DecoderOptions)} - {"num_levels", "num_layers"}
    if target is build_backbone:
        return {name for cls in BACKBONES.values() for name in family_options(cls)}
    return None


def _parameters(target) -> Optional[set]:
    """The keyword arguments ``target`` takes (None: any, a ``**kwargs`` that is not followed)."""
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return names
    followed = _kwargs_followed(target)
    return None if followed is None else names | followed


def _is_known(tree: Any, parts: Sequence[str]) -> bool:
    """Whether the dotted key ``parts`` names a node of the plain config ``tree``: written in the
    config, a parameter of the callable of a ``LazyCall`` node, or under an empty dict (a mapping
    that is filled freely, such as ``model.detector.backbone.arch_overrides``)."""
    node = tree
    for part in parts:
        if not isinstance(node, dict):
            return False  # below a value
        if part in node:
            node = node[part]
            continue
        if not node:
            return True
        if "_target_" not in node:
            return False
        target = _lazy_target(node)
        params = None if target is None else _parameters(target)
        return params is None or part in params  # below an unwritten parameter: not checked
    return True


def _lazy_keys(tree: Any, prefix: str = "") -> List[str]:
    """Every dotted key of ``tree`` (sections and values) and the parameters of its LazyCall nodes."""
    if not isinstance(tree, dict):
        return []
    names = set(tree) - {"_target_"}
    if "_target_" in tree:
        target = _lazy_target(tree)
        names |= (_parameters(target) or set()) if target is not None else set()
    out = []
    for name in sorted(names):
        out.append(prefix + name)
        out.extend(_lazy_keys(tree.get(name), f"{prefix}{name}."))
    return out


def _yacs_keys(cfg: CN, prefix: str = "") -> List[str]:
    out = []
    for name, value in cfg.items():
        out.append(prefix + name)
        if isinstance(value, CN):
            out.extend(_yacs_keys(value, f"{prefix}{name}."))
    return out


def _nearest_keys(key: str, known: Sequence[str]) -> List[str]:
    """The known keys nearest to ``key``: a misspelt name among its section's names first, then
    the whole key among all keys (a name in the wrong section)."""
    parts, known_set = key.split("."), set(known)
    i = len(parts) - 1
    while i > 0 and ".".join(parts[:i]) not in known_set:
        i -= 1
    prefix = ".".join(parts[:i]) + "." if i else ""
    names = {k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]}
    close = [prefix + n for n in difflib.get_close_matches(parts[i], names, n=3, cutoff=0.6)]
    rest = ".".join(parts[i + 1:])
    close = [f"{c}.{rest}" if rest and f"{c}.{rest}" in known_set else c for c in close]
    return (close or difflib.get_close_matches(key, known, n=3, cutoff=0.8)
            or [k for k in known if k.rsplit(".", 1)[-1] == parts[-1]][:3])  # the same name elsewhere


def _unknown_keys_message(unknown: Sequence[str], known: Sequence[str], path: str, lazy: bool = True) -> str:
    lines = [f"Unknown config key{'s' if len(unknown) > 1 else ''} on the command line for {path}:"]
    for key in unknown:
        close = _nearest_keys(key, known)
        lines.append(f"  {key}: " + (f"did you mean {' or '.join(close)}?" if close else "no similar key."))
    if lazy:
        lines.append(
            "A key must be written in the config (the model's keys come with their defaults from the "
            "dataclasses of dinov2od/modeling, the others from configs/common/*.py) or be an argument of the "
            "callable its LazyCall section builds. To add a "
            f"genuinely new key, prefix it with '+': +{unknown[0]}=VALUE.")
    else:
        lines.append("yacs keys are those of get_cfg() and add_dinov2od_config (dinov2od.d2.config.KEYS); "
                     "a new key is added in code (a row of KEYS), not on the command line.")
    return "\n".join(lines)


def check_lazy_overrides(cfg, overrides: Sequence[str], path: str = "the config") -> None:
    """Refuse ``key=value`` overrides whose key the lazy config ``cfg`` does not know, naming each
    and the nearest known keys; ``+key=value`` adds a key on purpose and is not checked.

    Raises:
        UnknownKeyError: (a ``KeyError``) with the unknown keys and suggestions.
    """
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=False)
    keys = [_override_key(str(o)) for o in overrides if "=" in str(o)]
    unknown = [k for k in keys if not k.startswith(("+", "~")) and not _is_known(tree, k.split("."))]
    if unknown:
        raise UnknownKeyError(_unknown_keys_message(unknown, _lazy_keys(tree), path))
