"""Runs that cannot erase each other (issue 29): one output folder, one run, on the tiny model (CPU).

* A training or --eval-only into a folder another process holds is refused before it writes anything;
  a holder killed by SIGKILL releases it, even while a process it forked (a loader worker) lives on.
* A new training into a folder holding a finished one is refused (lazy and yacs) and leaves it byte
  for byte; ``--overwrite`` removes that run's files and nothing else; in a 2-task SLURM-style job the
  refusal stops both tasks at once.
* ``--resume`` whose ``last_checkpoint`` names a deleted file continues from the newest complete
  checkpoint, with a warning; with none, an error naming the folder.
* ``--eval-only`` with no weights to load is an error naming both ways to give them.
* ``model_final_ema.pth`` is written when the evaluation after training fails.
* tools/predict.py refuses a non-empty output folder; ``--overwrite`` clears only what an earlier
  predict.py run wrote, in a folder it marked.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from dinov2od.d2.checkpoint.run_folder import LOCK_FILE, RunFolderError, claim_output_folder

from tests.helpers import ROOT
from tests.helpers.configs import TINY, TINY_YACS
from tests.helpers.ddp_jobs import JOB_TIMEOUT, free_port, job_env

YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")
RUN = [*TINY, "train.max_iter=2", "train.checkpointer.period=1", "train.eval_after_train=False"]


def snapshot(folder):
    """{relative path: (size, mtime_ns, bytes or None)} of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns, fh.read())
    return out


@pytest.fixture(scope="module")
def finished(tiny_config, train_net, tmp_path_factory):
    """A finished 2-iteration training (EMA on): model_0000000.pth, model_final.pth, model_final_ema.pth,
    last_checkpoint, metrics.json, events, log.txt, config.yaml."""
    out = str(tmp_path_factory.mktemp("finished"))
    train_net.run(tiny_config, *RUN, f"train.output_dir={out}")
    return out


def copy_of(finished, tmp_path, name="run"):
    dst = str(tmp_path / name)
    shutil.copytree(finished, dst)  # copy2: the times too
    return dst


