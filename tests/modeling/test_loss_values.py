"""Every loss term pinned by a value computed by hand (issue 29, item 6).

The expected values are the papers' formulas written out here in float64 with ``math`` and
``numpy`` (no dinov2od, torchvision or torch loss function), on cases chosen so that each formula
differs from its neighbours':

* focal loss (Lin et al. 2017), ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` over every query and
  class, is not plain BCE: alpha and gamma change the value (alpha = 0.5, gamma = 0 is BCE / 2);
* quality focal loss (GFL, Li et al. 2020), ``QFL = -|y - p|^gamma (y log p + (1 - y) log(1 - p))``
  with y the IoU of the matched box (0 for a matched box that does not overlap);
* L1 on normalized (cx, cy, w, h), summed over the 4 coordinates of every matched box and divided
  by the number of target boxes of the batch (not a mean over coordinates, not per image);
* GIoU (Rezatofighi et al. 2019), ``1 - (IoU - (hull - union) / hull)``, on a matched pair that
  does not overlap: IoU = 0 but GIoU < 0, so the loss exceeds 1;
* the normalizations: groups (Group-DETR: num_boxes x groups), auxiliary layers, two-stage
  proposals (num_boxes without groups), denoising (num_boxes x dn groups), one-to-many
  (num_boxes x repeats), dense proposals (the number of positives);
* the matcher's weights: a 2 x 2 case whose optimal assignment flips when any one of
  cost_class / cost_bbox / cost_giou is mis-weighted (the cost matrix entries themselves are
  pinned in modeling/test_matcher_costs.py).

The Hungarian assignment the expected values use is found here by brute force over the
hand-written matching cost.

Negative controls (run by monkeypatching dinov2od.modeling.criterion / matcher from a pytest
plugin, one at a time, nothing else changed; the tests named fail, the others pass):
* the criterion's focal alpha replaced by 1 - alpha: the focal values at alpha 0.25 and 0.75 (not
  0.5, where 1 - alpha = alpha), groups/aux/proposals, one-to-many, denoising (focal), dense;
* gamma + 1 in the criterion (focal and quality focal): all 10 class-loss tests;
* the criterion's GIoU replaced by plain IoU (``generalized_box_iou`` and
  ``generalized_box_iou_loss``): the 9 tests with a GIoU value;
* the criterion's L1 divided by 4 (a mean over coordinates): the 9 tests with an L1 value;
* num_boxes not multiplied by the groups: groups/aux/proposals, one-to-many, denoising (both);
* the matcher weighting the GIoU cost with cost_bbox: the flip test at the default weights and
  the groups test (another assignment).
"""
import itertools
import math

import numpy as np
import pytest
import torch

from dinov2od.modeling import HungarianMatcher, SetCriterion

RTOL = 2e-5  # the criterion computes in float32


# ---------------------------------------------------------------------------- the formulas, by hand
def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)  # log p, stable for any x


def log_one_minus_sigmoid(x):
    return -np.logaddexp(0.0, x)  # log (1 - p)


def focal(x, t, alpha, gamma):
    """Sigmoid focal loss of one logit with a 0/1 target: -alpha_t (1 - p_t)^gamma log(p_t)."""
    p = math.exp(log_sigmoid(x))
    p_t = p if t == 1 else 1.0 - p
    alpha_t = alpha if t == 1 else 1.0 - alpha
    log_p_t = log_sigmoid(x) if t == 1 else log_one_minus_sigmoid(x)
    return -alpha_t * (1.0 - p_t) ** gamma * log_p_t


def bce(x, y):
    return -(y * log_sigmoid(x) + (1.0 - y) * log_one_minus_sigmoid(x))


def quality_focal(x, y, gamma):
    """GFL's quality focal loss of one logit with a soft target y in [0, 1]."""
    return abs(y - math.exp(log_sigmoid(x))) ** gamma * bce(x, y)


def xyxy(box):
    cx, cy, w, h = (float(v) for v in box)
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def iou_and_giou(a, b):
    a, b = xyxy(a), xyxy(b)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union, inter / union - (hull - union) / hull


def l1(a, b):
    return sum(abs(float(u) - float(v)) for u, v in zip(a, b))


