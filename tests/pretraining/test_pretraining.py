"""The project's backbone pretraining: glyphs generator, dense targets, and the Meta-format export."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dinov2od.modeling import DINOv2Backbone
from dinov2od.pretraining.dense import DenseHeads, GlyphBatches, Stage, dense_loss, dense_targets
from dinov2od.pretraining.glyphs import GLYPH_CLASSES, generate_glyphs_image

from tests.helpers import ROOT



def test_glyphs_are_deterministic_and_not_the_demo_classes():
    a, owner_a, cls_a = generate_glyphs_image(7, 98, 126)
    b, owner_b, cls_b = generate_glyphs_image(7, 98, 126)
    c, _, _ = generate_glyphs_image(8, 98, 126)
    assert a.shape == (98, 126, 3) and a.dtype == np.uint8 and owner_a.shape == (98, 126)
    assert np.array_equal(a, b) and np.array_equal(owner_a, owner_b) and np.array_equal(cls_a, cls_b)
    assert not np.array_equal(a, c)
    assert len(GLYPH_CLASSES) >= 10 and not {"circle", "square", "triangle"} & set(GLYPH_CLASSES)
    # every glyph listed is visible, every visible pixel belongs to a listed glyph
    assert set(np.unique(owner_a)) == {-1, *range(len(cls_a))}


def test_dense_targets_on_a_hand_made_owner_map():
    owner = np.full((28, 42), -1, np.int16)  # 2 x 3 patches of 14 px
    owner[0:14, 0:14] = 0  # glyph 0 fills patch (0, 0) exactly
    owner[14:18, 28:30] = 1  # glyph 1: 8 px in patch (1, 2), all of it
    t = dense_targets(owner, np.array([4, 9]), num_classes=12, patch=14, sub=2)
    assert t["coverage"].shape == (2, 3, 13)
    np.testing.assert_allclose(t["coverage"].sum(-1), 1.0, rtol=1e-6)
    assert t["coverage"][0, 0, 4] == 1.0 and t["coverage"][0, 1, 12] == 1.0
    np.testing.assert_allclose(t["coverage"][1, 2, 9], 8 / 196, rtol=1e-6)
    assert t["box_valid"].tolist() == [[True, False, False], [False, False, True]]
    np.testing.assert_allclose(t["box"][0, 0], [0, 0, 0, 0], atol=1e-6)  # its own 14 x 14 box
    # glyph 1: box x 28..30, y 14..18 -> centre (29, 16) vs patch centre (35, 21)
    np.testing.assert_allclose(t["box"][1, 2], [-6 / 14, -5 / 14, np.log(2 / 14), np.log(4 / 14)], rtol=1e-5)
    assert t["fine"].shape == (4, 6) and t["fine"][0, 0] == 1.0 and t["fine"][1, 2] == 0.0
    np.testing.assert_allclose(t["fine"][2, 4], 8 / 49, rtol=1e-6)


def test_batches_are_the_same_in_a_worker_and_restartable():
    stages = [Stage(2, 3, [28, 42], max_glyphs=1, extent=(0.5, 0.9)), Stage(2, 2, [56, 70])]
    ds = GlyphBatches(seed=3, stages=stages, num_classes=len(GLYPH_CLASSES), patch=14)
    direct = list(ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    resumed = list(GlyphBatches(3, stages, len(GLYPH_CLASSES), 14, start=1))
    assert len(ds) == 4 and len(resumed) == 3
    assert [len(b[0]) for b in direct] == [3, 3, 2, 2] and direct[0][0].shape[-1] in (28, 42)
    assert (direct[0][1]["obj_class"] >= 0).sum(1).max() <= 1  # stage 1: one glyph per image
    for (img, tgt), (img_w, tgt_w) in zip(direct, loader):
        assert torch.equal(img, img_w) and all(torch.equal(tgt[k], tgt_w[k]) for k in tgt)
    assert torch.equal(direct[2][0], resumed[1][0])
    assert not torch.equal(direct[2][0][0], direct[3][0][0])  # no seed is drawn twice
    assert direct[0][0].min() >= 0 and direct[0][0].max() <= 1


def test_dense_heads_learn_the_targets():
    """A tiny ViT + linear heads lowers every dense loss on a fixed batch (the objective trains)."""
    torch.manual_seed(0)
    bb = DINOv2Backbone(arch="tiny", arch_overrides=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                         intermediate_size=64), num_taps=2, lora_rank=0, freeze=False)
    heads = DenseHeads(bb.embed_dim, bb.num_taps, len(GLYPH_CLASSES))
    images, target = next(iter(GlyphBatches(0, [Stage(1, 4, [56])], len(GLYPH_CLASSES), 14)))
    opt = torch.optim.AdamW(list(bb.parameters()) + list(heads.parameters()), lr=3e-3)
    first = None
    for _ in range(80):
        losses = dense_loss(heads(bb(images)[0]), target)
        first = first or {k: v.item() for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    for k, v in losses.items():
        assert v.item() < 0.7 * first[k], (k, first[k], v.item())


def test_pretrain_tool_writes_a_meta_format_checkpoint_that_the_backbone_loads(tmp_path):
    out = tmp_path / "tiny.pth"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain_backbone.py"), "--out", str(out), "--iters", "2",
           "--batch", "2", "--sizes", "56", "--small-iters", "1", "--small-batch", "2", "--small-sizes", "28", "--hidden", "32", "--depth", "2", "--heads", "2", "--mlp", "64",
           "--eval-images", "2", "--eval-every", "3", "--workers", "0", "--warmup", "1"]
    subprocess.run(cmd, check=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    sd = torch.load(out, map_location="cpu", weights_only=True)
    # Meta's DinoVisionTransformer keys (vit_small(...).state_dict() at depth 2)
    expected = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias"}
    for i in range(2):
        expected |= {f"blocks.{i}.{n}" for n in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                                  "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight",
                                                  "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                                                  "mlp.fc2.bias", "ls2.gamma")}
    assert set(sd) == expected
    assert sd["pos_embed"].shape == (1, 1 + 16 * 16, 32) and sd["blocks.0.attn.qkv.weight"].shape == (96, 32)
    info = json.loads((tmp_path / "tiny.json").read_text())
    assert "NOT Meta's DINOv2 weights" in info["what"] and info["eval"][-1]["step"] == 3
    overrides = info["arch_overrides"]
    bb = DINOv2Backbone(arch="tiny", arch_overrides=overrides, pretrained=str(out), num_taps=2, lora_rank=4)
    loaded = {k.replace(".base_layer", ""): v for k, v in bb.vit.state_dict().items() if "lora_" not in k}
    q = loaded["encoder.layer.1.attention.attention.query.weight" if "encoder.layer.1.attention.attention.query.weight"
               in loaded else "encoder.layer.1.attention.q_proj.weight"]
    torch.testing.assert_close(q, sd["blocks.1.attn.qkv.weight"][:32], rtol=0, atol=0)
    with pytest.raises(ValueError, match="another architecture"):
        DINOv2Backbone(arch="tiny", arch_overrides={**overrides, "num_hidden_layers": 3}, pretrained=str(out))
