"""Dense supervised pretraining of a DINOv2-architecture ViT on generated glyphs images.

Every patch token is asked, through *linear* heads on the tapped features (the same features
the detector's neck reads), three things about the image under it:

* ``coverage``: the share of the patch's pixels that belong to each glyph class or to the
  background (soft cross-entropy over K + 1);
* ``box``: for a patch that holds a fair part of a glyph, that glyph's box as
  ``(dx, dy, log w, log h)`` relative to the patch centre, in patch units (L1);
* ``fine``: the foreground share of each of ``sub x sub`` cells of the patch (binary
  cross-entropy), i.e. object boundaries finer than a patch.

These are what a DETR decoder reads from a backbone: what is here, where its box is, and where
its outline runs. Linear heads keep that information in the features themselves rather than in
a head that is thrown away.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DenseHeads", "GlyphBatches", "Stage", "cosine_lr", "dense_loss", "dense_metrics", "dense_targets", "glyph_batch",
           "object_logits"]


def dense_targets(owner: np.ndarray, classes: np.ndarray, num_classes: int, patch: int,
                  sub: int = 2, max_objects: int = 10) -> Dict[str, np.ndarray]:
    """Per-patch targets of one image from its owner map.

    Args:
        owner: (H, W) int, the glyph index visible at each pixel, -1 for background; H and W are
            multiples of ``patch``.
        classes: (N,) class index of each glyph.
        num_classes: K (the background is class K).
        patch: patch size in pixels.
        sub: fine-mask cells per patch side.
        max_objects: glyphs per image the object targets have room for (padded with class -1).

    Returns:
        ``coverage`` (Hp, Wp, K + 1) float32 summing to 1, ``box`` (Hp, Wp, 4) float32,
        ``box_valid`` (Hp, Wp) bool, ``fine`` (Hp * sub, Wp * sub) float32, ``obj_weight``
        (Hp, Wp, max_objects) float32: each glyph's share of each patch, ``obj_class``
        (max_objects,) int64.
    """
    from scipy import ndimage

    h, w = owner.shape
    hp, wp, n = h // patch, w // patch, len(classes)
    if n > max_objects:
        raise ValueError(f"{n} glyphs in one image but max_objects={max_objects}")
    # every pixel's patch index, then one bincount per histogram (class per patch, glyph per patch)
    patch_of = ((np.arange(h) // patch)[:, None] * wp + (np.arange(w) // patch)[None, :]).ravel()
    lookup = np.append(np.asarray(classes, dtype=np.int64), num_classes)  # owner -1 -> background
    per_pixel = lookup[owner].ravel()
    area = float(patch * patch)
    coverage = np.bincount(patch_of * (num_classes + 1) + per_pixel,
                           minlength=hp * wp * (num_classes + 1)).reshape(hp, wp, -1) / area
    cell = patch // sub
    fg = (owner >= 0).astype(np.float32)
    fine = fg[: hp * sub * cell, : wp * sub * cell].reshape(hp * sub, cell, wp * sub, cell).mean((1, 3))
    box = np.zeros((hp, wp, 4), np.float32)
    valid = np.zeros((hp, wp), bool)
    obj_weight = np.zeros((hp, wp, max_objects), np.float32)
    obj_class = np.full(max_objects, -1, np.int64)
    if n:
        owner_flat = owner.ravel().astype(np.int64)
        counts = np.bincount(patch_of * (n + 1) + owner_flat + 1, minlength=hp * wp * (n + 1))
        counts = counts.reshape(hp, wp, n + 1)[..., 1:]  # (Hp, Wp, N) pixels of each glyph per patch
        obj_weight[..., :n] = counts / area
        obj_class[:n] = classes
        glyph_area = counts.sum((0, 1))
        slices = ndimage.find_objects(owner.astype(np.int32) + 1, max_label=n)  # visible extent per glyph
        x0, y0, x1, y1 = (np.array([getattr(sl[a], b) if sl else 0 for sl in slices], np.float64)
                          for a, b in ((1, "start"), (0, "start"), (1, "stop"), (0, "stop")))
        best = counts.argmax(-1)  # (Hp, Wp)
        got = np.take_along_axis(counts, best[..., None], -1)[..., 0]
        # a patch speaks for a glyph that fills a tenth of it, or half of the glyph is inside it
        valid = (got >= 0.1 * area) | ((got > 0) & (got >= 0.5 * np.maximum(glyph_area[best], 1)))
        cy = (np.arange(hp)[:, None] + 0.5) * patch
        cx = (np.arange(wp)[None, :] + 0.5) * patch
        bw, bh = x1[best] - x0[best], y1[best] - y0[best]
        box[..., 0] = ((x0[best] + x1[best]) / 2 - cx) / patch
        box[..., 1] = ((y0[best] + y1[best]) / 2 - cy) / patch
        box[..., 2] = np.log(np.maximum(bw, 1) / patch)
        box[..., 3] = np.log(np.maximum(bh, 1) / patch)
        box[~valid] = 0
    return dict(coverage=coverage.astype(np.float32), box=box, box_valid=valid, fine=fine.astype(np.float32),
                obj_weight=obj_weight, obj_class=obj_class)


def glyph_batch(seeds: Sequence[int], height: int, width: int, num_classes: int, patch: int,
                sub: int = 2, max_glyphs: int = 10, extent: Tuple[float, float] = (10.0, 150.0),
                ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Images (B, 3, H, W) RGB in [0, 1] and stacked :func:`dense_targets` for ``seeds``.

    ``max_glyphs`` and ``extent`` (glyph size range in pixels) go to :func:`generate_glyphs_image`.
    """
    from .glyphs import generate_glyphs_image

    images, targets = [], []
    for s in seeds:
        img, owner, classes = generate_glyphs_image(int(s), height, width, max_glyphs, extent)
        images.append(img)
        targets.append(dense_targets(owner, classes, num_classes, patch, sub))
    batch = {k: torch.from_numpy(np.stack([t[k] for t in targets])) for k in targets[0]}
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return pixels.float().div_(255.0), batch


