"""Overrides mean what they say (issue 29, item 5): config loading only, no training.

* what the user typed wins: ``train.max_iter=N`` / ``SOLVER.MAX_ITER N`` on the command line beats
  the file's ``train.epochs`` / ``SOLVER.MAX_EPOCHS``; ``train.epochs=E`` on the command line beats
  the file's ``max_iter``; both on the command line is an error; one log line says which set the
  schedule;
* an unknown lazy key on the command line is an error naming it and the nearest known key, before
  anything is built or registered; keys the config does not write but its LazyCall callables take
  are known; ``+key=value`` adds a key on purpose; a run's saved config.yaml loads with overrides;
* every override the tests and the docs use on a shipped lazy config is known to that config.

Negative controls (run by hand, then restored):
* ``_schedule_origin`` in dinov2od/d2/config/batch.py returning early (``return None`` as its first
  line: the file's epochs overwrite the typed max_iter, as on main before this change) fails
  ``test_typed_max_iter_beats_the_files_epochs`` (both styles: max_iter 75 / 150, not 3) and
  ``test_both_on_the_command_line_is_an_error``.
* ``check_lazy_overrides`` returning at once (as main did: no check) fails the unknown-key tests
  (``train.max_itr=10`` loads; ``dataset.rooot`` reports "names no dataset").
* ``_kwargs_followed`` returning None for DINOv2ObjectDetector fails
  ``test_keys_of_lazycall_arguments_are_known`` (``model.detector.bogus_option`` passes).
"""
import json
import logging
import math
import os
import re

import pytest

from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog

from tests.helpers import ROOT
from tests.helpers.configs import TINY
from dinov2od.d2.config import UnknownKeyError, check_lazy_overrides, load_config
from tests.helpers.user_data import unique_dataset_name, write_roboflow_dataset

CUSTOM_PY = os.path.join(ROOT, "configs/custom.py")
CUSTOM_YAML = os.path.join(ROOT, "configs/yaml/custom.yaml")
LAZY_CONFIGS = ("coco.py", "coco_dinov3.py", "custom.py", "custom_tiny.py", "debug_overfit.py", "shapes.py",
                "shapes_efficient.py")


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    return write_roboflow_dataset(str(tmp_path_factory.mktemp("toys")), num_train=12, num_valid=4)


@pytest.fixture(scope="module")
def with_boxes(toys):
    data = json.load(open(os.path.join(toys, "train/_annotations.coco.json")))
    return len({a["image_id"] for a in data["annotations"]})  # counted here, from the json itself


def _data(style, toys):
    name = unique_dataset_name(f"ov{style}")
    return [f"dataset.root={toys}", f"dataset.name={name}"] if style == "lazy" else \
        ["DATASETS.ROOT", toys, "DATASETS.NAME", name]


def _schedule_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("schedule:")]


# ---------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("style", ["lazy", "yacs"])
def test_typed_max_iter_beats_the_files_epochs(toys, style, caplog):
    caplog.set_level(logging.INFO, logger="dinov2od")
    if style == "lazy":
        cfg = load_config(CUSTOM_PY, [*_data(style, toys), "train.max_iter=3"])
        assert cfg.train.max_iter == 3 and not cfg.train.epochs  # custom.py has train.epochs = 50
        expected = f"schedule: train.max_iter=3 from the command line (train.epochs=50 from {CUSTOM_PY} not used)"
    else:
        cfg = load_config(CUSTOM_YAML, [*_data(style, toys), "SOLVER.MAX_ITER", "3"])
        assert cfg.SOLVER.MAX_ITER == 3 and cfg.SOLVER.MAX_EPOCHS == 0  # custom.yaml has MAX_EPOCHS: 50
        expected = f"schedule: SOLVER.MAX_ITER 3 from the command line (SOLVER.MAX_EPOCHS 50 from {CUSTOM_YAML} not used)"
    assert _schedule_lines(caplog) == [expected]


@pytest.mark.parametrize("style", ["lazy", "yacs"])
def test_typed_epochs_beat_the_files_max_iter(toys, with_boxes, style, caplog):
    caplog.set_level(logging.INFO, logger="dinov2od")
    if style == "lazy":  # custom.py: max_iter 400, batch 8
        cfg = load_config(CUSTOM_PY, [*_data(style, toys), "train.epochs=4"])
        n = math.ceil(4 * with_boxes / 8)
        assert cfg.train.max_iter == n
        expected = f"schedule: train.epochs=4 from the command line sets train.max_iter={n} " \
                   f"(train.max_iter=400 from {CUSTOM_PY} not used)"
    else:  # custom.yaml: MAX_ITER 400, STEPS (320,), IMS_PER_BATCH 8
        cfg = load_config(CUSTOM_YAML, [*_data(style, toys), "SOLVER.MAX_EPOCHS", "4"])
        n = math.ceil(4 * with_boxes / 8)
        assert cfg.SOLVER.MAX_ITER == n and cfg.SOLVER.STEPS == (max(1, round(0.8 * n)),)
        expected = f"schedule: SOLVER.MAX_EPOCHS 4 from the command line sets SOLVER.MAX_ITER {n} " \
                   f"(SOLVER.MAX_ITER 400 from {CUSTOM_YAML} not used)"
    assert _schedule_lines(caplog) == [expected]


