"""DINOv2Backbone: HF equivalence, LoRA/freezing, taps, weight loading (no downloads)."""
import logging
import math
import re

import pytest
import torch

from dinov2od.modeling import (
    DINOv2Backbone,
    PretrainedWeightsUnavailable,
    build_dinov2_config,
)

from tests.helpers.backbone import TINY, hf_model, to_official


def base_state(backbone):
    """The backbone's ViT weights under plain HF names (LoRA wrappers removed)."""
    return {k.replace(".base_layer", ""): v for k, v in backbone.vit.state_dict().items() if "lora_" not in k}


def assert_same_weights(backbone, model):
    ours, ref = base_state(backbone), model.state_dict()
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize("size", [(56, 56), (70, 42)])  # native grid and interpolated
def test_matches_hf_forward_without_padding(tmp_path, registers, size):
    model = hf_model(registers)
    model.save_pretrained(tmp_path)
    # transformers resizes the position embeddings with size=(h, w); the default follows Meta
    backbone = DINOv2Backbone(pretrained=str(tmp_path), out_indices=(2,), lora_rank=0,
                              pos_interpolation="transformers").eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        (ours,), mask = backbone(x)
        ref = model(pixel_values=x).last_hidden_state
    prefix = 1 + (4 if registers else 0)
    ref = ref[:, prefix:].reshape(2, size[0] // 14, size[1] // 14, -1).permute(0, 3, 1, 2)
    assert not mask.any()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_taps_shapes_and_padding_mask():
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3)
    assert backbone.out_indices == (0, 1, 2)
    feats, mask = backbone(torch.randn(2, 3, 57, 30))  # padded to 70 x 42
    assert [tuple(f.shape) for f in feats] == [(2, 32, 5, 3)] * 3
    assert mask.shape == (2, 5, 3) and not mask.any()  # 57 px -> 5 patches, all hold pixels
    m = torch.zeros(2, 57, 30, dtype=torch.bool)
    m[1, 28:] = True
    m[1, :, 14:] = True
    _, mask = backbone(torch.randn(2, 3, 57, 30), m)
    assert mask[1].sum() == 15 - 2 and not mask[1, :2, :1].any()


def test_default_out_indices_are_evenly_spaced():
    assert DINOv2Backbone._resolve_out_indices(None, 4, 12) == (2, 5, 8, 11)
    assert DINOv2Backbone._resolve_out_indices(None, 4, 40) == (9, 19, 29, 39)
    with pytest.raises(ValueError, match="out_indices"):
        DINOv2Backbone._resolve_out_indices((3, 1), 4, 12)
    with pytest.raises(ValueError, match="num_taps"):
        DINOv2Backbone._resolve_out_indices(None, 13, 12)


def test_bad_mask_is_refused():
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3)
    m = torch.zeros(1, 28, 28, dtype=torch.bool)
    m[0, 3, 3] = True  # a hole, not bottom/right padding
    with pytest.raises(ValueError, match="top-left valid region"):
        backbone(torch.randn(1, 3, 28, 28), m)


def test_known_architectures_build_configs_without_download():
    for arch, width, depth in [("small", 384, 12), ("base", 768, 12), ("large", 1024, 24), ("giant", 1536, 40)]:
        cfg = build_dinov2_config(arch)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size, cfg.image_size) == (width, depth, 14, 518)
    assert build_dinov2_config("giant").use_swiglu_ffn
    assert build_dinov2_config("base", registers=True).num_register_tokens == 4
    with pytest.raises(ValueError, match="unknown DINOv2 arch"):
        build_dinov2_config("huge")


# ---------------------------------------------------------------------------- LoRA
def test_frozen_backbone_trains_only_lora_and_grads_reach_it(caplog):
    with caplog.at_level(logging.INFO, logger="dinov2od"):
        backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, lora_rank=4, lora_blocks=(1, 2))
    assert any("trainable" in r.getMessage() for r in caplog.records)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # adapters on query and value of blocks 1 and 2 only
    adapted = {re.sub(r"\.lora_[AB].*", "", n) for n in trainable}
    assert len(adapted) == 4 and all(re.search(r"layer\.[12]\.", n) for n in adapted)
    assert all(re.search(r"(query|value|q_proj|v_proj)$", n) for n in adapted)

    feats, _ = backbone(torch.randn(2, 3, 42, 56))
    sum(f.square().mean() for f in feats).backward()
    for n, p in backbone.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    # B starts at zero, so A's first gradient is zero; B's is not
    assert any(p.grad.abs().sum() > 0 for n, p in backbone.named_parameters() if "lora_B" in n)


