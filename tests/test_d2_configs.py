"""The experiment configs load, carry the recipe's values, and build (random init, no download)."""
import os

import pytest
import torch

from detectron2.config import LazyConfig, instantiate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, *overrides):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, "configs", name)), list(overrides))


def test_coco_recipe_values():
    cfg = load("coco.py")
    bb = cfg.model.detector.backbone
    assert (bb.arch, bb.registers, bb.pretrained, bb.freeze, bb.lora_rank) == (
        "base", False, "facebook/dinov2-base", True, 8)
    assert cfg.model.num_classes == 80 and cfg.model.detector.num_queries == 300
    assert cfg.model.detector.cross_attn == "deformable"
    assert cfg.optimizer.lr == 1e-4 and cfg.dataloader.train.total_batch_size == 64
    assert cfg.dataloader.train.dataset.names == "coco_2017_train" and cfg.dataloader.test.dataset.names == "coco_2017_val"
    epochs = cfg.train.max_iter * 64 / 118287
    assert 49.9 < epochs < 50.1
    assert cfg.lr_multiplier.scheduler.milestones == [800] and cfg.lr_multiplier.scheduler.num_updates == 1000
    assert cfg.train.clip_grad.max_norm > 0
    # num_classes is interpolated from one place
    cfg.model.num_classes = 7
    assert cfg.model.detector.num_classes == 7 and cfg.model.criterion.num_classes == 7


def test_coco_model_builds_with_random_init_backbone():
    cfg = load("coco.py", "model.detector.backbone.pretrained=null", "model.detector.backbone.arch=small")
    model = instantiate(cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in trainable)
    assert not any(n.endswith("attention.attention.query.base_layer.weight") or n.endswith("mlp.fc1.weight")
                   for n in trainable if ".vit." in n)  # the ViT's own weights are frozen
    assert model.detector.num_queries == 300 and model.num_classes == 80


def test_lr_schedule_warms_up_and_drops_late():
    cfg = load("coco.py")
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) < 0.01 and sched(0.5) == 1.0 and sched(0.79) == 1.0 and sched(0.81) == pytest.approx(0.1)


def test_debug_overfit_uses_a_small_subset_and_higher_lr():
    cfg = load("debug_overfit.py")
    assert cfg.optimizer.lr == 5e-4 and cfg.dataloader.train.dataset.num_images == 64
    assert cfg.dataloader.test.dataset.num_images == 64
    assert cfg.train.max_iter * cfg.dataloader.train.total_batch_size / 64 > 100  # epochs


def test_shapes_demo_is_a_cpu_config():
    cfg = load("shapes.py")
    assert cfg.train.device == "cpu" and cfg.model.detector.backbone.pretrained is None
    assert cfg.model.num_classes == 3 and cfg.train.visualize.num_images > 0
    model = instantiate(cfg.model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["detector.backbone.vit.embeddings.mask_token"]  # random init: all else is trained
    assert sum(p.numel() for p in model.parameters()) < 5e6
    assert isinstance(model.detector.backbone.vit.config.hidden_size, int)
    assert torch.is_tensor(model.pixel_mean)


def _lrs(optimizer, model):
    """Parameter name -> learning rate of a built optimizer."""
    lr = {p: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: lr[p] for n, p in model.named_parameters() if p in lr}


def test_backbone_lr_decay_on_both_config_routes():
    """``optimizer.params.lr_factor_func.decay`` (lazy) and ``SOLVER.BACKBONE_LR_DECAY`` (yacs) give
    every ViT parameter decay ** (depth + 1 - layer) times the base LR, the rest the base LR."""
    from detectron2.config import get_cfg

    from dinov2od.d2 import DINOv2DETR, add_dinov2od_config
    from dinov2od.d2.trainer import Trainer

    cfg = load("shapes.py", "optimizer.params.lr_factor_func.decay=0.8")
    torch.manual_seed(0)
    model = instantiate(cfg.model)  # a random-init 4-block ViT, all trained
    cfg.optimizer.params.model = model
    lazy = _lrs(instantiate(cfg.optimizer), model)
    yacs_cfg = get_cfg()
    add_dinov2od_config(yacs_cfg)
    yacs_cfg.merge_from_file(os.path.join(ROOT, "configs/yaml/shapes.yaml"))
    yacs_cfg.SOLVER.BACKBONE_LR_DECAY = 0.8
    yacs_model = DINOv2DETR(yacs_cfg)
    yacs = _lrs(Trainer.build_optimizer(yacs_cfg, yacs_model), yacs_model)
    base = cfg.optimizer.lr
    assert base == yacs_cfg.SOLVER.BASE_LR
    expected = {
        "detector.backbone.vit.embeddings.patch_embeddings.projection.weight": base * 0.8 ** 5,
        "detector.backbone.vit.encoder.layer.0.mlp.fc1.weight": base * 0.8 ** 4,
        "detector.backbone.vit.encoder.layer.3.attention.attention.query.weight": base * 0.8,
        "detector.backbone.vit.layernorm.weight": base,
        "detector.decoder.class_heads.0.weight": base,
    }
    for name, lr in expected.items():
        assert lazy[name] == pytest.approx(lr), name
    assert list(yacs) == list(lazy) and list(yacs.values()) == pytest.approx(list(lazy.values()))
    # the default (1.0) leaves every learning rate at the base LR
    cfg = load("shapes.py")
    cfg.optimizer.params.model = model
    assert set(_lrs(instantiate(cfg.optimizer), model).values()) == {base}


def test_lazy_optimizer_groups_are_detectron2s_with_a_pluggable_lr_factor():
    cfg = load("shapes.py")
    model = instantiate(cfg.model)
    cfg.optimizer.params.model = model
    cfg.optimizer.params.bias_lr_factor = 2.0
    cfg.optimizer.params.lr_factor_func = lambda name: 0.5 if ".vit." in name else 1.0  # e.g. a layer-wise decay
    optimizer = instantiate(cfg.optimizer)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    base = cfg.optimizer.lr
    vit_weight = next(n for n in params if ".vit." in n and n.endswith("query.weight"))
    head_bias = next(n for n in params if ".vit." not in n and n.endswith(".bias"))
    assert lr_of[id(params[vit_weight])] == pytest.approx(0.5 * base)
    assert lr_of[id(params[head_bias])] == pytest.approx(2.0 * base)
