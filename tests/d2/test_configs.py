"""The experiment configs load, carry the recipe's values, and build (random init, no download)."""
import os

import pytest
import torch

from detectron2.config import LazyConfig, instantiate

from tests.helpers import ROOT



def load(name, *overrides):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(ROOT, "configs", name)), list(overrides))


def test_coco_recipe_values():
    cfg = load("coco.py")
    bb = cfg.model.detector.backbone
    assert (bb.arch, bb.registers, bb.pretrained, bb.freeze, bb.lora_rank) == (
        "base", False, "facebook/dinov2-base", True, 8)
    assert cfg.model.num_classes == 80 and cfg.model.detector.num_queries == 300
    assert cfg.model.detector.cross_attn == "deformable"
    assert cfg.optimizer.lr == 1e-4 and (cfg.train.images_per_gpu, cfg.train.effective_batch) == (8, 64)  # per GPU
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


def test_benchmarks_plain_presets_build_the_lazy_presets():
    """dinov2od.benchmark.models builds the presets without Detectron2 from PLAIN_PRESETS: the same
    modules and options as the lazy configs (negative control: the default differs from efficient)."""
    from dinov2od.benchmark.models import PLAIN_PRESETS, PRESETS

    from dinov2od.modeling import DINOv2ObjectDetector

    def signature(det):
        bb = det.backbone
        return ({k: tuple(v.shape) for k, v in det.state_dict().items()},
                (bb.window_size, bb.window_blocks, getattr(bb, "lora_config", None), tuple(det.neck.scale_factors)))

    built = {}
    for preset, kwargs in PLAIN_PRESETS.items():
        cfg = LazyConfig.load(os.path.join(ROOT, PRESETS[preset]))
        cfg.model.detector.backbone.update(pretrained=None, arch="small")
        lazy = instantiate(cfg.model).detector
        plain = DINOv2ObjectDetector(num_classes=80, **dict(
            kwargs, backbone=dict(kwargs.get("backbone", {}), arch="small", pretrained=None)))
        built[preset] = signature(plain)
        assert built[preset] == signature(lazy), preset
    assert built["default"] != built["efficient"]


def test_lr_schedule_warms_up_and_drops_late():
    cfg = load("coco.py")
    sched = instantiate(cfg.lr_multiplier)
    assert sched(0.0) < 0.01 and sched(0.5) == 1.0 and sched(0.79) == 1.0 and sched(0.81) == pytest.approx(0.1)


def test_debug_overfit_uses_a_small_subset_and_higher_lr():
    cfg = load("debug_overfit.py")
    demo = load("shapes.py")
    assert cfg.optimizer.lr == 2e-3 > demo.optimizer.lr and cfg.dataloader.train.dataset.num_images == 64
    assert cfg.dataloader.test.dataset.num_images == 64 and not cfg.train.ema.enabled
    aug = cfg.dataloader.train.mapper.augmentations
    assert list(aug.min_size_train) == [224] and aug.random_flip == "none"
    assert cfg.train.max_iter * cfg.dataloader.train.total_batch_size / 64 > 30  # epochs
    assert cfg.train.print_loss_curve > 0


def test_shapes_demo_is_a_cpu_config_on_the_pretrained_frozen_lora_path():
    cfg = load("shapes.py")
    bb = cfg.model.detector.backbone
    assert cfg.train.device == "cpu" and os.path.isfile(bb.pretrained)
    assert os.path.basename(bb.pretrained) == "dinov2od_tiny_glyphs.pth" and bb.freeze and bb.lora_rank == 8
    assert cfg.model.num_classes == 3 and cfg.train.visualize.num_images > 0
    model = instantiate(cfg.model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad and ".vit." in n]
    assert trained and all("lora_" in n for n in trained)  # only the adapters of the ViT learn
    assert any(p.requires_grad for n, p in model.named_parameters() if ".decoder." in n)
    assert sum(p.numel() for p in model.parameters()) < 5e6
    assert isinstance(model.detector.backbone.vit.config.hidden_size, int)
    assert torch.is_tensor(model.pixel_mean)
    # docs/demo.md's from-scratch row: everything but the mask token trains
    cfg = load("shapes.py", "model.detector.backbone.pretrained=None", "model.detector.backbone.freeze=False",
               "model.detector.backbone.lora_rank=0")
    model = instantiate(cfg.model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["detector.backbone.vit.embeddings.mask_token"]


def test_shapes_yaml_is_the_lazy_demo():
    """configs/yaml/shapes.yaml builds the model of configs/shapes.py, with the same pretrained weights."""
    from detectron2.config import get_cfg

    from dinov2od.d2 import DINOv2DETR, add_dinov2od_config

    torch.manual_seed(0)
    lazy = instantiate(load("shapes.py").model)
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/yaml/shapes.yaml"))
    cwd = os.getcwd()
    os.chdir(ROOT)  # PRETRAINED is relative to the repository root
    try:
        yacs = DINOv2DETR(cfg)
    finally:
        os.chdir(cwd)
    a, b = lazy.state_dict(), yacs.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    vit = [k for k in a if ".vit." in k and "lora_" not in k]
    assert all(torch.equal(a[k], b[k]) for k in vit)  # the same pretrained ViT
    assert (lazy.detector.decoder.dn_groups, lazy.detector.decoder.o2m_queries) == (cfg.MODEL.DINOV2OD.DN.GROUPS,
        cfg.MODEL.DINOV2OD.O2M_QUERIES) == (5, 150)


def _lrs(optimizer, model):
    """Parameter name -> learning rate of a built optimizer."""
    lr = {p: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: lr[p] for n, p in model.named_parameters() if p in lr}


def test_backbone_lr_decay_on_both_config_routes():
    """``optimizer.params.lr_factor_func.decay`` (lazy) and ``SOLVER.BACKBONE_LR_DECAY`` (yacs) give
    every ViT parameter decay ** (depth + 1 - layer) times the base LR, the rest the base LR."""
    from detectron2.config import get_cfg

    from dinov2od.d2 import DINOv2DETR, add_dinov2od_config
    from dinov2od.d2.engine.trainer import Trainer

    full = ["model.detector.backbone.pretrained=None", "model.detector.backbone.freeze=False",
            "model.detector.backbone.lora_rank=0"]  # docs/demo.md's from-scratch row: the whole ViT trains
    cfg = load("shapes.py", "optimizer.params.lr_factor_func.decay=0.8", *full)
    torch.manual_seed(0)
    model = instantiate(cfg.model)  # a random-init 4-block ViT, all trained
    cfg.optimizer.params.model = model
    lazy = _lrs(instantiate(cfg.optimizer), model)
    yacs_cfg = get_cfg()
    add_dinov2od_config(yacs_cfg)
    yacs_cfg.merge_from_file(os.path.join(ROOT, "configs/yaml/shapes.yaml"))
    yacs_cfg.SOLVER.BACKBONE_LR_DECAY = 0.8
    yacs_cfg.merge_from_list(["MODEL.DINOV2OD.BACKBONE.PRETRAINED", "", "MODEL.DINOV2OD.BACKBONE.FREEZE", False,
                              "MODEL.DINOV2OD.BACKBONE.LORA_RANK", 0])
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
    cfg = load("shapes.py", *full)
    cfg.optimizer.params.model = model
    assert set(_lrs(instantiate(cfg.optimizer), model).values()) == {base}


def test_lazy_optimizer_groups_are_detectron2s_with_a_pluggable_lr_factor():
    cfg = load("shapes.py", "model.detector.backbone.pretrained=None", "model.detector.backbone.freeze=False",
               "model.detector.backbone.lora_rank=0")  # the whole ViT trains
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
