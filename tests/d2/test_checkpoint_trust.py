"""Loading that cannot run code, at every Detectron2 entry point (issue 29, item 1; SECURITY.md).

A malicious checkpoint (the tiny yacs model's real weights plus an object whose ``__reduce__``
runs ``exec`` to write a marker file; tests/modeling/test_checkpoint_io.py shows, in another
process, that ``torch.load(weights_only=False)`` does run it) is refused with a message naming the
file, the refused ``exec`` and the opt-in by ``CrashSafeCheckpointer`` / ``load_inference_weights``,
``classes_in_checkpoint``, ``--eval-only``, fine-tuning from ``train.init_checkpoint``, ``--resume``,
``tools/predict.py``, ``tools/export_onnx.py``, ``tools/convert_checkpoint.py``, Detectron2's
``DefaultPredictor`` and ``LazyPredictor``; the marker never appears. Naming the file in
``DINOV2OD_TRUSTED_CHECKPOINTS`` loads it (and the payload runs). The safetensors export predicts
exactly as the ``.pth`` it came from. (The project's own training checkpoints load with
``weights_only=True``: asserted in tests/d2/test_checkpoint.py on the runs it trains.)
"""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from dinov2od.d2.checkpoint import CrashSafeCheckpointer, load_inference_weights
from dinov2od.modeling.checkpoint_io import TRUSTED_ENV, UnsafeCheckpointError, export_for_inference

from tests.helpers import ROOT
from tests.helpers.checkpoints import assert_refused, write_malicious
from tests.helpers.configs import TINY, TINY_CLASSES, TINY_YACS, YACS_YAML, build_tiny_yacs_model

sys.path.insert(0, os.path.join(ROOT, "tools"))
OPTS = [str(v) for v in TINY_YACS]


@pytest.fixture
def evil(tiny_yacs_checkpoint, tmp_path, monkeypatch):
    """(path, marker): the tiny yacs checkpoint with a payload that writes ``marker`` when unpickled."""
    monkeypatch.delenv(TRUSTED_ENV, raising=False)
    state = torch.load(tiny_yacs_checkpoint["weights"], map_location="cpu", weights_only=True)
    marker = str(tmp_path / "marker")
    return write_malicious(tmp_path / "evil.pth", marker, state), marker


def _yacs_cfg(weights=""):
    from detectron2.config import get_cfg

    from dinov2od.d2 import add_dinov2od_config

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(YACS_YAML)
    cfg.merge_from_list(OPTS)
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", weights
    return cfg


def _lazy_cfg(tiny_config, *extra):
    from detectron2.config import LazyConfig

    return LazyConfig.apply_overrides(LazyConfig.load(tiny_config), [*TINY, *extra])


def test_checkpointer_loaders_refuse_it(evil, tmp_path):
    from dinov2od.d2.data.metadata import classes_in_checkpoint

    path, marker = evil
    model = build_tiny_yacs_model()
    for load in (lambda p: CrashSafeCheckpointer(model, save_to_disk=False).load(p),
                 lambda p: load_inference_weights(model, p), classes_in_checkpoint):
        with pytest.raises(UnsafeCheckpointError) as e:
            load(path)
        assert_refused(e, path, marker)
    pkl = write_malicious(tmp_path / "evil.pkl", marker, {"model": {}, "__author__": "x"})  # Detectron2's zoo format
    with pytest.raises(UnsafeCheckpointError) as e:
        CrashSafeCheckpointer(model, save_to_disk=False).load(pkl)
    assert_refused(e, pkl, marker)
    # a truncated checkpoint's message names the newest complete one beside it, found without unpickling
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(path, run / "model_0000009.pth")
    data = (run / "model_0000009.pth").read_bytes()
    (run / "model_0000010.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated or corrupt.*model_0000009\.pth"):
        load_inference_weights(model, str(run / "model_0000010.pth"))
    assert not os.path.exists(marker)


