"""The summary printed at the end of a run: the loss curve, the wall time and machine, and the outputs."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import List, Optional, Sequence

from dinov2od.layers.precision import cpu_flags

from .plots import RESULT_FILES

__all__ = ["cpu_description", "loss_curve", "outputs_listing", "run_summary"]

# The x86 / Arm vector extensions that decide CPU speed here (AVX2-only machines run ~2x slower).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "neon", "asimd",
                "sve")


def cpu_description() -> str:
    """``"<model name>, 2 cores, avx2 fma avx512f ..."``: the CPU and its vector extensions."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    vector = [f for f in VECTOR_FLAGS if f in flags] or ["(flags unknown)"]
    return f"{model}, {os.cpu_count()} cores, {' '.join(vector)}"


def loss_curve(metrics_file: str, rows: int = 12, keys: Sequence[str] = ("loss_class", "loss_bbox", "loss_giou"),
               width: int = 30) -> str:
    """A text table of the training losses in Detectron2's ``metrics.json`` at ``rows`` evenly spaced
    logged iterations, with a bar for the total loss.

    Returns:
        the table, or "" when the file holds no training losses.
    """
    if not os.path.isfile(metrics_file):
        return ""
    with open(metrics_file) as f:
        logged = [r for r in (json.loads(line) for line in f if line.strip()) if "total_loss" in r]
    if not logged:
        return ""
    picks = sorted({round(i * (len(logged) - 1) / max(rows - 1, 1)) for i in range(rows)})
    top = max(r["total_loss"] for r in logged) or 1.0
    lines = [f"{'iter':>7} {'total_loss':>10} " + " ".join(f"{k:>10}" for k in keys)]
    for i in picks:
        r = logged[i]
        bar = "#" * max(1, round(width * r["total_loss"] / top))
        lines.append(f"{r['iteration'] + 1:>7} {r['total_loss']:>10.4f} "
                     + " ".join(f"{r.get(k, float('nan')):>10.4f}" for k in keys) + f"  {bar}")
    return "\n".join(lines)


def outputs_listing(output_dir: str, vis_dir: str = "") -> List[str]:
    """The files a run wrote that a user looks for next, one line each."""
    lines = [f"Outputs are in {os.path.abspath(output_dir)}:"]
    for name, what in (
        ("model_final.pth", "final checkpoint (resume / fine-tune from it)"),
        ("model_final_ema.pth", "EMA weights, for DefaultPredictor / tools/predict.py"),
        ("model_final_ema.safetensors", "the same weights + model_final_ema.json: the format to share (SECURITY.md)"),
        ("metrics.json", "training metrics"),
        ("log.txt", "log"),
        ("inference/coco_instances_results.json", "COCO-format detections"),
        *RESULT_FILES,  # the pictures of dinov2od.d2.evaluation.plots
    ):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            lines.append(f"  {path}  ({what})")
    if vis_dir and os.path.isdir(vis_dir):
        lines.append(f"  {vis_dir}/  (prediction images drawn with Detectron2's Visualizer)")
    return lines


def run_summary(output_dir: str, started: float, vis_dir: str = "", curve_rows: int = 0,
                now: Optional[float] = None) -> str:
    """The end-of-run summary: the loss curve (``curve_rows`` > 0), the wall time since ``started``
    (a ``time.time()``) with the CPU it ran on, and the outputs."""
    parts = []
    if curve_rows:
        curve = loss_curve(os.path.join(output_dir, "metrics.json"), curve_rows)
        if curve:
            parts.append("Training loss:\n" + curve)
    elapsed = (now if now is not None else time.time()) - started
    parts.append(f"Wall time: {elapsed:.0f} s ({elapsed / 60:.1f} min) on {cpu_description()}")
    parts.append("\n".join(outputs_listing(output_dir, vis_dir)))
    return "\n".join(parts)
