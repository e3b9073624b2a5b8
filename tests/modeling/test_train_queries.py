"""Training-only queries: contrastive denoising (DN-DETR/DINO) and one-to-many matching (H-DETR)."""
import pytest
import torch
from torchvision.ops import box_iou, sigmoid_focal_loss

import dinov2od.modeling.decoder as decoder_module
from dinov2od.layers import box_cxcywh_to_xyxy
from dinov2od.modeling import SetCriterion, make_denoising_queries
from dinov2od.modeling.train_queries import noised_copies, self_attn_mask

from tests.helpers.detector import padded_batch, perturb, tiny_detector

ON = dict(dn_groups=2, o2m_queries=6)


def _targets3(dtype=torch.float32):
    """Targets of 3 images with 2, 0 and 3 boxes."""
    return [
        dict(labels=torch.tensor([0, 2]),
             boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]], dtype=dtype)),
        dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4, dtype=dtype)),
        dict(labels=torch.tensor([1, 1, 0]),
             boxes=torch.tensor([[0.2, 0.7, 0.3, 0.2], [0.6, 0.4, 0.4, 0.5], [0.8, 0.8, 0.2, 0.2]], dtype=dtype)),
    ]


def _pair(seed=0, **options):
    """The same tiny detector with the training queries on and off (same weights where shared)."""
    torch.manual_seed(seed)
    on = tiny_detector(**options, **ON)
    torch.manual_seed(seed)
    off = tiny_detector(**options)
    a, b = on.state_dict(), off.state_dict()
    assert set(a) - set(b) == {"decoder.dn_label_embed.weight", "decoder.o2m_query_embed.weight"} | (
        set() if options.get("two_stage") else {"decoder.o2m_refpoint_embed.weight"})
    assert all(torch.equal(a[k], b[k]) for k in b)  # created last: the shared init does not move
    return on, off


# ------------------------------------------------------------------------------------ noise, layout
def test_noised_copies_positives_near_negatives_further():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.4, 0.6, 0.1, 0.2]])
    labels = torch.tensor([1, 2])
    lab, noisy = noised_copies(labels, boxes, 500, 5, label_noise=0.0, box_noise=0.4)
    assert lab.shape == (500, 2, 2) and noisy.shape == (500, 2, 2, 4) and (lab == labels).all()
    half = boxes[:, 2:].repeat(1, 2) / 2
    moved = (box_cxcywh_to_xyxy(noisy) - box_cxcywh_to_xyxy(boxes)).abs() / (0.4 * half)  # in units of the scale
    assert moved[:, 0].max() < 1 and moved[:, 1].min() >= 1 - 1e-5 and moved[:, 1].max() < 2
    assert moved[:, 0].mean() == pytest.approx(0.5, abs=0.02) and moved[:, 1].mean() == pytest.approx(1.5, abs=0.02)
    lab, noisy = noised_copies(labels, boxes, 2000, 5, label_noise=0.5, box_noise=0.0)
    torch.testing.assert_close(noisy, boxes.expand_as(noisy))
    # a flipped label is uniform over the 5 classes: it stays the same 1/5 of the time
    assert (lab != labels).float().mean().item() == pytest.approx(0.5 * 4 / 5, abs=0.02)
    # large noise: corners are clipped to the image and kept in order
    _, noisy = noised_copies(labels, boxes, 200, 5, 0.0, box_noise=3.0)
    xyxy = box_cxcywh_to_xyxy(noisy)
    assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all() and (noisy[..., 2:] >= 0).all()


def test_denoising_layout_groups_and_padding():
    torch.manual_seed(0)
    dn = make_denoising_queries(_targets3(), 3, num_groups=2)
    n = 3  # most boxes of an image
    assert dn.labels.shape == (3, 2 * 2 * n) and dn.boxes.shape == (3, 12, 4) and dn.group_size == 6
    slot = torch.arange(12) % n  # target of each slot; positives then negatives in each group
    is_pos = (torch.arange(12) % (2 * n)) < n
    for i, k in enumerate((2, 0, 3)):
        assert dn.valid[i].tolist() == (slot < k).tolist()
        assert dn.positive[i].tolist() == ((slot < k) & is_pos).tolist()
        assert dn.target_index[i][dn.valid[i]].tolist() == slot[slot < k].tolist()
    # DINO's budget: groups = max_queries // (2 n)
    assert make_denoising_queries(_targets3(), 3, max_queries=13).num_groups == 2
    assert make_denoising_queries(_targets3(), 3, max_queries=4).num_groups == 1
    # no target in the batch: one padding slot per group and sign, none valid
    empty = make_denoising_queries([_targets3()[1]] * 2, 3, num_groups=3)
    assert empty.labels.shape == (2, 6) and not empty.valid.any()