def test_lora_starts_as_identity_and_freeze_false_trains_everything(tmp_path):
    model = hf_model()
    model.save_pretrained(tmp_path)
    plain = DINOv2Backbone(pretrained=str(tmp_path), num_taps=3, lora_rank=0).eval()
    lora = DINOv2Backbone(pretrained=str(tmp_path), num_taps=3, lora_rank=8, lora_targets=("query", "key", "value", "output", "fc1"),
                          freeze=False).eval()
    assert all(p.requires_grad for n, p in lora.named_parameters() if "mask_token" not in n)
    x = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        for a, b in zip(plain(x)[0], lora(x)[0]):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, lora_targets=("qkv",))


# ---------------------------------------------------------------------------- HF folder
def test_hf_folder_round_trip_and_arch_check(tmp_path):
    model = hf_model()
    model.save_pretrained(tmp_path)
    backbone = DINOv2Backbone(pretrained=str(tmp_path), num_taps=3, lora_rank=4)
    assert_same_weights(backbone, model)
    with pytest.raises(ValueError, match="arch='small'"):
        DINOv2Backbone(arch="small", pretrained=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PretrainedWeightsUnavailable, match="from the folder"):
        DINOv2Backbone(pretrained=str(empty))


def test_unreachable_hub_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        DINOv2Backbone(pretrained="facebook/dinov2-base")
    msg = str(err.value)
    assert "facebook/dinov2-base" in msg and "download" in msg and "pretrained='<folder>'" in msg


# ---------------------------------------------------------------------------- official .pth
@pytest.mark.parametrize("variant", [dict(), dict(registers=True), dict(use_swiglu_ffn=True)],
                         ids=["plain", "registers", "swiglu"])
def test_official_pth_round_trip(tmp_path, variant):
    registers = variant.pop("registers", False)
    model = hf_model(registers, **variant)
    path = tmp_path / "dinov2_tiny_pretrain.pth"
    sd = to_official(model)
    sd["head.weight"] = torch.zeros(2, 2)  # an extra key: reported, not fatal
    torch.save(sd, path)
    backbone = DINOv2Backbone(arch="tiny", arch_overrides={**TINY, **variant}, registers=registers,
                              pretrained=str(path), num_taps=3, lora_rank=2)
    assert_same_weights(backbone, model)


