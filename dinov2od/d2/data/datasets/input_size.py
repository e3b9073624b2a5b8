"""The input size the model sees, read from a config: the resize of the dataloaders' mappers
(``ResizeShortestEdge``) and the backbone's patch size, for the size advice
(:mod:`dinov2od.d2.data.datasets.sizes`)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

__all__ = ["InputSize", "input_sizes", "patch_size_of", "resized_shapes"]


@dataclass(frozen=True)
class InputSize:
    """A ``ResizeShortestEdge``: ``short`` px (None: no resize, the image's own size), longest edge
    at most ``max_size`` (None: no limit). ``choices``: the training resize's shortest edges."""

    short: Optional[float]
    max_size: Optional[float]
    choices: Tuple[int, ...] = ()
    range_style: bool = False  # choices are a [min, max] range (sample_style="range")

    def describe(self) -> str:
        if self.short is None:
            return "no resize (the images' own size)"
        cap = f", longest <= {self.max_size:g}" if self.max_size else ""
        return f"shortest edge {self.short:g}{cap}"


def resized_shapes(width, height, short: Optional[float], max_size: Optional[float]) -> Tuple[np.ndarray, np.ndarray]:
    """(new width, new height) of images after Detectron2's ``ResizeShortestEdge`` to ``short``
    capped by ``max_size`` (its ``get_output_shape``, rounding included), for arrays of sizes."""
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    if short is None or short <= 0:
        return w.copy(), h.copy()
    scale = float(short) / np.minimum(h, w)
    newh = np.where(h < w, float(short), scale * h)
    neww = np.where(h < w, scale * w, float(short))
    if max_size:
        longest = np.maximum(newh, neww)
        over = longest > max_size
        s = np.where(over, float(max_size) / longest, 1.0)
        newh, neww = newh * s, neww * s
    return np.floor(neww + 0.5), np.floor(newh + 0.5)


def _last_resize(augs) -> Optional[InputSize]:
    """The last top-level ``ResizeShortestEdge`` of an augmentation list (what sets the final size)."""
    from detectron2.data import transforms as T

    found = None
    for a in augs or []:
        if isinstance(a, T.ResizeShortestEdge):
            lengths = tuple(int(v) for v in a.short_edge_length)
            max_size = None if a.max_size is None or a.max_size >= sys.maxsize else float(a.max_size)
            if a.is_range:
                mean = (lengths[0] + lengths[-1]) / 2.0
            else:
                mean = float(np.mean(lengths))
            found = InputSize(short=None if mean <= 0 else mean, max_size=max_size, choices=lengths,
                              range_style=bool(a.is_range))
    return found


def input_sizes(cfg) -> Dict[str, Optional[InputSize]]:
    """``{"test": ..., "train": ...}``: the final resize of the config's test and train mappers
    (the augmentations built as the dataloaders build them; None where there is none). The train
    entry's ``short`` is the mean of its shortest-edge choices."""
    from dinov2od.d2.config import is_lazy

    out: Dict[str, Optional[InputSize]] = {"test": None, "train": None}
    if is_lazy(cfg):
        from detectron2.config import instantiate

        for split in ("test", "train"):
            loader = cfg.get("dataloader", {}).get(split, None)
            mapper = loader.get("mapper", None) if loader is not None else None
            augs = mapper.get("augmentations", None) if mapper is not None else None
            if augs is not None:
                out[split] = _last_resize(instantiate(augs))
    else:
        from dinov2od.d2.data.dataset_mapper import DetrDatasetMapper

        for split, is_train in (("test", False), ("train", True)):
            out[split] = _last_resize(DetrDatasetMapper.from_config(cfg, is_train)["augmentations"])
    return out


def patch_size_of(cfg) -> int:
    """The ViT patch size of a config's backbone: ``arch_overrides.patch_size`` (yacs
    ``ARCH_OVERRIDES.PATCH_SIZE``) or the family's (DINOv2 14, DINOv3 16); else the model's
    ``size_divisibility``; else 14."""
    from dinov2od.d2.config import is_lazy

    try:
        if is_lazy(cfg):
            bb = cfg.model.detector.backbone
            family, overrides = bb.get("family", "dinov2"), dict(bb.get("arch_overrides", None) or {})
            divisibility = cfg.model.get("size_divisibility", None)
        else:
            node = cfg.MODEL.DINOV2OD
            family = node.BACKBONE.FAMILY
            overrides = {k.lower(): v for k, v in dict(node.BACKBONE.ARCH_OVERRIDES).items()}
            divisibility = node.SIZE_DIVISIBILITY
        if overrides.get("patch_size"):
            return int(overrides["patch_size"])
        from dinov2od.modeling import BACKBONES

        if family in BACKBONES and getattr(BACKBONES[family], "default_patch_size", None):
            return int(BACKBONES[family].default_patch_size)
        if divisibility:
            return int(divisibility)
    except Exception:  # an unusual model config: the DINOv2 patch
        pass
    return 14