@dataclass
class Stage:
    """A part of the pretraining curriculum: ``steps`` batches of ``batch`` images whose sides are
    drawn from ``sizes``, with up to ``max_glyphs`` glyphs of ``extent`` pixels across; an extent
    of at most 1 is a fraction of the image's shorter side."""

    steps: int
    batch: int
    sizes: Sequence[int]
    max_glyphs: int = 10
    extent: Tuple[float, float] = (10.0, 150.0)


class GlyphBatches(torch.utils.data.IterableDataset):
    """The training batches of a curriculum of :class:`Stage` s, from step ``start`` on.

    Each step draws its image height and width from its stage's ``sizes`` (seeded by the step) and
    its images from seeds that no other step uses, so the batches are the same whether they are
    made in the training process or in a ``DataLoader`` worker, and a run restarted at ``start``
    continues the same sequence.
    """

    def __init__(self, seed: int, stages: Sequence[Stage], num_classes: int, patch: int, start: int = 0):
        super().__init__()
        self.seed, self.stages, self.start = seed, list(stages), start
        self.num_classes, self.patch = num_classes, patch

    def __len__(self) -> int:
        return sum(st.steps for st in self.stages) - self.start

    def __iter__(self):
        step, first = 0, self.seed * 100_000_000
        for st in self.stages:
            for _ in range(st.steps):
                if step >= self.start:
                    rng = np.random.default_rng([self.seed, step])
                    h, w = (int(v) for v in rng.choice(st.sizes, 2))
                    lo, hi = (e * min(h, w) if e <= 1 else e for e in st.extent)
                    yield glyph_batch(range(first, first + st.batch), h, w, self.num_classes, self.patch,
                                      max_glyphs=st.max_glyphs, extent=(lo, hi))
                step, first = step + 1, first + st.batch


