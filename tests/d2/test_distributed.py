"""Many GPUs, many machines (issue 21): the batch per GPU, torchrun / SLURM / launch(), timeouts,
workers that die with their launcher, and ranks that must resume the same state.

The multi-process tests run real jobs of two CPU processes (gloo, 127.0.0.1 only, free ports) on
the tiny model (tests/helpers/ddp_jobs.py); every subprocess has a timeout. One torchrun job is shared: its
weights are compared with the launch() job's (conftest's ``launch_job``, which d2/test_train.py
compares with a 1-process run), and its per-rank output folders (only rank 0's gets the checkpoint,
as on machines that do not share a folder) feed the mismatched-resume test.
"""
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.ddp_jobs import JOB_OPTS, JOB_TIMEOUT, finish, free_port, generate_data, job_env, start, torchrun_cmd

LAUNCH_PY = os.path.join(ROOT, "dinov2od", "d2", "engine", "launch.py")


def _load_launch_module():
    """dinov2od/d2/engine/launch.py on its own (stdlib only at the top; no package import)."""
    spec = importlib.util.spec_from_file_location("dd_launch_alone", LAUNCH_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- 1. the batch per GPU
# The table (images/GPU, GPUs, accumulation) for the recipe's 8 images per GPU and 64 per step.
RECIPE = {1: (8, 8), 2: (16, 4), 4: (32, 2), 8: (64, 1)}  # GPUs -> (images per micro-batch, accumulation)


def test_batch_plan_arithmetic_for_1_2_4_8_gpus_and_numbers_that_cannot_meet():
    from dinov2od.d2.config import batch_plan

    for gpus, (total, accumulate) in RECIPE.items():
        plan = batch_plan(8, 64, gpus)
        assert (plan.total_batch_size, plan.accumulate_steps, plan.effective_batch) == (total, accumulate, 64)
    assert str(batch_plan(8, 64, 4)) == "8 images/GPU x 4 GPUs x 2 accumulation = 64"
    assert str(batch_plan(8, 64, 1)) == "8 images/GPU x 1 GPU x 8 accumulation = 64"
    assert batch_plan(8, 0, 4, accumulate_steps=3).effective_batch == 96  # no effective batch: it grows
    for gpus in (3, 16):  # 64 / 24 and 64 / 128 are not whole
        with pytest.raises(ValueError, match=rf"effective_batch=64 .* images_per_gpu=8 x {gpus} GPUs .*"
                                             rf"not a multiple of {8 * gpus}.*\(1, 2, 4, 8\)"):
            batch_plan(8, 64, gpus)


@pytest.fixture()
def dinov2od_logs():
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("dinov2od")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(old_level)


@pytest.mark.parametrize("style", ["lazy", "yacs"])
def test_coco_recipe_batch_per_gpu_on_1_2_4_8_gpus(style, dinov2od_logs):
    from dinov2od.d2.config import load_config

    path = os.path.join(ROOT, "configs", "coco.py" if style == "lazy" else "yaml/coco.yaml")
    for gpus, (total, accumulate) in RECIPE.items():
        cfg = load_config(path, world_size=gpus)
        if style == "lazy":
            got = cfg.dataloader.train.total_batch_size, cfg.train.accumulate_steps
        else:
            got = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUMULATE_STEPS
        assert got == (total, accumulate), gpus
        assert any(f"8 images/GPU x {gpus} GPU" in m and f"x {accumulate} accumulation = 64" in m
                   for m in dinov2od_logs), dinov2od_logs
    key = "train.effective_batch" if style == "lazy" else "SOLVER.EFFECTIVE_BATCH"
    with pytest.raises(ValueError, match=rf"{key}=64 cannot be made of .*=8 x 3 GPUs"):
        load_config(path, world_size=3)
    load_config(path, world_size=3, batch=False)  # --eval-only: no training batch to make


def test_batch_per_gpu_is_off_unless_set_and_conflicts_are_named():
    from dinov2od.d2.config import load_config

    for world in (1, 2):  # the demo configs keep their total batch and accumulation
        lazy = load_config(os.path.join(ROOT, "configs/shapes.py"), world_size=world)
        assert (lazy.dataloader.train.total_batch_size, lazy.train.accumulate_steps) == (8, 1)
        yacs = load_config(os.path.join(ROOT, "configs/yaml/shapes.yaml"), world_size=world)
        assert (yacs.SOLVER.IMS_PER_BATCH, yacs.SOLVER.ACCUMULATE_STEPS) == (8, 1)
    shapes_yaml = os.path.join(ROOT, "configs/yaml/shapes.yaml")
    cfg = load_config(shapes_yaml, ["SOLVER.IMS_PER_GPU", "2"], world_size=2)  # per GPU, no effective batch
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUMULATE_STEPS) == (4, 1)
    with pytest.raises(ValueError, match="SOLVER.EFFECTIVE_BATCH=16 needs SOLVER.IMS_PER_GPU"):
        load_config(shapes_yaml, ["SOLVER.EFFECTIVE_BATCH", "16"])
    with pytest.raises(ValueError, match="REFERENCE_WORLD_SIZE"):
        load_config(shapes_yaml, ["SOLVER.IMS_PER_GPU", "2", "SOLVER.REFERENCE_WORLD_SIZE", "4"])


