#!/usr/bin/env python
"""Benchmarks for dinov2od (the library: dinov2od/benchmark/).

    python tools/benchmark.py                       # every section, CPU (+ CUDA if visible), 2 threads
    python tools/benchmark.py --section msda --device cpu --threads 2 --repeats 20
    python tools/benchmark.py --section model --threads 2 --profile   # the whole model (see below)
    python tools/benchmark.py --isa                 # the CPU kind alone: ISA flags, AMX, native bf16, oneDNN

Every run first prints the CPU kind (``dinov2od/benchmark/cpu_kind.py``): the CPU model, the ISA flags
that decide bf16 speed (avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8, from /proc/cpuinfo), AMX
yes/no, native bf16 yes/no, what torch reports (oneDNN version and state, torch's kernel ISA, its AMX
probe where it has one) and the kernels oneDNN picks for a bf16 linear, matmul and convolution; every
ratio line carries the short tag of it. ``--json PATH`` writes the same, with the sections' rows.

Section ``msda`` (``dinov2od/benchmark/msda.py``) times multi-scale deformable attention, forward
(no grad) and forward+backward, for every available path (the PyTorch path, the compiled CPU kernel,
the compiled CUDA kernel in float32 and bfloat16 when a GPU is visible) at

  (a) ``decoder``: a decoder cross-attention layer, N=2, 300 queries, 8 heads, 32 channels
      per head, levels 74x74/37x37/19x19/10x10, 4 points;
  (b) ``encoder``: one query per pyramid token (Lq = S = 7306), same levels.

It prints each path's median time (``--stat min``: best-of) and its speed-up over the PyTorch
path on the same device and dtype, measured in the same run, and the largest difference from
the PyTorch output.
Section ``model`` (``dinov2od/benchmark/model.py``) times the whole detector: inference end to end
and by parts, one training iteration, FLOPs, GFLOP/s against the machine's fp32 linear rate, peak
memory, onnxruntime and bfloat16, the speed targets (``dinov2od/benchmark/targets.py``); Markdown
tables. Its default run is ViT-S/14 at 448 px (default and efficient presets) and the demo model;
``--backbones vits14 vitb14 --sizes 448 518 640 800 --batches 1 8`` is the full table. Its
``fp32-plain`` rows turn the CPU inference path off with
``dinov2od.layers.inference_options.inference_options(fused_linear=False)``.
Section ``peers`` (``dinov2od/benchmark/peers.py``; ``make env-peers`` installs ``rfdetr`` into
``.venv-peers``) runs RF-DETR-N/S and dinov2od's presets at equal token grids in shared rounds,
fp32 and bf16, and one training iteration each; it prints each ratio and the targets against
RF-DETR-S.
Add a section in ``dinov2od/benchmark/__init__.py`` (``SECTIONS``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinov2od.benchmark import SECTIONS, run  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (flags: ``--help``), with ``devices`` and ``cases`` resolved."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS),
                        help="sections to run (repeatable; default: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cpu, plus cuda when a GPU is visible")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--case", dest="cases", action="append", choices=["decoder", "encoder"],
                        help="msda cases (repeatable; default: both)")
    parser.add_argument("--stat", default="median", choices=["median", "min"],
                        help="statistic of the repeats (min: best-of, steadier on a shared machine)")
    parser.add_argument("--isa", action="store_true",
                        help="print the CPU kind (ISA flags, AMX, native bf16, oneDNN's kernels) and exit")
    parser.add_argument("--json", metavar="PATH", help="also write the CPU kind and the sections' rows as JSON")
    parser.add_argument("--cpu-isa", default="auto", choices=["auto", "default", "avx2", "all"],
                        help="CPU kernel inner loops to time (auto: the one dispatch picks)")
    model = parser.add_argument_group("section model (dinov2od/benchmark/model.py)")
    model.add_argument("--backbones", nargs="+", default=["vits14"],
                       help="vits14 vitb14 dinov3-s16 (see BACKBONES in dinov2od/benchmark/models.py)")
    model.add_argument("--presets", nargs="+", default=["default", "efficient", "demo"],
                       choices=["default", "efficient", "demo", "demo-efficient"],
                       help="model configs to measure (demo-efficient: configs/shapes_efficient.py)")
    model.add_argument("--demo-overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides of the demo presets, e.g. model.detector.backbone.window_size=8 "
                            "(the rows of docs/speed.md's table in miniature)")
    model.add_argument("--sizes", nargs="+", type=int, default=[448],
                       help="square image sizes in px for 14-px patches, e.g. 448 518 640 800")
    model.add_argument("--batches", nargs="+", type=int, default=[1], help="inference batches, e.g. 1 8")
    model.add_argument("--dtypes", nargs="+", default=["fp32", "fp32-plain", "bf16", "int8"],
                       choices=["fp32", "fp32-plain", "bf16", "bf16-plain", "int8"],
                       help="inference precision (fp32-plain / bf16-plain: with the CPU inference path off "
                            "(bf16-plain: as autocast runs the blocks), for an A/B; "
                            "bf16: autocast, refused on CPUs without native bf16; int8: dynamic quantization "
                            "of the linear layers, CPU)")
    model.add_argument("--runtimes", nargs="+", default=["torch", "onnx"], choices=["torch", "onnx"],
                       help="onnx: also run the exported graph with onnxruntime (CPU)")
    model.add_argument("--train-batch", type=int, default=1, help="images of the training iteration (0: skip)")
    model.add_argument("--demo-size", type=int, default=224, help="image size for the demo model")
    model.add_argument("--model-repeats", type=int, default=5, help="timed calls per model measurement")
    model.add_argument("--clock", default="wall", choices=["wall", "process"],
                       help="process: CPU time of this process (use with --threads 1 on a busy machine)")
    model.add_argument("--profile", action="store_true", help="print torch.profiler's top ops per model (batch 1)")
    startup = parser.add_argument_group("section startup (dinov2od/benchmark/startup.py)")
    startup.add_argument("--startup-json", help="COCO json to start on (tools/make_coco_like.py); none: skip")
    startup.add_argument("--startup-ranks", nargs="+", type=int, default=[1, 2, 4], help="rank counts (gloo, CPU)")
    startup.add_argument("--startup-cache-dir", help="dataset cache folder (default: a new temporary one)")
    startup.add_argument("--startup-timeout", type=float, default=900, help="seconds per job")
    peers = parser.add_argument_group("section peers (dinov2od/benchmark/peers.py; needs rfdetr: make env-peers)")
    peers.add_argument("--peers", nargs="+", default=["RF-DETR-N", "RF-DETR-S"],
                       choices=["RF-DETR-N", "RF-DETR-S", "RF-DETR-M"],
                       help="RF-DETR sizes; dinov2od's presets run at each one's token grid")
    peers.add_argument("--peer-dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                       help="autocast dtypes (bf16: where the CPU has native bfloat16, or on a GPU)")
    peers.add_argument("--peer-repeats", type=int, default=10, help="shared rounds of the inference tables")
    peers.add_argument("--peer-train-batch", type=int, default=8, help="images of the training iteration (0: skip)")
    peers.add_argument("--peer-train-grids", nargs="+", type=int, default=[16, 32],
                       help="token grids of the training iteration: 16 = the demo's 224 px, 32 = 448 px; "
                            "57 = the COCO recipe's 800 px (slow on a CPU)")
    peers.add_argument("--peer-train-repeats", type=int, default=3, help="shared rounds of the training table")
    args = parser.parse_args(argv)
    args.cases = args.cases or ["decoder", "encoder"]
    if args.device == "auto":
        args.devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible to torch")
    else:
        args.devices = [args.device]
    return args


def main(argv=None) -> int:
    """Parse ``argv`` and run the sections it names (:func:`dinov2od.benchmark.run`)."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