class DenseHeads(nn.Module):
    """Linear heads on the concatenated taps: coverage (K + 1), box (4), fine mask (sub * sub).

    Args:
        in_dim: width of one tap; num_taps: taps concatenated; num_classes: K; sub: fine cells per side.
    """

    def __init__(self, in_dim: int, num_taps: int, num_classes: int, sub: int = 2):
        super().__init__()
        self.num_classes, self.sub = num_classes, sub
        self.proj = nn.Linear(in_dim * num_taps, num_classes + 1 + 4 + sub * sub)

    def forward(self, features: List[Tensor]) -> Dict[str, Tensor]:
        """features: per tap (B, D, Hp, Wp) -> ``coverage`` (B, Hp, Wp, K+1) logits, ``box``
        (B, Hp, Wp, 4), ``fine`` (B, Hp * sub, Wp * sub) logits."""
        x = self.proj(torch.cat(features, 1).permute(0, 2, 3, 1))  # (B, Hp, Wp, out)
        k1 = self.num_classes + 1
        b, hp, wp, _ = x.shape
        fine = x[..., k1 + 4:].reshape(b, hp, wp, self.sub, self.sub).permute(0, 1, 3, 2, 4)
        return dict(coverage=x[..., :k1], box=x[..., k1:k1 + 4],
                    fine=fine.reshape(b, hp * self.sub, wp * self.sub))


def object_logits(pred: Dict[str, Tensor], target: Dict[str, Tensor]) -> Tensor:
    """Class logits of each glyph: its patches' logits averaged with its share of each patch.

    Returns:
        (B, max_objects, K); rows of absent objects are zeros.
    """
    k = pred["coverage"].shape[-1] - 1
    w = target["obj_weight"]  # (B, Hp, Wp, N)
    pooled = torch.einsum("bhwk,bhwn->bnk", pred["coverage"][..., :k], w)
    return pooled / w.sum((1, 2)).clamp(min=1e-6)[..., None]


def dense_loss(pred: Dict[str, Tensor], target: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Soft cross-entropy (coverage), L1 on valid patches (box), BCE (fine mask), and a
    cross-entropy on each glyph's pooled class logits (:func:`object_logits`)."""
    loss_cov = -(target["coverage"] * F.log_softmax(pred["coverage"], -1)).sum(-1).mean()
    valid = target["box_valid"]
    loss_box = (pred["box"][valid] - target["box"][valid]).abs().sum(-1).mean() if valid.any() \
        else pred["box"].sum() * 0.0
    loss_fine = F.binary_cross_entropy_with_logits(pred["fine"], target["fine"])
    obj = target["obj_class"] >= 0
    loss_obj = F.cross_entropy(object_logits(pred, target)[obj], target["obj_class"][obj]) if obj.any() \
        else pred["coverage"].sum() * 0.0
    return dict(loss_coverage=loss_cov, loss_box=loss_box, loss_fine=loss_fine, loss_object=loss_obj)


@torch.no_grad()
def dense_metrics(pred: Dict[str, Tensor], target: Dict[str, Tensor]) -> Dict[str, float]:
    """``class_acc``: arg-max class of patches at least half covered by one glyph class;
    ``object_acc``: arg-max of each glyph's pooled logits; ``fg_iou``: IoU of the thresholded fine
    mask; ``box_l1``: mean L1 on valid patches."""
    k = pred["coverage"].shape[-1] - 1
    cov = target["coverage"]
    major = cov[..., :k].max(-1)
    sel = major.values >= 0.5
    acc = (pred["coverage"][..., :k].argmax(-1)[sel] == major.indices[sel]).float().mean()
    fg_pred, fg_true = pred["fine"] > 0, target["fine"] >= 0.5
    iou = (fg_pred & fg_true).sum() / (fg_pred | fg_true).sum().clamp(min=1)
    valid = target["box_valid"]
    box = (pred["box"][valid] - target["box"][valid]).abs().mean()
    obj = target["obj_class"] >= 0
    obj_acc = (object_logits(pred, target)[obj].argmax(-1) == target["obj_class"][obj]).float().mean()
    return dict(class_acc=float(acc), object_acc=float(obj_acc), fg_iou=float(iou), box_l1=float(box))


def cosine_lr(step: int, total: int, warmup: int, base: float, final: float = 0.0) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then a cosine down to ``final``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return final + (base - final) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