def test_coco_recipe_drops_the_lr_at_the_same_iteration_in_both_styles():
    """40 of 50 epochs at 118287 // 64 = 1848 iterations each: the drop is at iteration 73920."""
    from detectron2.config import instantiate
    from detectron2.solver import build_lr_scheduler

    from dinov2od.d2.config import load_config

    lazy = load_config(os.path.join(ROOT, "configs/coco.py"))
    yacs = load_config(os.path.join(ROOT, "configs/yaml/coco.yaml"))
    assert lazy.train.max_iter == yacs.SOLVER.MAX_ITER == 50 * 1848
    assert lazy.train.checkpointer.period == yacs.SOLVER.CHECKPOINT_PERIOD == 1848
    lazy_multiplier = instantiate(lazy.lr_multiplier)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    yacs_multiplier = build_lr_scheduler(yacs, optimizer)._multiplier

    def first_drop(multiplier, max_iter):
        return next(i for i in range(70000, 80000) if multiplier(i / max_iter) < 0.5)

    assert first_drop(lazy_multiplier, lazy.train.max_iter) == 73920
    assert first_drop(yacs_multiplier, yacs.SOLVER.MAX_ITER) == 73920
    for multiplier in (lazy_multiplier, yacs_multiplier):  # the same warmup too
        assert multiplier(500 / 92400) == pytest.approx(yacs_multiplier(500 / 92400))


# ---------------------------------------------------------------------------- 2. launchers
def test_torchrun_and_slurm_environments():
    m = _load_launch_module()
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    env = m.cluster_env(torchrun)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == \
        ("torchrun", 3, 4, 1, 2, 1)
    assert env.init_method == "env://"  # joins the store torchrun's agent serves
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_JOB_ID": "123456"}
    env = m.cluster_env(slurm)
    assert (env.source, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank) == \
        ("slurm", 5, 8, 1, 4, 1)
    assert env.init_method == f"tcp://gpu-07:{20000 + 123456 % 20000}"
    assert m.cluster_env({**slurm, "MASTER_ADDR": "h", "MASTER_PORT": "1234"}).init_method == "tcp://h:1234"
    assert m.first_host("node[3,5-7],other") == "node3" and m.first_host("a,b") == "a"
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        m.first_host("rack[1-2]-node[1-4]")
    with pytest.raises(ValueError, match="--distribution=block"):  # cyclic: rank 5 is not node 1's local 1
        m.cluster_env({**slurm, "SLURM_PROCID": "3"})
    with pytest.raises(ValueError, match="same number on every node"):
        m.cluster_env({**slurm, "SLURM_STEP_TASKS_PER_NODE": "4,3", "SLURM_STEP_NUM_TASKS": "7"})
    assert m.cluster_env({}) is None
    sbatch_script = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NUM_TASKS"}  # not an srun task
    assert m.cluster_env({**sbatch_script, "SLURM_NTASKS": "8"}) is None


def test_launcher_environment_and_num_gpus_together_are_refused():
    from dinov2od.d2.engine.launch import launch_main

    args = SimpleNamespace(num_gpus=2, num_machines=1, machine_rank=0, dist_url="auto", dist_timeout=5.0,
                           launcher="auto")
    environ = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(SystemExit, match="torchrun already started 2 processes .* drop --num-gpus"):
        launch_main(lambda a: pytest.fail("ran"), args, environ=environ)


