"""Real 2-process training jobs for the tests (gloo on the CPU, 127.0.0.1 only, free ports, a timeout
on every subprocess): ``tools/train_net.py``'s own command line wrapped with test hooks.

One ``launch()`` job (``--num-gpus 2``) is shared by the whole run (``launch_job`` in conftest.py):
d2/test_distributed.py compares it with a torchrun job, d2/test_train.py with a 1-process run.

The wrapper's hooks (environment variables):
  DD_PER_RANK_OUTPUT=DIR  each rank writes to DIR/rank<r> (machines that share no folder)
  DD_STALL_RANK=r         rank r stops progressing at its first training step (sleeps)
  DD_NO_AGREEMENT=1       the resume agreement check is skipped (negative controls)
and every rank's final weights are saved as <output>/rank<r>.pth (rank 0's weights before training:
init.pth).
"""
import os
import socket
import subprocess
import sys

from tests.helpers import ROOT
from tests.helpers.configs import TINY

JOB_TIMEOUT = 120  # seconds, per subprocess: a hang fails the test instead of the suite

WRAPPER = '''
import os, sys, time
sys.path.insert(0, {tools!r})
import torch
import train_net
from detectron2.utils import comm
from dinov2od.d2.engine import trainer

_train, _run_step, _main = trainer.DetrTrainer.train, trainer.DetrTrainer.run_step, train_net.main


def train(self):
    if comm.is_main_process():
        torch.save(trainer.unwrap_model(self.model).state_dict(), os.path.join(self.settings.output_dir, "init.pth"))
    results = _train(self)
    state = trainer.unwrap_model(self.model).state_dict()
    torch.save(state, os.path.join(self.settings.output_dir, f"rank{{comm.get_rank()}}.pth"))
    return results


def run_step(self):
    if os.environ.get("DD_STALL_RANK") == str(comm.get_rank()):
        print(f"rank {{comm.get_rank()}} stalls", flush=True)
        time.sleep(300)
    _run_step(self)


def main(args):
    if os.environ.get("DD_PER_RANK_OUTPUT"):
        args.opts = [*args.opts, f"train.output_dir={{os.environ['DD_PER_RANK_OUTPUT']}}/rank{{comm.get_rank()}}"]
    if os.environ.get("DD_NO_AGREEMENT"):
        trainer.check_ranks_agree = lambda *a, **k: None
    return _main(args)


trainer.DetrTrainer.train, trainer.DetrTrainer.run_step, train_net.main = train, run_step, main
if __name__ == "__main__":
    train_net.invoke_main()
'''

# 1 image per GPU x 2 GPUs x 2 accumulation = 4 images per optimizer step, 2 steps
JOB_OPTS = [*TINY, "train.max_iter=2", "train.images_per_gpu=1", "train.effective_batch=4",
            "train.eval_after_train=False", "train.checkpointer.period=100"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID")


def write_wrapper(folder) -> str:
    path = os.path.join(str(folder), "train_wrapper.py")
    with open(path, "w") as f:
        f.write(WRAPPER.format(tools=os.path.join(ROOT, "tools")))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def torchrun_cmd(script, args) -> list:
    """torchrun, 2 processes on this machine. Its agent looks at the workers every 0.2 s (torch 2.3's
    default is 5 s: up to 5 s of idling after the workers are done or one has failed)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--monitor-interval", "0.2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script),
            *args]


def launch_cmd(script, args) -> list:
    """Detectron2's ``launch()`` through train_net's ``--num-gpus 2``."""
    return [sys.executable, str(script), "--num-gpus", "2", "--dist-url", "auto", *args]


def start(cmd, env) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout=JOB_TIMEOUT) -> subprocess.CompletedProcess:
    """Wait for a started job (killed when it overruns ``timeout`` seconds)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def generate_data() -> None:
    """The tiny shapes splits on disk before jobs run at once (each job's rank 0 would generate
    missing images: two jobs would write the same files)."""
    from detectron2.data import DatasetCatalog

    for name in ("shapes_tiny_train", "shapes_tiny_val"):
        DatasetCatalog.get(name)
