"""DINOv3Backbone: shapes, masks, transformers and Meta equivalence, weight loading, LoRA (no downloads).

The Meta reference below is written here from the semantics of Meta's ``DinoVisionTransformer``
(``dinov3/models/vision_transformer.py`` with its hub builders' settings: RoPE base 100, coordinates
normalized per axis and computed in float32, ``mask_k_bias``, storage tokens, LayerNorm eps 1e-5).
It reads an official-layout state dict directly, so it shares no code with the backbone or with
``transformers``.
"""
import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F

from dinov2od.modeling import (
    DINOv2Backbone,
    DINOv2ObjectDetector,
    DINOv3Backbone,
    PretrainedWeightsUnavailable,
    build_backbone,
    build_dinov3_config,
)

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
SIZES = [(64, 64), (48, 80), (112, 48), (80, 112), (32, 144)]  # multiples of the 16-px patch, wide and tall


def hf_dinov3(**overrides):
    """A tiny DINOv3ViTModel with non-trivial layer scales, biases and tokens."""
    from transformers import DINOv3ViTModel

    torch.manual_seed(0)
    model = DINOv3ViTModel(build_dinov3_config("tiny", **{**TINY, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(torch.rand_like(p) * 0.9 + 0.1)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def to_official(model):
    """The model's weights in Meta's official DINOv3 layout, as a released ``.pth`` holds them.

    Without a key bias (``mask_k_bias``) the fused qkv bias carries a random key part and a
    ``bias_mask`` of (1, 0, 1) that zeroes it, as Meta's files do; with one, no mask.
    """
    cfg = model.config
    dim, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    emb = model.embeddings
    out = {"cls_token": emb.cls_token, "storage_tokens": emb.register_tokens, "mask_token": emb.mask_token[0],
           "patch_embed.proj.weight": emb.patch_embeddings.weight, "patch_embed.proj.bias": emb.patch_embeddings.bias,
           "rope_embed.periods": cfg.rope_theta ** (torch.arange(head_dim // 4) / (head_dim // 4)),
           "norm.weight": model.norm.weight, "norm.bias": model.norm.bias}
    layers = model.model.layer if hasattr(model, "model") else model.layer
    for i, layer in enumerate(layers):
        p, att, mlp = f"blocks.{i}.", layer.attention, layer.mlp
        out[p + "attn.qkv.weight"] = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
        if att.k_proj.bias is None:
            out[p + "attn.qkv.bias"] = torch.cat([att.q_proj.bias, torch.randn(dim), att.v_proj.bias])
            out[p + "attn.qkv.bias_mask"] = torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)])
        else:
            out[p + "attn.qkv.bias"] = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
        names = {"attn.proj": att.o_proj, "norm1": layer.norm1, "norm2": layer.norm2}
        if hasattr(mlp, "gate_proj"):
            names.update({"mlp.w1": mlp.gate_proj, "mlp.w2": mlp.up_proj, "mlp.w3": mlp.down_proj})
        else:
            names.update({"mlp.fc1": mlp.up_proj, "mlp.fc2": mlp.down_proj})
        for name, mod in names.items():
            out[p + name + ".weight"], out[p + name + ".bias"] = mod.weight, mod.bias
        out[p + "ls1.gamma"], out[p + "ls2.gamma"] = layer.layer_scale1.lambda1, layer.layer_scale2.lambda1
    return {k: v.detach().clone() for k, v in out.items()}


def meta_intermediate_layers(sd, x, blocks, num_heads, eps=1e-5):
    """Meta's ``get_intermediate_layers(x, n=blocks, reshape=True, norm=True)`` in eval mode."""
    b, _, height, width = x.shape
    patch = sd["patch_embed.proj.weight"].shape[-1]
    h, w = height // patch, width // patch
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    storage = sd["storage_tokens"]
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), storage.expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    prefix, dim = 1 + storage.shape[1], t.shape[-1]
    # RoPE in float32: patch centres in [-1, 1] per axis, angle 2 pi coord / period, [y | x] twice
    yy, xx = torch.meshgrid(torch.arange(0.5, h) / h, torch.arange(0.5, w) / w, indexing="ij")
    coords = torch.stack([yy.flatten(), xx.flatten()], 1) * 2 - 1  # (hw, 2)
    angles = 2 * math.pi * coords[:, :, None] / sd["rope_embed.periods"].float()
    angles = torch.cat([angles.flatten(1)] * 2, 1)
    sin, cos = angles.sin().to(x.dtype), angles.cos().to(x.dtype)

    def rotate(z):  # (B, heads, N, Dh): rotate the patch tokens only
        zp = z[:, :, prefix:]
        half = zp.shape[-1] // 2
        turned = torch.cat([-zp[..., half:], zp[..., :half]], -1)
        return torch.cat([z[:, :, :prefix], zp * cos + turned * sin], 2)

    out = []
    for i in range(max(blocks) + 1):
        p = lambda name: sd.get(f"blocks.{i}.{name}")  # noqa: E731
        y = F.layer_norm(t, (dim,), p("norm1.weight"), p("norm1.bias"), eps)
        bias = p("attn.qkv.bias")
        if p("attn.qkv.bias_mask") is not None:  # mask_k_bias
            bias = bias * p("attn.qkv.bias_mask")
        qkv = F.linear(y, p("attn.qkv.weight"), bias).reshape(b, -1, 3, num_heads, dim // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = rotate(q), rotate(k)
        att = (q * (dim // num_heads) ** -0.5) @ k.transpose(-2, -1)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, dim)
        t = t + p("ls1.gamma") * F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(t, (dim,), p("norm2.weight"), p("norm2.bias"), eps)
        if p("mlp.w1.weight") is not None:  # SwiGLU
            gate = F.silu(F.linear(y, p("mlp.w1.weight"), p("mlp.w1.bias")))
            y = F.linear(gate * F.linear(y, p("mlp.w2.weight"), p("mlp.w2.bias")), p("mlp.w3.weight"), p("mlp.w3.bias"))
        else:
            y = F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias")))
            y = F.linear(y, p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + p("ls2.gamma") * y
        if i in blocks:
            f = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps)[:, prefix:]
            out.append(f.reshape(b, h, w, dim).permute(0, 3, 1, 2))
    return out


def max_rel_err(ours, ref):
    return max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(ours, ref))


def base_state(backbone):
    return {k.replace(".base_layer", ""): v for k, v in backbone.vit.state_dict().items() if "lora_" not in k}


def assert_same_weights(backbone, model):
    ours, ref = base_state(backbone), model.state_dict()
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0, msg=k)


VARIANTS = {"mask_k_bias": {}, "swiglu": dict(use_gated_mlp=True), "key_bias": dict(key_bias=True)}


# ---------------------------------------------------------------------------- forward
def test_shapes_taps_and_patch_mask_at_odd_sizes():
    backbone = DINOv3Backbone(arch="tiny", arch_overrides=TINY, num_taps=3)
    assert (backbone.patch_size, backbone.embed_dim, backbone.num_register_tokens) == (16, 32, 4)
    assert backbone.out_indices == (0, 1, 2)
    feats, mask = backbone(torch.randn(2, 3, 57, 30))  # padded to 64 x 32
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 2)] * 3 and mask.shape == (2, 4, 2) and not mask.any()
    m = torch.zeros(2, 57, 30, dtype=torch.bool)
    m[1, 20:] = True
    m[1, :, 10:] = True  # image 1 is 20 x 10 px: 2 x 1 patches
    feats, mask = backbone(torch.randn(2, 3, 57, 30), m)
    assert mask[1].sum() == 8 - 2 and not mask[1, :2, :1].any()
    assert feats[0][1, :, 2:].abs().sum() == 0 and feats[0][1, :, :, 1:].abs().sum() == 0  # zero at padding