def test_temporary_checkpoint_files_are_unique_per_writer_and_cleaned_at_start(tmp_path, monkeypatch):
    from dinov2od.d2.checkpoint import CrashSafeCheckpointer, atomic_write

    path = str(tmp_path / "model_0000002.pth")
    pid = os.getpid()
    with atomic_write(path) as first:  # two writers of one name at once (two jobs in one folder)
        monkeypatch.setattr(os, "getpid", lambda: pid + 1)
        with atomic_write(path) as second:
            second.write(b"second")
        monkeypatch.setattr(os, "getpid", lambda: pid)
        first.write(b"first")
    assert first.name == f"{path}.tmp.{pid}" and second.name == f"{path}.tmp.{pid + 1}"
    with open(path, "rb") as f:
        assert f.read() == b"first"  # the last rename wins; neither lost its temporary file
    assert os.listdir(tmp_path) == ["model_0000002.pth"]
    ours = ["model_0000009.pth.tmp.4242", "last_checkpoint.tmp.77", "model_0000001.pth.tmp", "last_checkpoint.tmp"]
    theirs = ["notes.tmp.1", "model.pth.tmpx", "model_0000009.pth.tmp.x"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"half")
    removed = CrashSafeCheckpointer(torch.nn.Linear(1, 1), str(tmp_path)).remove_temporary_files()
    assert sorted(os.path.basename(p) for p in removed) == sorted(ours)
    assert sorted(os.listdir(tmp_path)) == sorted(theirs + ["model_0000002.pth"])


# A launcher that starts two workers and sleeps; only the first worker asks to die with it.
LAUNCHER = r'''
import importlib.util, os, subprocess, sys, time
worker = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("m", sys.argv[1]); m = importlib.util.module_from_spec(spec)
sys.modules["m"] = m; spec.loader.exec_module(m)
if sys.argv[2] == "1":
    print("how", m.exit_with_parent(int(sys.argv[3])), flush=True)
print("ready", flush=True)
time.sleep(60)
"""
procs = [subprocess.Popen([sys.executable, "-c", worker, sys.argv[1], flag, str(os.getpid())],
                          stdout=open(os.path.join(sys.argv[2], f"w{flag}.out"), "w")) for flag in ("1", "0")]
print(" ".join(str(p.pid) for p in procs), flush=True)
time.sleep(60)
'''


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_worker_exits_when_its_launcher_is_killed(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, LAUNCH_PY, str(tmp_path)], stdout=subprocess.PIPE,
                                text=True, start_new_session=True)
    try:
        with_parent, control = map(int, launcher.stdout.readline().split())
        deadline = time.time() + 20
        while time.time() < deadline and not all(
                (tmp_path / f"w{f}.out").exists() and "ready" in (tmp_path / f"w{f}.out").read_text() for f in "10"):
            time.sleep(0.05)
        assert "how prctl" in (tmp_path / "w1.out").read_text()
        launcher.kill()  # SIGKILL: the launcher cannot pass anything on
        launcher.wait(10)
        deadline = time.time() + 5
        while time.time() < deadline and _alive(with_parent):
            time.sleep(0.05)
        assert not _alive(with_parent), "the worker outlived its launcher"
        assert _alive(control), "negative control: a worker without exit_with_parent should be orphaned, alive"
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)  # the orphaned control worker is still in the group
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------- multi-process jobs
# tools/train_net.py's own command line with test hooks: tests/helpers/ddp_jobs.py (per-rank output folders,
# a stalled rank, no resume agreement; every rank's final weights saved).


