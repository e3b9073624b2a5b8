"""HungarianMatcher and SetCriterion on hand-built cases."""
import itertools
import math

import pytest
import torch
from torchvision.ops import generalized_box_iou as tv_giou

from dinov2od.modeling import HungarianMatcher, SetCriterion


def _xyxy(b):
    return torch.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], -1)


def reference_cost(logits, boxes, labels, tgt_boxes, wc=2.0, wb=5.0, wg=2.0, alpha=0.25, gamma=2.0):
    """The matching cost written out independently of the matcher: (Q, n)."""
    cost = torch.zeros(len(logits), len(labels), dtype=torch.float64)
    for q in range(len(logits)):
        for j in range(len(labels)):
            p = torch.sigmoid(logits[q, labels[j]].double())
            pos = alpha * (1 - p) ** gamma * -math.log(p)
            neg = (1 - alpha) * p ** gamma * -math.log(1 - p)
            l1 = (boxes[q] - tgt_boxes[j]).abs().sum().double()
            g = tv_giou(_xyxy(boxes[q:q + 1]).double(), _xyxy(tgt_boxes[j:j + 1]).double())[0, 0]
            cost[q, j] = wc * (pos - neg) + wb * l1 - wg * g
    return cost


def random_boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([xy, wh], 1)


@pytest.mark.parametrize("num_targets", [0, 1, 2, 3, 4])
def test_matcher_equals_brute_force(num_targets):
    gen = torch.Generator().manual_seed(num_targets)
    b, q, k = 2, 5, 3
    outputs = {"pred_logits": torch.randn(b, q, k, generator=gen), "pred_boxes": random_boxes(b * q, gen).view(b, q, 4)}
    targets = [dict(labels=torch.randint(0, k, (n,), generator=gen), boxes=random_boxes(n, gen))
               for n in (num_targets, max(num_targets - 1, 0))]
    matches = HungarianMatcher()(outputs, targets)
    for i, (src, tgt) in enumerate(matches):
        n = len(targets[i]["labels"])
        assert len(src) == len(tgt) == n
        if n == 0:
            continue
        assert len(set(src.tolist())) == n and sorted(tgt.tolist()) == list(range(n))
        cost = reference_cost(outputs["pred_logits"][i], outputs["pred_boxes"][i], targets[i]["labels"], targets[i]["boxes"])
        got = cost[src, tgt].sum().item()
        best = min(sum(cost[qs[j], j].item() for j in range(n)) for qs in itertools.permutations(range(q), n))
        assert got == pytest.approx(best, abs=1e-5)


def test_zero_target_images():
    gen = torch.Generator().manual_seed(0)
    outputs = {"pred_logits": torch.randn(2, 4, 3, generator=gen, requires_grad=True),
               "pred_boxes": random_boxes(8, gen).view(2, 4, 4)}
    empty = [dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4)) for _ in range(2)]
    crit = SetCriterion(3, num_aux_layers=0)
    losses = crit(outputs, empty)
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    # every query is a negative; num_boxes is clamped to 1, so the class loss is the plain focal sum
    p = outputs["pred_logits"].sigmoid()
    expected = (0.75 * p ** 2 * -torch.log(1 - p)).sum()
    torch.testing.assert_close(losses["loss_class"], expected, rtol=1e-5, atol=1e-6)
    losses["loss_class"].backward()
    assert outputs["pred_logits"].grad.abs().sum() > 0


def test_hand_computed_values():
    outputs = {"pred_logits": torch.zeros(1, 1, 1), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])}
    targets = [dict(labels=torch.tensor([0]), boxes=torch.tensor([[0.6, 0.5, 0.2, 0.2]]))]
    losses = SetCriterion(1)(outputs, targets)
    assert losses["loss_class"].item() == pytest.approx(0.25 * 0.25 * math.log(2), rel=1e-5)
    assert losses["loss_bbox"].item() == pytest.approx(0.1, rel=1e-5)
    # IoU 1/3, hull area = union area -> GIoU 1/3
    assert losses["loss_giou"].item() == pytest.approx(2 / 3, rel=1e-5)


