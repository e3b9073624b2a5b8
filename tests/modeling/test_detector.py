"""DINOv2ObjectDetector end to end on tiny random configs (CPU, no downloads)."""
import pytest
import torch
import torch.nn.functional as F

from dinov2od.modeling import (
    DINOv2ObjectDetector,
    HungarianMatcher,
    SetCriterion,
)
from dinov2od.modeling import pad_to_multiple
from dinov2od.modeling.neck import ConvSpatialPrior

from tests.helpers.detector import padded_batch, perturb, tiny_detector


def _targets():
    return [
        dict(labels=torch.tensor([0, 2]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])),
        dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4)),
    ]


@pytest.mark.parametrize(
    "options",
    [dict(), dict(cross_attn="standard"), dict(two_stage=True), dict(group_detr=3),
     dict(num_encoder_layers=1, box_refine=False), dict(scale_factors=(1.0,)), dict(spatial_prior=8)],
    ids=["deformable", "standard", "two_stage", "group_detr", "encoder_norefine", "single_level", "spatial_prior"],
)
def test_forward_shapes_and_loss_backward(options):
    torch.manual_seed(0)
    model = tiny_detector(**options).train()
    images = torch.rand(2, 3, 61, 75)  # odd sizes, not multiples of 14
    out = model(images)
    groups = options.get("group_detr", 1)
    assert out["pred_logits"].shape == (2, 12 * groups, 3)
    assert out["pred_boxes"].shape == (2, 12 * groups, 4)
    assert len(out["aux_outputs"]) == model.num_aux_outputs == 1
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert ("enc_outputs" in out) == options.get("two_stage", False)
    criterion = SetCriterion(3, HungarianMatcher(), num_aux_layers=model.num_aux_outputs)
    losses = criterion(out, _targets())
    assert set(losses) <= set(criterion.weight_dict)
    expected = {"loss_class", "loss_bbox", "loss_giou", "loss_class_0", "loss_bbox_0", "loss_giou_0"}
    if options.get("two_stage"):
        expected |= {"loss_class_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert set(losses) == expected
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses)
    assert torch.isfinite(total)
    total.backward()
    # every trainable parameter gets a gradient (DDP without find_unused_parameters)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out["pred_logits"].shape == (2, 12, 3)  # eval: exactly num_queries
    assert "num_groups" not in out


@pytest.mark.parametrize(
    "options,dtype,atol",
    [(dict(), torch.float64, 1e-10), (dict(cross_attn="standard"), torch.float64, 1e-10),
     (dict(two_stage=True), torch.float64, 1e-10), (dict(two_stage=True, two_stage_nms=0.5), torch.float64, 1e-10),
     (dict(num_encoder_layers=1, registers=True), torch.float64, 1e-10), (dict(), torch.float32, 1e-4),
     (dict(spatial_prior=8), torch.float64, 1e-10)],
    ids=["deformable64", "standard64", "two_stage64", "two_stage_nms64", "encoder_registers64", "deformable32",
         "spatial_prior64"],
)
def test_padded_batch_equals_one_by_one(options, dtype, atol):
    torch.manual_seed(0)
    model = tiny_detector(**options).to(dtype).eval()
    perturb(model)
    sizes = [(61, 75), (30, 44), (56, 28)]  # the padded batch is 61 x 75
    images = [torch.rand(3, h, w, dtype=dtype) for h, w in sizes]
    batch, mask = padded_batch(images)  # random values under the padding: they must not matter
    with torch.no_grad():
        batched = model(batch, mask)
        no_mask = model(batch)
        for i, im in enumerate(images):
            alone = model(im[None])
            for key in ("pred_logits", "pred_boxes"):
                torch.testing.assert_close(batched[key][i], alone[key][0], rtol=0, atol=atol)
            torch.testing.assert_close(batched["aux_outputs"][0]["pred_boxes"][i],
                                       alone["aux_outputs"][0]["pred_boxes"][0], rtol=0, atol=atol)
            if "enc_outputs" in alone:
                torch.testing.assert_close(batched["enc_outputs"]["pred_boxes"][i],
                                           alone["enc_outputs"]["pred_boxes"][0], rtol=0, atol=atol)
    # the test can fail: ignoring the mask changes the padded images' outputs a lot
    assert (no_mask["pred_boxes"][1] - batched["pred_boxes"][1]).abs().max() > 1e-2