def _slurm_tasks(script, args, env, timeout=JOB_TIMEOUT):
    """Two tasks as ``srun --ntasks=2`` starts them on one node (no supervising launcher)."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        task_env = dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                        SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost",
                        SLURM_JOB_ID="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, env=task_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], outputs


@pytest.fixture(scope="module")
def torchrun_job(tiny_config, train_wrapper, tmp_path_factory, request):
    """torchrun, 2 processes, each rank in its own output folder (rank 0's gets the checkpoint).
    The shared launch() job runs at the same time (the start-ups are mostly one busy thread each)."""
    out = tmp_path_factory.mktemp("torchrun")
    generate_data()
    proc = start(torchrun_cmd(train_wrapper, ["--config-file", tiny_config, *JOB_OPTS]),
                 job_env(DD_PER_RANK_OUTPUT=str(out)))
    try:
        request.getfixturevalue("launch_job")
    finally:
        proc = finish(proc)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return SimpleNamespace(out=out)


def _weights(path):
    return torch.load(path, map_location="cpu")


def test_torchrun_equals_launch_with_num_gpus_2(torchrun_job, launch_job):
    """The same 2-process job under torchrun and under Detectron2's launch(): identical weights."""
    rank0, rank1 = torchrun_job.out / "rank0", torchrun_job.out / "rank1"
    with open(rank0 / "log.txt") as f:
        log = f.read()
    assert "World size: 2" in log and "1 images/GPU x 2 GPUs x 2 accumulation = 4" in log
    assert not (rank1 / "model_final.pth").exists()  # one writer: rank 0
    assert not [n for n in os.listdir(rank0) if ".tmp" in n]
    out = launch_job
    launched = _weights(out / "model_final.pth")["model"]
    torchrun = _weights(rank0 / "model_final.pth")["model"]
    ranks = [_weights(rank0 / "rank0.pth"), _weights(rank1 / "rank1.pth"), _weights(out / "rank1.pth")]
    assert set(launched) == set(torchrun)
    initial = _weights(out / "init.pth")
    trained = 0
    for k in launched:
        assert torch.equal(launched[k], torchrun[k]), k
        assert all(torch.equal(r[k], launched[k]) for r in ranks), k
        trained += int(not torch.equal(launched[k], initial[k]))
    assert trained > 10  # the weights moved: the comparison is not of two untrained models


@pytest.fixture(scope="module")
def stalled_job(tiny_config, train_wrapper, tmp_path_factory):
    """torchrun, 2 processes, rank 1 stalls at its first training step, --dist-timeout 3: started here,
    awaited by the stalled-rank test (it runs while the mismatched-resume test's tasks run)."""
    out = tmp_path_factory.mktemp("stalled")
    generate_data()
    args = ["--config-file", tiny_config, "--dist-timeout", "3", *JOB_OPTS, f"train.output_dir={out}"]
    return SimpleNamespace(start=time.time(), proc=start(torchrun_cmd(train_wrapper, args), job_env(DD_STALL_RANK="1")))


def test_ranks_that_resume_different_checkpoints_stop_with_the_reason(torchrun_job, stalled_job, tiny_config,
                                                                      train_wrapper):
    """SLURM-style tasks whose output folders are not shared: rank 0 finds the checkpoint, rank 1 none.
    (``stalled_job`` runs meanwhile: its start-up overlaps these tasks'.)"""
    args = ["--config-file", tiny_config, "--resume", "--dist-timeout", "20", *JOB_OPTS, "train.max_iter=4"]
    codes, outputs = _slurm_tasks(train_wrapper, args, job_env(DD_PER_RANK_OUTPUT=str(torchrun_job.out)))
    out = torchrun_job.out
    for rank, (code, text) in enumerate(zip(codes, outputs)):
        assert code != 0, text[-3000:]
        assert (f"rank 0 resumed iteration 2 from {out}/rank0/model_final.pth" in text
                and f"rank 1 resumed iteration 0 (no checkpoint in its output folder {out}/rank1)" in text
                and "the output folder must be shared by all machines" in text), text[-3000:]
    assert _weights(out / "rank0" / "model_final.pth")["iteration"] == 1  # nothing trained, nothing written
    assert sorted(n for n in os.listdir(out / "rank0") if n.endswith(".pth")) == ["init.pth", "model_final.pth",
                                                                                 "model_final_ema.pth", "rank0.pth"]


def test_a_stalled_rank_ends_the_job_within_dist_timeout(stalled_job):
    proc = finish(stalled_job.proc, timeout=60)
    elapsed = time.time() - stalled_job.start
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "rank 1 stalls" in text, text[-3000:]
    assert "Timed out waiting 3000ms" in text, text[-3000:]  # gloo's own words, with --dist-timeout's value
    assert elapsed < 45, elapsed  # start-up + 3 s, far below the stalled rank's 300 s sleep