def matching_cost(x, box, tgt_box, w=(2.0, 5.0, 2.0), alpha=0.25, gamma=2.0):
    """Deformable DETR's matching cost of one query's class logit ``x`` and box vs one target."""
    p = math.exp(log_sigmoid(x))
    class_cost = alpha * (1 - p) ** gamma * -log_sigmoid(x) - (1 - alpha) * p ** gamma * -log_one_minus_sigmoid(x)
    return w[0] * class_cost + w[1] * l1(box, tgt_box) - w[2] * iou_and_giou(box, tgt_box)[1]


def assignment(logits, boxes, labels, tgt_boxes, w=(2.0, 5.0, 2.0)):
    """{target j: query q}: the one-to-one assignment of least total cost, by brute force."""
    n, q = len(labels), len(boxes)
    if n == 0:
        return {}
    cost = [[matching_cost(logits[i][labels[j]], boxes[i], tgt_boxes[j], w) for j in range(n)] for i in range(q)]
    best = min(itertools.permutations(range(q), n), key=lambda qs: sum(cost[qs[j]][j] for j in range(n)))
    return dict(enumerate(best))


def hand_losses(logits, boxes, targets, alpha=0.25, gamma=2.0, class_loss="focal", groups=1):
    """Unnormalized sums (class, L1, GIoU) of one decoder layer, every group matched on its own;
    also the matched pairs [(image, query, target)]."""
    logits, boxes = np.asarray(logits, np.float64), np.asarray(boxes, np.float64)
    per = boxes.shape[1] // groups
    pairs = []
    for b, t in enumerate(targets):
        labels, tgt = t["labels"].tolist(), t["boxes"].double().numpy()
        for g in range(groups):
            sl = slice(g * per, (g + 1) * per)
            for j, q in assignment(logits[b, sl], boxes[b, sl], labels, tgt).items():
                pairs.append((b, g * per + q, j))
    soft = np.zeros(logits.shape)
    s_l1 = s_giou = 0.0
    for b, q, j in pairs:
        tgt_box = targets[b]["boxes"][j].double().numpy()
        iou, giou = iou_and_giou(boxes[b, q], tgt_box)
        soft[b, q, int(targets[b]["labels"][j])] = 1.0 if class_loss == "focal" else iou
        s_l1 += l1(boxes[b, q], tgt_box)
        s_giou += 1.0 - giou
    if class_loss == "focal":
        s_class = sum(focal(x, int(t), alpha, gamma) for x, t in zip(logits.ravel(), soft.ravel()))
    else:
        s_class = sum(quality_focal(x, y, gamma) for x, y in zip(logits.ravel(), soft.ravel()))
    return s_class, s_l1, s_giou, pairs


# ---------------------------------------------------------------------------- a batch of two images
def _case():
    """Image 0: 3 queries, 2 targets close to queries 0 and 2; image 1: 3 queries, 1 target that no
    query overlaps. Two classes; moderate logits (focal and BCE differ)."""
    logits = torch.tensor([[[1.2, -0.8], [-1.5, -2.0], [-0.3, 0.9]],
                           [[0.4, -1.1], [-0.7, 0.6], [-2.2, 1.4]]])
    boxes = torch.tensor([[[0.32, 0.28, 0.22, 0.18], [0.10, 0.90, 0.10, 0.10], [0.68, 0.63, 0.25, 0.28]],
                          [[0.10, 0.10, 0.10, 0.10], [0.90, 0.15, 0.12, 0.10], [0.85, 0.85, 0.20, 0.16]]])
    targets = [dict(labels=torch.tensor([0, 1]), boxes=torch.tensor([[0.30, 0.30, 0.20, 0.20], [0.70, 0.60, 0.20, 0.30]])),
               dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.50, 0.50, 0.40, 0.20]]))]
    return logits, boxes, targets