def test_self_attention_mask_blocks():
    torch.manual_seed(0)
    dn = make_denoising_queries(_targets3(), 3, num_groups=2)  # D = 12, groups of 6
    q, groups, o2m, heads = 4, 2, 5, 3
    mask = self_attn_mask(groups, q, o2m, dn, heads)
    total = groups * q + o2m + 12
    assert mask.shape == (3 * heads, total, total)
    assert torch.equal(mask[0], mask[heads - 1]) and not (mask.all(-1)).any()  # no empty row
    allowed = ~mask[::heads]  # (B, Qa, Qa) per image
    m0, m1, o, d0, d1 = (slice(0, 4), slice(4, 8), slice(8, 13), slice(13, 19), slice(19, 25))
    for img in range(3):
        a = allowed[img]
        assert a[m0, m0].all() and not a[m0, m1].any() and not a[:13, 13:].any()  # matching sees no DN
        assert a[o, o].all() and not a[o, :8].any() and not a[:8, o].any()
        assert not a[d0, d1].any() and not a[d1, d0].any() and not a[13:, o].any()
        valid0 = dn.valid[img, :6]
        assert a[d0, m0].all() and not a[d0, m1].any()  # DN sees the first matching group only
        off_diag = ~torch.eye(6, dtype=torch.bool)
        assert torch.equal(a[d0, d0] & off_diag, valid0[None].expand(6, 6) & off_diag)  # padding hidden
    assert self_attn_mask(1, q) is None and self_attn_mask(2, q).shape == (8, 8)
    assert self_attn_mask(1, q, o2m).shape == (9, 9)


# ------------------------------------------------------------------------------------ model
@pytest.mark.parametrize(
    "options", [dict(), dict(two_stage=True, group_detr=2), dict(box_refine=False, cross_attn="standard")],
    ids=["refine", "two_stage_group", "norefine_standard"])
def test_matching_queries_never_see_training_queries(options, monkeypatch):
    """In training, the matching queries' outputs are those of the same model without denoising and
    one-to-many queries; in eval the outputs are bit-identical (nothing is added)."""
    on, off = _pair(**options)
    perturb(on)
    off.load_state_dict(on.state_dict(), strict=False)
    on, off = on.double(), off.double()
    images = torch.rand(2, 3, 61, 75, dtype=torch.float64)
    targets = _targets3(torch.float64)[:2]
    out_on, out_off = on.train()(images, targets=targets), off.train()(images)
    assert {"dn_outputs", "o2m_outputs"} <= set(out_on)
    for a, b in zip([out_on] + out_on["aux_outputs"], [out_off] + out_off["aux_outputs"]):
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-12)
        torch.testing.assert_close(a["pred_boxes"], b["pred_boxes"], rtol=0, atol=1e-12)
    with torch.no_grad():
        ev_on, ev_off = on.eval()(images, targets=targets), off.eval()(images)
    assert set(ev_on) == set(ev_off) and "dn_outputs" not in ev_on
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(ev_on[key], ev_off[key])
        assert torch.equal(ev_on["aux_outputs"][0][key], ev_off["aux_outputs"][0][key])
        if "enc_outputs" in ev_on:
            assert torch.equal(ev_on["enc_outputs"][key], ev_off["enc_outputs"][key])
    # negative control: without the mask the matching queries do see the extra queries
    monkeypatch.setattr(decoder_module, "self_attn_mask", lambda *args, **kwargs: None)
    leaked = on.train()(images, targets=targets)
    assert (leaked["pred_boxes"] - out_off["pred_boxes"]).abs().max() > 1e-3


OPTIONS = [dict(), dict(dn_groups=0, dn_queries=12), dict(two_stage=True, group_detr=2),
           dict(box_refine=False, cross_attn="standard")]


