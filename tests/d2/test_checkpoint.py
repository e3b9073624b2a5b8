"""Training state is never lost: crash-safe checkpoints, the EMA export, and exact resume.

The end-to-end tests run ``tools/train_net.py`` on a tiny model (CPU): a resumed run must end
with the same weights, optimizer, EMA and trainer state as an uninterrupted one, whether it was
stopped by an exception (lazy and yacs routes, one data-loader worker) or by a real ``SIGKILL``
of a child process at a seeded point (inside a training step, a checkpoint write, a rename).
"""
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from dinov2od.d2.checkpoint import CrashSafeCheckpointer, atomic_save
from dinov2od.modeling import SetCriterion

from tests.helpers import ROOT
from tests.helpers.configs import TINY, TINY_YACS


def assert_same_state(a, b, path="checkpoint"):
    """Recursively compare two checkpoints (tensors bit for bit, RNG states included)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for k in a:
            assert_same_state(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def load(path):
    """A checkpoint, read as an untrusted file would be: the project's own need no full unpickling."""
    return torch.load(path, map_location="cpu", weights_only=True)


def find(state, key):
    """The first entry named ``key`` in a nested checkpoint dict."""
    if isinstance(state, dict):
        if key in state:
            return state[key]
        for v in state.values():
            found = find(v, key)
            if found is not None:
                return found
    return None


def tag_of(out_dir):
    with open(os.path.join(out_dir, "last_checkpoint")) as f:
        return f.read().strip()


# ---------------------------------------------------------------------------- crash-safe writes
def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pth")
    atomic_save({"a": torch.ones(3)}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"a": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load(path)["a"], torch.ones(3))  # the previous version, intact
    assert os.listdir(tmp_path) == ["model.pth"]  # no temporary file left behind


def test_checkpointer_tags_only_complete_files(tmp_path):
    model = torch.nn.Linear(2, 2)
    ckpt = CrashSafeCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    assert tag_of(tmp_path) == "model_0000001.pth"
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    # a leftover temporary file of a killed save is neither a checkpoint nor a tag
    (tmp_path / "model_0000003.pth.tmp").write_bytes(b"trunc")
    assert ckpt.get_all_checkpoint_files() == [str(tmp_path / "model_0000001.pth")]
    assert load(ckpt.get_checkpoint_file())["iteration"] == 1