def test_the_case_is_what_it_claims():
    logits, boxes, targets = _case()
    *_, pairs = hand_losses(logits, boxes, targets)
    assert sorted(pairs) == [(0, 0, 0), (0, 2, 1), (1, 2, 0)]
    iou, giou = iou_and_giou(boxes[1, 2], targets[1]["boxes"][0])
    assert iou == 0 and giou < -0.1  # a matched pair that does not overlap
    assert SetCriterion(2, num_aux_layers=0).matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)[1][0] == 2


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 0.0), (0.75, 1.0)])
def test_focal_l1_and_giou_values(alpha, gamma):
    logits, boxes, targets = _case()
    losses = SetCriterion(2, num_aux_layers=0, focal_alpha=alpha, focal_gamma=gamma)(
        {"pred_logits": logits, "pred_boxes": boxes}, targets)
    s_class, s_l1, s_giou, pairs = hand_losses(logits, boxes, targets, alpha, gamma)
    num_boxes = 3  # target boxes of the batch
    assert losses["loss_class"].item() == pytest.approx(s_class / num_boxes, rel=RTOL)
    assert losses["loss_bbox"].item() == pytest.approx(s_l1 / num_boxes, rel=RTOL)
    assert losses["loss_giou"].item() == pytest.approx(s_giou / num_boxes, rel=RTOL)
    # the formulas differ from their neighbours on this case
    s_bce = sum(bce(x, 0.0) for x in logits.double().numpy().ravel()) + sum(
        bce(float(logits[b, q, int(targets[b]["labels"][j])]), 1.0) - bce(float(logits[b, q, int(targets[b]["labels"][j])]), 0.0)
        for b, q, j in pairs)
    if (alpha, gamma) == (0.5, 0.0):
        assert s_class == pytest.approx(s_bce / 2, rel=1e-12)  # focal(0.5, 0) is BCE / 2
    else:
        assert abs(s_class - s_bce) > 0.5 and abs(s_class - s_bce / 2) > 0.1
    assert abs(s_l1 / num_boxes - s_l1 / (4 * num_boxes)) > 0.1  # not a mean over coordinates
    s_iou_loss = sum(1 - iou_and_giou(boxes[b, q], targets[b]["boxes"][j])[0] for b, q, j in pairs)
    assert s_giou - s_iou_loss > 0.3  # the disjoint pair: GIoU < 0 = IoU


def test_giou_loss_of_two_disjoint_boxes_exceeds_one():
    """Written out: pred (0.1, 0.1)-(0.3, 0.3), target (0.6, 0.5)-(0.8, 0.7): IoU 0, union 0.08,
    hull 0.7 x 0.6 = 0.42, GIoU = -(0.42 - 0.08) / 0.42 = -17/21, loss 38/21."""
    out = {"pred_logits": torch.zeros(1, 1, 1), "pred_boxes": torch.tensor([[[0.2, 0.2, 0.2, 0.2]]])}
    losses = SetCriterion(1, num_aux_layers=0)(out, [dict(labels=torch.tensor([0]), boxes=torch.tensor([[0.7, 0.6, 0.2, 0.2]]))])
    assert losses["loss_giou"].item() == pytest.approx(38 / 21, rel=RTOL)
    assert losses["loss_bbox"].item() == pytest.approx(0.5 + 0.4, rel=RTOL)


@pytest.mark.parametrize("gamma", [2.0, 1.0])
def test_quality_focal_values(gamma):
    logits, boxes, targets = _case()
    losses = SetCriterion(2, num_aux_layers=0, class_loss="quality_focal", focal_gamma=gamma)(
        {"pred_logits": logits, "pred_boxes": boxes}, targets)
    s_class, *_ = hand_losses(logits, boxes, targets, gamma=gamma, class_loss="quality_focal")
    assert losses["loss_class"].item() == pytest.approx(s_class / 3, rel=RTOL)
    s_focal, *_ = hand_losses(logits, boxes, targets, gamma=gamma)
    assert abs(s_class - s_focal) > 0.1


def test_groups_aux_layers_and_proposals_are_normalized_as_documented():
    logits, boxes, targets = _case()
    gen = torch.Generator().manual_seed(0)
    # two Group-DETR groups of 3 queries; an auxiliary layer; two-stage proposals (4 queries)
    main = {"pred_logits": torch.cat([logits, logits.flip(1) * 0.5], 1), "pred_boxes": torch.cat([boxes, boxes.flip(1)], 1)}
    aux = {"pred_logits": torch.randn(2, 6, 2, generator=gen), "pred_boxes": torch.rand(2, 6, 4, generator=gen) * 0.3 + 0.2}
    enc = {"pred_logits": torch.randn(2, 4, 2, generator=gen), "pred_boxes": torch.rand(2, 4, 4, generator=gen) * 0.3 + 0.25}
    outputs = {**main, "num_groups": 2, "aux_outputs": [aux], "enc_outputs": enc}
    losses = SetCriterion(2, num_aux_layers=1, two_stage=True)(outputs, targets)
    for suffix, out, groups in (("", main, 2), ("_0", aux, 2), ("_enc", enc, 1)):
        s_class, s_l1, s_giou, _ = hand_losses(out["pred_logits"], out["pred_boxes"], targets, groups=groups)
        num_boxes = 3 * groups  # target boxes x groups; the proposals have no groups
        for key, s in (("loss_class", s_class), ("loss_bbox", s_l1), ("loss_giou", s_giou)):
            assert losses[key + suffix].item() == pytest.approx(s / num_boxes, rel=RTOL), key + suffix