def test_boxes_are_relative_to_the_unpadded_image():
    """Padding an image (with a mask) must not move its normalized boxes."""
    torch.manual_seed(0)
    model = tiny_detector().double().eval()
    perturb(model)
    image = torch.rand(1, 3, 42, 56, dtype=torch.float64)
    big = torch.zeros(1, 3, 84, 98, dtype=torch.float64)
    big[..., :42, :56] = image
    mask = torch.ones(1, 84, 98, dtype=torch.bool)
    mask[:, :42, :56] = False
    with torch.no_grad():
        torch.testing.assert_close(model(big, mask)["pred_boxes"], model(image)["pred_boxes"])


def test_spatial_prior_starts_as_a_no_op_then_changes_the_pyramid():
    """Zero-initialized output convs: adding the prior to a (pretrained) model changes nothing
    until it is trained; once its weights move, every level differs."""
    torch.manual_seed(0)
    model = tiny_detector(spatial_prior=8).double().eval()
    images = torch.rand(2, 3, 45, 59, dtype=torch.float64)
    with torch.no_grad():
        with_prior = model(images)
        prior, model.spatial_prior = model.spatial_prior, None
        without = model(images)
        model.spatial_prior = prior
    torch.testing.assert_close(with_prior["pred_logits"], without["pred_logits"], rtol=0, atol=0)
    maps = prior(*pad_to_multiple(images, None, 14))
    assert [tuple(m.shape[-2:]) for m in maps] == [(8, 10), (4, 5), (2, 3), (1, 2)]  # strides 7/14/28/56
    assert all(m.abs().max() == 0 for m in maps)
    perturb(prior)
    with torch.no_grad():
        maps = prior(*pad_to_multiple(images, None, 14))
        assert all(m.abs().max() > 0 for m in maps)
        assert (model(images)["pred_logits"] - without["pred_logits"]).abs().max() > 1e-3


def test_spatial_prior_rejects_levels_finer_than_half_a_patch():
    with pytest.raises(ValueError, match="finer level"):
        tiny_detector(spatial_prior=8, scale_factors=(4.0, 1.0))
    with pytest.raises(ValueError, match="even patch size"):
        ConvSpatialPrior(32, (1.0,), patch_size=15)


def test_frozen_detector_trains_lora_neck_decoder_only():
    model = tiny_detector(lora_rank=4, freeze=True).train()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    vit = [n for n in trainable if n.startswith("backbone.")]
    assert vit and all("lora_" in n for n in vit)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith(("neck.", "decoder.")))
    out = model(torch.rand(2, 3, 42, 42))
    criterion = SetCriterion(3, num_aux_layers=model.num_aux_outputs)
    losses = criterion(out, _targets())
    sum(losses[k] * criterion.weight_dict[k] for k in losses).backward()
    lora_b = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None for g in lora_b) and any(g.abs().sum() > 0 for g in lora_b)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_bad_inputs_raise_clear_errors():
    model = tiny_detector().eval()
    with pytest.raises(ValueError, match=r"images must be float RGB: a \(B, 3, H, W\)"):
        model(torch.rand(1, 28, 28))
    with pytest.raises(ValueError, match="images must be float RGB"):
        model(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"RGB in \[0, 1\].*Divide 0-255 pixels by 255"):
        model(torch.rand(1, 3, 28, 28) * 255)
    with pytest.raises(ValueError, match="normalized=True"):
        model(torch.randn(1, 3, 28, 28) * 2)  # ImageNet-normalized input without the flag
    with pytest.raises(ValueError, match="masks must be a bool"):
        model(torch.rand(1, 3, 28, 28), torch.zeros(1, 28, 28))
    with pytest.raises(ValueError, match="num_queries=12 pyramid tokens"):
        tiny_detector(two_stage=True, scale_factors=(0.5,)).eval()(torch.rand(1, 3, 28, 28))
    with pytest.raises(ValueError, match="cross_attn"):
        tiny_detector(cross_attn="dense")


