"""LoRA scaling: the adapted backbone computes ``W + (alpha / r) B A``, with the configured alpha.

The expected features come from a copy of the backbone in which every adapted linear is replaced
by a plain ``nn.Linear`` whose weight is merged here by hand, ``W + (ALPHA / RANK) * B @ A`` in
float64, from the adapter's ``lora_A``/``lora_B`` weights and this file's constants (never from
peft's ``scaling`` or ``get_delta_weight``, nor from dinov2od.modeling.inference). That copy runs
in float64 (the plain path: the fused one is fp32 only). The adapted backbone runs on the plain
path and on the fused CPU path (fp32, eval, no grad; dinov2od.modeling.inference merges the
adapters itself there), for DINOv2 and DINOv3, with non-zero B.
"""
import copy

import pytest
import torch
from torch import nn

from dinov2od.layers import fused_linear
from dinov2od.modeling import DINOv2Backbone
from dinov2od.modeling import DINOv3Backbone

RANK, ALPHA = 4, 12.0  # scale 3, not 1 (alpha = r) and not peft's default alpha 8
TARGETS = ("query", "value", "fc1")
TINY2 = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=56)
TINY3 = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96)


def _backbone(family):
    torch.manual_seed(0)
    cls, overrides = (DINOv2Backbone, TINY2) if family == "dinov2" else (DINOv3Backbone, TINY3)
    bb = cls(arch="tiny", arch_overrides=overrides, num_taps=2, lora_rank=RANK, lora_alpha=ALPHA,
             lora_targets=TARGETS)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "lora_B" in name else 0.05))  # B starts at zero
    return bb.eval()


def _adapted(bb):
    """(path, module) of every peft LoRA layer."""
    return [(n, m) for n, m in bb.named_modules() if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)]


def _merged_by_hand(bb, scale):
    """A float64 copy with each adapted linear replaced by nn.Linear(W + scale * B @ A)."""
    ref = copy.deepcopy(bb).double()
    adapted = _adapted(ref)
    assert len(adapted) == len(TARGETS) * 2  # every target in both blocks
    for path, module in adapted:
        base = module.base_layer
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
        assert a.shape[0] == RANK and b.abs().min() > 0
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None).double()
        with torch.no_grad():
            linear.weight.copy_(base.weight + scale * (b @ a))
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent), child, linear)
    assert not _adapted(ref)
    return ref


def _features(bb, images, masks):
    with torch.no_grad():
        return bb(images, masks)[0]


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_lora_backbone_equals_the_hand_merged_weights(family, count_fused, monkeypatch):
    bb = _backbone(family)
    p = bb.patch_size
    images = torch.randn(2, 3, 4 * p, 3 * p)
    masks = torch.zeros(2, 4 * p, 3 * p, dtype=torch.bool)
    masks[1, 3 * p:] = True  # a padded image too

    monkeypatch.setenv(fused_linear.ENV, "0")
    expected = _features(_merged_by_hand(bb, ALPHA / RANK), images.double(), masks)
    wrong = _features(_merged_by_hand(bb, 1.0), images.double(), masks)  # what alpha = r would give
    assert max((e - w).abs().max().item() for e, w in zip(expected, wrong)) > 0.01  # 50x the tolerance below

    paths = {"plain64": (False, torch.float64, 1e-9), "plain": (False, torch.float32, 2e-4)}
    if fused_linear._OP_AVAILABLE:
        paths["fused"] = (True, torch.float32, 2e-4)
    calls = count_fused
    for name, (fused, dtype, tol) in paths.items():
        monkeypatch.setenv(fused_linear.ENV, "1" if fused else "0")
        calls.clear()
        model = copy.deepcopy(bb).to(dtype)
        got = _features(model, images.to(dtype), masks)
        assert (len(calls) == len(bb._layers)) if fused else not calls, (name, len(calls))
        for g, e in zip(got, expected):
            torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
