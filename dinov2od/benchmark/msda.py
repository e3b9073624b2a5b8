"""The deformable-attention section (``tools/benchmark.py --section msda``).

It times multi-scale deformable attention, forward (no grad) and forward+backward, for every
available path (the PyTorch path, the compiled CPU kernel, the compiled CUDA kernel in float32 and
bfloat16 when a GPU is visible) at

  (a) ``decoder``: a decoder cross-attention layer, N=2, 300 queries, 8 heads, 32 channels
      per head, levels 74x74/37x37/19x19/10x10, 4 points;
  (b) ``encoder``: one query per pyramid token (Lq = S = 7306), same levels.

and prints each path's median time (``--stat min``: best-of), its speed-up over the PyTorch path on
the same device and dtype, measured in the same run, and the largest difference from the PyTorch
output.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from dinov2od.benchmark.measure import _sync
from dinov2od.layers import _ext
from dinov2od.layers.ms_deform_attn import level_start_index_from_shapes, ms_deform_attn_pytorch

LEVELS = [(74, 74), (37, 37), (19, 19), (10, 10)]


@dataclass
class Row:
    """One line of a section's table: times in milliseconds (median or best-of, see --stat)."""

    section: str
    case: str
    path: str
    device: str
    dtype: str
    fwd_ms: Optional[float]
    fwd_bwd_ms: Optional[float]
    baseline: Optional["Row"] = None  # the PyTorch path's row this one is compared with
    max_diff: Optional[float] = None


def median_ms(fn: Callable[[], object], device: str, repeats: int, warmup: int, stat: str = "median") -> float:
    """Median (or, with ``stat='min'``, best) wall time of ``fn()`` in milliseconds, the device
    synchronized after each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return min(times) if stat == "min" else statistics.median(times)


# ---------------------------------------------------------------- section: msda


def msda_inputs(case: str, device: str, dtype: torch.dtype, seed: int = 0):
    """Random op inputs for ``case`` ('decoder' or 'encoder'), Deformable DETR-like locations.

    Returns:
        value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,),
        sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P).
    """
    g = torch.Generator().manual_seed(seed)
    n, m, d, p = 2, 8, 32, 4
    shapes = torch.tensor(LEVELS, dtype=torch.long)
    starts = level_start_index_from_shapes(shapes)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    num_levels = len(LEVELS)
    if case == "decoder":
        lq = 300
        ref = torch.rand(n, lq, 2, generator=g)
    elif case == "encoder":
        lq = s
        centers = []
        for h, w in LEVELS:  # one query at the centre of every pyramid token
            ys, xs = torch.meshgrid(
                (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij"
            )
            centers.append(torch.stack([xs, ys], -1).view(-1, 2))
        ref = torch.cat(centers)[None].expand(n, -1, -1)
    else:
        raise ValueError(f"unknown msda case {case!r} (expected 'decoder' or 'encoder')")
    # offsets of a few pixels of each level around the reference point
    wh = shapes.flip(-1).to(torch.float32)  # (L, 2) as (W, H)
    offsets = torch.randn(n, lq, m, num_levels, p, 2, generator=g) * 2.0 / wh[:, None, :]
    locations = ref[:, :, None, None, None, :] + offsets
    weights = torch.randn(n, lq, m, num_levels * p, generator=g).softmax(-1)
    weights = weights.view(n, lq, m, num_levels, p)
    value = torch.randn(n, s, m, d, generator=g)
    return (
        value.to(device, dtype),
        shapes.to(device),
        starts.to(device),
        locations.to(device, torch.float32),
        weights.to(device, torch.float32),
    )


def _msda_paths(device: str, isa: str = "auto"):
    """(name, fn, dtypes) for every path available on ``device``; the PyTorch path first."""
    dtypes = [torch.float32] if device == "cpu" else [torch.float32, torch.bfloat16]
    paths = [("pytorch", ms_deform_attn_pytorch, dtypes)]
    probe = torch.empty(0, device=device)
    if not _ext.available_for(probe):
        return paths
    if device != "cpu":
        return paths + [("cuda-kernel", _ext.ms_deform_attn_compiled, dtypes)]
    ext = _ext.load_extension()
    isas = {"auto": [ext.cpu_capability()], "all": ["default", "avx2"]}.get(isa, [isa])
    for name in isas:
        paths.append((f"cpu-kernel[{name}]", _with_cpu_isa(ext, name), dtypes))
    return paths


def _with_cpu_isa(ext, name: str):
    """The compiled op with the CPU inner loops ``name`` ('default' or 'avx2') selected."""

    def fn(*inputs):
        previous = ext.cpu_capability()
        ext.set_cpu_capability(name)
        try:
            return _ext.ms_deform_attn_compiled(*inputs)
        finally:
            ext.set_cpu_capability(previous)

    return fn


def _time_msda(fn, inputs, device: str, repeats: int, warmup: int, stat: str):
    value, shapes, starts, locations, weights = inputs
    with torch.no_grad():
        out = fn(value, shapes, starts, locations, weights)
        fwd = median_ms(lambda: fn(value, shapes, starts, locations, weights), device, repeats, warmup, stat)
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    grad = torch.randn_like(out)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn(leaves[0], shapes, starts, leaves[1], leaves[2]).backward(grad)

    return out, fwd, median_ms(fwd_bwd, device, repeats, warmup, stat)


def section_msda(args) -> List[Row]:
    print(HEADER)
    rows = []
    for device in args.devices:
        for case in args.cases:
            for name, fn, dtypes in _msda_paths(device, args.cpu_isa):
                for dtype in dtypes:
                    inputs = msda_inputs(case, device, dtype)
                    out, fwd, fwd_bwd = _time_msda(fn, inputs, device, args.repeats, args.warmup, args.stat)
                    row = Row("msda", case, name, device, str(dtype).replace("torch.", ""), fwd, fwd_bwd)
                    base = next(
                        (r for r in rows if r.path == "pytorch" and (r.case, r.device, r.dtype)
                         == (row.case, row.device, row.dtype)),
                        None,
                    )
                    if base is not None:
                        row.baseline = base
                        ref = ms_deform_attn_pytorch(*inputs)
                        row.max_diff = float((out.float() - ref.float()).abs().max())
                    rows.append(row)
                    print_row(row, flush=True)
    return rows


# ---------------------------------------------------------------- output


def _fmt(ms: Optional[float]) -> str:
    return "-" if ms is None else f"{ms:9.2f}"


def _ratio(base: Optional[float], ms: Optional[float]) -> str:
    return "-" if base is None or ms is None else f"{base / ms:6.2f}x"


HEADER = (
    f"{'section':8} {'case':8} {'path':20} {'device':6} {'dtype':9} "
    f"{'fwd ms':>9} {'vs pt':>7} {'fwd+bwd ms':>10} {'vs pt':>7} {'max|diff|':>9}"
)


def print_row(row: Row, flush: bool = False) -> None:
    b = row.baseline
    print(
        f"{row.section:8} {row.case:8} {row.path:20} {row.device:6} {row.dtype:9} "
        f"{_fmt(row.fwd_ms)} {_ratio(b.fwd_ms if b else row.fwd_ms, row.fwd_ms):>7} "
        f"{_fmt(row.fwd_bwd_ms):>10} {_ratio(b.fwd_bwd_ms if b else row.fwd_bwd_ms, row.fwd_bwd_ms):>7} "
        f"{'-' if row.max_diff is None else f'{row.max_diff:.1e}':>9}",
        flush=flush,
    )