def test_default_predictor_and_lazy_predictor_refuse_it(evil, tiny_config):
    from detectron2.engine import DefaultPredictor

    from dinov2od.d2.engine.predictor import LazyPredictor

    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as e:  # Detectron2's own DetectionCheckpointer, MODEL.WEIGHTS
        DefaultPredictor(_yacs_cfg(path))
    assert_refused(e, path, marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        LazyPredictor(_lazy_cfg(tiny_config), path, device="cpu")
    assert_refused(e, path, marker)


def test_tools_refuse_it(evil, tmp_path):
    import convert_checkpoint
    import export_onnx
    import predict

    path, marker = evil
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    runs = {
        "predict.py": lambda: predict.main(["--config-file", YACS_YAML, "--weights", path, "--input", str(image),
                                            "--output", str(tmp_path / "out"), *OPTS]),
        "export_onnx.py": lambda: export_onnx.main(["--config-file", YACS_YAML, "--weights", path, "--output",
                                                    str(tmp_path / "m.onnx"), "--size", "56", "56", *OPTS]),
        "convert_checkpoint.py": lambda: convert_checkpoint.main([path, str(tmp_path / "m.safetensors")]),
    }
    for tool, run in runs.items():
        with pytest.raises(SystemExit) as e:
            run()
        assert str(e.value).startswith(tool), e.value
        assert_refused(e.value.code, path, marker)
    assert not os.path.exists(tmp_path / "m.onnx") and not os.path.exists(tmp_path / "m.safetensors")


def test_training_entry_points_refuse_it(evil, tiny_config, train_net, tmp_path):
    from dinov2od.d2.engine.trainer import LazyTrainer

    path, marker = evil
    with pytest.raises(UnsafeCheckpointError) as e:  # --eval-only (yacs, through train_net's main)
        train_net.run(YACS_YAML, *OPTS, "MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "ev"), flags=["--eval-only"])
    assert_refused(e, path, marker)
    with pytest.raises(UnsafeCheckpointError) as e:  # --eval-only (lazy)
        LazyTrainer.eval_only(_lazy_cfg(tiny_config, f"train.output_dir={tmp_path / 'ev2'}",
                                        f"train.init_checkpoint={path}"))
    assert_refused(e, path, marker)
    with pytest.raises(UnsafeCheckpointError) as e:  # fine-tuning from train.init_checkpoint
        LazyTrainer(_lazy_cfg(tiny_config, f"train.output_dir={tmp_path / 'ft'}",
                              f"train.init_checkpoint={path}")).resume_or_load(resume=False)
    assert_refused(e, path, marker)
    run = tmp_path / "run"  # --resume: last_checkpoint names it
    run.mkdir()
    shutil.copy(path, run / "model_0000009.pth")
    (run / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(UnsafeCheckpointError) as e:
        LazyTrainer(_lazy_cfg(tiny_config, f"train.output_dir={run}")).resume_or_load(resume=True)
    assert_refused(e, str(run / "model_0000009.pth"), marker)


def test_the_opt_in_by_name_loads_it(evil, tiny_yacs_checkpoint, monkeypatch):
    """Naming the file loads it at the Detectron2 entry points too, and then the payload does run."""
    from detectron2.engine import DefaultPredictor

    path, marker = evil
    monkeypatch.setenv(TRUSTED_ENV, path)
    model = build_tiny_yacs_model()
    load_inference_weights(model, path)
    assert open(marker).read() == "payload ran"
    expected = tiny_yacs_checkpoint["model"].state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    os.remove(marker)
    DefaultPredictor(_yacs_cfg(path))
    assert os.path.exists(marker)


def test_safetensors_export_predicts_as_the_pth(tiny_yacs_checkpoint, tmp_path):
    """tools/convert_checkpoint.py with the config: the .safetensors + JSON give identical predictions through
    DefaultPredictor (MODEL.WEIGHTS), tools/predict.py and the plain API's from_exported."""
    import convert_checkpoint
    import predict
    from detectron2.engine import DefaultPredictor
    from PIL import Image

    from dinov2od.modeling import DINOv2ObjectDetector

    pth = tiny_yacs_checkpoint["weights"]
    st = str(tmp_path / "tiny.safetensors")
    convert_checkpoint.main([pth, st, "--config-file", YACS_YAML, *OPTS])
    info = json.load(open(tmp_path / "tiny.json"))
    assert (info["class_names"], info["category_ids"]) == TINY_CLASSES and info["num_classes"] == 3
    assert info["detector_kwargs_note"].startswith("checked") and info["meta_architecture"]["input_format"]
    # the plain detector's weights (keys without "detector."), as the plain API exports them, load there too
    plain_st, _ = export_for_inference(tiny_yacs_checkpoint["model"].detector, str(tmp_path / "plain.safetensors"))
    image = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    outs = [DefaultPredictor(_yacs_cfg(w))(image)["instances"] for w in (pth, st, plain_st)]
    for out in outs[1:]:
        assert len(outs[0]) and torch.equal(outs[0].pred_boxes.tensor, out.pred_boxes.tensor)
        assert torch.equal(outs[0].scores, out.scores) and torch.equal(outs[0].pred_classes, out.pred_classes)
    Image.fromarray(image).save(tmp_path / "a.png")
    results = [predict.main(["--config-file", YACS_YAML, "--weights", w, "--input", str(tmp_path / "a.png"),
                             "--output", str(tmp_path / f"out{i}"), *OPTS]) for i, w in enumerate((pth, st))]
    assert results[0] == results[1] and {r["category_id"] for r in results[0]} <= {7, 11, 42}
    plain = DINOv2ObjectDetector.from_exported(st)
    x = torch.rand(2, 3, 56, 70)
    for a, b in zip(tiny_yacs_checkpoint["model"].detector.predict(x), plain.predict(x)):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"]) and a["names"] == b["names"]
