"""One source of truth for the model options (issue 20 item 4, issue 31 item 1), by value.

* every option and default is declared once, in dinov2od.modeling (``DecoderOptions``,
  ``BackboneOptions``, ``CriterionOptions``, ``MatcherOptions``, the constructors' signatures,
  ``PRESETS``); changing a declaration changes every route: the lazy model config (loaded and
  instantiated), the yacs keys (defaults and the built model) and the plain constructors
  (:func:`test_a_changed_declaration_reaches_every_route`, in a copy of the package);
* every leaf of the lazy model configs (``configs/common/models/dinov2_detr.py`` and the efficient
  preset) has a yacs key, a row of :data:`dinov2od.d2.config.KEYS` whose third column names it,
  and every ``model.`` row names a leaf; the yacs defaults are the lazy values;
* every option of the model's constructors is a leaf of the lazy config holding the constructor's
  default (by value; the differences are the configs' own, ``CONFIG_MODEL``, and the weights);
* the efficient preset built from yacs keys only is the lazy one (shapes and outputs), and the
  three routes read the one table;
* ``num_aux_layers`` follows the decoder's layers in both routes; loss weights are resolved by
  the criterion alone.

Negative controls: dropping any one ``model.`` row from (a copy of) KEYS makes the walk name
exactly that row's leaves; the default yacs model differs from the efficient one. For the changed
declaration (run by hand, 2026-12-07): writing ``model.detector.num_queries = 300`` back into
``configs/common/models/dinov2_detr.py`` fails the test (lazy ``num_queries`` 300, not 123); so
does a literal ``("MODEL.DINOV2OD.BACKBONE.LORA_RANK", 8, ...)`` default in the yacs table (yacs
``LORA_RANK`` 8, not 5), a literal ``lora_rank: int = 8`` in ``DINOv3Backbone`` (the lazy model
config stops: "backbone option lora_rank: the families' defaults differ (5, 8)") and
``model.detector.backbone.window_size = 16`` after ``apply_preset`` in ``dinov2_detr_efficient.py``
(lazy efficient window 16, not 12).
"""
import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf

from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, get_cfg, instantiate

