"""Benchmarks of dinov2od; ``tools/benchmark.py`` is their command line.

=====================  ================================================================
module                 what
=====================  ================================================================
:mod:`.msda`           section ``msda``: the deformable-attention op, every path
:mod:`.model`          section ``model``: the whole detector, inference and training
:mod:`.models`         the presets, backbones and ``--dtypes`` variants it measures
:mod:`.measure`        timing, peak memory, FLOPs, the fp32 linear yardstick, shared rounds
:mod:`.targets`        the speed targets (data) and the summary lines that judge them
:mod:`.startup`        section ``startup``: process start to first batch, peak RSS per rank
:mod:`.peers`          section ``peers``: RF-DETR and dinov2od side by side (needs ``rfdetr``)
:mod:`.cpu_kind`       the CPU kind every ratio is printed with: ISA flags, AMX, native bf16, oneDNN
=====================  ================================================================

Add a section by writing ``def section_NAME(args) -> list`` and registering it in :data:`SECTIONS`;
``args`` is the namespace of ``tools/benchmark.py``'s parser.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Dict, List

import torch

from dinov2od.benchmark.cpu_kind import cpu_kind, header_lines
from dinov2od.benchmark.msda import section_msda
from dinov2od.layers import _ext

__all__ = ["SECTIONS", "run", "section_model", "section_msda", "section_peers", "section_startup"]


def section_model(args: argparse.Namespace) -> list:
    """The whole detector (:func:`dinov2od.benchmark.model.section_model`, imported on first use)."""
    from dinov2od.benchmark.model import section_model as run_model

    return run_model(args)


def section_startup(args: argparse.Namespace) -> list:
    """Start-up on COCO-sized data (:func:`dinov2od.benchmark.startup.section_startup`; skipped
    without ``--startup-json``)."""
    from dinov2od.benchmark.startup import section_startup as run_startup

    return run_startup(args)


def section_peers(args: argparse.Namespace) -> list:
    """RF-DETR vs dinov2od (:func:`dinov2od.benchmark.peers.section_peers`; a message only without
    ``rfdetr``)."""
    from dinov2od.benchmark.peers import section_peers as run_peers

    return run_peers(args)


SECTIONS: Dict[str, Callable[[argparse.Namespace], List]] = {
    "msda": section_msda,
    "model": section_model,
    "startup": section_startup,
    "peers": section_peers,
}


def run(args: argparse.Namespace) -> int:
    """Print the setup (torch, threads, the compiled op, load, the CPU kind, GPU), then run
    ``args.section`` (all sections when None) with ``args.threads`` intra-op threads; with ``args.json``
    write the CPU kind and what the sections return there. ``args.isa``: the CPU kind only. Returns
    the exit status."""
    torch.set_num_threads(args.threads)
    kind = cpu_kind()  # (oneDNN's probe at the run's threads)
    if getattr(args, "isa", False):
        print("\n".join(header_lines(kind)))
        _write_json(args, kind, {})
        return 0
    ext = _ext.load_extension()
    print(
        f"torch {torch.__version__}, {args.threads} CPU threads, "
        f"dinov2od._C: {'loaded' if ext else f'not available ({_ext.load_error()})'}"
        + (f", cuda kernels: {ext.with_cuda()}" if ext else "")
        + (f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs" if hasattr(os, "getloadavg") else "")
    )
    for line in header_lines(kind):
        print(line)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"times are {'medians' if args.stat == 'median' else 'best-of'} of {args.repeats} calls "
          f"({args.model_repeats} in the model section); 'vs pt' = PyTorch path time / this path's time "
          "(same device, dtype, run)")
    results = {}
    for name in args.section or list(SECTIONS):
        results[name] = SECTIONS[name](args)
    _write_json(args, kind, results)
    return 0


def _write_json(args: argparse.Namespace, kind, results: dict) -> None:
    """``--json PATH``: the CPU kind, torch, threads and each section's returned rows."""
    path = getattr(args, "json", None)
    if not path:
        return
    with open(path, "w") as f:
        json.dump({"cpu": kind.as_dict(), "torch": torch.__version__, "threads": args.threads,
                   "sections": results}, f, indent=1, default=str)
    print(f"wrote {path}")