def test_default_constructor_builds_vit_small_offline():
    model = DINOv2ObjectDetector(num_classes=80)
    assert model.backbone.embed_dim == 384 and model.backbone.out_indices == (2, 5, 8, 11)
    assert model.num_queries == 300 and model.neck.strides == (7.0, 14.0, 28.0, 56.0)


def test_two_stage_nms_selects_non_overlapping_proposals():
    """With NMS the selected proposals overlap each other by at most the threshold (when enough
    survive); when too few survive, the best suppressed ones fill up."""
    from torchvision.ops import box_iou

    from dinov2od.layers import box_cxcywh_to_xyxy

    torch.manual_seed(0)
    model = tiny_detector(two_stage=True, two_stage_nms=0.3, num_queries=6).eval()
    dec = model.decoder
    gen = torch.Generator().manual_seed(0)
    # 40 proposals: 20 copies of one box with the best scores, 20 scattered small boxes
    centers = torch.cat([torch.full((20, 2), 0.5), torch.rand(20, 2, generator=gen) * 0.8 + 0.1])
    wh = torch.cat([torch.full((20, 2), 0.3), torch.full((20, 2), 0.02)])
    boxes_unsig = torch.logit(torch.cat([centers, wh], 1))[None]
    scores = torch.cat([torch.linspace(10, 9, 20), torch.linspace(5, 4, 20)])[None]
    scores[0, -1] = float("-inf")  # an invalid token is never picked
    picked = dec._nms_topk(boxes_unsig, scores)[0]
    assert picked[0] == 0 and len(set(picked.tolist())) == 6 and 39 not in picked.tolist()
    xyxy = box_cxcywh_to_xyxy(torch.sigmoid(boxes_unsig[0, picked]))
    iou = box_iou(xyxy, xyxy) - torch.eye(6)
    assert iou.max() <= 0.3
    assert scores.topk(6, dim=1)[1][0].tolist() == list(range(6))  # plain top-k: six copies of one box
    # too few survivors: the best suppressed proposals fill the remaining queries
    many = dec._nms_topk(boxes_unsig[:, :20], scores[:, :20])[0]
    assert many.tolist() == list(range(6))


