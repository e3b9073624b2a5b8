"""Measuring: wall (or process) time, peak memory, FLOPs, the fp32 linear yardstick and shared rounds.

Used by :mod:`dinov2od.benchmark.model`. ``--stat`` and ``--clock`` of ``tools/benchmark.py`` set
:data:`STAT` and :data:`CLOCK` for the whole section.
"""
from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from dinov2od.layers.inference_options import inference_options


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated``, or on the CPU the peak of the
    resident set above its level at entry (after ``malloc_trim``; a sampling thread, every
    ``interval`` seconds)."""

    def __init__(self, device: str, interval: float = 1e-3):
        self.device, self.interval, self.peak_mb = device, interval, 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        try:  # hand freed heap memory back to the OS first, so that the peak shows this call's needs
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._base = self._peak = self._rss()
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = (max(self._peak, self._rss()) - self._base) / 2**20


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs (2 x multiply-adds) of one call, attention included (the CPU attention kernels are
    missing from torch's table in torch 2.3, so they are added here)."""
    return count_flops_split(fn)[0]


def count_flops_split(fn: Callable[[], object]) -> Tuple[float, float]:
    """(FLOPs of one call, the part of them in attention kernels), as :func:`count_flops`."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(query, key, value, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(query, key, value)

        def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

        custom[aten._scaled_dot_product_flash_attention_for_cpu] = fwd  # FlopCounterMode wraps it
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # dinov2od.layers.fused_linear's CPU inference path
        def onednn_linear(x_shape, w_shape, *args, out_shape=None, **kwargs):  # (shapes, not tensors)
            return 2 * math.prod(x_shape) * w_shape[0]

        custom[torch.ops.mkldnn._linear_pointwise] = onednn_linear
    # dinov2od's attention kernel is no aten op: count torch's (same FLOPs)
    with inference_options(cpu_attention=False), fc.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in by_op.items() if "scaled_dot_product" in str(op))
    return float(counter.get_total_flops()), float(attention)


@contextlib.contextmanager
def grads_off(model: torch.nn.Module):
    """Parameters with requires_grad=False for a no-grad FLOP count: newer torch's FlopCounterMode
    tracks modules with grad hooks, which fail on a parameter passed as a module input under
    torch.no_grad() ("Expected gradient function to be set", seen with torch 2.14)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


STAT = {"name": "median"}  # or "min" (best-of, steadier on a shared machine): --stat
CLOCK = {"now": time.perf_counter}  # --clock process: this process's CPU time (with --threads 1, the
# time the model computed, whatever other processes took from the cores; wall time otherwise)


