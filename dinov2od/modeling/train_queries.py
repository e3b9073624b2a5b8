"""Queries that exist only in training: contrastive denoising and the one-to-many set.

Two ways of giving the decoder more, and easier, positives while training, both dropped at
inference (the decoder then runs exactly as without them):

- **Contrastive denoising** (DN-DETR; DINO's CDN). Each ground-truth box gives, per denoising
  group, a *positive* query (its box moved a little, to be reconstructed) and a *negative* one
  (moved further, to be classified "no object"), both with a label that is replaced by a random
  class with probability ``label_noise`` (label flipping). A query's content is the embedding of
  its (noised) label and its reference box is the noised box. The loss knows each query's target,
  so no Hungarian matching is needed: this removes the instability of bipartite matching early
  in training, which is what made DINO converge in 12 epochs instead of 50.
- **One-to-many** (H-DETR's hybrid matching). An extra query set is matched with Hungarian
  matching against the ground truth repeated ``K`` times, so each object trains ``K`` queries.

Query layout in training, along the query axis of every image:

    [ matching: groups * Q | one-to-many: Q_o2m | denoising: dn_groups * 2 * n ]

where ``n`` is the largest number of targets of an image in the batch (at least 1) and a
denoising group holds ``n`` positives then ``n`` negatives. An image with fewer targets has
padding slots there, which no other query sees and no loss reads; the slots exist even when
no image has a target so that the denoising label embedding takes part in every training step
(DDP without ``find_unused_parameters`` needs every trainable parameter in the graph; their
gradient is then zero).

Self-attention (:func:`self_attn_mask`): a matching group sees only itself (Group-DETR), the
one-to-many set only itself, a denoising group itself and the first matching group (the queries
kept at inference; DN-DETR lets denoising queries see the matching part, never the reverse, so
no ground truth leaks into the matching queries).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from dinov2od.layers import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["DenoisingQueries", "check_targets", "make_denoising_queries", "noised_copies", "self_attn_mask"]

_PAD_BOX = (0.5, 0.5, 0.5, 0.5)  # reference box of a padding slot (any finite box would do)


def check_targets(targets: Sequence[Dict[str, Tensor]], num_classes: int, batch: int) -> None:
    """Raise a ValueError naming the problem if ``targets`` is not B dicts of labels and boxes.

    Args:
        targets: B dicts with ``labels`` (n,) int64 in [0, num_classes) and ``boxes`` (n, 4)
            normalized ``(cx, cy, w, h)``; an optional ``name`` (e.g. the image file) is used in errors.
        num_classes: K.
        batch: B, the number of images.
    """
    if targets is None or len(targets) != batch:
        got = "None" if targets is None else f"{len(targets)} target dicts"
        raise ValueError(f"got {got} for a batch of {batch} images; pass one dict per image")
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise ValueError(f"targets[{i}] needs 'labels' and 'boxes', has {sorted(t)}")
        labels, boxes = t["labels"], t["boxes"]
        if boxes.shape != (len(labels), 4):
            raise ValueError(f"targets[{i}]: boxes must be ({len(labels)}, 4) cxcywh, got {tuple(boxes.shape)}")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):  # the one check of class ids (the Detectron2 meta-arch passes the file name)
            raise ValueError(
                f"{t.get('name', f'targets[{i}]')} has class id {int(bad[0])} outside [0, num_classes={num_classes}); "
                "set num_classes to the dataset's number of classes or remap the labels to 0..K-1")


@dataclass
class DenoisingQueries:
    """The denoising part of a training batch; D = ``num_groups * 2 * n`` slots per image.

    Attributes:
        labels: (B, D) int64 noised labels (the query content is their embedding).
        boxes: (B, D, 4) noised ``(cx, cy, w, h)`` boxes (the reference boxes).
        valid: (B, D) bool, False at padding slots.
        positive: (B, D) bool, True at valid positive slots (the others valid are negatives).
        target_index: (B, D) int64, index of the slot's target in its image's targets (0 at padding).
        num_groups: denoising groups.
    """

    labels: Tensor
    boxes: Tensor
    valid: Tensor
    positive: Tensor
    target_index: Tensor
    num_groups: int

    @property
    def group_size(self) -> int:
        """Slots per group, 2 * n."""
        return self.labels.shape[1] // self.num_groups

    def as_dict(self) -> Dict[str, object]:
        """What the criterion needs: ``valid``, ``positive``, ``target_index``, ``num_groups``."""
        return {"valid": self.valid, "positive": self.positive, "target_index": self.target_index,
                "num_groups": self.num_groups}


def noised_copies(labels: Tensor, boxes: Tensor, num_groups: int, num_classes: int, label_noise: float,
                  box_noise: float):
    """Positive and negative noised copies of one image's targets (DINO's CDN noise).

    Each box corner moves by ``box_noise * u * (w/2 or h/2)`` in a random direction, with
    ``u ~ U[0, 1)`` for positives and ``u ~ U[1, 2)`` for negatives, so a positive stays near its
    box and a negative lies just outside that ring. Corners are clipped to the image and put back
    in order. Random draws depend only on this image's targets (never on the batch), in this order:
    flip mask, random labels, magnitudes, signs.

    Args:
        labels: (n,) int64. boxes: (n, 4) ``(cx, cy, w, h)`` in [0, 1].
        num_groups: G. num_classes: K (random labels are drawn in [0, K)).
        label_noise: probability of replacing a label by a random class.
        box_noise: the scale above (DINO uses 1.0, DN-DETR 0.4).

    Returns:
        labels (G, 2, n) int64 and boxes (G, 2, n, 4) cxcywh; ``[:, 0]`` positives, ``[:, 1]``
        negatives.
    """
    n, dev = len(labels), boxes.device
    shape = (num_groups, 2, n)
    flip = torch.rand(shape, device=dev) < label_noise
    random_labels = torch.randint(0, num_classes, shape, device=dev)
    noisy_labels = torch.where(flip, random_labels, labels.expand(shape))
    half = boxes[:, 2:].repeat(1, 2) / 2  # (n, 4): w/2, h/2, w/2, h/2
    magnitude = torch.rand(*shape, 4, device=dev, dtype=boxes.dtype)
    magnitude[:, 1] += 1.0  # negatives: [1, 2)
    sign = torch.randint(0, 2, (*shape, 4), device=dev).to(boxes.dtype) * 2 - 1
    xyxy = (box_cxcywh_to_xyxy(boxes) + sign * magnitude * half * box_noise).clamp(0, 1)
    x0, x1 = torch.minimum(xyxy[..., 0], xyxy[..., 2]), torch.maximum(xyxy[..., 0], xyxy[..., 2])
    y0, y1 = torch.minimum(xyxy[..., 1], xyxy[..., 3]), torch.maximum(xyxy[..., 1], xyxy[..., 3])
    return noisy_labels, box_xyxy_to_cxcywh(torch.stack([x0, y0, x1, y1], -1))


def make_denoising_queries(targets: Sequence[Dict[str, Tensor]], num_classes: int, num_groups: int = 0,
                           max_queries: int = 0, label_noise: float = 0.25, box_noise: float = 1.0,
                           dtype: Optional[torch.dtype] = None) -> DenoisingQueries:
    """Denoising slots of a batch (see the module docstring for the layout).

    Args:
        targets: B dicts with ``labels`` (n_i,) and ``boxes`` (n_i, 4) cxcywh.
        num_classes: K.
        num_groups: G fixed; 0 to derive it from ``max_queries``.
        max_queries: DINO's budget: G = max(1, max_queries // (2 * n)), so the denoising part
            holds at most ``max_queries`` slots unless an image has more than ``max_queries / 2``
            targets (then one group).
        label_noise, box_noise: see :func:`noised_copies`.
        dtype: of the boxes (default: the targets').

    Returns:
        :class:`DenoisingQueries` with D = G * 2 * n, n = max(1, max_i n_i).
    """
    b = len(targets)
    device = targets[0]["boxes"].device
    dtype = dtype or targets[0]["boxes"].dtype
    n = max([len(t["labels"]) for t in targets] + [1])
    groups = num_groups if num_groups > 0 else max(1, max_queries // (2 * n))
    labels = torch.zeros(b, groups, 2, n, dtype=torch.int64, device=device)
    boxes = torch.tensor(_PAD_BOX, dtype=dtype, device=device).repeat(b, groups, 2, n, 1)
    valid = torch.zeros(b, groups, 2, n, dtype=torch.bool, device=device)
    index = torch.zeros(b, groups, 2, n, dtype=torch.int64, device=device)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        if k == 0:
            continue
        labels[i, ..., :k], boxes[i, ..., :k, :] = noised_copies(
            t["labels"].to(device), t["boxes"].to(device, dtype), groups, num_classes, label_noise, box_noise)
        valid[i, ..., :k] = True
        index[i, ..., :k] = torch.arange(k, device=device)
    positive = valid & (torch.arange(2, device=device) == 0)[None, None, :, None]
    return DenoisingQueries(labels.flatten(1), boxes.flatten(1, 3), valid.flatten(1), positive.flatten(1),
                            index.flatten(1), groups)


def self_attn_mask(num_groups: int, num_queries: int, num_o2m: int = 0, dn: Optional[DenoisingQueries] = None,
                   num_heads: int = 1, device=None) -> Optional[Tensor]:
    """Decoder self-attention mask over the training query layout; True = not allowed.

    Args:
        num_groups: matching groups (Group-DETR). num_queries: Q per matching group.
        num_o2m: one-to-many queries. dn: the denoising part, or None.
        num_heads: heads of the self-attention (a per-image mask is repeated per head).
        device: of the mask.

    Returns:
        None when every query may see every other (one group, nothing else); (Qa, Qa) when the
        mask is the same for every image; with denoising, (B * num_heads, Qa, Qa), image-major
        as ``nn.MultiheadAttention`` expects, where padding slots are hidden from every query but
        themselves.
    """
    n_match = num_groups * num_queries
    num_dn = 0 if dn is None else dn.labels.shape[1]
    if num_groups == 1 and num_o2m == 0 and dn is None:
        return None
    segment = torch.cat([
        torch.arange(n_match, device=device) // num_queries,
        torch.full((num_o2m,), num_groups, device=device),
        num_groups + 1 + torch.arange(num_dn, device=device) // max(dn.group_size if dn else 1, 1),
    ])
    blocked = segment[:, None] != segment[None, :]  # (Qa, Qa)
    if dn is None:
        return blocked
    blocked[n_match + num_o2m:, :num_queries] = False  # denoising sees the first matching group
    padding = torch.zeros(dn.valid.shape[0], len(segment), dtype=torch.bool, device=device)
    padding[:, n_match + num_o2m:] = ~dn.valid
    blocked = blocked[None] | padding[:, None, :]  # (B, Qa, Qa): nobody sees a padding slot ...
    diag = torch.arange(len(segment), device=device)
    blocked[:, diag, diag] = False  # ... but itself, so that no row is empty (NaN)
    return blocked.repeat_interleave(num_heads, 0)
