"""Hungarian matching of predictions to targets (focal class cost + L1 + GIoU).

The assignment itself is ``scipy.optimize.linear_sum_assignment``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dinov2od.layers import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "MatcherOptions", "focal_class_cost"]


@dataclasses.dataclass(frozen=True)
class MatcherOptions:
    """The options of :class:`HungarianMatcher`, with their defaults: the one place they are written
    (the matcher's signature, the criterion's focal parameters, the lazy config and the yacs keys
    read them).

    Attributes:
        cost_class: weight of the focal class cost.
        cost_bbox: weight of the L1 distance between normalized ``cxcywh`` boxes.
        cost_giou: weight of the negative generalized IoU.
        focal_alpha, focal_gamma: focal cost parameters (also the focal loss's, :class:`SetCriterion`).
    """

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal-loss matching cost (Deformable DETR): positive minus negative focal term.

    Args:
        logits: (N, K) class logits. labels: (M,) int64 target classes.

    Returns:
        (N, M) cost, lower is better.
    """
    p = logits.sigmoid()
    eps = 1e-8
    neg = (1 - alpha) * p.pow(gamma) * -(1 - p + eps).log()
    pos = alpha * (1 - p).pow(gamma) * -(p + eps).log()
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets per image.

    Args:
        cost_class: weight of the focal class cost.
        cost_bbox: weight of the L1 distance between normalized ``cxcywh`` boxes.
        cost_giou: weight of the negative generalized IoU.
        focal_alpha, focal_gamma: focal cost parameters.
    """

    def __init__(self, cost_class: float = MatcherOptions.cost_class, cost_bbox: float = MatcherOptions.cost_bbox,
                 cost_giou: float = MatcherOptions.cost_giou, focal_alpha: float = MatcherOptions.focal_alpha,
                 focal_gamma: float = MatcherOptions.focal_gamma):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one of cost_class, cost_bbox, cost_giou must be non-zero")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """(N, K) logits, (N, 4) boxes vs (M,) labels, (M, 4) boxes -> (N, M) total cost."""
        c = self.cost_class * focal_class_cost(logits, labels, self.focal_alpha, self.focal_gamma)
        c = c + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return c - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: List[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` (B, Q, K) and ``pred_boxes`` (B, Q, 4).
            targets: B dicts with ``labels`` (n_i,) int64 and ``boxes`` (n_i, 4) cxcywh.

        Returns:
            B pairs ``(query_indices, target_indices)`` of int64 tensors of length min(Q, n_i).
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q = logits.shape[:2]
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in range(b)]
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes.device, boxes.dtype)
        cost = self.cost_matrix(logits.flatten(0, 1).float(), boxes.flatten(0, 1).float(), labels, tgt_boxes.float())
        cost = cost.view(b, q, -1).cpu()
        result = []
        for i, c in enumerate(cost.split(sizes, -1)):
            if sizes[i] == 0:
                result.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(c[i].numpy())
            result.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return result
