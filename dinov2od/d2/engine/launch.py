"""Start training processes the way clusters do, and check that they start from the same state.

``tools/train_net.py`` runs under three launchers (docs/distributed.md):

* Detectron2's ``launch()`` (``--num-gpus``, ``--num-machines``, ``--machine-rank``,
  ``--dist-url``): this process spawns one worker per GPU;
* ``torchrun``: the workers already exist, with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment;
* SLURM's ``srun``: one task per GPU, with ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
  ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_STEP_TASKS_PER_NODE``; ``MASTER_ADDR`` from the
  environment or the first host of the node list, ``MASTER_PORT`` from the environment or the job id.

:func:`launch_main` picks one (:func:`cluster_env`), initialises the process group the way
Detectron2's ``launch()`` does (gloo on the CPU, NCCL on CUDA, the local process group of
``detectron2.utils.comm``) with ``--dist-timeout`` as every collective's timeout, and makes each
worker exit when its launcher dies (:func:`exit_with_parent`).

:func:`check_ranks_agree`: after loading, every rank must hold the same iteration and weights;
ranks that resumed different checkpoints (an output folder that is not shared) stop with one message.

This module imports only the standard library at the top (torch and Detectron2 inside functions).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Dict, List, Mapping, Optional, Sequence

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ClusterEnv",
    "add_launch_arguments",
    "check_ranks_agree",
    "cluster_env",
    "exit_with_parent",
    "first_host",
    "launch_main",
    "tasks_per_node",
    "weights_fingerprint",
]

logger = logging.getLogger("dinov2od")

DEFAULT_TIMEOUT_S = 1800.0  # Detectron2's DEFAULT_TIMEOUT (30 minutes)


# ---------------------------------------------------------------------------- the launcher's environment
@dataclasses.dataclass(frozen=True)
class ClusterEnv:
    """The process layout a launcher (torchrun, SLURM) gave this process."""

    source: str  # "torchrun" | "slurm"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def init_method(self) -> str:
        # torchrun's agent already serves the store at MASTER_ADDR:MASTER_PORT: env:// joins it
        return "env://" if self.source == "torchrun" else f"tcp://{self.master_addr}:{self.master_port}"


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        raise ValueError(f"The launcher's environment has {name}={environ.get(name)!r}; expected an integer.") from None


def tasks_per_node(value: str) -> List[int]:
    """SLURM's tasks-per-node list: ``"4(x2),3"`` -> ``[4, 4, 3]``."""
    counts: List[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"Cannot read SLURM's tasks per node {value!r}.")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, for the simple forms: ``"node[03-05,9]"`` -> ``"node03"``,
    ``"a,b"`` -> ``"a"``, ``"gpu-1"`` -> ``"gpu-1"``.

    Raises:
        ValueError: a form this does not read (more than one bracket in a name); set MASTER_ADDR
            (e.g. ``$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)``).
    """
    depth, item = 0, ""
    for ch in nodelist.strip():  # the first name: up to a comma outside brackets
        if ch == "," and depth == 0:
            break
        depth += {"[": 1, "]": -1}.get(ch, 0)
        item += ch
    m = re.fullmatch(r"([^\[\]]+)(?:\[([^\[\]]+)\]([^\[\]]*))?", item)
    if m is None:
        raise ValueError(
            f"Cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}: set MASTER_ADDR, e.g. "
            'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3) or ""
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0].strip() + suffix


def cluster_env(environ: Optional[Mapping[str, str]] = None) -> Optional[ClusterEnv]:
    """The layout torchrun or SLURM's ``srun`` gave this process, or None (neither is present).

    torchrun: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``. SLURM: inside an ``srun`` step (``SLURM_STEP_NUM_TASKS``; a batch script's own
    process is not a task of a step), ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NODEID``,
    ``SLURM_STEP_TASKS_PER_NODE`` (the same count on every node); ``MASTER_ADDR`` from the environment
    or the first host of ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST``; ``MASTER_PORT`` from the
    environment or ``20000 + SLURM_JOB_ID % 20000``.

    Raises:
        ValueError: the environment is incomplete or has a layout Detectron2 cannot use, naming
            the variable and the fix.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env:
        rank, world, local_rank = _int(env, "RANK"), _int(env, "WORLD_SIZE"), _int(env, "LOCAL_RANK")
        if "LOCAL_WORLD_SIZE" not in env:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK are set but not LOCAL_WORLD_SIZE (torchrun sets all "
                             "four): set it to the number of processes on each machine.")
        local_world = _int(env, "LOCAL_WORLD_SIZE")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if world > 1 and not env.get(name):
                raise ValueError(f"RANK and WORLD_SIZE are set but not {name} (torchrun sets it).")
        node = int(env.get("GROUP_RANK", rank // max(local_world, 1)))
        out = ClusterEnv("torchrun", rank, world, local_rank, local_world, node,
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "0") or 0))
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        local_rank, node = _int(env, "SLURM_LOCALID"), _int(env, "SLURM_NODEID")
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(world)
        counts = tasks_per_node(per_node)
        if len(set(counts)) != 1:
            raise ValueError(f"SLURM runs {per_node} tasks per node; Detectron2 needs the same number on every "
                             "node: srun --ntasks-per-node=<GPUs per node>.")
        local_world = counts[0]
        addr = env.get("MASTER_ADDR") or first_host(
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1")
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000
        out = ClusterEnv("slurm", rank, world, local_rank, local_world, node, addr, port)
    else:
        return None
    if not (0 <= out.rank < out.world_size and 0 <= out.local_rank < out.local_world_size) \
            or out.world_size % out.local_world_size:
        raise ValueError(f"{out.source} gave rank {out.rank} of {out.world_size}, local rank {out.local_rank} of "
                         f"{out.local_world_size}: not a layout of whole machines.")
    if out.rank != out.node_rank * out.local_world_size + out.local_rank:
        raise ValueError(
            f"{out.source} gave rank {out.rank} to local rank {out.local_rank} of machine {out.node_rank} "
            f"({out.local_world_size} per machine): Detectron2 needs each machine's ranks consecutive "
            "(SLURM: srun --distribution=block).")
    return out


# ---------------------------------------------------------------------------- a worker dies with its launcher
def exit_with_parent(parent_pid: int, sig: int = signal.SIGTERM, poll_s: float = 1.0) -> str:
    """Make this process receive ``sig`` (default SIGTERM) when its launcher (``parent_pid``) dies.

    Linux: ``prctl(PR_SET_PDEATHSIG)``; elsewhere a daemon thread that polls ``os.getppid()``.
    If the parent is already gone (it died while this process started), the signal comes at once.

    Returns:
        "prctl" or "watchdog" (how it is done here).
    """
    how = "watchdog"
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(1, int(sig), 0, 0, 0) == 0:  # PR_SET_PDEATHSIG = 1
                how = "prctl"
    if os.getppid() != parent_pid:  # too late for prctl: the parent died before it was set
        os.kill(os.getpid(), sig)
        return how
    if how == "watchdog":
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(poll_s)
            os.kill(os.getpid(), sig)

        threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return how


# ---------------------------------------------------------------------------- process groups
@contextlib.contextmanager
def _groups_time_out_after(timeout: timedelta):
    """New process groups (Detectron2's local group, its gloo group for NCCL jobs) get ``timeout``
    instead of torch's default 30 minutes."""
    import torch.distributed.distributed_c10d as c10d

    saved = {k: getattr(c10d, k) for k in ("default_pg_timeout", "default_pg_nccl_timeout") if hasattr(c10d, k)}
    try:
        for k in saved:
            setattr(c10d, k, timeout)
        yield
    finally:
        for k, v in saved.items():
            setattr(c10d, k, v)


def _prime_gloo_group(timeout: timedelta) -> None:
    """Create Detectron2's cached gloo group (``comm.all_gather``'s) now, with ``timeout``."""
    from detectron2.utils import comm

    with _groups_time_out_after(timeout):
        comm._get_global_gloo_group()


def _init_from_env(env: ClusterEnv, timeout: timedelta) -> None:
    """``init_process_group`` from a launcher's environment, then Detectron2's local process group,
    as Detectron2's ``launch()`` does for the workers it spawns."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    has_gpu = torch.cuda.is_available()
    if has_gpu:
        if env.local_world_size > torch.cuda.device_count():
            raise ValueError(
                f"{env.source} runs {env.local_world_size} processes on this machine but this process sees "
                f"{torch.cuda.device_count()} GPU(s): Detectron2 puts local rank i on GPU i, so every process must "
                "see all of the machine's GPUs (no --gpus-per-task / --gpu-bind, CUDA_VISIBLE_DEVICES for all).")
        torch.cuda.set_device(env.local_rank)
    try:
        dist.init_process_group(backend="nccl" if has_gpu else "gloo", init_method=env.init_method,
                                world_size=env.world_size, rank=env.rank, timeout=timeout)
    except Exception:
        logger.error("Process group from %s: %s (rank %d of %d)", env.source, env.init_method, env.rank, env.world_size)
        raise
    with _groups_time_out_after(timeout):
        comm.create_local_process_group(env.local_world_size)
        comm._get_global_gloo_group()
    comm.synchronize()


def _launched_worker(main_func: Callable, parent_pid: int, timeout_s: float, *args):
    """A worker spawned by Detectron2's ``launch()``: dies with the launcher, then runs ``main_func``."""
    from detectron2.utils import comm

    if comm.get_world_size() > 1:  # spawned (a world of one runs in the launcher's own process)
        exit_with_parent(parent_pid)
        _prime_gloo_group(timedelta(seconds=timeout_s))
    return main_func(*args)


def add_launch_arguments(parser):
    """``--dist-timeout`` and ``--launcher`` on Detectron2's ``default_argument_parser()``."""
    parser.add_argument(
        "--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="a collective that waits this long for a dead or stalled rank ends the job (default: %(default)s)")
    parser.add_argument(
        "--launcher", choices=("auto", "launch", "torchrun", "slurm"), default="auto",
        help="auto (default): the torchrun or srun environment when present, else Detectron2's launch() "
             "with --num-gpus; launch: always launch() (e.g. one srun task per machine spawning --num-gpus)")
    return parser


def launch_main(main_func: Callable, args, parent_pid: Optional[int] = None,
                environ: Optional[Mapping[str, str]] = None):
    """Run ``main_func(args)`` in every process of the job, however it was started.

    Args:
        main_func: ``main(args)``, picklable (a module-level function) for ``launch()``'s workers.
        args: parsed :func:`add_launch_arguments` + Detectron2 arguments.
        parent_pid: this process's parent as seen when it started (torchrun, SLURM: the worker
            dies with it); default ``os.getppid()`` now.
        environ: the environment (default ``os.environ``).
    """
    from detectron2.engine import launch

    timeout_s = float(getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S))
    timeout = timedelta(seconds=timeout_s)
    choice = getattr(args, "launcher", "auto")
    env = None if choice == "launch" else cluster_env(environ)
    if choice in ("torchrun", "slurm") and (env is None or env.source != choice):
        raise SystemExit(f"--launcher {choice}: this process has no {choice} environment "
                         f"({'RANK, WORLD_SIZE, LOCAL_RANK' if choice == 'torchrun' else 'SLURM_PROCID, SLURM_STEP_NUM_TASKS'}).")
    if env is not None and env.world_size > 1:
        if args.num_gpus > 1 or args.num_machines > 1:
            raise SystemExit(
                f"{env.source} already started {env.world_size} processes ({env.local_world_size} on this machine), "
                f"and --num-gpus {args.num_gpus} --num-machines {args.num_machines} would spawn more in each: drop "
                "--num-gpus / --num-machines under torchrun or srun, or pass --launcher launch to spawn with "
                "Detectron2's launch() (one srun task per machine).")
        exit_with_parent(os.getppid() if parent_pid is None else parent_pid)
        logger.info("Distributed by %s: rank %d of %d (local %d of %d on machine %d), %s, timeout %gs",
                    env.source, env.rank, env.world_size, env.local_rank, env.local_world_size, env.node_rank,
                    env.init_method, timeout_s)
        _init_from_env(env, timeout)
        result = main_func(args)
        import torch.distributed as dist

        dist.destroy_process_group()
        return result
    return launch(
        functools.partial(_launched_worker, main_func, os.getpid(), timeout_s),
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=timeout,
    )


# ---------------------------------------------------------------------------- every rank, the same state
def weights_fingerprint(model) -> str:
    """A hash (12 hex digits) of the bytes of ``model``'s trainable parameters and its buffers."""
    import torch

    h = hashlib.sha1()
    tensors = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + list(model.named_buffers())
    for name, t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes())
    return h.hexdigest()[:12]