def test_the_files_own_schedule_is_logged(toys, with_boxes, caplog):
    caplog.set_level(logging.INFO, logger="dinov2od")
    cfg = load_config(CUSTOM_PY, _data("lazy", toys))
    n = math.ceil(50 * with_boxes / 8)
    assert cfg.train.max_iter == n
    assert _schedule_lines(caplog) == [
        f"schedule: train.epochs=50 from {CUSTOM_PY} sets train.max_iter={n} (train.max_iter=400 from {CUSTOM_PY} not used)"]
    caplog.clear()
    load_config(CUSTOM_PY, [*_data("lazy", toys), "train.epochs=None"])  # epochs off: the file's max_iter
    assert _schedule_lines(caplog) == [f"schedule: train.max_iter=400 from {CUSTOM_PY}"]


@pytest.mark.parametrize("style", ["lazy", "yacs"])
def test_both_on_the_command_line_is_an_error(toys, style):
    if style == "lazy":
        with pytest.raises(ValueError, match=r"train\.max_iter=3 and train\.epochs=2 are both on the command line"):
            load_config(CUSTOM_PY, [*_data(style, toys), "train.max_iter=3", "train.epochs=2"])
        cfg = load_config(CUSTOM_PY, [*_data(style, toys), "train.max_iter=3", "train.epochs=None"])  # epochs off
    else:
        with pytest.raises(ValueError, match=r"SOLVER\.MAX_ITER 3 and SOLVER\.MAX_EPOCHS 2 are both on the command"):
            load_config(CUSTOM_YAML, [*_data(style, toys), "SOLVER.MAX_ITER", "3", "SOLVER.MAX_EPOCHS", "2"])
        cfg = load_config(CUSTOM_YAML, [*_data(style, toys), "SOLVER.MAX_ITER", "3", "SOLVER.MAX_EPOCHS", "0"])
    assert (cfg.train.max_iter if style == "lazy" else cfg.SOLVER.MAX_ITER) == 3


# ---------------------------------------------------------------------------- unknown keys
def test_misspelt_lazy_key_is_an_error_naming_the_nearest(toys):
    with pytest.raises(UnknownKeyError) as err:
        load_config(CUSTOM_PY, [*_data("lazy", toys), "train.max_itr=10"])
    msg = str(err.value)
    assert "train.max_itr: did you mean train.max_iter?" in msg and "+train.max_itr=VALUE" in msg
    with pytest.raises(KeyError, match=r"(?s)dataset\.rooot: did you mean dataset\.root\?"):  # not "names no dataset"
        load_config(CUSTOM_PY, [f"dataset.rooot={toys}"])


def test_unknown_key_fails_before_anything_is_registered(tmp_path):
    name = unique_dataset_name("never")
    with pytest.raises(UnknownKeyError, match=r"model\.detector\.num_querys: did you mean model\.detector\.num_queries"):
        load_config(CUSTOM_PY, [f"dataset.root={tmp_path / 'missing'}", f"dataset.name={name}",
                                "model.detector.num_querys=10"])
    assert f"{name}_train" not in DatasetCatalog.list()


def test_every_unknown_key_is_named_at_once():
    with pytest.raises(UnknownKeyError) as err:
        load_config(CUSTOM_PY, ["optimizer.lrr=1", "train.lr=2", "model.detectr.num_queries=3"], resolve_data=False)
    msg = str(err.value)
    assert msg.startswith(f"Unknown config keys on the command line for {CUSTOM_PY}:")
    assert "optimizer.lrr: did you mean optimizer.lr?" in msg
    assert "train.lr: did you mean optimizer.lr?" in msg  # the name in another section
    assert "model.detectr.num_queries: did you mean model.detector.num_queries?" in msg


def test_yacs_unknown_key_names_the_nearest():
    with pytest.raises(KeyError, match=r"SOLVER\.MAX_ITR: did you mean SOLVER\.MAX_ITER\?"):
        load_config(CUSTOM_YAML, ["SOLVER.MAX_ITR", "10"], resolve_data=False)


def test_keys_of_lazycall_arguments_are_known():
    cfg = LazyConfig.load(CUSTOM_PY)
    # not written in the config, but arguments of the callables: DINOv2ObjectDetector's neck,
    # build_detection_train_loader's sampler (and its **kwargs, passed to the DataLoader)
    check_lazy_overrides(cfg, ["model.detector.neck=None", "dataloader.train.sampler=None",
                               "dataloader.train.pin_memory=True"])
    # an empty mapping argument is filled freely (coco.py's arch_overrides={}) ...
    check_lazy_overrides(LazyConfig.load(os.path.join(ROOT, "configs/coco.py")),
                         ["model.detector.backbone.arch_overrides.layer_norm_eps=1e-5"])
    # ... and the detector's **decoder_options are followed to DecoderOptions
    with pytest.raises(UnknownKeyError, match=r"model\.detector\.bogus_option"):
        check_lazy_overrides(cfg, ["model.detector.bogus_option=1"])
    with pytest.raises(UnknownKeyError, match=r"model\.detector\.backbone\.lora_alfa: did you mean "
                                              r"model\.detector\.backbone\.lora_alpha"):
        check_lazy_overrides(cfg, ["model.detector.backbone.lora_alfa=4"])