@pytest.mark.parametrize("window_size", [None, 2], ids=["global", "windowed"])
def test_padded_batch_equals_one_by_one_float64(window_size):
    """Each image's RoPE comes from its own valid patch grid and padded keys are masked."""
    torch.manual_seed(0)
    backbone = DINOv3Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, lora_rank=0,
                              window_size=window_size).double().eval()
    sizes = [(70, 98), (33, 47), (112, 64)]  # odd sizes: partial patches at the border
    images = [torch.randn(3, h, w, dtype=torch.float64) for h, w in sizes]
    batch = torch.randn(3, 3, 112, 112, dtype=torch.float64) * 5  # garbage under the padding
    masks = torch.ones(3, 112, 112, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        masks[i, : im.shape[1], : im.shape[2]] = False
    with torch.no_grad():
        batched, _ = backbone(batch, masks)
        for i, im in enumerate(images):
            single, _ = backbone(im[None])
            hp, wp = single[0].shape[-2:]
            for a, s in zip(batched, single):
                torch.testing.assert_close(a[i : i + 1, :, :hp, :wp], s, rtol=1e-10, atol=1e-10)
                assert a[i, :, hp:].abs().sum() == 0 and a[i, :, :, wp:].abs().sum() == 0


def test_one_window_equals_global_attention_with_rope(tmp_path):
    """Windowed patches keep their RoPE position in the whole image."""
    hf_dinov3().save_pretrained(tmp_path)
    kw = dict(pretrained=str(tmp_path), out_indices=(2,), lora_rank=0)
    plain = DINOv3Backbone(**kw).double().eval()
    big, small = (DINOv3Backbone(**kw, window_size=ws).double().eval() for ws in (8, 2))
    x = torch.randn(1, 3, 80, 112, dtype=torch.float64)  # 5 x 7 patches
    with torch.no_grad():
        ref = plain(x)[0][0]
        torch.testing.assert_close(big(x)[0][0], ref, rtol=1e-10, atol=1e-10)
        assert (small(x)[0][0] - ref).abs().max() > 1e-3


@pytest.mark.parametrize("variant", ["mask_k_bias", "swiglu"])
def test_matches_transformers_forward_without_padding(tmp_path, variant):
    model = hf_dinov3(**VARIANTS[variant]).double()
    model.save_pretrained(tmp_path)
    backbone = DINOv3Backbone(pretrained=str(tmp_path), out_indices=(2,), lora_rank=0).double().eval()
    for size in [(64, 64), (80, 48)]:
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            (ours,), mask = backbone(x)
            ref = model(pixel_values=x).last_hidden_state
        ref = ref[:, 5:].reshape(2, size[0] // 16, size[1] // 16, -1).permute(0, 3, 1, 2)
        assert not mask.any()
        # both compute RoPE in float32; Meta's periods are divided, transformers' inverse multiplied
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_pth_features_equal_meta_reference_at_every_size(tmp_path, variant):
    sd = {k: v.double() for k, v in to_official(hf_dinov3(**VARIANTS[variant])).items()}
    sd["rope_embed.periods"] = sd["rope_embed.periods"].float()
    torch.save(sd, tmp_path / "dinov3_tiny.pth")
    backbone = DINOv3Backbone(arch="tiny", arch_overrides={**TINY, **VARIANTS[variant]},
                              pretrained=str(tmp_path / "dinov3_tiny.pth"), num_taps=3, lora_rank=0).double().eval()
    for size in SIZES:
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            ours, _ = backbone(x)
        ref = meta_intermediate_layers(sd, x, backbone.out_indices, TINY["num_attention_heads"])
        assert max_rel_err(ours, ref) <= 1e-6, size  # float64 except the float32 RoPE tables


# ---------------------------------------------------------------------------- weights
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_official_pth_round_trip(tmp_path, variant, caplog):
    model = hf_dinov3(**VARIANTS[variant])
    sd = to_official(model)
    sd["local_cls_norm.weight"] = torch.ones(TINY["hidden_size"])  # 7B / SAT files: dropped, not reported
    sd["head.weight"] = torch.zeros(2, 2)  # an unknown key: reported, not fatal
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    with caplog.at_level(logging.WARNING, logger="dinov2od"):
        backbone = DINOv3Backbone(arch="tiny", arch_overrides={**TINY, **VARIANTS[variant]},
                                  pretrained=str(tmp_path / "ckpt.pth"), num_taps=3, lora_rank=2)
    assert_same_weights(backbone, model)
    assert "head.weight" in caplog.text and "local_cls_norm" not in caplog.text
    assert backbone.vit.config.key_bias == (variant == "key_bias")


def test_official_pth_refuses_other_architectures_and_families(tmp_path):
    sd = to_official(hf_dinov3())
    torch.save(sd, tmp_path / "v3.pth")
    kw = dict(num_taps=3, lora_rank=0)
    for wrong in (dict(num_hidden_layers=4), dict(num_attention_heads=1)):  # heads: read off the RoPE periods
        with pytest.raises(ValueError, match="another architecture"):
            DINOv3Backbone(arch="tiny", arch_overrides={**TINY, **wrong}, pretrained=str(tmp_path / "v3.pth"), **kw)
    with pytest.raises(ValueError, match="matches no released arch"):
        DINOv3Backbone(pretrained=str(tmp_path / "v3.pth"), **kw)
    with pytest.raises(ValueError, match="family='dinov3'"):
        DINOv2Backbone(arch="tiny", pretrained=str(tmp_path / "v3.pth"), **kw)
    torch.save({"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
                "patch_embed.proj.weight": torch.zeros(8, 3, 14, 14)}, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match="DINOv2 checkpoint.*family='dinov2'"):
        DINOv3Backbone(arch="tiny", pretrained=str(tmp_path / "v2.pth"), **kw)
    bad = dict(sd, **{"rope_embed.periods": sd["rope_embed.periods"] ** 2})  # base 100 ** 2
    torch.save(bad, tmp_path / "rope.pth")
    with pytest.raises(ValueError, match="RoPE periods"):
        DINOv3Backbone(arch="tiny", arch_overrides=TINY, pretrained=str(tmp_path / "rope.pth"), **kw)
    del sd["blocks.1.attn.proj.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks 1 weight"):
        DINOv3Backbone(arch="tiny", arch_overrides=TINY, pretrained=str(tmp_path / "partial.pth"), **kw)
    with pytest.raises(PretrainedWeightsUnavailable, match="does not exist"):
        DINOv3Backbone(arch="tiny", pretrained=str(tmp_path / "nope.pth"))


def test_hf_folder_round_trip_and_refusals(tmp_path, monkeypatch):
    from transformers import Dinov2Model

    model = hf_dinov3(use_gated_mlp=True)
    model.save_pretrained(tmp_path / "v3")
    backbone = DINOv3Backbone(pretrained=str(tmp_path / "v3"), num_taps=3, lora_rank=4)
    assert_same_weights(backbone, model)
    with pytest.raises(ValueError, match="arch='small'"):
        DINOv3Backbone(arch="small", pretrained=str(tmp_path / "v3"))
    from dinov2od.modeling import build_dinov2_config

    Dinov2Model(build_dinov2_config("tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64)).save_pretrained(tmp_path / "v2")
    with pytest.raises(ValueError, match="not a DINOv3 ViT.*family='dinov2'"):
        DINOv3Backbone(pretrained=str(tmp_path / "v2"))
    with pytest.raises(ValueError, match="not a DINOv2 ViT.*family='dinov3'"):
        DINOv2Backbone(pretrained=str(tmp_path / "v3"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        DINOv3Backbone(pretrained="facebook/dinov3-vitb16-pretrain-lvd1689m")
    msg = str(err.value)
    assert "DINOv3 weights 'facebook/dinov3-vitb16-pretrain-lvd1689m'" in msg and "--local-dir" in msg


def test_folder_in_hub_layout_loads_under_any_transformers(tmp_path):
    """The hub's DINOv3 files name the blocks ``layer.N`` (transformers 4); transformers 5 keeps them
    under ``model.layer.N``. Write such a folder by hand and load it."""
    from safetensors.torch import save_file

    model = hf_dinov3()
    v4 = {re.sub(r"^model\.layer\.", "layer.", k): v.contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("layer.0.") for k in v4)
    save_file(v4, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(tmp_path / "config.json"))
    assert_same_weights(DINOv3Backbone(pretrained=str(tmp_path), num_taps=3, lora_rank=0), model)


def test_known_architectures_build_configs_without_download():
    expected = {"small": (384, 12, 6, 1536, False), "small_plus": (384, 12, 6, 1536, True),
                "base": (768, 12, 12, 3072, False), "large": (1024, 24, 16, 4096, False),
                "huge_plus": (1280, 32, 20, 5120, True), "7b": (4096, 40, 32, 8192, True)}
    for arch, fields in expected.items():
        c = build_dinov3_config(arch)
        got = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.use_gated_mlp)
        assert got == fields, arch
        assert (c.patch_size, c.num_register_tokens, c.rope_theta, c.key_bias) == (16, 4, 100.0, False)
        assert c.layer_norm_eps == 1e-5
        assert c.hidden_act == ("silu" if c.use_gated_mlp else "gelu")
    assert not build_dinov3_config("7b").query_bias
    with pytest.raises(ValueError, match="unknown DINOv3 arch"):
        build_dinov3_config("giant")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_dinov3_config("tiny", hidden_size=36, num_attention_heads=6)


# ---------------------------------------------------------------------------- LoRA, training
@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
def test_lora_on_every_target_trains_only_adapters_and_gets_gradients(gated):
    backbone = DINOv3Backbone(arch="tiny", arch_overrides={**TINY, "use_gated_mlp": gated}, num_taps=3,
                              lora_rank=4, lora_targets=("query", "key", "value", "output", "fc1", "fc2"),
                              lora_blocks=(1, 2))
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {re.sub(r"\.lora_[AB].*", "", n) for n in trainable}
    per_block = 7 if gated else 6  # fc1 is gate_proj + up_proj in SwiGLU
    assert len(adapted) == 2 * per_block and all(re.search(r"layer\.[12]\.", n) for n in adapted)
    feats, _ = backbone(torch.randn(2, 3, 48, 64))
    sum(f.square().mean() for f in feats).backward()
    for n, p in backbone.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    assert all(p.grad.abs().sum() > 0 for n, p in backbone.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_freeze_false_trains_everything_that_runs_and_lora_starts_as_identity(lora_rank):
    kw = dict(arch="tiny", arch_overrides=TINY, out_indices=(0, 1), rope_train_augment=False)
    torch.manual_seed(0)
    plain = DINOv3Backbone(**kw, lora_rank=0).eval()
    torch.manual_seed(0)  # the same ViT weights; LoRA's B starts at zero
    backbone = DINOv3Backbone(**kw, lora_rank=lora_rank, freeze=False).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(plain(x)[0], backbone(x)[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    feats, _ = backbone.train()(x)
    sum(f.sum() for f in feats).backward()
    assert [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None] == []
    assert backbone._layers[0].attention.q_proj.weight.requires_grad or lora_rank  # the ViT's own weights train
    assert all(p.requires_grad for n, p in backbone._layers[1].named_parameters())
    assert not any(p.requires_grad for p in backbone._layers[2].parameters())  # after the last tap: never run
    assert not backbone.vit.embeddings.mask_token.requires_grad


def test_rope_coordinates_are_augmented_in_training_only(tmp_path):
    hf_dinov3().save_pretrained(tmp_path)  # layer scales of O(1), so attention (and RoPE) matter
    backbone = DINOv3Backbone(pretrained=str(tmp_path), num_taps=3, lora_rank=0)
    fixed = DINOv3Backbone(pretrained=str(tmp_path), num_taps=3, lora_rank=0, rope_train_augment=False)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ref = backbone.eval()(x)[0][-1]
        torch.testing.assert_close(backbone(x)[0][-1], ref, rtol=0, atol=0)
        torch.testing.assert_close(fixed.train()(x)[0][-1], ref)
        a, b = backbone.train()(x)[0][-1], backbone(x)[0][-1]  # released config: rescale in [1/2, 2]
    assert (a - ref).abs().max() > 1e-4 and (a - b).abs().max() > 1e-4


def test_bfloat16_autocast_forward_and_backward_on_cpu():
    backbone = DINOv3Backbone(arch="tiny", arch_overrides=TINY, num_taps=2, lora_rank=4, window_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats, _ = backbone(torch.randn(2, 3, 48, 80))
    assert all(torch.isfinite(f).all() for f in feats)
    sum(f.float().square().mean() for f in feats).backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- one field selects the family
def test_family_field_selects_the_backbone_and_refuses_foreign_options(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kw = dict(arch="tiny", arch_overrides=TINY, num_taps=2, lora_rank=0)
    v3 = build_backbone(family="DINOv3", registers=False, pos_embed_init="sincos", **kw)
    assert isinstance(v3, DINOv3Backbone) and v3.family == "dinov3"
    v2 = build_backbone(**{**kw, "arch_overrides": {}})
    assert isinstance(v2, DINOv2Backbone) and v2.family == "dinov2"
    with pytest.raises(ValueError, match="registers= applies to family='dinov2' only"):
        build_backbone(family="dinov3", registers=True, **kw)
    with pytest.raises(ValueError, match="rope_train_augment= applies to family='dinov3' only"):
        build_backbone(family="dinov2", rope_train_augment=False, arch="tiny")
    with pytest.raises(ValueError, match="family='dinov4' is unknown"):
        build_backbone(family="dinov4")
    model = DINOv2ObjectDetector(num_classes=3, backbone=dict(family="dinov3", **kw), hidden_dim=32,
                                 scale_factors=(2.0, 1.0, 0.5), num_queries=10, num_decoder_layers=2,
                                 num_heads=4, dim_feedforward=64).eval()
    assert model.neck.strides == (8.0, 16.0, 32.0)
    dets = model.predict([torch.rand(3, 70, 90), torch.rand(3, 40, 33)], topk=5)
    assert [d["boxes"].shape for d in dets] == [(5, 4), (5, 4)]


def test_layer_wise_lr_decay_reads_dinov3_blocks():
    from dinov2od.modeling import backbone_lr_decay, num_vit_layers

    model = DINOv2ObjectDetector(num_classes=3, backbone=dict(family="dinov3", arch="tiny", arch_overrides=TINY,
                                                              num_taps=3, lora_rank=0, freeze=False),
                                 hidden_dim=32, num_queries=10, num_decoder_layers=1, num_heads=4, dim_feedforward=64)
    assert num_vit_layers(model) == 3
    f = backbone_lr_decay(0.5, model=model)
    names = [n for n, _ in model.named_parameters()]
    block0 = next(n for n in names if re.search(r"vit\.(model\.)?layer\.0\.", n))
    assert f(block0) == 0.5 ** 3 and f("backbone.vit.embeddings.cls_token") == 0.5 ** 4
    assert f("backbone.vit.norm.weight") == 1


def test_benchmark_constructor_builds_dinov3_small_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = DINOv2ObjectDetector(num_classes=80, backbone=dict(family="dinov3", arch="small"))
    bb = model.backbone
    assert isinstance(bb, DINOv3Backbone) and (bb.embed_dim, bb.patch_size, bb.out_indices) == (384, 16, (2, 5, 8, 11))
