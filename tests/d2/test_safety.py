"""Training and weight loading are safe (issue 18, "no checkpoint ever lost"), on the tiny model (CPU).

* A non-finite gradient at the last iteration stops training with nothing written or tagged,
  even where a hook saves ``model_final`` after a failed last iteration.
* The temporary files of a killed save are removed when training starts, with a log line.
* A truncated checkpoint names the newest complete one beside it and the fix (resume, --eval-only).
* No init checkpoint: an accurate message instead of fvcore's "Initializing model from scratch".
* A checkpoint of another architecture is refused with one error at --eval-only, --resume,
  prediction and export; fine-tuning to another class count is allowed and reported in one line;
  a checkpoint without the newer ``class_metadata`` buffer still loads.
"""
import contextlib
import logging
import os
import time

import pytest
import torch

from dinov2od.d2.checkpoint import CrashSafeCheckpointer, load_inference_weights

from tests.helpers import ROOT
from tests.helpers.configs import TINY, TINY_YACS

YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")
LOGGERS = ("fvcore", "detectron2", "dinov2od")


@contextlib.contextmanager
def captured_logs(*names):
    """The messages logged to ``names`` (and their children) inside the block, INFO and up."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(logging.INFO)
    loggers = [logging.getLogger(n) for n in names or LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def lazy_cfg(tiny_config, out, *extra):
    from detectron2.config import LazyConfig

    return LazyConfig.apply_overrides(LazyConfig.load(tiny_config), [*TINY, f"train.output_dir={out}", *extra])


def save_model(cfg, path, classes=None):
    """Build ``cfg.model`` (random init) and save it as a Detectron2 checkpoint at ``path``."""
    from detectron2.config import instantiate

    model = instantiate(cfg.model)
    if classes is not None:
        model.detector.set_classes(classes)
    CrashSafeCheckpointer(model, os.path.dirname(path)).save(os.path.basename(path)[:-4])
    return model


def tag_of(out_dir):
    with open(os.path.join(out_dir, "last_checkpoint")) as f:
        return f.read().strip()


# ---------------------------------------------------------------------------- 1. non-finite gradients
def test_nan_gradient_at_the_last_iteration_writes_and_tags_nothing(tiny_config, train_net, tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN at the last iteration (2 of 0..2). Detectron2 versions
    whose PeriodicCheckpointer saves model_final in after_train when the last iteration failed are
    mimicked; that save is attempted (recorded) and refused."""
    from detectron2.engine import hooks

    from dinov2od.modeling import SetCriterion

    def after_train(self):  # newer Detectron2: save after the last iteration even when it failed
        if self.trainer.iter + 1 >= self.trainer.max_iter:
            self.step(self.trainer.iter)

    monkeypatch.setattr(hooks.PeriodicCheckpointer, "after_train", after_train)
    attempted, save = [], CrashSafeCheckpointer.save

    def recording_save(self, name, **kwargs):
        attempted.append(name)
        return save(self, name, **kwargs)

    monkeypatch.setattr(CrashSafeCheckpointer, "save", recording_save)
    forward, calls = SetCriterion.forward, {"n": 0}

    def poisoned(self, outputs, targets):
        losses = forward(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 3:  # iteration 2: the loss stays finite, its gradient is NaN
            losses["loss_giou"].register_hook(lambda g: g * float("nan"))
        return losses

    monkeypatch.setattr(SetCriterion, "forward", poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"gradient norm \(nan\) at iteration 2"):
        train_net.run(tiny_config, *TINY, "train.max_iter=3", "train.checkpointer.period=2", "train.ema.enabled=True",
                      "train.eval_after_train=False", f"train.output_dir={out}")
    assert attempted == ["model_0000001", "model_final"]  # the after_train save did happen ...
    assert tag_of(out) == "model_0000001.pth"  # ... and wrote nothing
    assert not any(n.startswith("model_final") for n in os.listdir(out)), os.listdir(out)
    ckpt = torch.load(os.path.join(out, "model_0000001.pth"), map_location="cpu")
    assert ckpt["iteration"] == 1 and ckpt["ema"]["num_updates"] == 2
    for state in (ckpt["model"], ckpt["ema"]["shadow"]):
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ---------------------------------------------------------------------------- 2-4. leftovers, corrupt files, messages
def test_training_start_removes_leftover_temporary_files_and_says_how_the_model_starts(tiny_config, tmp_path):
    from dinov2od.d2.engine.trainer import LazyTrainer

    out = tmp_path / "run"
    out.mkdir()
    for name in ("model_0000099.pth.tmp", "last_checkpoint.tmp", "notes.tmp"):
        (out / name).write_bytes(b"half")
    trainer = LazyTrainer(lazy_cfg(tiny_config, out, "train.init_checkpoint="))
    assert len(os.listdir(out)) >= 3  # building the trainer touches nothing
    with captured_logs() as logs:
        trainer.resume_or_load(resume=False)
    assert not {"model_0000099.pth.tmp", "last_checkpoint.tmp"} & set(os.listdir(out))
    assert (out / "notes.tmp").exists()  # not a file of ours: kept
    removed = [m for m in logs if "model_0000099.pth.tmp" in m]
    assert len(removed) == 1 and "last_checkpoint.tmp" in removed[0], logs
    assert any("No train.init_checkpoint / MODEL.WEIGHTS: the detector starts from its initialisation" in m
               for m in logs), logs
    assert not any("from scratch" in m for m in logs), logs


def test_truncated_checkpoint_names_the_newest_complete_one(tiny_config, train_net, tmp_path):
    """model_0000005.pth (tagged) is truncated; model_0000004.pth is newer than 0000003 but
    corrupt too, so the one to name is model_0000003.pth: at --resume and at --eval-only."""
    from dinov2od.d2.engine.trainer import LazyTrainer

    out = tmp_path / "run"
    out.mkdir()
    trainer = LazyTrainer(lazy_cfg(tiny_config, out))
    now = time.time()
    for i, it in enumerate((1, 3, 4, 5)):
        trainer.checkpointer.save(f"model_{it:07d}", iteration=it)
        path = out / f"model_{it:07d}.pth"
        if it in (4, 5):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        os.utime(path, (now - 100 + i, now - 100 + i))
    assert tag_of(out) == "model_0000005.pth"
    expected = (r"model_0000005\.pth: it is truncated or corrupt .*"
                r"newest complete checkpoint beside it is .*model_0000003\.pth")
    with pytest.raises(ValueError, match=expected) as e:
        LazyTrainer(lazy_cfg(tiny_config, out)).resume_or_load(resume=True)
    assert "last_checkpoint" in str(e.value)
    with pytest.raises(ValueError, match=expected):
        train_net.run(tiny_config, *TINY, f"train.output_dir={tmp_path / 'ev'}",
                      f"train.init_checkpoint={out / 'model_0000005.pth'}", flags=["--eval-only"])


# ---------------------------------------------------------------------------- 5. checkpoints that do not fit
def _assert_refused(error, path):
    msg = str(error)
    assert str(path) in msg and "does not fit this model" in msg and "config it was trained with" in msg, msg
    assert "tensors of another shape (" in msg, msg


def test_checkpoint_of_another_architecture_is_refused_everywhere(tiny_config, train_net, tmp_path):
    """hidden_dim 64 in the file, 32 in the model: one error (no "Skip loading parameter" lines)
    at --eval-only, --resume, LazyPredictor, load_inference_weights and export (yacs)."""
    import export_onnx
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from dinov2od.d2 import add_dinov2od_config
    from dinov2od.d2.engine.predictor import LazyPredictor
    from dinov2od.d2.engine.trainer import LazyTrainer

    other = tmp_path / "wide" / "model_final.pth"
    other.parent.mkdir()
    save_model(lazy_cfg(tiny_config, tmp_path, "model.detector.hidden_dim=64"), str(other))
    cfg = lazy_cfg(tiny_config, tmp_path / "ev")
    # control: the architecture's own checkpoint loads, and fvcore would have loaded this one silently
    own = tmp_path / "own.pth"
    save_model(cfg, str(own))
    load_inference_weights(LazyTrainer(cfg).model, str(own))
    with captured_logs() as logs:
        DetectionCheckpointer(LazyTrainer(cfg).model).load(str(other))
    assert sum("Skip loading parameter" in m for m in logs) > 20

    with captured_logs() as logs:
        with pytest.raises(ValueError) as e:
            train_net.run(tiny_config, *TINY, f"train.output_dir={tmp_path / 'ev'}", f"train.init_checkpoint={other}",
                          flags=["--eval-only"])
        _assert_refused(e.value, other)
        with pytest.raises(ValueError) as e:
            LazyTrainer(lazy_cfg(tiny_config, other.parent)).resume_or_load(resume=True)  # tagged model_final.pth
        _assert_refused(e.value, other)
        with pytest.raises(ValueError) as e:
            LazyPredictor(cfg, str(other), device="cpu")
        _assert_refused(e.value, other)
    assert not any("Skip loading parameter" in m for m in logs)

    ycfg = get_cfg()
    add_dinov2od_config(ycfg)
    ycfg.merge_from_file(YAML)
    ycfg.merge_from_list([*TINY_YACS, "MODEL.DINOV2OD.HIDDEN_DIM", "64", "MODEL.DEVICE", "cpu"])
    ywide = tmp_path / "ywide.pth"
    CrashSafeCheckpointer(build_model(ycfg), str(tmp_path)).save("ywide")
    with pytest.raises(ValueError) as e:
        export_onnx.main(["--config-file", YAML, "--weights", str(ywide), "--output", str(tmp_path / "x.onnx"),
                          *[str(v) for v in TINY_YACS]])
    _assert_refused(e.value, ywide)
    assert not os.path.exists(tmp_path / "x.onnx")


def test_fine_tuning_to_another_class_count_is_one_line_and_inference_refuses_it(tiny_config, train_net, tmp_path):
    """A 5-class checkpoint into the 3-class shapes model: fine-tuning loads every other tensor,
    keeps the fresh class layers and the model's class names, and says so in one line; prediction
    and --eval-only refuse it, naming both class counts."""
    from dinov2od.d2.engine.trainer import LazyTrainer

    five = tmp_path / "five.pth"
    source = save_model(lazy_cfg(tiny_config, tmp_path, "model.num_classes=5"), str(five),
                        classes=["a", "b", "c", "d", "e"])
    src = source.state_dict()
    trainer = LazyTrainer(lazy_cfg(tiny_config, tmp_path / "ft", f"train.init_checkpoint={five}"))
    fresh = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with captured_logs() as logs:
        trainer.resume_or_load(resume=False)
    notes = [m for m in logs if "class head" in m]
    assert notes == ["class head: checkpoint has 5 classes, model 3: the class-specific layers start fresh"], logs
    assert not any("Skip loading" in m or "not found in the checkpoint" in m for m in logs), logs
    loaded = trainer.model.state_dict()
    class_keys = [k for k in loaded if loaded[k].shape != src[k].shape]
    assert class_keys and all("class" in k or "label" in k for k in class_keys), class_keys
    for k, v in loaded.items():
        if k in class_keys or k.endswith("class_metadata"):
            assert torch.equal(v, fresh[k]), k  # fresh, and the model's own class names
        else:
            assert torch.equal(v, src[k]), k  # loaded
    assert not torch.equal(src["detector.class_metadata"], fresh["detector.class_metadata"])

    expected = r"five\.pth was trained for 5 classes but the model has num_classes=3"
    with pytest.raises(ValueError, match=expected):
        load_inference_weights(LazyTrainer(lazy_cfg(tiny_config, tmp_path)).model, str(five))
    with pytest.raises(ValueError, match=expected):
        train_net.run(tiny_config, *TINY, f"train.output_dir={tmp_path / 'ev'}", f"train.init_checkpoint={five}",
                      flags=["--eval-only"])


def test_a_file_without_class_metadata_loads_and_any_other_missing_key_is_refused(tiny_config, tmp_path):
    from dinov2od.d2.engine.trainer import LazyTrainer

    cfg = lazy_cfg(tiny_config, tmp_path)
    source = save_model(cfg, str(tmp_path / "full.pth"), classes=["circle", "square", "triangle"])
    state = source.state_dict()
    assert "detector.class_metadata" in state
    older = {k: v for k, v in state.items() if k != "detector.class_metadata"}
    torch.save({"model": older}, tmp_path / "older.pth")
    model = LazyTrainer(cfg).model
    load_inference_weights(model, str(tmp_path / "older.pth"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in older.items())
    dropped = sorted(older)[3]
    torch.save({"model": {k: v for k, v in older.items() if k != dropped}}, tmp_path / "less.pth")
    with pytest.raises(ValueError, match=rf"1 keys of the model missing from the file \({dropped}\)"):
        load_inference_weights(model, str(tmp_path / "less.pth"))
    torch.save({"model": {**state, "detector.extra.weight": torch.ones(2)}}, tmp_path / "more.pth")
    with pytest.raises(ValueError, match=r"1 keys of the file unknown to the model \(detector\.extra\.weight\)"):
        load_inference_weights(model, str(tmp_path / "more.pth"))


def test_load_inference_weights_prefers_the_ema_weights(tmp_path):
    model = torch.nn.Linear(2, 2)
    weights = {k: torch.full_like(v, 1.0) for k, v in model.state_dict().items()}
    shadow = {k: torch.full_like(v, 2.0) for k, v in model.state_dict().items()}
    torch.save({"model": weights, "ema": {"decay": 0.9, "num_updates": 3, "shadow": shadow}}, tmp_path / "t.pth")
    torch.save({"model": weights, "ema": {"decay": 0.9, "num_updates": 0, "shadow": shadow}}, tmp_path / "t0.pth")
    load_inference_weights(model, str(tmp_path / "t.pth"))
    assert torch.equal(model.weight, shadow["weight"])
    load_inference_weights(model, str(tmp_path / "t.pth"), use_ema=False)
    assert torch.equal(model.weight, weights["weight"])
    load_inference_weights(model, str(tmp_path / "t0.pth"))  # an EMA that never updated: the weights
    assert torch.equal(model.weight, weights["weight"])
    with pytest.raises(ValueError, match="does not exist"):
        load_inference_weights(model, str(tmp_path / "missing.pth"))


def test_fine_tuning_tolerates_training_only_layers_that_inference_refuses(caplog):
    """A recipe with denoising queries adds ``dn_label_embed``: fine-tuning from a run without them
    keeps their initialization with one warning; evaluation or prediction with the same mismatch is
    refused. Another shape outside the class head is refused in both."""
    from fvcore.common.checkpoint import _IncompatibleKeys

    model = torch.nn.Linear(2, 2)
    lacking = _IncompatibleKeys(missing_keys=["detector.decoder.dn_label_embed.weight"], unexpected_keys=[],
                                incorrect_shapes=[])
    caplog.set_level(logging.WARNING)
    from dinov2od.d2.checkpoint import check_fit

    assert check_fit(model, lacking, "ft.pth", allow_class_change=True) is None
    assert "Fine-tuning from ft.pth: 1 layers of the model start fresh (detector.decoder.dn_label_embed.weight)" \
        in caplog.text
    with pytest.raises(ValueError, match=r"ft\.pth does not fit this model: 1 keys of the model missing"):
        check_fit(model, lacking, "ft.pth", allow_class_change=False)
    reshaped = _IncompatibleKeys(missing_keys=[], unexpected_keys=[],
                                 incorrect_shapes=[("detector.neck.proj.weight", (64, 8), (32, 8))])
    with pytest.raises(ValueError, match="1 tensors of another shape"):
        check_fit(model, reshaped, "ft.pth", allow_class_change=True)
