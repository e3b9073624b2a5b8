"""Layer-wise LR decay of the ViT backbone: the factor of every parameter name."""
import pytest
import torch

from dinov2od.modeling import backbone_lr_decay, num_vit_layers, vit_lr_decay_factor

from tests.helpers.detector import tiny_detector


def test_factor_of_each_kind_of_parameter():
    model = tiny_detector(lora_rank=4, freeze=False)  # 2 blocks, LoRA adapters, everything trainable
    f = backbone_lr_decay(0.5, model=model)
    assert num_vit_layers(model) == 2
    expected = {
        "backbone.vit.embeddings.patch_embeddings.projection.weight": 0.5 ** 3,  # layer 0
        "backbone.vit.embeddings.position_embeddings": 0.5 ** 3,
        "backbone.vit.embeddings.cls_token": 0.5 ** 3,
        "backbone.vit.encoder.layer.0.mlp.fc1.weight": 0.5 ** 2,  # block i: layer i + 1
        "backbone.vit.encoder.layer.1.attention.attention.key.weight": 0.5,
        "backbone.vit.layernorm.weight": 1.0,  # after the blocks, like the neck and decoder
        "neck.fuse.0.weight": 1.0,
        "decoder.class_heads.0.bias": 1.0,
    }
    for name, factor in expected.items():
        assert f(name) == pytest.approx(factor), name
    names = [n for n, _ in model.named_parameters()]
    lora = [n for n in names if "lora_" in n]
    assert lora and all(f(n) == 1.0 for n in lora)  # adapters start at zero: nothing to protect
    lora_decayed = backbone_lr_decay(0.5, model=model, decay_lora=True)
    assert lora_decayed(next(n for n in lora if ".layer.0." in n)) == pytest.approx(0.25)
    # every ViT parameter but the final norm is decayed, nothing else is
    for n in names:
        in_vit = ".vit.embeddings." in n or ".vit.encoder." in n
        assert (f(n) < 1.0) == (in_vit and "lora_" not in n), n
    # DDP's "module." prefix and Detectron2's meta-arch "detector." prefix are the same parameters
    assert f("module.detector.backbone.vit.encoder.layer.1.mlp.fc2.bias") == pytest.approx(0.5)


def test_rf_detr_value_on_a_12_block_vit():
    f = backbone_lr_decay(0.8, num_layers=12)
    assert f("backbone.vit.encoder.layer.11.norm1.weight") == pytest.approx(0.8)
    assert f("backbone.vit.encoder.layer.0.norm1.weight") == pytest.approx(0.8 ** 12)
    assert f("backbone.vit.embeddings.register_tokens") == pytest.approx(0.8 ** 13)
    assert vit_lr_decay_factor("backbone.vit.encoder.layer.5.mlp.fc1.weight", 0.8, 12) == pytest.approx(0.8 ** 7)


def test_no_decay_and_bad_values():
    f = backbone_lr_decay(1.0)  # off: no model or depth needed
    assert f("backbone.vit.embeddings.cls_token") == 1.0
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        backbone_lr_decay(1.2, num_layers=12)
    with pytest.raises(ValueError, match="needs num_layers or the model"):
        backbone_lr_decay(0.8)
    with pytest.raises(ValueError, match="block 12 but num_layers=12"):
        backbone_lr_decay(0.8, num_layers=12)("backbone.vit.encoder.layer.12.mlp.fc1.weight")
    with pytest.raises(ValueError, match="no DINOv2 ViT blocks"):
        backbone_lr_decay(0.8, model=torch.nn.Linear(2, 2))
