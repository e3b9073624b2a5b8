"""The Hungarian matcher's cost matrix against an independent float64 formula.

Deformable DETR's matching cost (``models/matcher.py``), with p = sigmoid(logit) of the target's class:

    class: alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))
    box:   L1 distance of the normalized (cx, cy, w, h) boxes, sum_k |b_k - t_k|
    giou:  -GIoU of the xyxy boxes

    cost = cost_class * class + cost_bbox * box + cost_giou * giou

The expected values here are written out element by element in numpy float64 (no dinov2od or
torchvision box function), so a wrong norm, a swapped alpha or a sign error shows in the matrix
itself, not only in the optimal total.
"""
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from dinov2od.modeling import HungarianMatcher


def _giou_xyxy(a, b):
    """GIoU of two xyxy boxes, by hand."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def _xyxy(box):
    cx, cy, w, h = box
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def expected_cost(logits, boxes, labels, tgt_boxes, w_class, w_bbox, w_giou, alpha, gamma):
    logits, boxes = np.asarray(logits, np.float64), np.asarray(boxes, np.float64)
    tgt_boxes = np.asarray(tgt_boxes, np.float64)
    n, m = len(boxes), len(tgt_boxes)
    cost = np.zeros((n, m))
    for i, j in itertools.product(range(n), range(m)):
        p = 1.0 / (1.0 + np.exp(-logits[i, labels[j]]))
        pos = alpha * (1 - p) ** gamma * -np.log(p + 1e-8)
        neg = (1 - alpha) * p ** gamma * -np.log(1 - p + 1e-8)
        l1 = sum(abs(boxes[i, k] - tgt_boxes[j, k]) for k in range(4))
        giou = _giou_xyxy(_xyxy(boxes[i]), _xyxy(tgt_boxes[j]))
        cost[i, j] = w_class * (pos - neg) + w_bbox * l1 - w_giou * giou
    return cost


def _inputs(seed, n=7, m=5, k=4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 2
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    boxes = torch.cat([centre, size], 1)
    labels = torch.randint(0, k, (m,), generator=g)
    tgt = torch.cat([torch.rand(m, 2, generator=g) * 0.6 + 0.2, torch.rand(m, 2, generator=g) * 0.3 + 0.05], 1)
    tgt[0] = boxes[2]  # a perfect overlap (GIoU 1, L1 0)
    tgt[1, :2] = torch.tensor([0.05, 0.95])  # disjoint from most predictions (negative GIoU)
    tgt[1, 2:] = torch.tensor([0.04, 0.06])
    return logits, boxes, labels, tgt


@pytest.mark.parametrize("weights,alpha,gamma", [
    ((2.0, 5.0, 2.0), 0.25, 2.0),  # Deformable DETR's defaults
    ((1.0, 3.0, 0.5), 0.4, 1.5),
])
def test_cost_matrix_equals_the_formula(weights, alpha, gamma):
    for seed in range(3):
        logits, boxes, labels, tgt = _inputs(seed)
        matcher = HungarianMatcher(*weights, focal_alpha=alpha, focal_gamma=gamma)
        got = matcher.cost_matrix(logits, boxes, labels, tgt).double().numpy()
        want = expected_cost(logits.numpy(), boxes.numpy(), labels.numpy(), tgt.numpy(), *weights, alpha, gamma)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_each_cost_term_alone():
    """One weight at a time, so an error in one term cannot hide behind another."""
    logits, boxes, labels, tgt = _inputs(5)
    for weights in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)):
        matcher = HungarianMatcher(*weights, focal_alpha=0.25, focal_gamma=2.0)
        got = matcher.cost_matrix(logits, boxes, labels, tgt).double().numpy()
        want = expected_cost(logits.numpy(), boxes.numpy(), labels.numpy(), tgt.numpy(), *weights, 0.25, 2.0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=str(weights))
    # hand values: the L1 cost of the perfect overlap is 0 and its GIoU cost -1
    assert HungarianMatcher(0, 1, 0).cost_matrix(logits, boxes, labels, tgt)[2, 0].item() == pytest.approx(0, abs=1e-7)
    assert HungarianMatcher(0, 0, 1).cost_matrix(logits, boxes, labels, tgt)[2, 0].item() == pytest.approx(-1, abs=1e-6)


def test_forward_assignment_is_optimal_for_the_formula():
    """Per image, the matcher's assignment has the minimal total of the independent cost."""
    b, q, k = 2, 6, 3
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(b, q, k, generator=g) * 2
    boxes = torch.cat([torch.rand(b, q, 2, generator=g) * 0.6 + 0.2, torch.rand(b, q, 2, generator=g) * 0.3 + 0.05], -1)
    targets = []
    for n in (4, 2):
        targets.append({"labels": torch.randint(0, k, (n,), generator=g),
                        "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                            torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)})
    matcher = HungarianMatcher()
    result = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for i, (rows, cols) in enumerate(result):
        t = targets[i]
        cost = expected_cost(logits[i].numpy(), boxes[i].numpy(), t["labels"].numpy(), t["boxes"].numpy(),
                             2.0, 5.0, 2.0, 0.25, 2.0)
        r, c = linear_sum_assignment(cost)
        assert len(rows) == len(t["labels"]) and sorted(cols.tolist()) == list(range(len(t["labels"])))
        assert cost[rows.numpy(), cols.numpy()].sum() == pytest.approx(cost[r, c].sum(), abs=1e-5)
