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


@pytest.mark.parametrize("mode", ["meta", "size", "antialias"])
def test_bicubic_resize_matrix_equals_interpolate(mode):
    """The traced (ONNX) position-embedding resize equals F.interpolate's, per image and axis."""
    import torch.nn.functional as F

    from dinov2od.layers import bicubic_resize_matrix

    torch.manual_seed(0)
    m = 16
    grid = torch.randn(1, 8, m, m)
    for h, w in [(16, 16), (4, 23), (9, 31), (37, 2), (16, 40)]:
        if mode == "meta":  # Meta's DINOv2: scale_factor (n + 0.1) / M, no antialias
            ref = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic")
            scales = (m / (h + 0.1), m / (w + 0.1))
        else:
            ref = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=mode == "antialias")
            scales = (m / h, m / w)
        a_h = bicubic_resize_matrix(torch.tensor([h]), h + 3, m, torch.tensor([scales[0]]), mode == "antialias")[0]
        a_w = bicubic_resize_matrix(torch.tensor([w]), w + 2, m, torch.tensor([scales[1]]), mode == "antialias")[0]
        ours = torch.einsum("im,cmn,jn->cij", a_h, grid[0].double(), a_w)
        assert ours[:, h:].abs().max() == 0 and ours[:, :, w:].abs().max() == 0  # zero padding rows
        torch.testing.assert_close(ours[:, :h, :w].float(), ref[0], rtol=0, atol=2e-5)
    # negative control: the other filter gives another result
    other = bicubic_resize_matrix(torch.tensor([9]), 9, m, torch.tensor([m / 9]), mode != "antialias")[0]
    mine = bicubic_resize_matrix(torch.tensor([9]), 9, m, torch.tensor([m / 9]), mode == "antialias")[0]
    assert (other - mine).abs().max() > 1e-2


def test_bf16_autocast_is_refused_on_cpus_without_native_bf16(monkeypatch):
    from dinov2od.layers import precision

    avx2_only = frozenset("fpu sse4_2 avx avx2 fma f16c".split())
    monkeypatch.setattr(precision, "cpu_flags", lambda: avx2_only)
    monkeypatch.delenv(precision.ALLOW_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"none of avx512_bf16, amx_bf16, bf16 \(it has: avx avx2 fma sse4_2\)"):
        precision.check_cpu_autocast("cpu", torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 autocast on this CPU"):
        precision.autocast_context("cpu", "bfloat16")
    precision.check_cpu_autocast("cpu", torch.float16)  # only bf16 is checked
    precision.check_cpu_autocast("cuda", torch.bfloat16)  # GPUs are not
    monkeypatch.setenv(precision.ALLOW_ENV, "1")
    precision.check_cpu_autocast("cpu", torch.bfloat16)  # the documented override
    monkeypatch.delenv(precision.ALLOW_ENV)
    # a CPU with avx512_bf16 (or AMX) is allowed
    monkeypatch.setattr(precision, "cpu_flags", lambda: avx2_only | {"avx512f", "avx512_bf16"})
    with precision.autocast_context("cpu", "bfloat16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision='int8'"):
        precision.autocast_context("cpu", "int8")