def _ranks(ranks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "ranks 0-2, 5"; [1] -> "rank 1"."""
    spans, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            spans.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


def check_ranks_agree(iteration: int, checkpoint: str, output_dir: str, model, resumed: bool) -> None:
    """Stop every rank when the ranks did not load the same state (a no-op in a one-process job).

    Each rank contributes (the iteration it starts at, the file it loaded, its weights'
    :func:`weights_fingerprint`); they are all-gathered over the default process group (its
    ``--dist-timeout``) and compared.

    Args:
        iteration: the iteration this rank starts at.
        checkpoint: the file it loaded ("" for none).
        output_dir: its output folder (where ``--resume`` looked).
        model: its model (DDP-wrapped or not).
        resumed: whether it resumed from ``last_checkpoint`` of ``output_dir``.

    Raises:
        RuntimeError: on every rank, naming what each group of ranks loaded and the fix.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = {"iteration": int(iteration), "checkpoint": checkpoint or "", "resumed": bool(resumed),
            "output_dir": os.path.abspath(output_dir), "host": socket.gethostname(),
            "weights": weights_fingerprint(getattr(model, "module", model))}
    states: List[Dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(states, mine)
    if all((s["iteration"], s["weights"]) == (states[0]["iteration"], states[0]["weights"]) for s in states):
        return
    groups: Dict[tuple, List[int]] = {}
    for rank, s in enumerate(states):
        groups.setdefault((s["iteration"], s["weights"], s["checkpoint"], s["resumed"]), []).append(rank)
    parts = []
    for (it, weights, path, resumed_), ranks in sorted(groups.items(), key=lambda kv: -kv[0][0]):
        s = states[ranks[0]]
        if resumed_:
            source = f"from {path}"
        elif path:
            source = f"from its init checkpoint {path} (no checkpoint in its output folder {s['output_dir']})"
        else:
            source = f"(no checkpoint in its output folder {s['output_dir']})"
        hosts = sorted({states[r]["host"] for r in ranks})
        parts.append(f"{_ranks(ranks)} resumed iteration {it} {source}, weights {weights}, on {', '.join(hosts[:4])}"
                     + (" ..." if len(hosts) > 4 else ""))
    raise RuntimeError(
        "The ranks did not load the same training state: " + "; ".join(parts) + ". Every rank must load the "
        "same checkpoint: the output folder must be shared by all machines (the same network folder at the "
        "same path), or copy the checkpoint and its last_checkpoint file into every machine's output folder "
        "before --resume.")
