"""Box conversions and (generalized) IoU.

Inside the model boxes are normalized ``(cx, cy, w, h)``; IoU is computed on
``(x1, y1, x2, y2)``. The IoU math is torchvision's; this module adds the
validation that turns a degenerate box into an error naming it, instead of a NaN
loss several iterations later.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou as _tv_box_iou
from torchvision.ops import generalized_box_iou as _tv_generalized_box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "check_boxes_xyxy",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) ``(cx, cy, w, h)`` -> (..., 4) ``(x1, y1, x2, y2)``."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) ``(x1, y1, x2, y2)`` -> (..., 4) ``(cx, cy, w, h)``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def check_boxes_xyxy(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ``ValueError`` naming the offending rows if any box has x2 < x1 or y2 < y1
    or a non-finite coordinate."""
    if boxes.numel() == 0:
        return
    with torch.no_grad():
        bad = ~torch.isfinite(boxes).all(-1) | (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            idx = bad.nonzero().flatten()
            shown = ", ".join(
                f"#{int(i)}: {[round(float(v), 4) for v in boxes[i]]}" for i in idx[:5]
            )
            more = f" (and {len(idx) - 5} more)" if len(idx) > 5 else ""
            raise ValueError(
                f"{name} has {len(idx)} degenerate box(es) (need x2 >= x1, y2 >= y1, finite "
                f"values, format x1y1x2y2): {shown}{more}. If these are predictions, the loss "
                "has diverged (lower the learning rate or enable gradient clipping); if they are "
                "targets, fix or filter the annotations."
            )


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of (N, 4) and (M, 4) ``xyxy`` boxes -> (N, M)."""
    check_boxes_xyxy(boxes1, "boxes1")
    check_boxes_xyxy(boxes2, "boxes2")
    return _tv_box_iou(boxes1, boxes2)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of ``xyxy`` boxes -> (N, M).

    Raises:
        ValueError: naming the offending boxes, if any box is degenerate.
    """
    check_boxes_xyxy(boxes1, "boxes1")
    check_boxes_xyxy(boxes2, "boxes2")
    return _tv_generalized_box_iou(boxes1, boxes2)