def test_input_is_rgb01_normalized_inside_like_torchvision():
    """The plain API takes RGB in [0, 1] (ToTensor()) and normalizes with ImageNet statistics."""
    from dinov2od.layers import IMAGENET_MEAN, IMAGENET_STD

    model = tiny_detector().double().eval()
    images = torch.rand(2, 3, 42, 56, dtype=torch.float64)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64)[:, None, None]
    with torch.no_grad():
        raw = model(images)
        pre = model((images - mean) / std, normalized=True)
        wrong = model(images, normalized=True)  # skipping the normalization changes the outputs
        one = model(images[0])  # a single (3, H, W) image
        listed = model([images[0], images[1, :, :28, :42]])  # a list of sizes: padded inside
        alone = model(images[1:, :, :28, :42])
    for k in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(raw[k], pre[k], rtol=1e-6, atol=1e-6)  # float32 statistics
        torch.testing.assert_close(one[k], raw[k][:1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(listed[k][1:], alone[k], rtol=1e-8, atol=1e-8)
    assert (wrong["pred_logits"] - raw["pred_logits"]).abs().max() > 1e-3


def test_predict_returns_topk_boxes_in_pixels_of_each_image():
    model = tiny_detector().double().eval()
    a, b = torch.rand(3, 42, 56, dtype=torch.float64), torch.rand(3, 28, 70, dtype=torch.float64)
    dets = model.predict([a, b], topk=7)
    with torch.no_grad():
        out = model(b)
    logits, boxes = out["pred_logits"][0], out["pred_boxes"][0]
    scores, idx = logits.sigmoid().flatten().topk(7)
    q, c = idx // logits.shape[1], idx % logits.shape[1]
    cx, cy, w, h = boxes[q].unbind(-1)
    expected = torch.stack([(cx - w / 2) * 70, (cy - h / 2) * 28, (cx + w / 2) * 70, (cy + h / 2) * 28], -1)
    bound = torch.tensor([70.0, 28.0, 70.0, 28.0], dtype=expected.dtype)
    expected = torch.minimum(expected.clamp(min=0), bound)  # clipped to the image, as Detectron2 does
    assert [len(d["scores"]) for d in dets] == [7, 7]
    torch.testing.assert_close(dets[1]["scores"], scores.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dets[1]["labels"], c)
    torch.testing.assert_close(dets[1]["boxes"], expected.float(), rtol=1e-5, atol=1e-4)
    # between the 4th and 5th scores: at exactly the 4th, a difference in the last bit between this
    # forward and predict's decided whether it was kept (a 1-in-7 flake)
    kept = model.predict(b, topk=7, threshold=float(scores[3] + scores[4]) / 2)[0]
    assert len(kept["scores"]) == 4


def test_load_checkpoint_reads_plain_and_detectron2_checkpoints(tmp_path):
    src = tiny_detector().eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    torch.save(src.state_dict(), tmp_path / "plain.pth")
    d2 = {"model": {f"detector.{k}": v.numpy() for k, v in src.state_dict().items()}, "iteration": 7}
    d2["model"]["criterion.empty_weight"] = torch.ones(4).numpy()  # other meta-arch parts are ignored
    torch.save(d2, tmp_path / "d2.pth")
    x = torch.rand(1, 3, 42, 56)
    with torch.no_grad():
        ref = src(x)["pred_boxes"]
        for name in ("plain.pth", "d2.pth"):  # numpy arrays need full unpickling: the opt-in (SECURITY.md)
            out = tiny_detector().load_checkpoint(str(tmp_path / name), trusted=name == "d2.pth").eval()(x)
            torch.testing.assert_close(out["pred_boxes"], ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit this detector"):
        tiny_detector(num_queries=7).load_checkpoint(str(tmp_path / "plain.pth"))


def test_bf16_predict_is_refused_on_cpus_without_native_bf16(monkeypatch):
    from dinov2od.layers import precision

    model = tiny_detector().eval()
    image = torch.rand(3, 40, 50)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with pytest.raises(RuntimeError, match="avx512_bf16"):
        model.predict(image, precision="bfloat16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    bf16 = model.predict(image, topk=5, precision="bfloat16")[0]
    fp32 = model.predict(image, topk=5)[0]
    assert bf16["boxes"].shape == fp32["boxes"].shape == (5, 4)


def test_nothing_padded_skips_the_masks_and_gives_the_masked_result():
    """A batch without padding runs without masks (the fused attention kernel); an all-False mask
    gives the same outputs as no mask."""
    torch.manual_seed(0)
    model = tiny_detector().eval()
    perturb(model)
    images = torch.rand(2, 3, 56, 70)
    with torch.no_grad():
        x, masks, valid_hw = model.pad(images, torch.zeros(2, 56, 70, dtype=torch.bool))
        assert masks is None and valid_hw is None and x is images  # no copy, no mask
        feats, patch_mask = model.backbone.forward_padded(x, None)
        assert patch_mask is None
        plain = model(images)
        masked = model(images, torch.zeros(2, 56, 70, dtype=torch.bool))
        # the masked code path (image 1 padded to 42 x 56) gives image 0 what the unmasked one gives
        pad = torch.zeros(2, 56, 70, dtype=torch.bool)
        pad[1, 42:] = pad[1, :, 56:] = True
        forced = model.forward_padded(model.normalize(images), pad, torch.tensor([[56, 70], [42, 56]]))
    torch.testing.assert_close(plain["pred_logits"], masked["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(forced["pred_logits"][0], plain["pred_logits"][0], rtol=0, atol=1e-5)
    assert (forced["pred_logits"][1] - plain["pred_logits"][1]).abs().max() > 1e-3  # image 1 was masked


def test_one_value_projection_for_all_decoder_layers_equals_one_per_layer(monkeypatch):
    """DeformableDecoder._project_values: the layers' value projections of the memory in one product
    give the outputs and gradients of one projection per layer (padded batch, training and eval)."""
    from dinov2od.modeling.decoder import DeformableDecoder

    torch.manual_seed(0)
    model = tiny_detector(num_decoder_layers=3)
    with torch.no_grad():  # the layers start as copies of one: make their projections differ
        for layer in model.decoder.layers:
            layer.cross_attn.value_proj.weight.add_(torch.randn_like(layer.cross_attn.value_proj.weight) * 0.1)
            layer.cross_attn.value_proj.bias.normal_(0, 0.1)
        for p in model.decoder.box_heads.parameters():  # zero-initialized: boxes would ignore the values
            p.normal_(0, 0.1)
    images = torch.rand(2, 3, 56, 70)
    masks = torch.zeros(2, 56, 70, dtype=torch.bool)
    masks[1, :, 42:] = True

    def run(stacked, train):
        monkeypatch.setattr(DeformableDecoder, "stack_value_proj", stacked)
        model.train(train)
        model.zero_grad(set_to_none=True)
        out = model(images, masks)
        if train:
            (out["pred_boxes"].sum() + out["pred_logits"].sum()).backward()
            return out, model.decoder.layers[1].cross_attn.value_proj.weight.grad.clone()
        return out, None

    for train in (True, False):
        with torch.set_grad_enabled(train):
            (a, ga), (b, gb) = run(False, train), run(True, train)
        torch.testing.assert_close(b["pred_logits"], a["pred_logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["pred_boxes"], a["pred_boxes"], rtol=1e-5, atol=1e-5)
        if train:
            assert ga.abs().max() > 0
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    # negative control: the stacked projections handed to the layers in the wrong order change the result
    original = DeformableDecoder._project_values
    monkeypatch.setattr(DeformableDecoder, "_project_values", lambda self, *a: original(self, *a)[::-1])
    with torch.no_grad():
        c, _ = run(True, False)
    assert (c["pred_boxes"] - a["pred_boxes"]).abs().max() > 1e-3
    assert (c["pred_logits"] - a["pred_logits"]).abs().max() > 1e-3


def test_one_value_projection_under_cpu_bfloat16_autocast(monkeypatch):
    """At inference under CPU bfloat16 autocast the stacked value projection is oneDNN's bfloat16
    product with the bias fused: each layer's values against float64 ``memory @ W^T + b`` within
    the rounding of bfloat16 products, no further from it than the layer's own projection as
    autocast runs it, padded tokens zero."""
    from dinov2od.layers.precision import native_cpu_bf16

    if not native_cpu_bf16():
        pytest.skip("this CPU has no native bfloat16: the bfloat16 inference path is not taken here")
    torch.manual_seed(0)
    decoder = tiny_detector(num_decoder_layers=3).eval().decoder
    with torch.no_grad():
        for layer in decoder.layers:
            layer.cross_attn.value_proj.weight.add_(torch.randn_like(layer.cross_attn.value_proj.weight) * 0.3)
            layer.cross_attn.value_proj.bias.normal_(0, 0.3)
    memory = torch.randn(2, 50, 32).bfloat16()  # the neck's maps under autocast are bfloat16
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[1, 40:] = True
    calls = []
    from dinov2od.layers import fused_linear

    bf16_linear = fused_linear.bf16_linear
    monkeypatch.setattr(fused_linear, "bf16_linear", lambda *a: calls.append(a[1].shape) or bf16_linear(*a))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        values = decoder._project_values(memory, mask)
        own = [layer.cross_attn.value_proj(memory).masked_fill(mask[..., None], 0) for layer in decoder.layers]
    assert calls == [(3 * 32, 32)]  # one product for the three layers

    def worst(per_layer):
        """Largest error of each layer's values against float64, in units of the bfloat16 bound."""
        out = []
        for v, layer in zip(per_layer, decoder.layers):
            w, b = layer.cross_attn.value_proj.weight.double(), layer.cross_attn.value_proj.bias.double()
            ref = F.linear(memory.double(), w, b).masked_fill(mask[..., None], 0)
            bound = 2 ** -7 * F.linear(memory.double().abs(), w.abs(), b.abs()) + 1e-6
            out.append(float(((v.double() - ref).abs() / bound).max()))
        return max(out)

    assert all(v.dtype == torch.bfloat16 for v in values)
    assert all(float(v[1, 40:].abs().max()) == 0 for v in values)
    assert worst(values) <= 1.0 and worst(values) <= 2 * worst(own) + 0.05, (worst(values), worst(own))
    # negative control: the stacked values handed to the layers in the wrong order
    assert worst(values[::-1]) > 1.0