def test_one_to_many_values():
    """H-DETR: the targets repeated k times, Hungarian-matched, divided by num_boxes x k."""
    logits, boxes, targets = _case()
    gen = torch.Generator().manual_seed(1)
    o2m = {"pred_logits": torch.randn(2, 6, 2, generator=gen),
           "pred_boxes": torch.cat([boxes, boxes], 1) + torch.rand(2, 6, 4, generator=gen) * 0.04}
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "o2m_outputs": {**o2m, "aux_outputs": []}}
    losses = SetCriterion(2, num_aux_layers=0, o2m_repeats=2)(outputs, targets)
    repeated = [dict(labels=t["labels"].repeat(2), boxes=t["boxes"].repeat(2, 1)) for t in targets]
    s_class, s_l1, s_giou, _ = hand_losses(o2m["pred_logits"], o2m["pred_boxes"], repeated)
    for key, s in (("loss_class_o2m", s_class), ("loss_bbox_o2m", s_l1), ("loss_giou_o2m", s_giou)):
        assert losses[key].item() == pytest.approx(s / (3 * 2), rel=RTOL), key


@pytest.mark.parametrize("class_loss", ["focal", "quality_focal"])
def test_denoising_values(class_loss):
    """Two dn groups, each a positive and a negative per target; no matching; num_boxes x groups."""
    targets = [dict(labels=torch.tensor([1, 0]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]))]
    # slots: group 0: pos t0, pos t1, neg t0, neg t1; group 1 the same
    logits = torch.tensor([[[0.3, 1.1], [0.8, -0.4], [-0.2, 0.5], [0.1, -1.3],
                            [-0.6, 0.7], [1.5, 0.2], [0.4, -0.9], [-1.0, 0.3]]])
    boxes = torch.tensor([[[0.53, 0.48, 0.2, 0.24], [0.3, 0.33, 0.12, 0.2], [0.6, 0.6, 0.3, 0.3], [0.2, 0.2, 0.1, 0.1],
                           [0.8, 0.8, 0.1, 0.1], [0.28, 0.3, 0.1, 0.18], [0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]])
    positive = torch.tensor([[True, True, False, False] * 2])
    dn = dict(pred_logits=logits, pred_boxes=boxes, aux_outputs=[], valid=torch.ones(1, 8, dtype=torch.bool),
              positive=positive, target_index=torch.tensor([[0, 1, 0, 1] * 2]), num_groups=2)
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5), "dn_outputs": dn}
    losses = SetCriterion(2, num_aux_layers=0, class_loss=class_loss)(outputs, targets)
    s_class = s_l1 = s_giou = 0.0
    for slot in range(8):
        j = slot % 2
        label, tgt = int(targets[0]["labels"][j]), targets[0]["boxes"][j]
        iou, giou = iou_and_giou(boxes[0, slot], tgt)
        pos = bool(positive[0, slot])
        for k in range(2):
            x = float(logits[0, slot, k])
            if class_loss == "focal":
                s_class += focal(x, int(pos and k == label), 0.25, 2.0)
            else:
                s_class += quality_focal(x, iou if pos and k == label else 0.0, 2.0)
        if pos:
            s_l1 += l1(boxes[0, slot], tgt)
            s_giou += 1 - giou
    assert iou_and_giou(boxes[0, 4], targets[0]["boxes"][0])[0] == 0  # a disjoint positive (GIoU < 0)
    num_boxes = 2 * 2  # targets x dn groups
    for key, s in (("loss_class_dn", s_class), ("loss_bbox_dn", s_l1), ("loss_giou_dn", s_giou)):
        assert losses[key].item() == pytest.approx(s / num_boxes, rel=RTOL), key