def test_perfect_prediction_gives_near_zero_box_losses():
    gen = torch.Generator().manual_seed(1)
    targets = [dict(labels=torch.tensor([2, 0]), boxes=random_boxes(2, gen)),
               dict(labels=torch.tensor([1]), boxes=random_boxes(1, gen))]
    q, k = 6, 3
    logits = torch.full((2, q, k), -12.0)
    boxes = random_boxes(2 * q, gen).view(2, q, 4)
    for i, t in enumerate(targets):
        for j, (c, box) in enumerate(zip(t["labels"], t["boxes"])):
            slot = 3 + j  # anywhere: the matcher must find it
            logits[i, slot, c] = 12.0
            boxes[i, slot] = box
    outputs = {"pred_logits": logits, "pred_boxes": boxes, "aux_outputs": [{"pred_logits": logits, "pred_boxes": boxes}]}
    crit = SetCriterion(k, num_aux_layers=1)
    losses = crit(outputs, targets)
    for key in ("loss_bbox", "loss_giou", "loss_bbox_0", "loss_giou_0"):
        assert losses[key].item() < 1e-6, key
    assert losses["loss_class"].item() < 1e-4


def test_weight_dict_lists_every_key_and_respects_overrides():
    crit = SetCriterion(5, weight_dict={"loss_class": 1.0, "loss_giou_enc": 0.5}, num_aux_layers=2)
    assert crit.weight_dict["loss_class"] == crit.weight_dict["loss_class_1"] == crit.weight_dict["loss_class_enc"] == 1.0
    assert crit.weight_dict["loss_bbox"] == 5.0 and crit.weight_dict["loss_giou"] == 2.0
    assert crit.weight_dict["loss_giou_enc"] == 0.5
    assert set(crit.weight_dict) == {f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in ("", "_0", "_1", "_enc")}


def test_bad_targets_raise_clear_errors():
    outputs = {"pred_logits": torch.zeros(1, 3, 4), "pred_boxes": torch.full((1, 3, 4), 0.3)}
    crit = SetCriterion(4)
    with pytest.raises(ValueError, match=r"class id 4 outside \[0, num_classes=4\)"):
        crit(outputs, [dict(labels=torch.tensor([1, 4]), boxes=torch.full((2, 4), 0.2))])
    with pytest.raises(ValueError, match="class id -1"):
        crit(outputs, [dict(labels=torch.tensor([-1]), boxes=torch.full((1, 4), 0.2))])
    with pytest.raises(ValueError, match="boxes must be"):
        crit(outputs, [dict(labels=torch.tensor([1]), boxes=torch.full((2, 4), 0.2))])
    with pytest.raises(ValueError, match="num_classes=5"):
        SetCriterion(5)(outputs, [dict(labels=torch.tensor([1]), boxes=torch.full((1, 4), 0.2))])


def test_group_detr_groups_are_matched_separately():
    gen = torch.Generator().manual_seed(2)
    targets = [dict(labels=torch.tensor([0, 1]), boxes=random_boxes(2, gen)),
               dict(labels=torch.tensor([2]), boxes=random_boxes(1, gen))]
    logits = torch.randn(2, 5, 3, generator=gen)
    boxes = random_boxes(10, gen).view(2, 5, 4)
    crit = SetCriterion(3, num_aux_layers=0)
    single = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    # two identical groups: each is matched one-to-one, num_boxes doubles -> same losses
    doubled = {"pred_logits": logits.repeat(1, 2, 1), "pred_boxes": boxes.repeat(1, 2, 1), "num_groups": 2}
    grouped = crit(doubled, targets)
    for key in single:
        torch.testing.assert_close(grouped[key], single[key])
    matches = crit._match(doubled, targets, 2)
    assert sorted(matches[0][0].tolist())[-1] >= 5  # the second group got matches too
    assert len(matches[0][0]) == 4 and len(matches[1][0]) == 2


