"""The backbone's features equal Meta's DINOv2 at every input size (docs/backbones.md, "Meta-exact DINOv2 features").

The reference below is written here from the semantics of Meta's ``DinoVisionTransformer``
(``dinov2/models/vision_transformer.py``): it reads an official-layout state dict directly, so it
shares no code with the backbone or with ``transformers``. Its position-embedding interpolation is
Meta's: for the models without registers ``scale_factor = ((h + 0.1) / M, (w + 0.1) / M)``
(``interpolate_offset=0.1``, no antialias), for the register models ``size=(h, w)`` with antialias
(the hub builders' ``interpolate_offset=0.0, interpolate_antialias=True``), and no resize when the
input is the stored square grid.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dinov2od.modeling import DINOv2Backbone

from tests.helpers.backbone import TINY, hf_model, to_official

SIZES = [(56, 56), (70, 42), (42, 98), (98, 70), (28, 126)]  # multiples of 14; (56, 56) is the stored 4x4 grid


def meta_pos_embed(pos_embed, h, w, registers):
    """Meta's ``interpolate_pos_encoding`` for an (h, w) patch grid -> (1, 1 + h*w, D)."""
    m = math.isqrt(pos_embed.shape[1] - 1)
    if (h, w) == (m, m):
        return pos_embed
    grid = pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if registers:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (h, w)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)], 1)


def meta_intermediate_layers(sd, x, blocks, num_heads, eps=1e-6):
    """Meta's ``get_intermediate_layers(x, n=blocks, reshape=True, norm=True)`` on an official state dict."""
    b, _, height, width = x.shape
    patch = sd["patch_embed.proj.weight"].shape[-1]
    h, w = height // patch, width // patch
    registers = "register_tokens" in sd
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t.flatten(2).transpose(1, 2)], 1)
    t = t + meta_pos_embed(sd["pos_embed"], h, w, registers)
    if registers:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(b, -1, -1), t[:, 1:]], 1)
    num_prefix = t.shape[1] - h * w
    dim = t.shape[-1]
    out = []
    for i in range(max(blocks) + 1):
        p = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(t, (dim,), p("norm1.weight"), p("norm1.bias"), eps)
        q, k, v = F.linear(y, p("attn.qkv.weight"), p("attn.qkv.bias")).reshape(
            b, -1, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
        att = (q * (dim // num_heads) ** -0.5) @ k.transpose(-2, -1)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, dim)
        t = t + p("ls1.gamma") * F.linear(y, p("attn.proj.weight"), p("attn.proj.bias"))
        y = F.layer_norm(t, (dim,), p("norm2.weight"), p("norm2.bias"), eps)
        y = F.linear(F.gelu(F.linear(y, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
        t = t + p("ls2.gamma") * y
        if i in blocks:
            f = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps)[:, num_prefix:]
            out.append(f.reshape(b, h, w, dim).permute(0, 3, 1, 2))
    return out


def max_rel_err(ours, ref):
    return max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(ours, ref))


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "registers"])
def test_official_pth_features_equal_meta_reference_at_every_size(tmp_path, registers):
    sd = {k: v.double() for k, v in to_official(hf_model(registers)).items()}
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(sd, path)
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY, registers=registers, pretrained=str(path),
                              num_taps=3, lora_rank=0).double().eval()
    for size in SIZES:
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            ours, _ = backbone(x)
        ref = meta_intermediate_layers(sd, x, backbone.out_indices, TINY["num_attention_heads"])
        # float64 end to end except the interpolation itself, which Meta (and the backbone) run in float32
        assert max_rel_err(ours, ref) <= 1e-5, size


def test_transformers_interpolation_is_an_option_and_differs_without_registers(tmp_path):
    sd = to_official(hf_model())
    torch.save(sd, tmp_path / "w.pth")
    kw = dict(arch="tiny", arch_overrides=TINY, pretrained=str(tmp_path / "w.pth"), num_taps=3, lora_rank=0)
    meta, hf = DINOv2Backbone(**kw).eval(), DINOv2Backbone(**kw, pos_interpolation="transformers").eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 56, 56)
        torch.testing.assert_close(meta(x)[0], hf(x)[0], rtol=0, atol=0)  # the stored grid: no resize
        x = torch.randn(1, 3, 70, 42)
        ref = meta_intermediate_layers(sd, x, meta.out_indices, TINY["num_attention_heads"])
        assert max_rel_err(meta(x)[0], ref) <= 1e-5
        assert max_rel_err(hf(x)[0], ref) > 1e-3  # the deviation the default avoids
    with pytest.raises(ValueError, match="pos_interpolation"):
        DINOv2Backbone(**kw, pos_interpolation="bilinear")


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "registers"])
def test_same_weights_as_hf_folder_and_official_pth_give_identical_features(tmp_path, registers):
    model = hf_model(registers)
    model.save_pretrained(tmp_path / "hf")
    torch.save(to_official(model), tmp_path / "official.pth")
    kw = dict(num_taps=3, lora_rank=0)
    from_folder = DINOv2Backbone(pretrained=str(tmp_path / "hf"), **kw).eval()
    from_pth = DINOv2Backbone(arch="tiny", arch_overrides=TINY, registers=registers,
                              pretrained=str(tmp_path / "official.pth"), **kw).eval()
    for size in SIZES:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            for a, b in zip(from_folder(x)[0], from_pth(x)[0]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