from dinov2od.d2 import DINOv2DETR, add_dinov2od_config
from dinov2od.d2.config import CONFIG_MODEL, KEYS, model_arguments
from dinov2od.modeling import (
    BACKBONES,
    PRESETS,
    CriterionOptions,
    DecoderOptions,
    DeformableDecoder,
    DINOv2ObjectDetector,
    MatcherOptions,
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
    return () if row[2] is None else (row[2],) if isinstance(row[2], str) else tuple(row[2])


def unmapped_leaves(model_leaves, keys):
    """The option leaves that no row of ``keys`` names."""
    mapped = {p for row in keys for p in row_paths(row)} | set(DETECTRON2_KEYS) | NOT_OPTIONS
    return sorted(path for path, value in model_leaves.items()
                  if path not in mapped and not path.endswith("._target_")
                  and not (isinstance(value, str) and value.startswith("${")))


MODEL_ROWS = [row for row in KEYS if row_paths(row) and row_paths(row)[0].startswith("model.")]


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_lazy_model_leaf_has_a_yacs_key(name):
    model_leaves = lazy_model_leaves(name)
    assert len(model_leaves) > 60  # the walk reaches into detector.backbone and criterion.matcher
    assert unmapped_leaves(model_leaves, KEYS) == [], "lazy options without a row in dinov2od/d2/config/keys.py's KEYS"
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


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _defaults(fn, skip=()):
    return {p.name: p.default for p in list(inspect.signature(fn).parameters.values())[1:]
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in skip}


def test_every_constructor_default_is_the_lazy_value():
    """The chain's other end, by value: each constructor option is a leaf of the lazy config holding
    the constructor's default (so, by the walk above, the yacs default too). The differences are
    the configs' own choices (``CONFIG_MODEL``: ViT-B, an empty ``arch_overrides``) and the weights
    the model file names."""
    cfg = OmegaConf.to_container(LazyConfig.load(os.path.join(ROOT, MODEL_CONFIGS[0])).model, resolve=True)
    det, crit = cfg["detector"], cfg["criterion"]
    differ = {}

    def compare(where, node, defaults):
        for name, default in defaults.items():
            assert name in node, f"{where}.{name}: a constructor option missing from the lazy config"
            if _plain(node[name]) != _plain(default):
                differ[f"{where}.{name}"] = (node[name], default)

    decoder = {f.name: f.default for f in dataclasses.fields(DecoderOptions)}
    decoder.pop("num_levels"), decoder.pop("num_layers")  # the neck's levels; num_decoder_layers
    compare("detector", det, decoder)
    # modules, and the detector's [0, 1] statistics (unused in Detectron2: the meta-arch normalizes)
    compare("detector", det, _defaults(DINOv2ObjectDetector.__init__,
                                       skip=("backbone", "neck", "decoder", "pixel_mean", "pixel_std")))
    for family in ("dinov2", "dinov3"):
        compare("detector.backbone", det["backbone"], family_options(BACKBONES[family]))
    compare("criterion", crit, _defaults(SetCriterion.__init__, skip=("num_classes", "matcher", "weight_dict",
                                                                      "num_aux_layers", "two_stage")))
    compare("criterion.weight_dict", crit["weight_dict"], CriterionOptions.base_weights())
    compare("criterion.matcher", crit["matcher"], {f.name: f.default for f in dataclasses.fields(MatcherOptions)})
    compare("", cfg, _defaults(DINOv2DETR.__init__, skip=("detector", "criterion", "num_classes")))
    assert differ == {
        "detector.backbone.arch": (CONFIG_MODEL["detector.backbone.arch"], None),
        "detector.backbone.arch_overrides": ({}, None),
        "detector.backbone.pretrained": ("facebook/dinov2-base", None),
    }
    assert cfg["num_classes"] == det["num_classes"] == crit["num_classes"]  # one value, interpolated


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


def test_the_preset_is_one_table_for_every_route():
    """``PRESETS["efficient"]`` is what the lazy preset file, the yacs preset key and the benchmark's
    plain presets hold, by value."""
    from dinov2od.benchmark.models import PLAIN_PRESETS

    assert PLAIN_PRESETS is PRESETS
    base = OmegaConf.to_container(LazyConfig.load(os.path.join(ROOT, MODEL_CONFIGS[0])).model, resolve=True)
    lazy = OmegaConf.to_container(LazyConfig.load(os.path.join(ROOT, MODEL_CONFIGS[1])).model, resolve=True)
    changed = {p: v for p, v in leaves(lazy).items() if leaves(base)[p] != v}
    preset = PRESETS["efficient"]
    assert changed == {"model.detector.backbone.window_size": preset["backbone"]["window_size"],
                       "model.detector.scale_factors": list(preset["scale_factors"]),
                       "model.detector.num_decoder_layers": preset["num_decoder_layers"]}
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/yaml/Base-DINOv2DETR-efficient.yaml"))
    yacs = model_arguments(cfg)
    assert {p: _plain(v) for p, v in leaves(yacs).items() if f"model.{p[len('model.'):]}" in changed} == changed
    # a value the YAML sets wins over the preset; an unknown preset is named
    cfg.merge_from_list(["MODEL.DINOV2OD.DEC_LAYERS", 4])
    assert model_arguments(cfg)["detector"]["num_decoder_layers"] == 4
    cfg.MODEL.DINOV2OD.PRESET = "fast"
    with pytest.raises(KeyError, match="MODEL.DINOV2OD.PRESET='fast' is no preset.*efficient"):
        model_arguments(cfg)


def test_a_key_typed_on_the_command_line_wins_over_the_preset_even_at_its_base_default(tmp_path):
    """``MODEL.DINOV2OD.DEC_LAYERS 6`` typed over the efficient base (6 is the base default): the model
    gets 6 layers, as typed; a key the files set wins too; the keys nobody set get the preset's values,
    and the saved config holds them (PRESET cleared, so reading it back gives the same model).
    Negative control: without resolve_preset in load_config, model_arguments could not tell a typed 6
    from the base default and gave the preset's 3 (this test then fails at the first assert)."""
    from dinov2od.d2.config import load_config

    efficient = os.path.join(ROOT, "configs/yaml/Base-DINOv2DETR-efficient.yaml")
    cfg = load_config(efficient, ["MODEL.DINOV2OD.DEC_LAYERS", "6"], resolve_data=False)
    detector = model_arguments(cfg)["detector"]
    assert detector["num_decoder_layers"] == 6
    assert detector["backbone"]["window_size"] == PRESETS["efficient"]["backbone"]["window_size"]
    assert list(detector["scale_factors"]) == list(PRESETS["efficient"]["scale_factors"])
    # a file that sets a key at its base default over the efficient base: the file wins
    child = tmp_path / "child.yaml"
    child.write_text(f"_BASE_: {efficient}\nMODEL:\n  DINOV2OD:\n    SCALE_FACTORS: [2.0, 1.0, 0.5, 0.25]\n")
    cfg = load_config(str(child), [], resolve_data=False)
    assert list(model_arguments(cfg)["detector"]["scale_factors"]) == [2.0, 1.0, 0.5, 0.25]
    assert model_arguments(cfg)["detector"]["num_decoder_layers"] == PRESETS["efficient"]["num_decoder_layers"]
    # the saved config: the values, no preset left to apply
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.dump())
    again = load_config(str(saved), [], resolve_data=False)
    assert again.MODEL.DINOV2OD.PRESET == "" and model_arguments(again) == model_arguments(cfg)


