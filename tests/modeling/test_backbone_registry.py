"""dinov2od.modeling.backbones: each module imports alone and none imports one that imports it back;
families are registered by name and built through build_backbone, the detector and the yacs keys;
bad families and options give clear errors;
drop_path_rate means the same for every family and every weight source."""
import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from dinov2od.modeling import (
    BACKBONE_FAMILIES,
    BACKBONES,
    DINOv2Backbone,
    DINOv2ObjectDetector,
    DINOv3Backbone,
    ViTBackbone,
    build_backbone,
    hf_to_official_state_dict,
    register_backbone,
)
from dinov2od.modeling import backbones

from tests.helpers import ROOT

MODELING = os.path.join(ROOT, "dinov2od", "modeling")
NEW_MODULES = ["base", "registry", "loading", "dinov2", "dinov3"]
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
SMALL = dict(arch="tiny", arch_overrides=TINY, num_taps=2, lora_rank=0)


# ---------------------------------------------------------------------------- imports
def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str):
    """dinov2od.modeling modules a file imports anywhere (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule`
        else:
            continue
        found.update(t for t in targets if t.startswith("dinov2od.modeling"))
    return found


def _graph():
    files = [os.path.join(d, f) for d, _, fs in os.walk(MODELING) for f in fs if f.endswith(".py")]
    modules = {_module_name(f): f for f in files}
    return {m: {t for t in _imports(f) if t in modules and t != m} for m, f in modules.items()}


def test_no_module_imports_one_that_imports_it_back():
    """The import graph of dinov2od.modeling (every import statement, function-level ones included)
    has no cycle: a module never needs a module that needs it."""
    graph = _graph()
    assert {f"dinov2od.modeling.backbones.{m}" for m in NEW_MODULES} <= set(graph)
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for t in sorted(graph[m]):
            visit(t)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    # the layering the package promises: base < registry < families; loading on its own
    b = "dinov2od.modeling.backbones."
    assert not graph[b + "base"] & {b + m for m in NEW_MODULES}
    assert graph[b + "registry"] & {b + m for m in NEW_MODULES} == {b + "base"}
    assert not graph[b + "loading"] & {b + m for m in NEW_MODULES}
    assert b + "dinov2" not in graph[b + "dinov3"] and b + "dinov3" not in graph[b + "dinov2"]


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above catches a function-level import that closes a circle (as the old modules had)."""
    graph = _graph()
    b = "dinov2od.modeling.backbones."
    monkeypatch.setitem(graph, b + "base", graph[b + "base"] | {b + "dinov2"})
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_module_imports_one_that_imports_it_back()


