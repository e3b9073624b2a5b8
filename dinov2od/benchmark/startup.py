"""Section ``startup``: time from process start to the first training batch, and peak memory per rank.

    python tools/make_coco_like.py /tmp/coco_like                     # the 118,287-image file
    python tools/benchmark.py --section startup --startup-json /tmp/coco_like/annotations.json

For each rank count (``--startup-ranks``, default 1 2 4) three jobs run, each a fresh
``python -m dinov2od.benchmark.startup`` that starts its ranks with Detectron2's ``launch()``
(gloo, CPU; one rank: no process group, as ``launch()`` does):

- ``before``: the lazy train loader with ``dataloader.train.dataset.cache=False`` (every rank
  parses the json with ``get_detection_dataset_dicts``; Detectron2 serializes it per rank);
- ``after, 1st``: ``cache=True`` into an empty cache folder (local rank 0 parses and writes it);
- ``after, 2nd``: ``cache=True`` again (every rank memory-maps the cache).

Every rank builds ``configs/common/data.py``'s ``dataloader.train`` (DetrDatasetMapper, COCO
augmentation, 2 images per rank, ``num_workers=0``, so the rank's memory is the loader's) and takes
one batch. Reported per job: seconds from the job's start (before the interpreter starts) to the
last rank's first batch, split into the start-up (interpreter, imports, ``launch()``'s spawned ranks
and process group: the latest rank to enter its main) and the data (dataset, loader, first batch:
the slowest rank; the rest is loading the config, which imports dinov2od), and the peak RSS (``VmHWM``) of rank 0 and the largest of the other ranks
(also less their ``VmHWM`` after the interpreter, torch and Detectron2 are imported).
``VmHWM`` counts the memory-mapped cache pages a rank touched, though the OS holds them once.
Without ``--startup-json`` the section is skipped (it needs the large file).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATASET = "dd_startup_coco_like"

__all__ = ["section_startup"]


def _vm_hwm_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _rank_main(json_file: str, cache: bool, cache_dir: str, out: str, t0: float) -> None:
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data.datasets import register_coco_instances
    from detectron2.utils import comm

    t_main = time.time() - t0  # interpreter, imports, launch()'s spawn and process group
    imports_gib = _vm_hwm_gib()  # interpreter + torch + Detectron2 (+ dinov2od via the config below, ~0.1 GiB)
    register_coco_instances(DATASET, {}, json_file, os.path.join(os.path.dirname(json_file), "images"))
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "common", "data.py"))
    train = cfg.dataloader.train
    train.dataset.update(names=DATASET, cache=cache, cache_dir=cache_dir)
    train.total_batch_size = 2 * comm.get_world_size()
    train.num_workers = 0
    t_build = time.time()
    loader = instantiate(train)
    batch = next(iter(loader))
    t = time.time()
    result = {"rank": comm.get_rank(), "first_batch_s": t - t0, "loader_s": t - t_build, "images": len(batch),
              "vmhwm_gib": _vm_hwm_gib(), "imports_gib": imports_gib,
              "main_s": t_main}
    with open(os.path.join(out, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(result, f)
    comm.synchronize()


def _job(json_file: str, ranks: int, cache: bool, cache_dir: str, timeout: float) -> dict:
    out = tempfile.mkdtemp(prefix="dd_startup_")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    cmd = [sys.executable, "-m", "dinov2od.benchmark.startup", json_file, str(ranks), str(int(cache)), cache_dir,
           out, repr(t0)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - t0
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    rows = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(ranks)]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "first_batch_s": max(r["first_batch_s"] for r in rows),
        "main_s": max(r["main_s"] for r in rows),
        "loader_s": max(r["loader_s"] for r in rows),
        "wall_s": wall,
        "rank0_gib": rows[0]["vmhwm_gib"],
        "other_gib": max((r["vmhwm_gib"] for r in rows[1:]), default=float("nan")),
        "total_gib": sum(r["vmhwm_gib"] for r in rows),
        "other_growth_gib": max((r["vmhwm_gib"] - r["imports_gib"] for r in rows[1:]), default=float("nan")),
    }


def section_startup(args: argparse.Namespace) -> List[dict]:
    """Print a Markdown table (ranks x before / after 1st / after 2nd); return its rows."""
    json_file = getattr(args, "startup_json", None)
    if not json_file:
        print("\n## startup: skipped (give --startup-json FILE, e.g. from tools/make_coco_like.py)")
        return []
    cache_root = getattr(args, "startup_cache_dir", None) or tempfile.mkdtemp(prefix="dd_startup_cache_")
    size = os.path.getsize(json_file) / 2**20
    print(f"\n## startup: {json_file} ({size:.0f} MiB), DetrDatasetMapper, 2 images/rank, num_workers=0, "
          f"gloo on CPU")
    print("| ranks | run | first batch (s) | of it: start-up, imports (s) | of it: data + batch (s) "
          "| peak RSS rank 0 (GiB) | peak RSS other ranks, max (GiB) | of it after the imports (GiB) | sum (GiB) |")
    print("|------:|-----|----------------:|-----------------------------:|------------------------:"
          "|----------------------:|--------------------------------:|------------------------------:|----------:|")
    rows = []
    for n in args.startup_ranks:
        cache_dir = os.path.join(cache_root, f"ranks{n}")
        shutil.rmtree(cache_dir, ignore_errors=True)
        for run_name, cache in (("before (cache off)", False), ("after, 1st start", True), ("after, 2nd start", True)):
            r = _job(json_file, n, cache, cache_dir, args.startup_timeout)
            r.update(ranks=n, run=run_name)
            rows.append(r)
            if "error" in r:
                print(f"| {n} | {run_name} | failed: {r['error']} | | | | | | |", flush=True)
                continue
            other = f"{r['other_gib']:.2f} | {r['other_growth_gib']:.2f}" if n > 1 else "- | -"
            print(f"| {n} | {run_name} | {r['first_batch_s']:.1f} | {r['main_s']:.1f} | {r['loader_s']:.1f} "
                  f"| {r['rank0_gib']:.2f} | {other} | "
                  f"{r['total_gib']:.2f} |", flush=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
    return rows


if __name__ == "__main__":  # one job: python -m dinov2od.benchmark.startup JSON RANKS CACHE CACHE_DIR OUT T0
    from detectron2.engine import launch

    from dinov2od.benchmark.startup import _rank_main as rank_main  # importable by launch()'s spawned ranks

    _json, _ranks, _cache, _cache_dir, _out, _t0 = sys.argv[1:7]
    launch(rank_main, int(_ranks), num_machines=1, machine_rank=0, dist_url="auto",
           args=(_json, bool(int(_cache)), _cache_dir, _out, float(_t0)))