def test_checkpointer_refuses_non_finite_weights_of_the_model_and_the_ema(tmp_path):
    """Defence in depth behind the training loop's checks: a save of non-finite model or EMA
    weights raises FloatingPointError, writes nothing and leaves the tag; so does the EMA export."""
    from dinov2od.d2.engine.ema import ModelEMA, export_ema_weights

    model = torch.nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.5)
    ckpt = CrashSafeCheckpointer(model, str(tmp_path), ema=ema)
    ckpt.save("model_0000001", iteration=1)  # control: finite weights are saved and tagged
    assert tag_of(tmp_path) == "model_0000001.pth"
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"Refusing to save model_0000002: non-finite weights in bias"):
        ckpt.save("model_0000002", iteration=2)
    with torch.no_grad():
        model.bias[1] = 0.0
    ema.shadow["weight"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"ema:weight"):
        ckpt.save("model_final", iteration=3)
    with pytest.raises(FloatingPointError, match="model_final_ema.pth"):
        export_ema_weights(ema, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert tag_of(tmp_path) == "model_0000001.pth"


def test_checkpointer_skips_a_save_while_a_floating_point_error_propagates(tmp_path):
    """What a hook's after_train (e.g. a PeriodicCheckpointer saving model_final when the last
    iteration failed) would write after the loop stopped on a non-finite value: nothing."""
    model = torch.nn.Linear(2, 2)
    ckpt = CrashSafeCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    with pytest.raises(FloatingPointError):
        try:
            raise FloatingPointError("Non-finite gradient norm (nan) at iteration 2: ...")
        finally:
            ckpt.save("model_final", iteration=2)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    # control: another exception (a crash that is not about the weights) does not block the save
    with pytest.raises(KeyError):
        try:
            raise KeyError("x")
        finally:
            ckpt.save("model_final", iteration=2)
    assert tag_of(tmp_path) == "model_final.pth"


# ---------------------------------------------------------------------------- EMA export
def test_ema_export_does_not_retag_and_resume_continues(tiny_config, train_net, tmp_path):
    """Training with EMA to the end, then --resume with a larger max_iter continues from the
    last iteration with the optimizer and EMA state (the EMA export must not take the tag)."""
    out = str(tmp_path / "run")
    common = [*TINY, f"train.output_dir={out}", "train.checkpointer.period=100", "train.eval_after_train=False"]
    train_net.run(tiny_config, *common, "train.max_iter=4")
    assert os.path.isfile(os.path.join(out, "model_final_ema.pth"))
    assert tag_of(out) == "model_final.pth"
    assert set(load(os.path.join(out, "model_final_ema.pth"))) == {"model"}  # weights only, for predictors
    # beside it the same weights as .safetensors, and a JSON with what using them takes
    from safetensors.torch import load_file

    exported = load_file(os.path.join(out, "model_final_ema.safetensors"))
    ema_weights = load(os.path.join(out, "model_final_ema.pth"))["model"]
    assert set(exported) == set(ema_weights) and all(torch.equal(exported[k], v) for k, v in ema_weights.items())
    with open(os.path.join(out, "model_final_ema.json")) as f:
        info = json.load(f)
    assert info["class_names"] == ["circle", "square", "triangle"] and info["ema_updates"] == 4
    assert info["config_file"] == "config.yaml" and info["detector_kwargs_note"].startswith("checked")
    train_net.run(tiny_config, *common, "train.max_iter=6", flags=["--resume"])
    final = load(os.path.join(out, "model_final.pth"))
    assert final["iteration"] == 5
    steps = {int(s["step"]) for s in find(final["trainer"], "optimizer")["state"].values()}
    assert steps == {6}, steps  # 4 + 2 optimizer steps: the optimizer state was resumed
    assert final["ema"]["num_updates"] == 6
    with open(os.path.join(out, "metrics.json")) as f:
        iters = [json.loads(line)["iteration"] for line in f if '"total_loss"' in line]
    assert iters == sorted(iters) and len(iters) == len(set(iters))  # no iteration trained twice


def test_fine_tuning_starts_the_ema_from_the_loaded_weights(tiny_config, tmp_path):
    from detectron2.config import LazyConfig

    from dinov2od.d2.engine.trainer import LazyTrainer

    cfg = LazyConfig.apply_overrides(LazyConfig.load(tiny_config), [*TINY, f"train.output_dir={tmp_path}"])
    model = LazyTrainer(cfg).model
    loaded = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": loaded}, tmp_path / "init.pth")
    cfg.train.init_checkpoint = str(tmp_path / "init.pth")
    trainer = LazyTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert trainer.ema is not None and trainer.ema.num_updates == 0
    for k, v in trainer.ema.shadow.items():
        assert torch.equal(v, loaded[k]), k  # not the random init the trainer was built with


# ---------------------------------------------------------------------------- exact resume
def _crash_at_step(monkeypatch, step):
    """Make the training step number ``step`` (0-based) raise, like a crash mid-iteration."""
    forward, calls = SetCriterion.forward, {"n": 0}

    def crashing(self, outputs, targets):
        if calls["n"] == step:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        return forward(self, outputs, targets)

    monkeypatch.setattr(SetCriterion, "forward", crashing)


def test_resume_restores_every_state_lazy_with_a_loader_worker(tiny_config, train_net, tmp_path, monkeypatch):
    """num_workers=1 (the demo's setting), dropout on, EMA on: the resumed run's final checkpoint
    equals the uninterrupted one in every entry (weights, optimizer, EMA, scheduler, RNG)."""
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = [*TINY, "train.max_iter=6", "train.checkpointer.period=3", "train.eval_after_train=False",
              "model.detector.dropout=0.1", "dataloader.train.num_workers=1"]
    train_net.run(tiny_config, *common, f"train.output_dir={full}")
    with monkeypatch.context() as m:
        _crash_at_step(m, 4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_net.run(tiny_config, *common, f"train.output_dir={resumed}")
    assert tag_of(resumed) == "model_0000002.pth"
    train_net.run(tiny_config, *common, f"train.output_dir={resumed}", flags=["--resume"])
    a, b = load(os.path.join(full, "model_final.pth")), load(os.path.join(resumed, "model_final.pth"))
    assert a["iteration"] == 5 and "ema" in a and find(a["trainer"], "optimizer") is not None
    assert_same_state(a, b)
    c = load(os.path.join(full, "model_0000002.pth"))
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # it did train


def test_resume_restores_every_state_yacs(tiny_config, train_net, tmp_path, monkeypatch):
    yaml = os.path.join(ROOT, "configs/yaml/shapes.yaml")
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    common = [*TINY_YACS, "SOLVER.MAX_ITER", "6", "SOLVER.STEPS", "(4,)", "SOLVER.CHECKPOINT_PERIOD", "3",
              "TEST.EVAL_PERIOD", "0", "MODEL.DINOV2OD.DROPOUT", "0.1", "DATALOADER.NUM_WORKERS", "1"]
    train_net.run(yaml, *common, "OUTPUT_DIR", full)
    with monkeypatch.context() as m:
        _crash_at_step(m, 4)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_net.run(yaml, *common, "OUTPUT_DIR", resumed)
    train_net.run(yaml, *common, "OUTPUT_DIR", resumed, flags=["--resume"])
    a, b = load(os.path.join(full, "model_final.pth")), load(os.path.join(resumed, "model_final.pth"))
    assert a["iteration"] == 5 and "ema" in a  # shapes.yaml enables the EMA
    assert_same_state(a, b)


# ---------------------------------------------------------------------------- SIGKILL
# Imported by the child's config: dies by SIGKILL at the point DINOV2OD_TEST_KILL names.
KILLER = '''
import io, os, signal
import torch
from dinov2od.modeling import SetCriterion

def _die():
    os.kill(os.getpid(), signal.SIGKILL)

kind, _, arg = os.environ.get("DINOV2OD_TEST_KILL", "").partition(":")
if kind == "step":  # inside the forward pass of training step `arg` (0-based)
    _forward, _calls = SetCriterion.forward, [0]
    def _forward_or_die(self, *a, **k):
        if _calls[0] == int(arg):
            _die()
        _calls[0] += 1
        return _forward(self, *a, **k)
    SetCriterion.forward = _forward_or_die
elif kind == "save":  # after writing a fraction of the bytes of torch.save call number n
    _n, _frac = arg.split("/")
    _save, _calls = torch.save, [0]
    def _save_or_die(obj, f, *a, **k):
        if _calls[0] == int(_n):
            buf = io.BytesIO()
            _save(obj, buf, *a, **k)
            f = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
            f.write(buf.getvalue()[: int(len(buf.getvalue()) * float(_frac))])
            f.flush()
            _die()
        _calls[0] += 1
        return _save(obj, f, *a, **k)
    torch.save = _save_or_die
elif kind == "replace":  # just before rename number n (a complete temporary file, not yet in place)
    _replace, _calls = os.replace, [0]
    def _replace_or_die(src, dst, *a, **k):
        if _calls[0] == int(arg):
            _die()
        _calls[0] += 1
        return _replace(src, dst, *a, **k)
    os.replace = _replace_or_die
'''

KILL_RUN = [*TINY, "train.max_iter=6", "train.checkpointer.period=2", "train.eval_after_train=False"]


@pytest.fixture(scope="module")
def kill_config(tiny_config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    (folder / "killer.py").write_text(KILLER)
    path = folder / "kill_shapes.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(folder)!r})\n"
        "import killer  # noqa: F401\n"
        "from detectron2.config import LazyConfig\n"
        f"_base = LazyConfig.load({tiny_config!r})\n"
        "model, dataloader, optimizer, train = _base.model, _base.dataloader, _base.optimizer, _base.train\n"
        "lr_multiplier = _base.lr_multiplier\n"
    )
    return str(path)


@pytest.fixture(scope="module")
def uninterrupted(tiny_config, train_net, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted"))
    train_net.run(tiny_config, *KILL_RUN, f"train.output_dir={out}")
    return load(os.path.join(out, "model_final.pth"))


def _kill_point(kind, seed):
    """A seeded point of the run: 6 steps, saves after steps 1, 3, 5 and model_final (+ its EMA export)."""
    rng = random.Random(seed)
    if kind == "step":
        return f"step:{rng.randrange(1, 6)}"
    if kind == "save":
        return f"save:{rng.randrange(0, 4)}/{rng.uniform(0.05, 0.95):.3f}"
    return f"replace:{rng.randrange(0, 8)}"


KILL_POINTS = [("step", 0), ("save", 1), ("save", 2), ("replace", 3)]

# tools/train_net.py's command line once per kill point, each in a child process forked after the
# imports (torch, Detectron2, dinov2od: they cost more than the training up to the kill), so every
# run is a real process that a real SIGKILL ends. The children run at once (mostly one busy thread
# each) in their own output folders, their output in their log files; their exit codes (-9: SIGKILL)
# are printed as json.
FORK_RUNS = """
import json, os, sys, traceback
sys.path.insert(0, {tools!r})
import train_net  # noqa: E402  (nothing has run a parallel region yet: the children may use threads)

pids = []
for point, argv, log in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1), os.dup2(fd, 2)
            os.environ["DINOV2OD_TEST_KILL"] = point
            sys.argv = [train_net.__file__, *argv]
            train_net.invoke_main()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    pids.append(pid)
print(json.dumps([os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]))
"""


@pytest.fixture(scope="module")
def killed_runs(kill_config, tmp_path_factory, request):
    """{(kind, seed): (kill point, exit code, output folder, log file)} of the killed runs (the
    uninterrupted run is trained in this process meanwhile)."""
    root = tmp_path_factory.mktemp("killed")
    jobs = {}
    for kind, seed in KILL_POINTS:
        out = str(root / f"{kind}-{seed}")
        jobs[kind, seed] = [_kill_point(kind, seed), ["--config-file", kill_config, *KILL_RUN,
                                                      f"train.output_dir={out}"], f"{out}.log"]
    (root / "fork_runs.py").write_text(FORK_RUNS.format(tools=os.path.join(ROOT, "tools")))
    proc = subprocess.Popen([sys.executable, str(root / "fork_runs.py"), json.dumps(list(jobs.values()))], cwd=ROOT,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        request.getfixturevalue("uninterrupted")
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    codes = json.loads(stdout.strip().splitlines()[-1])
    return {key: (point, code, argv[-1].split("=", 1)[1], log)
            for (key, (point, argv, log)), code in zip(jobs.items(), codes)}


@pytest.mark.parametrize("kind,seed", KILL_POINTS)
def test_sigkill_then_resume_equals_the_uninterrupted_run(kind, seed, killed_runs, kill_config, train_net,
                                                          uninterrupted):
    point, code, out, log = killed_runs[kind, seed]
    with open(log) as f:
        assert code == -signal.SIGKILL, (point, code, f.read()[-2000:])
    # nothing under a checkpoint's name is truncated, and the tag names a complete checkpoint
    for name in sorted(os.listdir(out)):
        if name.endswith(".pth"):
            load(os.path.join(out, name))
    if os.path.exists(os.path.join(out, "last_checkpoint")):
        assert "trainer" in load(os.path.join(out, tag_of(out))), point
    train_net.run(kill_config, *KILL_RUN, f"train.output_dir={out}", flags=["--resume"])
    assert_same_state(uninterrupted, load(os.path.join(out, "model_final.pth")))