# Imports each name of argv in a child forked from this process, which has imported the heavy
# third-party packages but nothing of dinov2od: each child is a fresh interpreter as far as dinov2od
# goes, without paying torch's start-up again. One json line per name, in order.
FRESH_IMPORTS = """
import importlib, json, os, sys, traceback, warnings
for heavy in ("torch", "torchvision", "numpy", "scipy.optimize", "PIL.Image", "onnx", "onnxruntime"):
    try:
        importlib.import_module(heavy)
    except ImportError:
        pass
assert not [m for m in sys.modules if m.startswith("dinov2od")]
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                __import__(name)
            result = dict(name=name, modules=sorted(m for m in sys.modules if m.startswith("dinov2od")),
                          warnings=[str(w.message) for w in caught if "dinov2od" in str(w.message)])
        except BaseException:
            result = dict(name=name, error=traceback.format_exc())
        print(json.dumps(result), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_each_module_imports_alone():
    """A fresh interpreter imports each module by itself (one forked child per module, from a process
    that has loaded torch and the other third-party packages only)."""
    names = ["dinov2od.modeling.backbones" + (f".{m}" if m else "") for m in NEW_MODULES + [""]]
    proc = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *names], cwd=ROOT, text=True, capture_output=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["name"] for r in results] == names, proc.stdout[-2000:]
    for name, result in zip(names, results):
        assert "error" not in result, f"{name}: {result.get('error', '')[-2000:]}"
        assert name in result["modules"]
        assert result["warnings"] == [], name


def test_public_names_stay_in_dinov2od_modeling():
    import dinov2od.modeling as modeling

    for name in ("ARCHS", "BACKBONE_FAMILIES", "DINOV3_ARCHS", "DINOV3_HUB_IDS", "HUB_IDS", "DINOv2Backbone",
                 "DINOv3Backbone", "PretrainedWeightsUnavailable", "ViTBackbone", "build_backbone",
                 "build_dinov2_config", "build_dinov3_config", "dinov3_official_to_hf_state_dict",
                 "hf_to_official_state_dict", "official_to_hf_state_dict", "pad_to_multiple",
                 "valid_sizes_from_mask", "BACKBONES", "register_backbone"):
        assert name in modeling.__all__ and getattr(modeling, name) is getattr(backbones, name)
    assert BACKBONE_FAMILIES == ("dinov2", "dinov3")
    assert BACKBONES["dinov2"] is DINOv2Backbone and BACKBONES["dinov3"] is DINOv3Backbone
    assert (DINOv2Backbone.default_patch_size, DINOv3Backbone.default_patch_size) == (14, 16)
    assert "giant" in DINOv2Backbone.archs and "huge_plus" in DINOv3Backbone.archs


# ---------------------------------------------------------------------------- a family of one's own
@pytest.fixture
def toy():
    """A family registered from outside the package: DINOv2 blocks whose features are scaled."""

    @register_backbone("Toy")
    class ToyBackbone(DINOv2Backbone):
        display_name = "Toy"

        def __init__(self, toy_gain: float = 1.0, **kwargs):
            super().__init__(**kwargs)
            self.toy_gain = toy_gain

        def forward_padded(self, images, valid_hw=None):
            features, patch_mask = super().forward_padded(images, valid_hw)
            return [f * self.toy_gain for f in features], patch_mask

    yield ToyBackbone
    BACKBONES.pop("toy")


def test_a_registered_family_builds_through_build_backbone_and_the_detector(toy):
    assert BACKBONES["toy"] is toy and toy.family == "toy"
    torch.manual_seed(0)
    bb = build_backbone(family="TOY", toy_gain=2.0, rope_train_augment=True, **SMALL)
    assert isinstance(bb, toy) and bb.family == "toy" and bb.toy_gain == 2.0
    torch.manual_seed(0)
    plain = build_backbone(family="dinov2", toy_gain=1.0, **SMALL)  # another family's option at its default
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        assert torch.allclose(bb.eval()(x)[0][-1], 2 * plain.eval()(x)[0][-1])
    model = DINOv2ObjectDetector(num_classes=3, backbone=dict(family="toy", toy_gain=0.5, **SMALL), hidden_dim=32,
                                 scale_factors=(1.0, 0.5), num_queries=10, num_decoder_layers=1, num_heads=4,
                                 dim_feedforward=64).eval()
    assert isinstance(model.backbone, toy) and model.backbone.toy_gain == 0.5
    dets = model.predict([torch.rand(3, 50, 60), torch.rand(3, 30, 44)], topk=5)
    assert [d["boxes"].shape for d in dets] == [(5, 4), (5, 4)]


def test_a_registered_family_is_reached_by_the_yacs_keys(toy):
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    from dinov2od.d2.config import add_dinov2od_config, build_backbone_from_cfg

    cfg = add_dinov2od_config(get_cfg())
    bb_cfg = cfg.MODEL.DINOV2OD.BACKBONE
    bb_cfg.FAMILY, bb_cfg.ARCH, bb_cfg.NUM_TAPS, bb_cfg.LORA_RANK = "toy", "tiny", 2, 0
    bb_cfg.ARCH_OVERRIDES.update(TINY)
    assert isinstance(build_backbone_from_cfg(cfg), toy)


def test_other_families_options_are_refused_unless_at_their_default(toy):
    with pytest.raises(ValueError, match=r"toy_gain= applies to family='toy' only, not family='dinov3'"):
        build_backbone(family="dinov3", toy_gain=3.0, **SMALL)
    with pytest.raises(ValueError, match=r"registers= applies to family='dinov2' or family='toy' only"):
        build_backbone(family="dinov3", registers=True, **SMALL)


def test_unknown_family_and_unknown_option_give_clear_errors():
    with pytest.raises(ValueError, match=r"family='dinov4' is unknown; choose one of \['dinov2', 'dinov3'\]"):
        build_backbone(family="dinov4")
    with pytest.raises(ValueError, match=r"lora_rnak= is unknown to family='dinov3' \(DINOv3Backbone\); "
                                         r"its options: \[.*'lora_rank'.*'rope_train_augment'"):
        build_backbone(family="dinov3", lora_rnak=4, **SMALL)


def test_register_backbone_refuses_what_cannot_be_a_family():
    with pytest.raises(TypeError, match="ViTBackbone subclass"):
        register_backbone("nope")(torch.nn.Linear)

    class Partial(ViTBackbone):
        def __init__(self, arch=None, speed=1):
            super().__init__()

    with pytest.raises(TypeError, match=r"shared option.*missing \['arch_overrides'"):
        register_backbone("partial")(Partial)

    class Other(DINOv2Backbone):
        pass

    with pytest.raises(ValueError, match="'dinov2' is registered already"):
        register_backbone("dinov2")(Other)
    assert BACKBONES["dinov2"] is DINOv2Backbone and "partial" not in BACKBONES


# ---------------------------------------------------------------------------- drop_path_rate
def _drop_probs(bb):
    return [float(getattr(layer.drop_path, "drop_prob", 0.0)) for layer in bb._layers]


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_drop_path_rate_applies_to_every_source_of_both_families(family, tmp_path, monkeypatch, caplog):
    """One behaviour: drop_path_rate sets the ViT's stochastic depth whether it is random-init, read
    from a save_pretrained folder or from an official .pth, and the loaded weights are unchanged."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    random_init = build_backbone(family=family, drop_path_rate=0.2, **SMALL)
    assert _drop_probs(random_init) == [0.2] * 3 and random_init.vit.config.drop_path_rate == 0.2
    source = build_backbone(family=family, **SMALL)
    assert _drop_probs(source) == [0.0] * 3
    source.vit.save_pretrained(tmp_path)
    sources = [str(tmp_path)]
    if family == "dinov2":
        torch.save(hf_to_official_state_dict(source.vit), tmp_path / "official.pth")
        sources.append(str(tmp_path / "official.pth"))
    for pretrained in sources:
        kw = dict(SMALL, arch_overrides=TINY if pretrained.endswith(".pth") else {})
        if not pretrained.endswith(".pth"):
            kw.pop("arch")
        with caplog.at_level("WARNING", logger="dinov2od"):
            bb = build_backbone(family=family, pretrained=pretrained, drop_path_rate=0.1, **kw)
        assert _drop_probs(bb) == [0.1] * 3 and bb.vit.config.drop_path_rate == 0.1, pretrained
        assert "drop_path_rate" not in caplog.text
        own = source.vit.state_dict()
        for k, v in bb.vit.state_dict().items():
            if k in own:
                assert torch.equal(v, own[k]), k
