"""PyTorch path of multi-scale deformable attention against a naive per-point loop."""
import pytest
import torch

from dinov2od.layers import (
    MultiScaleDeformableAttention,
    level_start_index_from_shapes,
    ms_deform_attn,
    ms_deform_attn_pytorch,
)

SHAPES = [(7, 5), (4, 9), (3, 2)]  # non-square levels


def naive_ms_deform_attn(value, shapes, locations, weights):
    """One sampling point at a time: bilinear interpolation at (x*W - 0.5, y*H - 0.5),
    zero outside the map."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = locations.shape
    locations = locations.detach()
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, m, d, dtype=value.dtype)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    for pt in range(p):
                        x = float(locations[b, q, head, lvl, pt, 0]) * w - 0.5
                        y = float(locations[b, q, head, lvl, pt, 1]) * h - 0.5
                        x0, y0 = int(torch.floor(torch.tensor(x))), int(torch.floor(torch.tensor(y)))
                        acc = torch.zeros(d, dtype=value.dtype)
                        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                            if 0 <= yy < h and 0 <= xx < w:
                                coeff = (1 - abs(x - xx)) * (1 - abs(y - yy))
                                acc += coeff * value[b, starts[lvl] + yy * w + xx, head]
                        out[b, q, head] += weights[b, q, head, lvl, pt] * acc
    return out.view(n, lq, m * d)


def random_inputs(n=2, lq=5, m=2, d=3, p=3, shapes=SHAPES, dtype=torch.float64, spread=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    s = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    loc = torch.rand(n, lq, m, len(shapes), p, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread
    w = torch.rand(n, lq, m, len(shapes), p, generator=g, dtype=dtype) + 1e-5
    w = w / w.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, level_start_index_from_shapes(spatial_shapes), loc, w


def test_level_start_index():
    shapes = torch.tensor(SHAPES)
    assert level_start_index_from_shapes(shapes).tolist() == [0, 35, 71]


@pytest.mark.parametrize("spread", [0.0, 0.3])  # 0.3: many points fall outside the map
def test_matches_naive_loop_float64(spread):
    value, shapes, starts, loc, w = random_inputs(spread=spread)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    expected = naive_ms_deform_attn(value, SHAPES, loc, w)
    assert out.shape == (2, 5, 2 * 3)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_points_outside_map_read_zero():
    value, shapes, starts, loc, w = random_inputs()
    loc = torch.full_like(loc, 1.6)  # every point more than a pixel outside every level
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    assert torch.count_nonzero(out) == 0


def test_gradcheck_float64():
    value, shapes, starts, loc, w = random_inputs(n=1, lq=2, m=2, d=2, p=2, spread=0.1, seed=1)
    # random points lie off the pixel grid (where bilinear sampling has kinks) almost surely
    inputs = (value.requires_grad_(), loc.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn_pytorch(v, shapes, starts, l, a), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("n", [1, 3, 65])  # no batch % im2col_step constraint
def test_batch_independence(n):
    value, shapes, starts, loc, w = random_inputs(n=n, seed=n)
    out = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    for i in [0, n // 2, n - 1]:
        single = ms_deform_attn_pytorch(value[i : i + 1], shapes, starts, loc[i : i + 1], w[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], single, atol=1e-12, rtol=0)


def test_float32_and_autocast_keep_dtype():
    value, shapes, starts, loc, w = random_inputs(dtype=torch.float32)
    ref = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    assert ref.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ms_deform_attn_pytorch(value.bfloat16(), shapes, starts, loc.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_bad_shapes_are_named():
    value, shapes, starts, loc, w = random_inputs()
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value[:, :-1], shapes, starts, loc, w)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, starts, loc, w[..., :-1])


def test_forced_pytorch_path_matches_dispatch(monkeypatch):
    value, shapes, starts, loc, w = random_inputs()
    ref = ms_deform_attn_pytorch(value, shapes, starts, loc, w)
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, w, force_pytorch=True), ref)
    monkeypatch.setenv("DINOV2OD_COMPILED_MSDA", "0")
    torch.testing.assert_close(ms_deform_attn(value, shapes, starts, loc, w), ref)


def _module_inputs(n=2, c=16, lq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    query = torch.randn(n, lq, c, generator=g, dtype=torch.float64)
    value = torch.randn(n, s, c, generator=g, dtype=torch.float64)
    return query, value, shapes


def _randomized_module(c=16, m=4, p=2):
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dim=c, num_heads=m, num_levels=len(SHAPES), num_points=p).double()
    with torch.no_grad():  # make offsets and weights depend on the query
        attn.sampling_offsets.weight.normal_(0, 0.3)
        attn.attention_weights.weight.normal_(0, 0.3)
    return attn


def test_module_shapes_points_and_boxes():
    attn = _randomized_module()
    query, value, shapes = _module_inputs()
    points = torch.rand(2, 6, 2, dtype=torch.float64)
    boxes = torch.cat([points, torch.rand(2, 6, 2, dtype=torch.float64) * 0.5], -1)
    assert attn(query, points, value, shapes).shape == (2, 6, 16)
    assert attn(query, boxes[:, :, None].expand(-1, -1, 3, -1), value, shapes).shape == (2, 6, 16)
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, torch.rand(2, 6, 3, dtype=torch.float64), value, shapes)


def test_module_box_reference_points_scale_offsets_by_box_size():
    """With box references, sampling locations are centre + offset / P * size / 2."""
    attn = _randomized_module()
    query, value, shapes = _module_inputs()
    boxes = torch.tensor([0.4, 0.6, 0.2, 0.5], dtype=torch.float64).expand(2, 6, 4)
    n, lq, m, num_levels, p = 2, 6, 4, 3, 2
    offsets = attn.sampling_offsets(query).view(n, lq, m, num_levels, p, 2)
    weights = attn.attention_weights(query).view(n, lq, m, -1).softmax(-1).view(n, lq, m, num_levels, p)
    loc = boxes[:, :, None, None, None, :2] + offsets / p * boxes[:, :, None, None, None, 2:] * 0.5
    v = attn.value_proj(value).view(n, -1, m, 4)
    expected = attn.output_proj(naive_ms_deform_attn(v, SHAPES, loc, weights))
    torch.testing.assert_close(attn(query, boxes, value, shapes), expected, atol=1e-10, rtol=0)


def test_module_key_padding_mask_ignores_padded_values():
    attn = _randomized_module()
    query, value, shapes = _module_inputs()
    points = torch.rand(2, 6, 2, dtype=torch.float64)
    mask = torch.zeros(2, value.shape[1], dtype=torch.bool)
    mask[1, 10:50] = True
    out = attn(query, points, value, shapes, key_padding_mask=mask)
    garbage = value.clone()
    garbage[mask] = 1e6
    torch.testing.assert_close(attn(query, points, garbage, shapes, key_padding_mask=mask), out)
    # and the mask really removes something
    assert not torch.allclose(attn(query, points, value, shapes), out)


def test_module_rejects_wrong_level_count():
    attn = _randomized_module()
    query, value, shapes = _module_inputs()
    with pytest.raises(ValueError, match="levels"):
        attn(query, torch.rand(2, 6, 2, dtype=torch.float64), value[:, :35], shapes[:1])


def test_module_gradients_reach_every_projection():
    attn = _randomized_module()
    query, value, shapes = _module_inputs()
    attn(query.requires_grad_(), torch.rand(2, 6, 2, dtype=torch.float64), value, shapes).sum().backward()
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