def test_plus_adds_a_key_on_purpose():
    cfg = load_config(CUSTOM_PY, ["+train.my_note=7", "+model.detector.backbone.arch_overrides.layer_norm_eps=1e-5"],
                      resolve_data=False)
    assert cfg.train.my_note == 7 and cfg.model.detector.backbone.arch_overrides.layer_norm_eps == 1e-5


def test_typed_none_is_none_as_in_the_config_files(toys):
    """``model.num_classes=None`` (how configs/custom*.py write it, and what check_num_classes' message
    offers) is None, so the class count comes from the data; Hydra alone reads it as the string
    "None" and the run failed with an AttributeError (negative control: without ``_python_none``
    this test fails on ``'None' is not None``). ``null`` keeps working; a quoted word stays a string."""
    cfg = load_config(CUSTOM_PY, ["model.num_classes=None", "train.output_dir=None"], resolve_data=False)
    assert cfg.model.num_classes is None and cfg.train.output_dir is None
    assert load_config(CUSTOM_PY, ["model.num_classes=null"], resolve_data=False).model.num_classes is None
    assert load_config(CUSTOM_PY, ["dataset.name=Nonesuch"], resolve_data=False).dataset.name == "Nonesuch"
    cfg = load_config(CUSTOM_PY, _data("lazy", toys) + ["model.num_classes=None"])
    classes = json.load(open(os.path.join(toys, "train/_annotations.coco.json")))["categories"]
    assert cfg.model.num_classes == len(classes) == 3


def test_a_runs_saved_config_yaml_loads_with_overrides(tmp_path, toys):
    saved = str(tmp_path / "config.yaml")
    LazyConfig.save(load_config(CUSTOM_PY, _data("lazy", toys)), saved)  # as a run saves it: resolved
    cfg = load_config(saved, ["train.max_iter=5", "model.detector.backbone.lora_alpha=4.0",
                              "model.detector.neck=None"], resolve_data=False)
    assert cfg.train.max_iter == 5 and cfg.model.detector.backbone.lora_alpha == 4.0
    with pytest.raises(UnknownKeyError, match=r"train\.max_itr: did you mean train\.max_iter\?"):
        load_config(saved, ["train.max_itr=5"], resolve_data=False)


# ---------------------------------------------------------------------------- what the project types
@pytest.mark.parametrize("name", [n for n in LAZY_CONFIGS if not n.startswith("coco")])  # TINY: the demo's
def test_the_tests_tiny_overrides_are_known(name):
    check_lazy_overrides(LazyConfig.load(os.path.join(ROOT, "configs", name)), TINY)


def _doc_files():
    files = [os.path.join(ROOT, f) for f in ("README.md", "MODEL_CARD.md", "Makefile")]
    for folder, ext in (("docs", ".md"), ("configs", ".py"), ("tools", ".py")):
        files += [os.path.join(ROOT, folder, f) for f in sorted(os.listdir(os.path.join(ROOT, folder))) if f.endswith(ext)]
    return files


def _documented_overrides():
    """(file, config, key) for every ``key=value`` written after ``--config-file configs/X.py`` in
    the docs, README, Makefile, configs and tools (config None: a key named in prose)."""
    out = set()
    for path in _doc_files():
        text = open(path).read().replace("\\\n", " ")
        for line in text.splitlines():
            m = re.search(r"--config-file\s+(configs/[\w/]+\.py)(.*)", line)
            if m:
                for key in re.findall(r"(?:^|\s)([a-z_][\w.]*\.[\w.]+)=", m.group(2)):
                    out.add((os.path.relpath(path, ROOT), m.group(1), key))
        for key in re.findall(r"(?<![\w.$/-])((?:model|train|dataloader|optimizer|lr_multiplier|dataset)\.[\w.]+)=",
                              text):
            out.add((os.path.relpath(path, ROOT), None, key))
    return sorted(out, key=str)


def test_documented_overrides_are_known():
    """A key after ``--config-file X`` is known to X; a key named anywhere else is known to at
    least one shipped lazy config."""
    found = _documented_overrides()
    assert len([f for f in found if f[1]]) >= 5 and len(found) > 40  # the parser sees the docs
    configs = {name: LazyConfig.load(os.path.join(ROOT, "configs", name)) for name in LAZY_CONFIGS}

    def known(name, key):
        try:
            check_lazy_overrides(configs[name], [f"{key}=1"])
            return True
        except UnknownKeyError:
            return False

    unknown = [f"{doc}: {config or 'no shipped config'}: {key}" for doc, config, key in found
               if not (known(config[len("configs/"):], key) if config else any(known(n, key) for n in configs))]
    assert not unknown, "unknown keys:\n" + "\n".join(unknown)