def test_official_pth_refuses_other_architecture(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(to_official(hf_model()), path)
    with pytest.raises(ValueError, match="another architecture"):
        DINOv2Backbone(arch="tiny", arch_overrides={**TINY, "num_hidden_layers": 4}, pretrained=str(path))
    with pytest.raises(ValueError, match="matches no released arch"):
        DINOv2Backbone(pretrained=str(path))  # width 32 is none of small/base/large/giant
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="not an official DINOv2"):
        DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, pretrained=str(tmp_path / "resnet.pth"))
    sd = to_official(hf_model())
    del sd["blocks.1.attn.proj.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="lacks 1 weight"):
        DINOv2Backbone(arch="tiny", arch_overrides=TINY, pretrained=str(tmp_path / "partial.pth"), num_taps=3)
    with pytest.raises(PretrainedWeightsUnavailable, match="does not exist"):
        DINOv2Backbone(arch="tiny", pretrained=str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------------------- windowed attention
def test_windowed_attention_one_window_equals_global_and_padding_is_invisible():
    torch.manual_seed(0)
    kw = dict(arch="tiny", arch_overrides=TINY, registers=True, out_indices=(2,), lora_rank=0)
    plain = DINOv2Backbone(**kw).double().eval()
    big_window = DINOv2Backbone(**kw, window_size=16).double().eval()
    small_window = DINOv2Backbone(**kw, window_size=2).double().eval()
    assert small_window.window_blocks == (0, 1)
    for m in (big_window, small_window):
        m.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 70, 98, dtype=torch.float64)  # 5 x 7 patches
    with torch.no_grad():
        ref = plain(x)[0][0]
        torch.testing.assert_close(big_window(x)[0][0], ref)  # one window holds everything
        windowed = small_window(x)[0][0]
        assert (windowed - ref).abs().max() > 1e-3  # windows do change the result
        # the same image inside a padded batch (garbage under the padding) gives the same features
        batch = torch.randn(2, 3, 100, 120, dtype=torch.float64)
        batch[0, :, :70, :98] = x[0]
        mask = torch.ones(2, 100, 120, dtype=torch.bool)
        mask[0, :70, :98] = False
        mask[1, :50, :60] = False
        torch.testing.assert_close(small_window(batch, mask)[0][0][:1, :, :5, :7], windowed)


@pytest.mark.parametrize("family,registers,size", [
    ("dinov2", False, (84, 112)),  # 6 x 8 patches: whole windows of 2
    ("dinov2", True, (70, 98)),  # 5 x 7: ragged windows
    ("dinov3", False, (80, 112)),  # RoPE, 4 register tokens, 5 x 7
])
def test_windows_written_once_compute_the_cat_formulation(family, registers, size, monkeypatch):
    """The windowed attention that copies each activation once (the default) gives the features
    and gradients of the first formulation (reshape + cat), alone and in a padded batch, in training
    (LoRA, grads) and at inference; negative control: windows read in the wrong order differ."""
    from dinov2od.modeling import ViTBackbone
    from dinov2od.modeling import DINOv3Backbone

    torch.manual_seed(0)
    if family == "dinov2":
        bb = DINOv2Backbone(arch="tiny", arch_overrides=TINY, registers=registers, out_indices=(2,),
                            lora_rank=2, window_size=2)
    else:
        bb = DINOv3Backbone(arch="tiny", arch_overrides=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                             intermediate_size=64), out_indices=(2,), lora_rank=2, window_size=2)
    assert bb.window_blocks == (0, 1)
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 3, *size)
    mask = torch.zeros(2, *size, dtype=torch.bool)
    mask[1, size[0] // 2:, :] = True
    mask[1, :, size[1] // 3:] = True

    def run(copies, train):
        monkeypatch.setattr(ViTBackbone, "window_copies", copies)
        torch.manual_seed(1)  # DINOv3's RoPE augmentation draws random numbers in training
        bb.train(train)
        bb.zero_grad()
        outs = [bb(x)[0][0], bb(x, mask)[0][0]]
        if train:
            sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs).backward()
            return outs + [p.grad.clone() for p in bb.parameters() if p.requires_grad]
        return outs

    for train in (True, False):
        with torch.set_grad_enabled(train):
            once, cat = run("once", train), run("cat", train)
        for a, b in zip(once, cat):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    original = ViTBackbone._window_attention_tokens_first

    def swapped(self, q, k, v, *args):  # the windows of the second image read in reverse order
        out = original(self, q, k, v, *args)
        return torch.cat([out[:1], out[1:].flip(1)])

    monkeypatch.setattr(ViTBackbone, "_window_attention_tokens_first", swapped)
    with torch.no_grad():
        assert (run("once", False)[1] - cat[1]).abs().max() > 1e-3


@pytest.mark.parametrize("freeze,lora_rank", [(False, 0), (False, 4), (True, 4)])
def test_every_trainable_parameter_gets_a_gradient(freeze, lora_rank):
    """DDP-safe: blocks after the last tap (never run) and the mask token are not trainable."""
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY, out_indices=(0, 1), freeze=freeze,
                              lora_rank=lora_rank, apply_layernorm=False)
    feats, _ = backbone(torch.randn(1, 3, 42, 42))
    sum(f.sum() for f in feats).backward()
    assert [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not any(p.requires_grad for p in backbone.vit.encoder.layer[2].parameters())


def test_folder_in_hub_layout_loads_under_any_transformers(tmp_path):
    """The hub's DINOv2 files use transformers-4 names (attention.attention.query, weights_in);
    transformers 5 renames them on load. Write such a folder by hand and load it."""
    from safetensors.torch import save_file

    model = hf_model(use_swiglu_ffn=True)
    v4 = {}
    for k, v in model.state_dict().items():
        k = (k.replace("attention.q_proj", "attention.attention.query")
             .replace("attention.k_proj", "attention.attention.key")
             .replace("attention.v_proj", "attention.attention.value")
             .replace("attention.o_proj", "attention.output.dense"))
        if "mlp.gate_proj" in k:
            v = torch.cat([v, model.state_dict()[k.replace("gate_proj", "up_proj")]], 0)
            k = k.replace("gate_proj", "weights_in")
        elif "mlp.up_proj" in k:
            continue
        k = k.replace("mlp.down_proj", "mlp.weights_out")
        v4[k] = v.contiguous()
    assert any("attention.attention.query" in k for k in v4) and any("weights_in" in k for k in v4)
    save_file(v4, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(tmp_path / "config.json"))
    backbone = DINOv2Backbone(pretrained=str(tmp_path), num_taps=3, lora_rank=0)
    assert_same_weights(backbone, model)


@pytest.mark.parametrize("spelled", ["None", "null", ""])
def test_pretrained_spelled_as_none_means_random_init(spelled, monkeypatch):
    """Command-line overrides deliver ``pretrained=None`` as a string; it must not reach the hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, pretrained=spelled)
    assert backbone.embed_dim == TINY["hidden_size"]


def test_random_init_position_embeddings_are_sincos_and_loaded_ones_are_kept(tmp_path):
    from dinov2od.modeling.backbones.dinov2 import sincos_pos_embed_2d

    pe = sincos_pos_embed_2d(4, 5, 8)
    assert pe.shape == (20, 8)
    # x channels depend only on the column, y channels only on the row
    grid = pe.view(4, 5, 8)
    torch.testing.assert_close(grid[0, :, :4], grid[3, :, :4])
    torch.testing.assert_close(grid[:, 0, 4:], grid[:, 4, 4:])
    assert len({tuple(r) for r in pe.round(decimals=5).tolist()}) == 20  # every position distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(2, 2, 6)

    torch.manual_seed(0)
    sincos = DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, lora_rank=0)
    n = int(math.isqrt(sincos.vit.embeddings.position_embeddings.shape[1] - 1))
    torch.testing.assert_close(sincos.vit.embeddings.position_embeddings[0, 1:].detach(),
                               sincos_pos_embed_2d(n, n, TINY["hidden_size"]))
    random = DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, lora_rank=0, pos_embed_init="random")
    assert random.vit.embeddings.position_embeddings.std() < 0.1  # transformers' truncated normal
    # loaded weights are never re-initialized
    random.vit.save_pretrained(str(tmp_path))
    loaded = DINOv2Backbone(pretrained=str(tmp_path), num_taps=3, lora_rank=0)
    torch.testing.assert_close(loaded.vit.embeddings.position_embeddings, random.vit.embeddings.position_embeddings)
    with pytest.raises(ValueError, match="pos_embed_init"):
        DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, pos_embed_init="learned")


@pytest.mark.parametrize("variant", [dict(), dict(registers=True), dict(use_swiglu_ffn=True)],
                         ids=["plain", "registers", "swiglu"])
def test_hf_to_official_state_dict_is_the_inverse_of_the_loader(tmp_path, variant):
    from dinov2od.modeling import hf_to_official_state_dict

    registers = variant.pop("registers", False)
    model = hf_model(registers, **variant)
    ours, ref = hf_to_official_state_dict(model), to_official(model)
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0, msg=k)
    torch.save(ours, tmp_path / "w.pth")
    backbone = DINOv2Backbone(arch="tiny", arch_overrides={**TINY, **variant}, registers=registers,
                              pretrained=str(tmp_path / "w.pth"), num_taps=3, lora_rank=0)
    assert_same_weights(backbone, model)
    with pytest.raises(ValueError, match="LoRA"):
        hf_to_official_state_dict(DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=3, lora_rank=2).vit)


def test_resized_position_embeddings_are_kept_until_the_parameter_changes():
    """Without autograd the resized grid is kept per (h, w, dtype); an in-place edit of the
    parameter, a load_state_dict or another interpolation setting must give a fresh one, equal to
    what the forward computes with autograd on (which never keeps anything)."""
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY, out_indices=(2,), lora_rank=0).eval()
    x = torch.randn(1, 3, 70, 42)  # 5 x 3 patches: the 4 x 4 stored grid is resized

    def cached():
        with torch.no_grad():
            return backbone(x)[0][0]

    def computed():
        with torch.enable_grad():
            return backbone(x)[0][0].detach()

    first = cached()
    kept = backbone.__dict__["_pos_embed_cache"][1]
    assert cached() is not None and backbone.__dict__["_pos_embed_cache"][1] is kept  # reused
    torch.testing.assert_close(first, computed(), rtol=0, atol=0)

    pos = backbone.vit.embeddings.position_embeddings
    with torch.no_grad():
        pos.mul_(-2.0)  # in place: same storage, version counter bumped
    edited = cached()
    assert (edited - first).abs().max() > 1e-3
    torch.testing.assert_close(edited, computed(), rtol=0, atol=0)

    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    state["vit.embeddings.position_embeddings"] = torch.randn_like(pos)
    backbone.load_state_dict(state)
    loaded = cached()
    assert (loaded - edited).abs().max() > 1e-3
    torch.testing.assert_close(loaded, computed(), rtol=0, atol=0)

    backbone.pos_interpolation = "transformers" if backbone.pos_interpolation != "transformers" else "meta"
    other = cached()
    assert (other - loaded).abs().max() > 1e-6
    torch.testing.assert_close(other, computed(), rtol=0, atol=0)
