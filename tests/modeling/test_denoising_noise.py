"""Contrastive denoising moves the reference boxes the decoder actually starts from by DINO's amounts.

DINO's CDN box noise (``dn_components.py``; :func:`dinov2od.modeling.train_queries.noised_copies`
documents the same): each corner of a ground-truth box moves by ``box_noise * u * (w/2 or h/2)``
in a random direction, ``u ~ U[0, 1)`` for a positive query and ``u ~ U[1, 2)`` for a negative one.
So, per corner, ``|moved| / (box_noise * half size)`` is uniform on [0, 1) (positives) or [1, 2)
(negatives), and the direction is +-1 with probability 1/2 each.

The boxes are read where the decoder uses them (the reference boxes its first layer receives) in a
training forward of a detector built with ``dn_box_noise=0.4``, so a noise scale lost on the way
(the option not passed on, or zeroed inside the decoder) is seen, not only the noise function.
Targets are small enough that no corner is clipped to the image or swaps with its opposite one.
"""
import numpy as np
import pytest
import torch
from scipy import stats

from tests.helpers.detector import tiny_detector

BOX_NOISE = 0.4
GROUPS = 120
TARGETS = torch.tensor([[0.50, 0.50, 0.20, 0.30], [0.30, 0.60, 0.10, 0.20], [0.70, 0.30, 0.25, 0.15]])
LABELS = torch.tensor([0, 2, 1])


def _reference_boxes():
    """The (cx, cy, w, h) reference boxes of every query at the first decoder layer, and Q."""
    torch.manual_seed(0)
    model = tiny_detector(lora_rank=0, dn_groups=GROUPS, dn_box_noise=BOX_NOISE, dn_label_noise=0.0).train()
    seen = []
    model.decoder.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[2].detach()))
    images = torch.rand(1, 3, 56, 56)  # whole patches, no padding: valid ratios 1
    torch.manual_seed(1)
    with torch.no_grad():  # (training mode is what makes the denoising queries)
        out = model(images, targets=[{"labels": LABELS, "boxes": TARGETS}])
    (ref_per_level,) = seen  # (B, Q', levels, 4) = reference box * valid ratio per level
    assert torch.equal(ref_per_level[:, :, :1].expand_as(ref_per_level), ref_per_level)  # ratios 1
    return ref_per_level[0, :, 0].double(), model.num_queries, out


def _xyxy(b):
    return torch.stack([b[..., 0] - b[..., 2] / 2, b[..., 1] - b[..., 3] / 2,
                        b[..., 0] + b[..., 2] / 2, b[..., 1] + b[..., 3] / 2], -1)


def test_denoising_reference_boxes_move_by_the_documented_amounts():
    ref, q, out = _reference_boxes()
    n = len(TARGETS)
    # the documented layout: [matching Q | dn: GROUPS x (n positives, n negatives)]
    assert ref.shape[0] == q + GROUPS * 2 * n
    dn = ref[q:].view(GROUPS, 2, n, 4)
    assert out["dn_outputs"]["positive"][0].view(GROUPS, 2, n)[:, 0].all()
    assert not out["dn_outputs"]["positive"][0].view(GROUPS, 2, n)[:, 1].any()

    target = TARGETS.double()
    moved = _xyxy(dn) - _xyxy(target)  # (G, 2, n, 4) corner displacements
    half = (target[:, 2:] / 2).repeat(1, 2)  # (n, 4): w/2, h/2, w/2, h/2
    u = (moved.abs() / (BOX_NOISE * half)).numpy()
    pos, neg = u[:, 0].ravel(), u[:, 1].ravel()  # 120 * 3 * 4 = 1440 draws each

    # ranges: a positive stays within its ring, a negative lies in the next one
    assert pos.max() < 1 + 1e-4 and neg.min() > 1 - 1e-4 and neg.max() < 2 + 1e-4, (pos.max(), neg.min(), neg.max())
    # uniform on [0, 1) and [1, 2): mean 1/2 and 3/2, variance 1/12, and the KS test
    # (1440 draws: the mean's standard error is 0.0076; 0.03 is 4 of them)
    assert pos.mean() == pytest.approx(0.5, abs=0.03) and neg.mean() == pytest.approx(1.5, abs=0.03)
    assert pos.var() == pytest.approx(1 / 12, abs=0.012) and neg.var() == pytest.approx(1 / 12, abs=0.012)
    assert stats.kstest(pos, "uniform", args=(0, 1)).pvalue > 1e-3
    assert stats.kstest(neg, "uniform", args=(1, 1)).pvalue > 1e-3
    # direction +-1 with probability 1/2, for both kinds of query and every corner
    sign = np.sign(moved.numpy())
    for kind in (0, 1):
        for corner in range(4):
            share = (sign[:, kind, :, corner] > 0).mean()
            assert share == pytest.approx(0.5, abs=0.1), (kind, corner, share)