def test_num_boxes_uses_torch_distributed(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        crit = SetCriterion(2)
        targets = [dict(labels=torch.tensor([0, 1, 1]), boxes=torch.full((3, 4), 0.2))]
        assert crit._num_boxes(targets, 2, torch.device("cpu")) == 6.0
        assert crit._num_boxes([dict(labels=torch.zeros(0, dtype=torch.long))], 1, torch.device("cpu")) == 1.0
    finally:
        dist.destroy_process_group()


def test_quality_focal_targets_the_iou_of_the_matched_box():
    """At sigmoid(logit) == IoU the matched entry's class gradient vanishes; off it, it points there."""
    box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    target = [dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.6, 0.5, 0.2, 0.2]]))]  # IoU 1/3
    crit = SetCriterion(2, num_aux_layers=0, class_loss="quality_focal")
    grads = {}
    for name, p in (("at_iou", 1 / 3), ("above", 0.9), ("below", 0.05)):
        logits = torch.full((1, 1, 2), -30.0)
        logits[0, 0, 1] = math.log(p / (1 - p))
        logits.requires_grad_(True)
        crit({"pred_logits": logits, "pred_boxes": box}, target)["loss_class"].backward()
        grads[name] = logits.grad[0, 0, 1].item()
    assert abs(grads["at_iou"]) < 1e-6
    assert grads["above"] > 0 > grads["below"]  # gradient descent moves the score towards 1/3
    # a perfect box has target 1: the plain BCE direction
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    crit({"pred_logits": logits, "pred_boxes": target[0]["boxes"][None]}, target)["loss_class"].backward()
    assert logits.grad[0, 0, 1] < 0 and logits.grad[0, 0, 0] > 0


def _dense_outputs(centers, boxes, logits):
    s = len(centers)
    return {"pred_logits": logits[None], "pred_boxes": boxes[None], "centers": centers[None],
            "valid": torch.ones(1, s, dtype=torch.bool)}


def test_task_aligned_assignment_rules():
    # a 10 x 10 grid of token centres over the image, every token predicting a 0.2 x 0.2 box
    ys, xs = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    centers = torch.stack([(xs.flatten() + 0.5) / 10, (ys.flatten() + 0.5) / 10], -1)
    boxes = torch.cat([centers, torch.full((100, 2), 0.2)], 1)
    logits = torch.zeros(100, 2)
    crit = SetCriterion(2, num_aux_layers=0, enc_loss="dense", dense_topk=4)
    big = torch.tensor([0.5, 0.5, 0.41, 0.41])  # holds the 4 x 4 centres 0.35 .. 0.65
    tiny = torch.tensor([0.09, 0.09, 0.02, 0.02])  # no centre inside: the nearest, (0.05, 0.05)
    tok, tgt = crit._task_aligned_assign(logits, boxes, centers, torch.ones(100, dtype=torch.bool),
                                         torch.tensor([0, 1]), torch.stack([big, tiny]))
    big_tokens = tok[tgt == 0]
    assert len(big_tokens) == 4  # top-k
    inside = (centers[big_tokens] - 0.5).abs().max(1)[0] < 0.205
    assert inside.all()
    # the chosen ones are those whose boxes overlap the target most: the 4 nearest the centre
    assert sorted(big_tokens.tolist()) == [44, 45, 54, 55]
    assert tok[tgt == 1].tolist() == [0]
    # a token wanted by two targets goes to the one it overlaps more
    other = torch.tensor([0.45, 0.45, 0.2, 0.2])  # identical to token 44's box
    tok, tgt = crit._task_aligned_assign(logits, boxes, centers, torch.ones(100, dtype=torch.bool),
                                         torch.tensor([0, 0]), torch.stack([big, other]))
    assert len(set(tok.tolist())) == len(tok)
    assert int(tgt[tok == 44]) == 1
    # invalid tokens are never positives
    valid = torch.ones(100, dtype=torch.bool)
    valid[[44, 45, 54, 55]] = False
    tok, _ = crit._task_aligned_assign(logits, boxes, centers, valid, torch.tensor([0]), big[None])
    assert len(tok) == 4 and not set(tok.tolist()) & {44, 45, 54, 55}


