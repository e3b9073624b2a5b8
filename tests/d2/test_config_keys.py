"""One source of truth for the model options (issue 20 item 4).

* every leaf of the lazy model configs (``configs/common/models/dinov2_detr.py`` and the efficient
  preset) has a yacs key, a row of :data:`dinov2od.d2.config.KEYS` whose third column names it,
  and every ``model.`` row names a leaf; the yacs defaults are the lazy ones;
* every option of the model's constructors (:class:`DecoderOptions` through the detector, the
  backbone families, the criterion, the matcher) is a leaf of the lazy config;
* the efficient preset built from yacs keys only is the lazy one (shapes and outputs);
* ``num_aux_layers`` follows the decoder's layers in both routes; loss weights are resolved by
  the criterion alone.

Negative controls: dropping any one ``model.`` row from (a copy of) KEYS makes the walk name
exactly that row's leaves; the default yacs model differs from the efficient one.
"""
import dataclasses
import inspect
import os

import pytest
import torch
from omegaconf import OmegaConf

from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, get_cfg, instantiate

from dinov2od.d2 import DINOv2DETR, add_dinov2od_config
from dinov2od.d2.config import KEYS
from dinov2od.modeling import (
    BACKBONES,
    DecoderOptions,
    DeformableDecoder,
    DINOv2ObjectDetector,
    HungarianMatcher,
    SetCriterion,
)
from dinov2od.modeling.backbones.registry import family_options

from tests.helpers import ROOT

MODEL_CONFIGS = ("configs/common/models/dinov2_detr.py", "configs/common/models/dinov2_detr_efficient.py")

# Leaves of the lazy model config that are no option, so have no yacs key (besides every
# ``_target_``, which names what is built, and every interpolation such as "${..num_classes}",
# a copy of another leaf):
NOT_OPTIONS = {
    # derived: DINOv2DETR sets it to the detector's decoder layers - 1 (None in the config)
    "model.criterion.num_aux_layers",
}
# Leaves that Detectron2's own keys mirror (not in KEYS: add_dinov2od_config adds only dinov2od's keys)
DETECTRON2_KEYS = {
    "model.pixel_mean": "MODEL.PIXEL_MEAN",
    "model.pixel_std": "MODEL.PIXEL_STD",
    "model.input_format": "INPUT.FORMAT",
}


def leaves(node, path="model"):
    """{dotted path: value} of every leaf (a scalar, a list, an empty dict) of a plain config tree."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(leaves(v, f"{path}.{k}"))
        return out
    return {path: node}


def lazy_model_leaves(name):
    return leaves(OmegaConf.to_container(LazyConfig.load(os.path.join(ROOT, name)).model, resolve=False))


def row_paths(row):
    return (row[2],) if isinstance(row[2], str) else tuple(row[2])


def unmapped_leaves(model_leaves, keys):
    """The option leaves that no row of ``keys`` names."""
    mapped = {p for row in keys for p in row_paths(row)} | set(DETECTRON2_KEYS) | NOT_OPTIONS
    return sorted(path for path, value in model_leaves.items()
                  if path not in mapped and not path.endswith("._target_")
                  and not (isinstance(value, str) and value.startswith("${")))


MODEL_ROWS = [row for row in KEYS if row_paths(row)[0].startswith("model.")]


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_lazy_model_leaf_has_a_yacs_key(name):
    model_leaves = lazy_model_leaves(name)
    assert len(model_leaves) > 60  # the walk reaches into detector.backbone and criterion.matcher
    assert unmapped_leaves(model_leaves, KEYS) == [], "lazy options without a row in dinov2od/d2/config.py's KEYS"
    # ... and every model row names a leaf of the lazy config (no row for an option that does not exist)
    assert [p for row in MODEL_ROWS for p in row_paths(row) if p not in model_leaves] == []
    cfg = get_cfg()
    assert all(cfg.get(k.split(".")[0]).get(k.split(".")[1]) is not None for k in DETECTRON2_KEYS.values())


@pytest.mark.parametrize("dropped", MODEL_ROWS, ids=[row[0] for row in MODEL_ROWS])
def test_negative_control_a_dropped_row_is_named(dropped):
    """Without one row (on a copy of KEYS) the walk names exactly that row's leaves."""
    keys = [row for row in KEYS if row is not dropped]
    found = set()
    for name in MODEL_CONFIGS:
        found |= set(unmapped_leaves(lazy_model_leaves(name), keys))
    assert found == set(row_paths(dropped))