# ------------------------------------------------------------------ a changed declaration, every route
# (file, the declaration as written, the changed one): a decoder, a shared backbone, a loss, a matcher
# option and the efficient preset
CHANGES = [
    ("dinov2od/modeling/decoder.py", "    num_queries: int = 300\n", "    num_queries: int = 123\n"),
    ("dinov2od/modeling/backbones/options.py", "    lora_rank: int = 8\n", "    lora_rank: int = 5\n"),
    ("dinov2od/modeling/criterion.py", "    loss_bbox: float = 5.0\n", "    loss_bbox: float = 7.0\n"),
    ("dinov2od/modeling/matcher.py", "    cost_giou: float = 2.0\n", "    cost_giou: float = 3.0\n"),
    ("dinov2od/modeling/presets.py", "backbone=dict(window_size=16)", "backbone=dict(window_size=12)"),
]

# What each route gives for the changed options, run in the changed copy (one process: every module
# reads the declarations as it is imported).
ROUTES = textwrap.dedent("""
    import json, sys
    from detectron2.config import CfgNode as CN, LazyConfig, get_cfg, instantiate
    from dinov2od.d2 import DINOv2DETR, add_dinov2od_config
    from dinov2od.d2.config import model_arguments
    from dinov2od.modeling import DINOv2ObjectDetector, HungarianMatcher, SetCriterion
    from dinov2od.benchmark.models import PLAIN_PRESETS

    VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

    def built(meta):
        det = meta.detector
        return dict(num_queries=det.num_queries, lora_rank=det.backbone.lora_config["rank"],
                    loss_bbox=meta.criterion.weight_dict["loss_bbox"], cost_giou=meta.criterion.matcher.cost_giou)

    out = {}
    lazy = LazyConfig.load("configs/common/models/dinov2_detr.py")
    m = lazy.model
    out["lazy config"] = dict(num_queries=m.detector.num_queries, lora_rank=m.detector.backbone.lora_rank,
                              loss_bbox=m.criterion.weight_dict.loss_bbox, cost_giou=m.criterion.matcher.cost_giou)
    m.detector.backbone.update(arch="tiny", pretrained=None, arch_overrides=VIT, num_taps=2)
    out["lazy instantiate"] = built(instantiate(m))
    eff = LazyConfig.load("configs/common/models/dinov2_detr_efficient.py").model
    out["lazy efficient"] = dict(window_size=eff.detector.backbone.window_size)

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    d = cfg.MODEL.DINOV2OD
    out["yacs keys"] = dict(num_queries=d.NUM_QUERIES, lora_rank=d.BACKBONE.LORA_RANK, loss_bbox=d.LOSS.BBOX_WEIGHT,
                            cost_giou=d.MATCHER.COST_GIOU)
    cfg.merge_from_file("configs/yaml/Base-DINOv2DETR.yaml")
    cfg.merge_from_list(["MODEL.DINOV2OD.BACKBONE.ARCH", "tiny", "MODEL.DINOV2OD.BACKBONE.NUM_TAPS", 2])
    cfg.MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES = CN(VIT)
    out["yacs build"] = built(DINOv2DETR(cfg))
    eff = get_cfg()
    add_dinov2od_config(eff)
    eff.merge_from_file("configs/yaml/Base-DINOv2DETR-efficient.yaml")
    out["yacs efficient"] = dict(window_size=model_arguments(eff)["detector"]["backbone"]["window_size"])

    for family in ("dinov2", "dinov3"):
        det = DINOv2ObjectDetector(num_classes=3, backbone=dict(family=family, arch="tiny", arch_overrides=VIT,
                                                                num_taps=2))
        crit = SetCriterion(3)
        out[f"plain {family}"] = dict(num_queries=det.num_queries, lora_rank=det.backbone.lora_config["rank"],
                                      loss_bbox=crit.weight_dict["loss_bbox"], cost_giou=crit.matcher.cost_giou)
    out["plain matcher"] = dict(cost_giou=HungarianMatcher().cost_giou)
    out["plain efficient"] = dict(window_size=PLAIN_PRESETS["efficient"]["backbone"]["window_size"])
    json.dump(out, sys.stdout)
""")


def test_a_changed_declaration_reaches_every_route(tmp_path):
    """Change five declarations in a copy of the package (and configs) and read each route there:
    the lazy config and its instantiated model, the yacs keys and the model built from them, the
    plain constructors (both backbone families) and the efficient preset of all three. Negative
    controls: see the module docstring."""
    for folder in ("dinov2od", "configs"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so", "csrc"))
    for path, old, new in CHANGES:
        text = (tmp_path / path).read_text()
        assert text.count(old) == 1, f"{path}: the declaration {old!r} is not written once"
        (tmp_path / path).write_text(text.replace(old, new))
    env = dict(os.environ, PYTHONPATH=str(tmp_path), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", ROUTES], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    routes = json.loads(run.stdout.strip().splitlines()[-1])
    changed = dict(num_queries=123, lora_rank=5, loss_bbox=7.0, cost_giou=3.0, window_size=12)
    wrong = {route: {k: v for k, v in got.items() if v != changed[k]} for route, got in routes.items()}
    assert {route: w for route, w in wrong.items() if w} == {}
    assert len(routes) == 10


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