@pytest.mark.parametrize("options", OPTIONS, ids=["refine", "dn_budget", "two_stage_group", "norefine_standard"])
@pytest.mark.parametrize("empty", [False, True], ids=["targets", "no_targets"])
def test_losses_and_every_parameter_gets_a_gradient(options, empty):
    torch.manual_seed(0)
    model = tiny_detector(**{**ON, **options}).train()
    targets = [_targets3()[1]] * 2 if empty else _targets3()[:2]
    out = model(torch.rand(2, 3, 61, 75), targets=targets)
    criterion = SetCriterion(3, num_aux_layers=1, class_loss="quality_focal", o2m_repeats=2, o2m_weight=0.5)
    losses = criterion(out, targets)
    for part in ("", "_dn", "_o2m"):
        for name in ("loss_class", "loss_bbox", "loss_giou"):
            assert f"{name}{part}" in losses and f"{name}{part}_0" in losses
    assert criterion.weight_dict["loss_bbox_o2m_0"] == 2.5 and criterion.weight_dict["loss_giou_dn"] == 2.0
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
    assert torch.isfinite(total)
    total.backward()
    # DDP without find_unused_parameters: every trainable parameter takes part, even with no target
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    if empty:
        assert losses["loss_bbox_dn"] == 0 and losses["loss_class_dn"] == 0


def _valid_dn(out, i):
    """Image i's denoising predictions at its non-padding slots, in slot order."""
    dn = out["dn_outputs"]
    return dn["pred_logits"][i][dn["valid"][i]], dn["pred_boxes"][i][dn["valid"][i]]


@pytest.mark.parametrize("options", [dict(class_loss="focal"), dict(class_loss="quality_focal", two_stage=True,
                                                                     group_detr=2)], ids=["focal", "qfl_two_stage"])
def test_padded_batch_gives_the_losses_of_one_by_one(options):
    """float64, the same noise seed: a padded batch (3 images, 2/0/3 boxes) gives the sums of the
    per-image losses, for the matching, denoising and one-to-many queries."""
    options = dict(options)
    class_loss = options.pop("class_loss")
    torch.manual_seed(0)
    model = tiny_detector(**options, **ON).double().train()
    perturb(model)
    criterion = SetCriterion(3, num_aux_layers=1, class_loss=class_loss, o2m_repeats=2)
    sizes = [(61, 75), (30, 44), (56, 28)]
    images = [torch.rand(3, h, w, dtype=torch.float64) for h, w in sizes]
    targets = _targets3(torch.float64)
    batch, mask = padded_batch(images)
    torch.manual_seed(1)
    batched = model(batch, mask, targets=targets)
    losses = criterion(batched, targets)
    torch.manual_seed(1)  # the noise of image i is drawn after that of images < i, in both cases
    alone = [model(im[None], targets=[t]) for im, t in zip(images, targets)]
    alone_losses = [criterion(o, [t]) for o, t in zip(alone, targets)]
    counts = [len(t["labels"]) for t in targets]
    norm = {"": options.get("group_detr", 1), "_enc": 1, "_dn": 2, "_o2m": 2}  # num_boxes factor of each part
    for key in losses:
        part = next((p for p in ("_enc", "_dn", "_o2m") if p in key), "")
        total = sum(al[key] * max(n * norm[part], 1) for al, n in zip(alone_losses, counts))
        torch.testing.assert_close(losses[key] * sum(counts) * norm[part], total, rtol=1e-9, atol=1e-10)
    for i in range(3):
        for a, b in zip(_valid_dn(batched, i), _valid_dn(alone[i], 0)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert losses["loss_bbox_dn"] > 0 and losses["loss_class_o2m"] > 0


# ------------------------------------------------------------------------------------ losses
def _dn_case():
    """Image 0: 2 targets, image 1: 1 target; one group of n = 2: slots pos, pos, neg, neg."""
    targets = [dict(labels=torch.tensor([1, 0]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])),
               dict(labels=torch.tensor([2]), boxes=torch.tensor([[0.6, 0.4, 0.3, 0.3]]))]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=gen)
    boxes = torch.tensor([[0.52, 0.5, 0.2, 0.25], [0.3, 0.32, 0.1, 0.2], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]])
    boxes = torch.stack([boxes, boxes.flip(0)])
    meta = dict(valid=torch.tensor([[True] * 4, [True, False, True, False]]),
                positive=torch.tensor([[True, True, False, False], [True, False, False, False]]),
                target_index=torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]]), num_groups=1)
    outputs = {"pred_logits": torch.zeros(2, 5, 3), "pred_boxes": torch.full((2, 5, 4), 0.5),
               "dn_outputs": dict(pred_logits=logits, pred_boxes=boxes, aux_outputs=[], **meta)}
    return outputs, targets