def test_dense_encoder_loss_replaces_the_topk_matching():
    gen = torch.Generator().manual_seed(3)
    ys, xs = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    centers = torch.stack([(xs.flatten() + 0.5) / 6, (ys.flatten() + 0.5) / 6], -1)
    boxes = torch.cat([centers, torch.full((36, 2), 0.25)], 1).requires_grad_(True)
    logits = torch.randn(36, 3, generator=gen, requires_grad=True)
    targets = [dict(labels=torch.tensor([2]), boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4]]))]
    dense = _dense_outputs(centers, boxes, logits)
    dense["valid"][0, :6] = False  # the first row is padding
    outputs = {"pred_logits": torch.randn(1, 4, 3, generator=gen), "pred_boxes": random_boxes(4, gen)[None],
               "enc_outputs": {"pred_logits": torch.randn(1, 4, 3, generator=gen),
                               "pred_boxes": random_boxes(4, gen)[None]},
               "enc_dense": dense}
    crit = SetCriterion(3, num_aux_layers=0, two_stage=True, enc_loss="dense", dense_topk=3)
    losses = crit(outputs, targets)
    assert {"loss_class_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)
    # 3 positives (the centres nearest the target's), losses are per positive
    tok, _ = crit._task_aligned_assign(logits, boxes, centers, dense["valid"][0], targets[0]["labels"],
                                       targets[0]["boxes"])
    assert len(tok) == 3
    expected_l1 = (boxes[tok] - targets[0]["boxes"]).abs().sum() / 3
    torch.testing.assert_close(losses["loss_bbox_enc"], expected_l1)
    sum(losses[k] for k in ("loss_class_enc", "loss_bbox_enc", "loss_giou_enc")).backward()
    assert logits.grad[:6].abs().sum() == 0  # padding tokens get no gradient
    assert logits.grad[6:].abs().sum() > 0
    # the Hungarian top-k variant ignores enc_dense
    hung = SetCriterion(3, num_aux_layers=0, two_stage=True)(outputs, targets)
    assert hung["loss_bbox_enc"].item() != pytest.approx(losses["loss_bbox_enc"].item())


def test_a_misspelt_loss_weight_is_refused():
    """Negative control: without the check in SetCriterion.__init__, "loss_bbx" was accepted and the
    box loss kept its default weight 5.0 (this test then fails on the first pytest.raises)."""
    with pytest.raises(ValueError, match=r"'loss_bbx' \(did you mean 'loss_bbox'"):
        SetCriterion(2, weight_dict={"loss_bbx": 1.0})
    with pytest.raises(ValueError, match="loss_classs_0"):
        SetCriterion(2, weight_dict={"loss_class": 1.0, "loss_classs_0": 1.0})
    crit = SetCriterion(2, weight_dict={"loss_bbox_dn_2": 3.0, "loss_giou_o2m": 0.5, "loss_class_enc": 4.0})
    assert crit.weight_of("loss_bbox_dn_2") == 3.0 and crit.weight_of("loss_giou_o2m_1") == 0.5


def test_bad_loss_options_are_refused():
    with pytest.raises(ValueError, match="class_loss"):
        SetCriterion(2, class_loss="softmax")
    with pytest.raises(ValueError, match="enc_loss"):
        SetCriterion(2, enc_loss="ota")
    with pytest.raises(ValueError, match="dense_topk"):
        SetCriterion(2, dense_topk=0)
