"""Box ops, sine position encodings and MLP."""
import math

import pytest
import torch

from dinov2od.layers import (
    MLP,
    PositionEmbeddingSine,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    coordinate_to_sine_embedding,
    generalized_box_iou,
)


def test_box_conversions_round_trip():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.1]])
    xyxy = box_cxcywh_to_xyxy(boxes)
    torch.testing.assert_close(xyxy[0], torch.tensor([0.4, 0.3, 0.6, 0.7]))
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), boxes)


def test_generalized_iou_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 6.0, 2.0]])
    giou = generalized_box_iou(a, b)[0]
    # identical: 1; half-overlap: IoU 1/7, hull 9 -> 1/7 - (9 - 7) / 9; disjoint: 0 - (12 - 8) / 12
    torch.testing.assert_close(giou, torch.tensor([1.0, 1 / 7 - 2 / 9, -1 / 3]))
    torch.testing.assert_close(box_iou(a, b)[0], torch.tensor([1.0, 1 / 7, 0.0]))


def test_generalized_iou_gradients_flow():
    a = torch.tensor([[0.1, 0.1, 0.5, 0.6]], requires_grad=True)
    b = torch.tensor([[0.2, 0.0, 0.7, 0.5]])
    (1 - generalized_box_iou(a, b)).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0


def test_degenerate_boxes_are_named():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.2, 0.9], [0.0, 0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match=r"boxes2 has 2 degenerate.*#1: \[0\.5, 0\.5, 0\.2, 0\.9\]"):
        generalized_box_iou(good, bad)
    # zero-area boxes are allowed (they are valid, if useless)
    generalized_box_iou(good, torch.tensor([[0.3, 0.3, 0.3, 0.3]]))


def test_position_embedding_ignores_padding():
    pe = PositionEmbeddingSine(num_pos_feats=8)
    mask = torch.zeros(2, 6, 9, dtype=torch.bool)
    mask[1, 4:, :] = True
    mask[1, :, 5:] = True
    pos = pe(mask)
    assert pos.shape == (2, 16, 6, 9)
    alone = pe(torch.zeros(1, 4, 5, dtype=torch.bool))
    torch.testing.assert_close(pos[1:, :, :4, :5], alone)
    assert pos[1, :, 4:].abs().sum() == 0 and pos[1, :, :, 5:].abs().sum() == 0
    # normalized coordinates span (0, 2*pi]: the first y channel is sin(y)
    assert math.isclose(float(alone[0, 0, -1, 0]), math.sin((4 - 0.5) / 4 * 2 * math.pi), abs_tol=1e-5)


def test_coordinate_sine_embedding_shape_and_order():
    coords = torch.rand(3, 5, 4)
    emb = coordinate_to_sine_embedding(coords, num_feats=16)
    assert emb.shape == (3, 5, 64)
    # the first block embeds the first coordinate alone
    torch.testing.assert_close(emb[..., :16], coordinate_to_sine_embedding(coords[..., :1], num_feats=16))


def test_mlp():
    mlp = MLP(8, 16, 4, num_layers=3)
    assert mlp(torch.randn(2, 7, 8)).shape == (2, 7, 4)
    assert len(mlp.layers) == 3
    with pytest.raises(ValueError):
        MLP(8, 16, 4, num_layers=0)
