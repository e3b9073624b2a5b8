"""DINOv2ObjectDetector end to end on tiny random configs (CPU, no downloads)."""
import pytest
import torch

from dinov2od.modeling import (
    DINOv2Backbone,
    DINOv2ObjectDetector,
    HungarianMatcher,
    SetCriterion,
)

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_detector(num_classes=3, lora_rank=4, freeze=True, registers=False, **kw):
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY_VIT, registers=registers, num_taps=2,
                              lora_rank=lora_rank, freeze=freeze)
    args = dict(hidden_dim=32, num_queries=12, num_decoder_layers=2, num_heads=4, num_points=2,
                dim_feedforward=64)
    args.update(kw)
    return DINOv2ObjectDetector(num_classes=num_classes, backbone=backbone, **args)


def _targets():
    return [
        dict(labels=torch.tensor([0, 2]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])),
        dict(labels=torch.zeros(0, dtype=torch.long), boxes=torch.zeros(0, 4)),
    ]


@pytest.mark.parametrize(
    "options",
    [dict(), dict(cross_attn="standard"), dict(two_stage=True), dict(group_detr=3),
     dict(num_encoder_layers=1, box_refine=False), dict(scale_factors=(1.0,))],
    ids=["deformable", "standard", "two_stage", "group_detr", "encoder_norefine", "single_level"],
)
def test_forward_shapes_and_loss_backward(options):
    torch.manual_seed(0)
    model = tiny_detector(**options).train()
    images = torch.randn(2, 3, 61, 75)  # odd sizes, not multiples of 14
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
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out["pred_logits"].shape == (2, 12, 3)  # eval: exactly num_queries
    assert "num_groups" not in out
