"""The DINOv3 family through Detectron2: one config field, DefaultPredictor, lazy/yacs parity, recipe."""
import os

import numpy as np
import torch

from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, Instances

from dinov2od.d2 import DINOv2DETR, add_dinov2od_config
from dinov2od.modeling import DINOv3Backbone

from tests.helpers import ROOT
from tests.helpers.configs import TINY_SIZES_YACS

TINY_DINOV3_YACS = [
    "MODEL.DINOV2OD.BACKBONE.FAMILY", "dinov3",
    "MODEL.DINOV2OD.BACKBONE.PRETRAINED", "",  # the demo's pretrained file is a DINOv2
    "MODEL.DINOV2OD.SIZE_DIVISIBILITY", 16,
    *TINY_SIZES_YACS,
]


def tiny_dinov3_cfg():
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/yaml/shapes.yaml"))
    cfg.merge_from_list(TINY_DINOV3_YACS)
    return cfg


def test_default_predictor_on_the_dinov3_family():
    cfg = tiny_dinov3_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 112, 400
    torch.manual_seed(0)
    predictor = DefaultPredictor(cfg)
    assert isinstance(predictor.model.detector.backbone, DINOv3Backbone)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)  # BGR
    inst = predictor(image)["instances"]
    assert isinstance(inst, Instances) and inst.image_size == (480, 640) and len(inst) == 12 * 3
    boxes = inst.pred_boxes.tensor
    assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 640 and boxes[:, 1::2].max() <= 480
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])
    # batched inference (images padded together) equals one-by-one
    model = predictor.model
    g = torch.Generator().manual_seed(1)
    inputs = [{"image": torch.randint(0, 255, (3, 100, 140), generator=g, dtype=torch.uint8)},
              {"image": torch.randint(0, 255, (3, 130, 84), generator=g, dtype=torch.uint8)}]
    with torch.no_grad():
        batched = model(inputs)
        single = [model([x])[0] for x in inputs]
    for b, s in zip(batched, single):
        assert torch.allclose(b["instances"].scores, s["instances"].scores, atol=1e-5)
        assert torch.allclose(b["instances"].pred_boxes.tensor, s["instances"].pred_boxes.tensor, atol=1e-3)


def test_training_step_on_the_dinov3_family():
    torch.manual_seed(0)
    model = DINOv2DETR(tiny_dinov3_cfg()).train()
    inst = Instances((84, 112))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12, 50, 60], [60, 20, 100, 80]]))
    inst.gt_classes = torch.tensor([0, 2])
    inputs = [{"image": torch.randint(0, 255, (3, 84, 112), dtype=torch.uint8), "instances": inst},
              {"image": torch.randint(0, 255, (3, 60, 90), dtype=torch.uint8), "instances": inst[:0]}]
    losses = model(inputs)
    assert {"loss_class", "loss_bbox", "loss_giou"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    vit_grads = [p.grad for n, p in model.named_parameters() if ".vit." in n and p.requires_grad]
    assert vit_grads and all(g is not None for g in vit_grads)


def test_one_field_switches_the_family_in_lazy_and_yacs_configs_alike():
    lazy = LazyConfig.load(os.path.join(ROOT, "configs/shapes.py"))
    lazy = LazyConfig.apply_overrides(lazy, ["model.detector.backbone.family=dinov3", "model.size_divisibility=16",
                                            "model.detector.backbone.pretrained=None"])  # the demo's file is a DINOv2
    torch.manual_seed(123)
    m_lazy = instantiate(lazy.model)
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/yaml/shapes.yaml"))
    cfg.merge_from_list(["MODEL.DINOV2OD.BACKBONE.FAMILY", "dinov3", "MODEL.DINOV2OD.SIZE_DIVISIBILITY", 16,
                         "MODEL.DINOV2OD.BACKBONE.PRETRAINED", ""])
    torch.manual_seed(123)
    m_yacs = DINOv2DETR(cfg)
    assert isinstance(m_lazy.detector.backbone, DINOv3Backbone) and m_lazy.size_divisibility == 16
    a, b = m_lazy.state_dict(), m_yacs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert m_lazy.detector.neck.strides == (8.0, 16.0, 32.0)


def test_coco_dinov3_recipe():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/coco_dinov3.py"))
    coco = LazyConfig.load(os.path.join(ROOT, "configs/coco.py"))
    bb = cfg.model.detector.backbone
    assert (bb.family, bb.arch, bb.pretrained, bb.freeze, bb.lora_rank) == (
        "dinov3", "base", "facebook/dinov3-vitb16-pretrain-lvd1689m", True, 8)
    assert cfg.model.size_divisibility == 16 and cfg.train.output_dir == "./output/coco_dinov3"
    assert cfg.train.max_iter == coco.train.max_iter and cfg.optimizer.lr == coco.optimizer.lr
    assert cfg.dataloader.train.dataset.names == "coco_2017_train" and cfg.model.num_classes == 80
    cfg = LazyConfig.apply_overrides(
        cfg, ["model.detector.backbone.pretrained=null", "model.detector.backbone.arch=small"])
    model = instantiate(cfg.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and ".vit." in n]
    assert trainable and all("lora_" in n for n in trainable)
    yacs = get_cfg()
    add_dinov2od_config(yacs)
    yacs.merge_from_file(os.path.join(ROOT, "configs/yaml/coco_dinov3.yaml"))
    b = yacs.MODEL.DINOV2OD.BACKBONE
    assert (b.FAMILY, b.ARCH, b.PRETRAINED, yacs.MODEL.DINOV2OD.SIZE_DIVISIBILITY) == (
        "dinov3", "base", "facebook/dinov3-vitb16-pretrain-lvd1689m", 16)
    assert yacs.SOLVER.MAX_ITER == 92400  # the rest is coco.yaml's


def test_backbone_registry_builder_on_the_dinov3_family():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import build_backbone

    cfg = tiny_dinov3_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_dinov2_backbone"
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.size_divisibility == 16
    shapes = backbone.output_shape()
    assert {k: v.stride for k, v in shapes.items()} == {"p0": 8, "p1": 16, "p2": 32}
    feats = backbone(torch.randn(1, 3, 96, 128))
    assert {k: tuple(f.shape[-2:]) for k, f in feats.items()} == {"p0": (12, 16), "p1": (6, 8), "p2": (3, 4)}