def test_dense_proposal_values():
    """Task-aligned dense proposals: every valid token's class term, the positives' box terms,
    divided by the number of positives. A 3 x 3 grid of tokens; the target's box holds two token
    centres (dense_topk=3 >= 2: both are positives); the last token is padding."""
    ys, xs = np.meshgrid(np.arange(3.0), np.arange(3.0), indexing="ij")
    centers = np.stack([(xs.ravel() + 0.5) / 3, (ys.ravel() + 0.5) / 3], -1)  # 1/6, 1/2, 5/6
    boxes = np.concatenate([centers + 0.02, np.full((9, 2), 0.3)], 1)
    logits = np.linspace(-1.5, 1.5, 18).reshape(9, 2)
    valid = np.ones(9, bool)
    valid[8] = False
    target = np.array([0.5, 0.67, 0.4, 0.5])  # x 0.3..0.7, y 0.42..0.92: the centres of tokens 4 and 7
    tx1, ty1, tx2, ty2 = xyxy(target)
    inside = [s for s in range(9) if valid[s] and tx1 < centers[s, 0] < tx2 and ty1 < centers[s, 1] < ty2]
    assert inside == [4, 7]
    s_class = sum(focal(logits[s, k], int(s in inside and k == 1), 0.25, 2.0) for s in range(9) if valid[s] for k in range(2))
    s_l1 = sum(l1(boxes[s], target) for s in inside)
    s_giou = sum(1 - iou_and_giou(boxes[s], target)[1] for s in inside)
    dense = {"pred_logits": torch.tensor(logits, dtype=torch.float32)[None],
             "pred_boxes": torch.tensor(boxes, dtype=torch.float32)[None],
             "centers": torch.tensor(centers, dtype=torch.float32)[None], "valid": torch.tensor(valid)[None]}
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5), "enc_dense": dense}
    losses = SetCriterion(2, num_aux_layers=0, two_stage=True, enc_loss="dense", dense_topk=3)(
        outputs, [dict(labels=torch.tensor([1]), boxes=torch.tensor(target[None], dtype=torch.float32))])
    for key, s in (("loss_class_enc", s_class), ("loss_bbox_enc", s_l1), ("loss_giou_enc", s_giou)):
        assert losses[key].item() == pytest.approx(s / len(inside), rel=RTOL), key


# ---------------------------------------------------------------------------- the matcher's weights
FLIP_QUERIES = [(0.44, 0.44, 0.11, 0.18), (0.36, 0.43, 0.39, 0.33)]
FLIP_LOGITS = [[-1.4, 0.4], [-1.6, -1.5]]
FLIP_TARGETS = dict(labels=[0, 1], boxes=[(0.30, 0.50, 0.20, 0.20), (0.55, 0.50, 0.40, 0.40)])


@pytest.mark.parametrize("weights,expected", [
    ((2.0, 5.0, 2.0), [0, 1]),  # the defaults: the L1 term decides, query i -> target i
    ((2.0, 2.0, 2.0), [1, 0]),  # cost_bbox too low: class and GIoU win, the assignment flips
    ((5.0, 5.0, 2.0), [1, 0]),  # cost_class too high
    ((2.0, 5.0, 5.0), [1, 0]),  # cost_giou too high
])
def test_matcher_weights_decide_a_2x2_assignment(weights, expected):
    hand = assignment(FLIP_LOGITS, FLIP_QUERIES, FLIP_TARGETS["labels"], FLIP_TARGETS["boxes"], weights)
    assert [hand[j] for j in range(2)] == expected  # by hand: the case flips as described
    # the hand totals of the two assignments are far apart: no near tie
    totals = [sum(matching_cost(FLIP_LOGITS[qs[j]][FLIP_TARGETS["labels"][j]], FLIP_QUERIES[qs[j]],
                                FLIP_TARGETS["boxes"][j], weights) for j in range(2)) for qs in ((0, 1), (1, 0))]
    assert abs(totals[0] - totals[1]) > 0.6
    outputs = {"pred_logits": torch.tensor([FLIP_LOGITS]), "pred_boxes": torch.tensor([FLIP_QUERIES])}
    targets = [dict(labels=torch.tensor(FLIP_TARGETS["labels"]), boxes=torch.tensor(FLIP_TARGETS["boxes"]))]
    rows, cols = HungarianMatcher(*weights)(outputs, targets)[0]
    assert dict(zip(cols.tolist(), rows.tolist())) == {j: expected[j] for j in range(2)}