@pytest.mark.parametrize("class_loss", ["focal", "quality_focal"])
def test_denoising_losses_against_their_known_targets(class_loss):
    outputs, targets = _dn_case()
    losses = SetCriterion(3, num_aux_layers=0, class_loss=class_loss)(outputs, targets)
    dn = outputs["dn_outputs"]
    # written out: valid slots (0,0) (0,1) (0,2) (0,3) (1,0) (1,2); positives (0,0)->t0, (0,1)->t1, (1,0)->t0
    rows = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 2)]
    pos = {(0, 0): (0, 0), (0, 1): (0, 1), (1, 0): (1, 0)}
    logits = torch.stack([dn["pred_logits"][b, q] for b, q in rows])
    target = torch.zeros_like(logits)
    pred = torch.stack([dn["pred_boxes"][b, q] for b, q in pos])
    gt = torch.stack([targets[i]["boxes"][j] for i, j in pos.values()])
    iou = box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt)).diagonal()
    for r, (bq, (i, j)) in enumerate(pos.items()):
        target[rows.index(bq), targets[i]["labels"][j]] = 1.0 if class_loss == "focal" else iou[r]
    if class_loss == "focal":
        expected = sigmoid_focal_loss(logits, target, 0.25, 2.0, reduction="sum")
    else:
        p = logits.sigmoid()
        expected = (torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
                    * (p - target).abs() ** 2).sum()
    num_boxes = 3  # targets x groups
    torch.testing.assert_close(losses["loss_class_dn"], expected / num_boxes)
    torch.testing.assert_close(losses["loss_bbox_dn"], (pred - gt).abs().sum() / num_boxes)
    # padding slots are ignored: changing them changes nothing
    dn["pred_logits"][1, 1] += 5.0
    dn["pred_boxes"][1, 3] = torch.tensor([0.1, 0.9, 0.05, 0.05])
    again = SetCriterion(3, num_aux_layers=0, class_loss=class_loss)(outputs, targets)
    for key in ("loss_class_dn", "loss_bbox_dn", "loss_giou_dn"):
        torch.testing.assert_close(again[key], losses[key])
    # ... and a negative's box is never pulled: moving it changes no box loss
    dn["pred_boxes"][0, 2] = torch.tensor([0.7, 0.7, 0.2, 0.2])
    moved = SetCriterion(3, num_aux_layers=0, class_loss=class_loss)(outputs, targets)
    torch.testing.assert_close(moved["loss_bbox_dn"], losses["loss_bbox_dn"])
    if class_loss == "focal":
        torch.testing.assert_close(moved["loss_class_dn"], losses["loss_class_dn"])


def test_one_to_many_trains_each_target_k_times():
    targets = [dict(labels=torch.tensor([0, 1]), boxes=torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]]))]
    gt = targets[0]["boxes"]
    far = torch.tensor([[0.9, 0.1, 0.05, 0.05]])
    logits = torch.full((1, 8, 2), -4.0)
    main = {"pred_logits": torch.zeros(1, 4, 2), "pred_boxes": torch.full((1, 4, 4), 0.5)}

    def o2m_losses(copies, k):
        boxes = torch.cat([gt[0:1].repeat(copies, 1), gt[1:2].repeat(copies, 1), far.repeat(8 - 2 * copies, 1)])
        out = {**main, "o2m_outputs": {"pred_logits": logits, "pred_boxes": boxes[None], "aux_outputs": []}}
        return SetCriterion(2, num_aux_layers=0, o2m_repeats=k)(out, targets)

    assert o2m_losses(3, 3)["loss_bbox_o2m"] == 0  # 3 exact copies of each box for 3 repeats
    assert o2m_losses(3, 2)["loss_bbox_o2m"] == 0  # fewer repeats: the third copies are negatives
    short = o2m_losses(2, 3)  # 3 repeats, 2 copies: each target's third query is a far box
    l1_far = sum((far[0] - b).abs().sum() for b in gt)
    torch.testing.assert_close(short["loss_bbox_o2m"], l1_far / (2 * 3))  # divided by targets x repeats


def test_bad_options_and_missing_targets_are_clear_errors():
    with pytest.raises(ValueError, match="not both"):
        tiny_detector(dn_groups=2, dn_queries=100)
    with pytest.raises(ValueError, match="dn_label_noise"):
        tiny_detector(dn_groups=2, dn_label_noise=1.5)
    model = tiny_detector(dn_groups=2).train()
    with pytest.raises(ValueError, match=r"targets=targets"):
        model(torch.rand(1, 3, 28, 28))
    bad = [dict(labels=torch.tensor([5]), boxes=torch.tensor([[0.5, 0.5, 0.1, 0.1]]))]
    with pytest.raises(ValueError, match=r"class id 5 outside \[0, num_classes=3\)"):
        model(torch.rand(1, 3, 28, 28), targets=bad)
    model.eval()(torch.rand(1, 3, 28, 28))  # inference needs no targets
