"""int8 dynamic quantization of the linear layers (dinov2od.modeling.quantize). Accuracy on a trained
model (the demo's AP) is measured by `train.eval_quantize=int8` (docs/speed.md); here: what the copy holds,
that the LoRA adapters are in it, and that its outputs follow the fp32 model's."""
import pytest
import torch
from torch import nn

from dinov2od.modeling import DINOv2Backbone, DINOv2ObjectDetector
from dinov2od.modeling import quantize as quantize_mod
from dinov2od.modeling.quantize import quantize_dynamic_int8

TINY_VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def detector():
    torch.manual_seed(0)
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY_VIT, num_taps=2, lora_rank=4, freeze=True)
    model = DINOv2ObjectDetector(num_classes=5, backbone=backbone, hidden_dim=32, num_queries=20,
                                 num_decoder_layers=2, num_heads=4, num_points=2, dim_feedforward=64)
    with torch.no_grad():  # LoRA B starts at zero: give the adapters an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.eval()


def outputs(model, images):
    """(last tapped ViT features, logits, boxes)"""
    with torch.no_grad():
        out = model(images)
        return model.backbone(images)[0][-1], out["pred_logits"], out["pred_boxes"]


def linears(module):
    return [m for m in module.modules() if type(m) is nn.Linear]


def test_int8_copy_follows_the_fp32_model_and_keeps_it_intact():
    model = detector()
    images = torch.rand(2, 3, 70, 84)
    feats, logits, boxes = outputs(model, images)
    q = quantize_dynamic_int8(model)
    assert not linears(q) and not any("lora_" in n for n, _ in q.named_modules())
    assert not any(p.requires_grad for p in q.parameters())
    assert linears(model) and any("lora_" in n for n, _ in model.named_modules())  # the original is unchanged
    torch.testing.assert_close(outputs(model, images)[1], logits, rtol=0, atol=0)
    q_feats, q_logits, q_boxes = outputs(q, images)
    err = (q_feats - feats).abs().max().item()
    assert err < 0.05 * feats.abs().max().item()
    assert (q_logits - logits).abs().max().item() < 0.1 and (q_boxes - boxes).abs().max().item() < 0.02
    # negative control: an int8 copy whose adapters were dropped instead of merged is further off
    def drop(m):
        from peft.tuners.lora import LoraLayer
        for parent in list(m.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    setattr(parent, name, child.get_base_layer())
        return 0

    orig = quantize_mod.merge_lora_adapters
    quantize_mod.merge_lora_adapters = drop
    try:
        dropped_feats = outputs(quantize_dynamic_int8(model), images)[0]
    finally:
        quantize_mod.merge_lora_adapters = orig
    assert (dropped_feats - feats).abs().max().item() > 3 * err


def test_backbone_scope_leaves_the_decoder_fp32_and_bad_arguments_raise():
    model = detector()
    q = quantize_dynamic_int8(model, "backbone")
    assert not linears(q.backbone) and linears(q.decoder)
    with pytest.raises(ValueError, match="scope='neck'"):
        quantize_dynamic_int8(model, "neck")
    with pytest.raises(ValueError, match="runs on the CPU"):
        quantize_dynamic_int8(model.to("meta"))