def test_yacs_defaults_are_the_lazy_defaults():
    model_leaves = lazy_model_leaves(MODEL_CONFIGS[0])
    differ = {}
    for key, default, _, *convert in MODEL_ROWS:
        value = convert[0](default) if convert else default
        value = list(value) if isinstance(value, tuple) else value
        for path in row_paths((key, default, _)):
            if value != model_leaves[path]:
                differ[path] = (value, model_leaves[path])
    # the only deliberate difference: yacs starts from a random-init ViT (a YAML names the weights)
    assert differ == {"model.detector.backbone.pretrained": (None, "facebook/dinov2-base")}


def _params(fn):
    return [p.name for p in list(inspect.signature(fn).parameters.values())[1:]
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def test_every_constructor_option_is_a_lazy_leaf():
    """The chain's other end: what the constructors take is in the lazy config (so, by the walk, in yacs)."""
    cfg = OmegaConf.to_container(LazyConfig.load(os.path.join(ROOT, MODEL_CONFIGS[0])).model, resolve=False)
    det, crit = cfg["detector"], cfg["criterion"]
    decoder = {f.name for f in dataclasses.fields(DecoderOptions)} - {"num_levels", "num_layers"}  # neck, renamed
    detector = set(_params(DINOv2ObjectDetector.__init__)) - {"neck", "decoder", "pixel_mean", "pixel_std"}  # modules;
    # the detector's [0, 1] statistics, unused in Detectron2 (the meta-arch normalizes with model.pixel_mean)
    assert sorted((decoder | detector) - set(det)) == []
    for family in ("dinov2", "dinov3"):
        assert sorted(set(family_options(BACKBONES[family])) - set(det["backbone"])) == [], family
    assert sorted(set(_params(SetCriterion.__init__)) - set(crit)) == []
    assert sorted(set(_params(HungarianMatcher.__init__)) - set(crit["matcher"])) == []


def test_decoder_options_by_keyword_one_default_each():
    torch.manual_seed(0)
    a = DeformableDecoder(3, hidden_dim=32, num_queries=7, num_layers=2, two_stage=True)
    torch.manual_seed(0)
    b = DeformableDecoder(3, DecoderOptions(hidden_dim=32, num_queries=7, num_layers=2, two_stage=True))
    assert a.options == b.options and a.options.num_heads == DecoderOptions.num_heads
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(TypeError, match=r"DeformableDecoder got unknown decoder option\(s\) \['num_querys'\].*num_queries"):
        DeformableDecoder(3, num_querys=7)
    with pytest.raises(TypeError, match=r"DINOv2ObjectDetector got unknown decoder option\(s\) \['two_stages'\]"):
        DINOv2ObjectDetector(3, two_stages=True)
    with pytest.raises(TypeError, match="sets the decoder's num_layers from num_decoder_layers"):
        DINOv2ObjectDetector(3, num_layers=2)
    # the detector's own defaults are the dataclass's
    sig = inspect.signature(DINOv2ObjectDetector.__init__).parameters
    assert sig["hidden_dim"].default == DecoderOptions.hidden_dim
    assert sig["num_decoder_layers"].default == DecoderOptions.num_layers


# ------------------------------------------------------------------ the efficient preset as yacs
VIT = dict(hidden_size=32, num_hidden_layers=8, num_attention_heads=2, intermediate_size=64)  # 4 untapped blocks
SMALL = dict(hidden_dim=32, num_queries=10, dim_feedforward=64)


def _lazy_efficient():
    cfg = LazyConfig.load(os.path.join(ROOT, MODEL_CONFIGS[1]))
    cfg.model.detector.backbone.update(arch="tiny", pretrained=None, arch_overrides=VIT)
    cfg.model.detector.update(SMALL)
    torch.manual_seed(0)
    return instantiate(cfg.model).eval()


def _yacs(base):
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/yaml", base))
    cfg.merge_from_list(["MODEL.DINOV2OD.BACKBONE.ARCH", "tiny", "MODEL.DINOV2OD.HIDDEN_DIM", 32,
                         "MODEL.DINOV2OD.NUM_QUERIES", 10, "MODEL.DINOV2OD.DIM_FEEDFORWARD", 64])
    cfg.MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES = CN(VIT)
    torch.manual_seed(0)
    return DINOv2DETR(cfg).eval()


def _shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_efficient_preset_through_yacs_keys_only():
    lazy = _lazy_efficient()
    yacs = _yacs("Base-DINOv2DETR-efficient.yaml")
    assert _shapes(lazy) == _shapes(yacs)
    bb = yacs.detector.backbone
    assert (bb.window_size, bb.window_blocks, yacs.detector.decoder.num_layers, yacs.detector.neck.num_levels) == (
        16, (0, 2, 4, 6), 3, 2)  # the preset really is on: windows in the untapped blocks
    assert yacs.criterion.weight_dict == lazy.criterion.weight_dict
    # negative control: the default model has other shapes
    assert _shapes(_yacs("Base-DINOv2DETR.yaml")) != _shapes(yacs)
    yacs.load_state_dict(lazy.state_dict())
    image = torch.randint(0, 255, (3, 266, 322), dtype=torch.uint8)  # 19 x 23 patches: partial windows
    with torch.no_grad():
        a, b = lazy([{"image": image}])[0]["instances"], yacs([{"image": image}])[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)


# ------------------------------------------------------------------ derived values, resolved once
def test_num_aux_layers_follows_the_decoder_in_both_routes():
    cfg = LazyConfig.load(os.path.join(ROOT, "configs/shapes.py"))  # 3 decoder layers, nothing else set
    assert cfg.model.criterion.num_aux_layers is None
    cfg.model.detector.backbone.update(pretrained=None, arch="tiny", arch_overrides=dict(VIT, num_hidden_layers=2))
    cfg.model.detector.backbone.num_taps = 2
    for layers in (3, 4):
        cfg.model.detector.num_decoder_layers = layers
        lazy = instantiate(cfg.model)
        yacs = _yacs_layers(layers)
        for model in (lazy, yacs):
            assert model.criterion.num_aux_layers == model.detector.num_aux_outputs == layers - 1
            assert f"loss_giou_{layers - 2}" in model.criterion.weight_dict
            assert f"loss_giou_{layers - 1}" not in model.criterion.weight_dict
    # a number given explicitly is kept (configs saved before it was derived)
    cfg.model.criterion.num_aux_layers = 5
    assert instantiate(cfg.model).criterion.num_aux_layers == 5


def _yacs_layers(layers):
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_list(["MODEL.DINOV2OD.BACKBONE.ARCH", "tiny", "MODEL.DINOV2OD.BACKBONE.NUM_TAPS", 2,
                         "MODEL.DINOV2OD.HIDDEN_DIM", 32, "MODEL.DINOV2OD.DEC_LAYERS", layers])
    cfg.MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES = CN(dict(VIT, num_hidden_layers=2))
    return DINOv2DETR(cfg)


def test_the_meta_arch_weights_losses_as_the_criterion_resolves_them(monkeypatch):
    """Loss weights are resolved once, by ``SetCriterion.weight_of``; the meta-arch only reads them."""
    model = _yacs_layers(2)
    losses = {"loss_class": torch.tensor(1.0), "loss_bbox_0": torch.tensor(2.0), "loss_giou_dn_0": torch.tensor(3.0),
              "loss_class_o2m": torch.tensor(4.0), "class_error": torch.tensor(50.0)}
    crit = model.criterion
    weighted = model.weighted_losses(losses)
    assert {k: v.item() for k, v in weighted.items()} == {k: v.item() * crit.weight_of(k) for k, v in losses.items()
                                                         if k.startswith("loss")}
    monkeypatch.setattr(crit, "weight_of", lambda key: 0.0 if key == "loss_class" else 10.0)
    assert {k: v.item() for k, v in model.weighted_losses(losses).items()} == {
        "loss_bbox_0": 20.0, "loss_giou_dn_0": 30.0, "loss_class_o2m": 40.0}
    with pytest.raises(KeyError, match="No weight for loss 'loss_mask'"):
        SetCriterion(3).weight_of("loss_mask")