def median_of(fn: Callable[[], object], repeats: int, warmup: int, device: str) -> float:
    """Median (or best, with ``--stat min``) wall time of ``fn()`` in ms."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = CLOCK["now"]()
        fn()
        _sync(device)
        times.append(CLOCK["now"]() - t0)
    return (min(times) if STAT["name"] == "min" else statistics.median(times)) * 1e3


YARD_SHAPES = {"vit-s mlp 1024x384x1536": (1024, 384, 1536), "1536^3": (1536, 1536, 1536)}


def yardstick_kernels(device: str) -> Dict[str, Tuple[Callable[[], object], int]]:
    """The fp32 linear kernels of the yardstick, ``{name: (call, FLOPs)}``, at the ViT-S MLP shape
    (1024 x 384 -> 1536) and at 1536^3: ``F.linear`` (what ``nn.Linear`` runs), and on the CPU also
    oneDNN's matmul (the kernel of :mod:`dinov2od.layers.fused_linear`, faster than ``F.linear``
    on some CPUs). Names ``"F.linear <shape>"`` and ``"oneDNN <shape>"``."""
    from dinov2od.layers.fused_linear import _OP_AVAILABLE

    out = {}
    for name, (m, k, n) in YARD_SHAPES.items():
        x = torch.randn(m, k, device=device)
        w = torch.randn(n, k, device=device)
        out[f"F.linear {name}"] = ((lambda x=x, w=w: F.linear(x, w)), 2 * m * k * n)
        if device == "cpu" and _OP_AVAILABLE:
            out[f"oneDNN {name}"] = ((lambda x=x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")),
                                     2 * m * k * n)
    return out


MATMUL_N = 1536  # the square products of the matmul rate (:func:`matmul_kernels`)
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FLOP_COUNTER = ("torch.utils.flop_counter.FlopCounterMode (matrix products, convolutions, attention; with "
                "entries added for torch's CPU flash attention and oneDNN's linear; element-wise ops, "
                "sampling and norms not counted)")


def matmul_kernels(dtype: str, device: str = "cpu") -> Dict[str, Tuple[Callable[[], object], int]]:
    """The machine's matmul rate in ``dtype`` ("fp32" or "bf16"), ``{name: (call, FLOPs)}``: a square
    ``torch.mm`` at :data:`MATMUL_N`^3 on ``dtype`` tensors and, on the CPU, oneDNN's linear
    (``torch.ops.mkldnn._linear_pointwise``: the op of the project's CPU inference path) at the same
    size. Names ``"matmul <dtype> ..."``; :func:`matmul_rate` takes the best. Timed at the run's threads
    (``torch.set_num_threads``); run them in the same rounds as what is compared with them."""
    from dinov2od.layers.fused_linear import _OP_AVAILABLE

    n, dt = MATMUL_N, MATMUL_DTYPES[dtype]
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    out = {f"matmul {dtype} torch.mm {n}^3": ((lambda: torch.mm(a, b)), 2 * n ** 3)}
    if device == "cpu" and _OP_AVAILABLE:
        out[f"matmul {dtype} oneDNN linear {n}^3"] = (
            (lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")), 2 * n ** 3)
    return out


def matmul_rate(rates: Dict[str, float], dtype: str) -> Optional[float]:
    """The best GFLOP/s of :func:`matmul_kernels`' ``dtype`` kernels in ``{kernel name: GFLOP/s}``
    (None when they were not run)."""
    found = [v for k, v in rates.items() if k.startswith(f"matmul {dtype} ")]
    return max(found) if found else None


def yardstick_rates(yard: Dict[str, float]) -> Tuple[float, Optional[float]]:
    """(best ``F.linear`` GFLOP/s, best oneDNN GFLOP/s or None) of ``{kernel name: GFLOP/s}``."""
    flin = max(v for k, v in yard.items() if k.startswith("F.linear"))
    onednn = [v for k, v in yard.items() if k.startswith("oneDNN")]
    return flin, (max(onednn) if onednn else None)


def run_rounds(calls: Dict[object, Tuple[Callable[[], object], Callable[[], Dict[str, float]]]], repeats: int,
               device: str, extra_kernels: Optional[Dict[str, Tuple[Callable[[], object], int]]] = None,
               ) -> Tuple[Dict[str, float], Dict[object, float], Dict[object, Dict[str, float]]]:
    """Rounds shared by the yardstick and every ``(e2e, staged)`` pair of ``calls``: each round runs
    every yardstick kernel (and each of ``extra_kernels``, ``{name: (call, FLOPs)}``) twice, then
    for each pair ``e2e()`` once (timed) and ``staged()`` once (its stage times), so that a shared
    host's changing load weighs on all of them alike (their ratios are the targets). Reduced with
    ``--stat`` (median, or min: the best round of each).

    Returns:
        ({kernel: GFLOP/s}, {key: end-to-end ms}, {key: {stage: ms}})
    """
    kernels = {**yardstick_kernels(device), **(extra_kernels or {})}
    for fn, _ in kernels.values():  # warm-up
        fn()
    for e2e, staged in calls.values():
        e2e()
        staged()
    _sync(device)
    yard_s = {k: [] for k in kernels}
    e2e_ms = {k: [] for k in calls}
    stage_runs = {k: [] for k in calls}
    for _ in range(repeats):
        for name, (fn, _) in kernels.items():
            for _ in range(2):
                t0 = CLOCK["now"]()
                fn()
                _sync(device)
                yard_s[name].append(CLOCK["now"]() - t0)
        for key, (e2e, staged) in calls.items():
            t0 = CLOCK["now"]()
            e2e()
            _sync(device)
            e2e_ms[key].append((CLOCK["now"]() - t0) * 1e3)
            stage_runs[key].append(staged())
    pick = min if STAT["name"] == "min" else statistics.median

    def stages(runs):
        if STAT["name"] == "min":  # the fastest call, whole
            return min(runs, key=lambda r: sum(r.values()))
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    yard = {name: kernels[name][1] / pick(ts) / 1e9 for name, ts in yard_s.items()}
    return yard, {k: pick(v) for k, v in e2e_ms.items()}, {k: stages(v) for k, v in stage_runs.items()}



class Stopwatch:
    """Milliseconds between named marks (synchronizing the device at each)."""

    def __init__(self, device: str):
        self.device, self.t, self.names = device, [CLOCK["now"]()], []

    def mark(self, name: str) -> None:
        _sync(self.device)
        self.t.append(CLOCK["now"]())
        self.names.append(name)

    def ms(self) -> Dict[str, float]:
        return {name: (b - a) * 1e3 for name, a, b in zip(self.names, self.t, self.t[1:])}



def median_stages(fn: Callable[[], Dict[str, float]], repeats: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    runs = [fn() for _ in range(repeats)]
    if STAT["name"] == "min":  # the fastest call, whole
        return min(runs, key=lambda r: sum(r.values()))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}



def profile_top_ops(fn: Callable[[], object], top: int = 15) -> str:
    """torch.profiler's table of the ops taking the most self CPU time in one call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)