# ---------------------------------------------------------------------------- 1. the lock
HOLDER = r"""
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("run_folder", {module!r})
run_folder = sys.modules["run_folder"] = importlib.util.module_from_spec(spec)  # stdlib only: no torch import
spec.loader.exec_module(run_folder)
claim = run_folder.claim_output_folder({folder!r}, command="holder --config-file x.py")
child = os.fork()  # as a data loader worker is forked from a training
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_a_held_folder_refuses_a_second_run_until_its_holder_is_killed(tiny_config, train_net, tmp_path):
    folder = str(tmp_path / "held")
    module = os.path.join(ROOT, "dinov2od", "d2", "checkpoint", "run_folder.py")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(module=module, folder=folder)],
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        line = holder.stdout.readline()  # the lock is held (and written) before this line
        assert line.strip().isdigit(), f"the holder did not start: {line!r}"
        child = int(line)
        before = snapshot(folder)
        assert list(before) == [LOCK_FILE]
        for flags in ((), ("--eval-only",)):
            with pytest.raises(RunFolderError) as e:
                train_net.run(tiny_config, *RUN, f"train.output_dir={folder}", flags=flags)
            msg = str(e.value)
            assert f"The output folder {folder} is in use by another run: pid {holder.pid} on host" in msg, msg
            assert "holder --config-file x.py" in msg and "train.output_dir=" in msg and "OUTPUT_DIR" in msg, msg
            assert snapshot(folder) == before  # nothing written, not even a time changed
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        os.kill(child, 0)  # the forked child still lives ...
        claim_output_folder(folder).release()  # ... and the lock died with the holder
    finally:
        holder.kill()
        holder.wait(timeout=10)
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)  # reparented to init, which reaps it
            except ProcessLookupError:
                pass


def test_the_lock_is_held_while_training_runs_and_released_after(tiny_config, train_net, tmp_path, monkeypatch):
    """In the middle of a real training, another claim of its folder is refused; after it, the folder is free."""
    from dinov2od.d2.engine import trainer

    out = str(tmp_path / "run")
    seen = []
    train = trainer.DetrTrainer.train

    def train_and_try(self):
        with pytest.raises(RunFolderError, match=f"pid {os.getpid()} on host"):
            claim_output_folder(out)
        seen.append(1)
        return train(self)

    monkeypatch.setattr(trainer.DetrTrainer, "train", train_and_try)
    train_net.run(tiny_config, *TINY, "train.max_iter=1", "train.eval_after_train=False", f"train.output_dir={out}")
    assert seen == [1]
    with open(os.path.join(out, LOCK_FILE)) as f:
        assert json.load(f)["pid"] == os.getpid()
    claim_output_folder(out, resume=True).release()


# ---------------------------------------------------------------------------- 2. a used folder
def test_a_new_run_into_a_finished_folder_is_refused_and_leaves_it_unchanged(finished, tiny_config, train_net,
                                                                              tmp_path):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    assert {"model_0000000.pth", "model_final.pth", "model_final_ema.pth", "last_checkpoint", "metrics.json"} \
        <= set(before)
    with pytest.raises(RunFolderError) as e:
        train_net.run(tiny_config, *RUN, f"train.output_dir={out}")
    msg = str(e.value)
    assert f"The output folder {out} already holds a training (last_checkpoint -> model_final.pth; " in msg, msg
    assert ("checkpoints model_0000000.pth, model_0000001.pth, model_final.pth, model_final_ema.pth; "
            "metrics.json (to iteration 1)") \
        in msg, msg
    for choice in ("--resume", "train.output_dir=", "OUTPUT_DIR", "--overwrite"):
        assert choice in msg, msg
    yaml_out = copy_of(finished, tmp_path, "yacs")  # the yacs route: the same check
    with pytest.raises(RunFolderError, match=f"The output folder {yaml_out} already holds a training"):
        train_net.run(YAML, *TINY_YACS, "OUTPUT_DIR", yaml_out)
    assert snapshot(out) == before  # model_final.pth byte for byte, every time unchanged
    with pytest.raises(RunFolderError, match="cannot be combined with --resume"):
        train_net.run(tiny_config, *RUN, f"train.output_dir={out}", flags=("--resume", "--overwrite"))


def test_overwrite_removes_the_earlier_runs_files_and_nothing_else(finished, tiny_config, train_net, tmp_path):
    out = copy_of(finished, tmp_path)
    os.makedirs(os.path.join(out, "inference"))
    with open(os.path.join(out, "inference", "coco_instances_results.json"), "w") as f:
        f.write("[]")
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    os.makedirs(os.path.join(out, "data"))
    with open(os.path.join(out, "data", "model_0000007.pth"), "w") as f:  # not at the top: not the run's
        f.write("mine too")
    old_events = sorted(n for n in os.listdir(out) if n.startswith("events.out"))
    assert old_events
    train_net.run(tiny_config, *TINY, "train.max_iter=1", "train.eval_after_train=False", f"train.output_dir={out}",
                  flags=("--overwrite",))
    names = set(os.listdir(out))
    assert "model_0000000.pth" not in names and "inference" not in names and not set(old_events) & names
    assert {"notes.txt", "data", "model_final.pth", "model_final_ema.pth", "log.txt"} <= names
    with open(os.path.join(out, "data", "model_0000007.pth")) as f:
        assert f.read() == "mine too"
    assert torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")["iteration"] == 0  # the new run
    with open(os.path.join(out, "metrics.json")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [0]  # only the new run's metrics
    with open(os.path.join(out, "log.txt")) as f:
        removed = [line for line in f if "--overwrite: removed the earlier run's" in line]
    assert len(removed) == 1, removed
    for name in ("last_checkpoint", "inference/", "metrics.json", "model_0000000.pth", "model_final.pth",
                 "model_final_ema.pth", old_events[0]):
        assert name in removed[0], removed[0]
    assert "notes.txt" not in removed[0] and "log.txt" not in removed[0]


SLURM_TASK_VARS = dict(SLURM_NODEID="0", SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2",
                       SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1", MASTER_ADDR="127.0.0.1")


def test_a_refused_distributed_job_stops_on_every_rank(finished, tiny_config, tmp_path):
    """Two SLURM-style tasks (no launcher to end the other when one fails), --dist-timeout 600: rank 0 refuses
    the used folder and rank 1 stops too, at once, instead of waiting 600 s for rank 0."""
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    port = str(free_port())
    script = os.path.join(ROOT, "tools", "train_net.py")
    args = ["--config-file", tiny_config, "--dist-timeout", "600", *RUN, f"train.output_dir={out}"]
    procs = [subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=job_env(**SLURM_TASK_VARS, SLURM_PROCID=str(r), SLURM_LOCALID=str(r), MASTER_PORT=port))
             for r in (0, 1)]
    try:
        texts = [p.communicate(timeout=JOB_TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 1, (rank, text[-3000:])
    assert f"The output folder {out} already holds a training" in texts[0], texts[0][-3000:]
    assert f"rank 1 stops: rank 0 refused the output folder {out}" in texts[1], texts[1][-3000:]
    assert snapshot(out) == before


# ---------------------------------------------------------------------------- 3. --resume's fallback
def test_resume_falls_back_to_the_newest_complete_checkpoint(finished, tiny_config, tmp_path, caplog):
    from detectron2.config import LazyConfig

    from dinov2od.d2.engine.trainer import LazyTrainer

    out = copy_of(finished, tmp_path)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(tiny_config), [*RUN, f"train.output_dir={out}"])
    os.remove(os.path.join(out, "model_final.pth"))  # last_checkpoint names it
    good = os.path.join(out, "model_0000000.pth")
    with open(good, "rb") as f:
        data = f.read()
    with open(os.path.join(out, "model_0000001.pth"), "wb") as f:  # newer, but truncated
        f.write(data[: len(data) // 2])
    os.utime(os.path.join(out, "model_final_ema.pth"))  # newest of all, but weights only
    caplog.set_level(logging.WARNING, logger="dinov2od")
    trainer = LazyTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 1  # model_0000000.pth's iteration + 1
    warnings = [r.getMessage() for r in caplog.records if "does not exist; resuming from" in r.getMessage()]
    assert warnings == [f"{out}/last_checkpoint names model_final.pth, which does not exist; resuming from "
                        f"model_0000000.pth, the newest complete checkpoint in {out}."], caplog.text
    for name in ("model_0000000.pth", "model_0000001.pth"):
        os.remove(os.path.join(out, name))
    with pytest.raises(FileNotFoundError, match=rf"Cannot resume in {out}: last_checkpoint names model_final\.pth, "
                                                r"which does not exist, and no complete checkpoint"):
        LazyTrainer(cfg).resume_or_load(resume=True)


# ---------------------------------------------------------------------------- 4. --eval-only with nothing to load
def test_eval_only_with_nothing_to_load_is_an_error(tiny_config, train_net, tmp_path, monkeypatch):
    from dinov2od.d2.engine import trainer

    built, build = [], trainer.build_lazy_model
    monkeypatch.setattr(trainer, "build_lazy_model", lambda *a, **k: built.append(1) or build(*a, **k))
    for flags in (("--eval-only",), ("--eval-only", "--resume")):
        with pytest.raises(ValueError) as e:
            train_net.run(tiny_config, *TINY, f"train.output_dir={tmp_path / 'ev'}", flags=flags)
        msg = str(e.value)
        assert msg.startswith("--eval-only has no weights to evaluate") and "untrained model" in msg, msg
        assert "train.init_checkpoint=PATH.pth" in msg and "MODEL.WEIGHTS PATH.pth" in msg and "--resume with" in msg
        if "--resume" in flags:
            assert f"the output folder {tmp_path / 'ev'} has no checkpoint to resume" in msg, msg
    with pytest.raises(ValueError, match="--eval-only has no weights to evaluate"):
        train_net.run(YAML, *TINY_YACS, "OUTPUT_DIR", str(tmp_path / "yev"), flags=("--eval-only",))
    assert built == []  # refused before the model is built


# ---------------------------------------------------------------------------- 5. the EMA export
def test_model_final_ema_is_written_when_the_evaluation_after_training_fails(tiny_config, train_net, tmp_path,
                                                                             monkeypatch):
    from dinov2od.d2.engine import trainer

    def failing(cfg, model):
        raise OSError("cannot identify image file 'val/000003.jpg' (simulated)")

    monkeypatch.setattr(trainer, "evaluate_lazy", failing)
    out = str(tmp_path / "run")
    with pytest.raises(OSError, match="simulated"):
        train_net.run(tiny_config, *TINY, "train.max_iter=1", "train.eval_after_train=True", f"train.output_dir={out}")
    ema = torch.load(os.path.join(out, "model_final_ema.pth"), map_location="cpu")
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu")
    assert set(ema) == {"model"} and ema["model"].keys() == final["model"].keys()
    shadow = final["ema"]["shadow"]
    assert all(torch.equal(ema["model"][k], v) for k, v in shadow.items())


# ---------------------------------------------------------------------------- 6. tools/predict.py
def _image(path, seed):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)


def test_predict_refuses_a_used_output_folder_and_overwrite_clears_only_its_own_run(tiny_yacs_checkpoint, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import predict

    weights = tiny_yacs_checkpoint["weights"]
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        _image(str(tmp_path / "in" / name), i)

    def run(output, *flags, inputs=("a.png", "b.png", "c.png")):
        return predict.main(["--config-file", YAML, "--weights", weights, "--input",
                             *[str(tmp_path / "in" / n) for n in inputs], "--output", str(output), *flags,
                             *[str(v) for v in TINY_YACS]])

    out = tmp_path / "out"
    run(out)
    assert sorted(os.listdir(out)) == [predict.MARKER, predict.LOCK, "a.png.jpg", "b.png.jpg", "c.png.jpg", "predictions.json",
                                       "predictions.jsonl"]
    # an earlier run interrupted after more drawings than this one makes, and a file of the user's
    (out / "d.png.jpg").write_bytes(b"stale drawing")
    (out / "sub").mkdir()
    (out / "sub" / "e.jpg.jpg").write_bytes(b"stale drawing")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with pytest.raises(SystemExit, match=r"holds an earlier predict\.py run .* Give another --output, or --overwrite"):
        run(out, inputs=("a.png",))
    assert snapshot(out) == before
    run(out, "--overwrite", inputs=("a.png",))
    assert sorted(os.listdir(out)) == [predict.MARKER, predict.LOCK, "a.png.jpg", "notes.txt", "predictions.json",
                                       "predictions.jsonl"]
    with open(out / "predictions.jsonl") as f:
        assert [os.path.basename(json.loads(line)["file_name"]) for line in f] == ["a.png"]
    # a folder predict.py did not mark is never emptied, --overwrite or not; an empty one is used
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "x.png.jpg").write_bytes(b"someone's file")
    for flags in ((), ("--overwrite",)):
        with pytest.raises(SystemExit, match=r"is not empty \(x\.png\.jpg\) and is not a predict\.py output folder"):
            run(theirs, *flags)
    assert os.listdir(theirs) == ["x.png.jpg"]
    (tmp_path / "empty").mkdir()
    run(tmp_path / "empty", inputs=("b.png",))
    assert sorted(os.listdir(tmp_path / "empty"))[-1] == "predictions.jsonl"
    # a run that holds the folder (here: its lock taken as a running predict.py holds it) stops a second
    # one, with the holder named and nothing written; once released, the same command runs.
    # Negative control: without claim_output's lock both runs wrote into the folder (this raises no
    # SystemExit and the test fails at pytest.raises).
    from dinov2od.d2.checkpoint.run_folder import FolderLock

    busy = tmp_path / "busy"
    busy.mkdir()
    holder = FolderLock(str(busy), predict.LOCK)
    assert holder.try_acquire()
    holder.write_holder("tools/predict.py --output busy (the other run)")
    with pytest.raises(SystemExit, match=r"in use by another predict\.py run \(pid .*the other run\)"):
        run(busy, inputs=("a.png",))
    assert os.listdir(busy) == [predict.LOCK]
    holder.release()
    run(busy, inputs=("a.png",))
    assert sorted(os.listdir(busy)) == [predict.MARKER, predict.LOCK, "a.png.jpg", "predictions.json",
                                        "predictions.jsonl"]
