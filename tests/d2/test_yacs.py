"""The yacs route: ``add_dinov2od_config`` only adds keys (Detectron2's keep their meaning and
values), the project's values live in a base YAML, and the stock ``DefaultTrainer`` API works:
a stock meta-architecture with the DINOv2 backbone, the optimizer keys, ``test(evaluators=)``."""
import logging
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import DatasetEvaluator
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from dinov2od.d2 import DINOv2DETR, add_dinov2od_config
from dinov2od.d2.engine.settings import TrainSettings
from dinov2od.d2.engine.trainer import Trainer
from dinov2od.layers import IMAGENET_MEAN, IMAGENET_STD

from tests.helpers import ROOT
from tests.helpers.configs import TINY_YACS

BASE_YAML = os.path.join(ROOT, "configs/yaml/Base-DINOv2DETR.yaml")
SHAPES_YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")


def flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if hasattr(v, "items"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def tiny_without_base_yaml():
    """add_dinov2od_config + the tiny model's keys, without any YAML (Detectron2's own defaults)."""
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    overrides = cfg.MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES  # (keys of a new_allowed node: set, not merged)
    overrides.hidden_size, overrides.num_hidden_layers, overrides.num_attention_heads = 48, 2, 2
    overrides.intermediate_size = 96
    start = TINY_YACS.index("MODEL.DINOV2OD.HIDDEN_DIM")
    cfg.merge_from_list([*TINY_YACS[start:start + 8], "MODEL.DINOV2OD.BACKBONE.NUM_TAPS", 2])  # + NUM_QUERIES, ...
    return cfg


def shapes_cfg(*opts):
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(SHAPES_YAML)
    cfg.merge_from_list([*TINY_YACS, *opts])
    return cfg


def test_add_dinov2od_config_adds_keys_and_keeps_every_stock_value():
    stock = flat(get_cfg())
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    added = flat(cfg)
    changed = {k: (v, added[k]) for k, v in stock.items() if added[k] != v}
    assert not changed, changed
    new = set(added) - set(stock)
    assert {"MODEL.DINOV2OD.NUM_CLASSES", "MODEL.DINOV2OD.BACKBONE.ARCH", "SOLVER.EMA.ENABLED",
            "SOLVER.CLIP_GRADIENTS.FULL_MODEL", "SOLVER.AMP.PRECISION"} <= new
    add_dinov2od_config(cfg)  # a second call changes nothing
    assert flat(cfg) == added


def test_base_yaml_holds_the_project_values_with_the_imagenet_constants():
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(BASE_YAML)
    assert cfg.MODEL.META_ARCHITECTURE == "DINOv2DETR" and cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([255 * m for m in IMAGENET_MEAN])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([255 * s for s in IMAGENET_STD])
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert (clip.ENABLED, clip.CLIP_TYPE, clip.FULL_MODEL) == (True, "norm", True)
    for name in ("shapes.yaml", "coco.yaml"):  # the experiment files build on it
        with open(os.path.join(ROOT, "configs/yaml", name)) as f:
            assert '_BASE_: "Base-DINOv2DETR.yaml"' in f.read(), name


def test_meta_arch_warns_when_the_pixel_statistics_are_not_imagenet(caplog):
    cfg = tiny_without_base_yaml()  # Detectron2's BGR Caffe statistics
    with caplog.at_level(logging.WARNING):
        DINOv2DETR(cfg)
    assert "PIXEL_MEAN" in caplog.text and "Base-DINOv2DETR.yaml" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        DINOv2DETR(shapes_cfg())
    assert "PIXEL_MEAN" not in caplog.text


def _retina_inputs():
    inst = Instances((112, 140))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 12, 50, 60], [60, 20, 100, 80]]))
    inst.gt_classes = torch.tensor([0, 2])
    return [{"image": torch.randint(0, 255, (3, 112, 140), dtype=torch.uint8), "instances": inst}]


@pytest.mark.parametrize("clip_type", [None, "value", "norm"])
def test_stock_retinanet_with_the_dinov2_backbone_trains_under_default_trainer(clip_type):
    """Detectron2's own meta-architecture, optimizer builder and gradient clipping keys, with the
    clipping keys as add_dinov2od_config leaves them (None) or set as a Detectron2 user would."""
    cfg = tiny_without_base_yaml()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.BACKBONE.NAME = "build_dinov2_backbone"
    cfg.MODEL.DINOV2OD.SCALE_FACTORS = [2.0, 1.0, 0.5]
    cfg.MODEL.RETINANET.IN_FEATURES = ["p0", "p1", "p2"]
    cfg.MODEL.RETINANET.NUM_CLASSES = 3
    if clip_type is not None:
        cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = clip_type
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = DefaultTrainer.build_optimizer(cfg, model)
    # Detectron2's per-parameter clipping, exactly when its key enables it
    assert ("GradientClip" in type(optimizer).__name__) == (clip_type is not None)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with EventStorage(0):
        losses = model(_retina_inputs())
    assert set(losses) == {"loss_cls", "loss_box_reg"} and all(torch.isfinite(v) for v in losses.values())
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())


def test_yacs_optimizer_honours_bias_and_norm_keys():
    cfg = shapes_cfg("SOLVER.BASE_LR", "0.001", "SOLVER.WEIGHT_DECAY", "0.0001", "SOLVER.BIAS_LR_FACTOR", "2.0",
                     "SOLVER.WEIGHT_DECAY_BIAS", "0.0", "SOLVER.WEIGHT_DECAY_NORM", "0.5")
    model = DINOv2DETR(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert "GradientClip" not in type(optimizer).__name__  # FULL_MODEL: the loop clips all gradients together
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    layer_norm = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
    linear = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    expect = {
        f"{linear}.weight": (1e-3, 1e-4),
        f"{linear}.bias": (2e-3, 0.0),
        f"{layer_norm}.weight": (1e-3, 0.5),
    }
    for name, (lr, wd) in expect.items():
        g = group_of[id(params[name])]
        assert (g["lr"], g["weight_decay"]) == pytest.approx((lr, wd)), name


def test_clipping_keys_reach_the_loop_with_their_detectron2_meaning():
    s = TrainSettings.from_yacs(shapes_cfg("SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.25",
                                           "SOLVER.CLIP_GRADIENTS.NORM_TYPE", "1.0"))
    assert (s.clip_max_norm, s.clip_norm_type) == (0.25, 1.0)
    per_param = shapes_cfg("SOLVER.CLIP_GRADIENTS.FULL_MODEL", "False")
    assert TrainSettings.from_yacs(per_param).clip_max_norm == 0.0  # Detectron2's clipper does it
    assert "GradientClip" in type(Trainer.build_optimizer(per_param, DINOv2DETR(per_param))).__name__
    with pytest.raises(ValueError, match="FULL_MODEL.*CLIP_TYPE"):
        TrainSettings.from_yacs(shapes_cfg("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value"))


class Recorder(DatasetEvaluator):
    def reset(self):
        self.images = 0

    def process(self, inputs, outputs):
        self.images += len(outputs)

    def evaluate(self):
        return {"recorded": {"images": self.images}}


def test_trainer_test_uses_the_evaluators_it_is_given(tiny_config):
    cfg = shapes_cfg()
    model = Trainer.build_model(cfg).eval()
    assert Trainer.test(cfg, model, evaluators=[Recorder()]) == {"recorded": {"images": 8}}
