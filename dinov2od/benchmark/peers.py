"""Section ``peers``: RF-DETR and dinov2od side by side, in the same rounds, threads and dtype.

RF-DETR (Roboflow's DINOv2 + deformable-decoder detector, ``pip install rfdetr``) is an optional
dependency of this section only: ``make env-peers`` builds ``.venv-peers`` (the modern stack plus
``rfdetr``; requirements/peers.txt), and

    .venv-peers/bin/python tools/benchmark.py --section peers

runs it. Without ``rfdetr`` the section prints how to get it and measures nothing.

What is compared (docs/speed.md, "Against RF-DETR"):

* **Equal token grids.** RF-DETR-N/S/M use 16-px patches at 384/512/576 px (24/32/36 patches a
  side); dinov2od's ViT-S/14 gets the same grid at 336/448/504 px. Both are random-initialized
  (speed does not depend on the weights; nothing is downloaded: RF-DETR's 16-px ViTs are built
  from its bundled config).
* **Inference**, batch 1: the model's forward plus its own top-k post-processing (RF-DETR's
  ``PostProcess``, dinov2od's ``topk_detections``), under ``torch.inference_mode`` and autocast
  in each ``--peer-dtypes`` entry (bf16 only where the CPU has native bfloat16, or on a GPU). RF-DETR
  is timed twice, as ``predict()`` runs it (eager) and in its export mode (``model.export()``:
  no NestedTensor, what its ``optimize_for_inference`` starts from); a ratio is taken against the
  faster of the two. ``speed`` = RF-DETR's time / this row's time (> 1: faster than RF-DETR).
* **Training**, one iteration (forward, loss, backward, optimizer step; AdamW), ``--peer-train-batch``
  images at each ``--peer-train-grids`` token grid: each model as its recipe trains it (RF-DETR: the
  whole model, 13 query groups, its SetCriterion; dinov2od: frozen ViT + LoRA, the preset's
  decoder, :class:`dinov2od.modeling.SetCriterion`), and the default with its whole ViT trained
  (like for like with RF-DETR's recipe). Images/s and peak memory.

Every call of a table is made once per round, round after round (``--peer-repeats`` rounds), so
that a shared machine's load falls on all alike; the reduction is ``--stat``. Each inference table's
rounds also time the machine's matmul rate in the table's dtype (a square ``torch.mm`` and oneDNN's
linear at 1536^3, :func:`dinov2od.benchmark.measure.matmul_kernels`, same threads): every row prints its
GFLOP/s (FLOPs: :data:`dinov2od.benchmark.measure.FLOP_COUNTER`, counted once in fp32) as a fraction
of that rate, the distance to the physical limit. Every table title and target line carries the CPU
kind (:func:`dinov2od.benchmark.cpu_kind.cpu_tag`: AMX, native bf16), and the targets are
:data:`dinov2od.benchmark.targets.PEER_TARGETS` (bf16 ones only where the CPU has native bf16).
"""
from __future__ import annotations

import argparse
import copy
import contextlib
import logging
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from dinov2od.benchmark import measure
from dinov2od.benchmark.cpu_kind import cpu_tag
from dinov2od.benchmark.models import random_targets
from dinov2od.benchmark.targets import PEER_TARGETS, TRAIN_TARGET
from dinov2od.layers.precision import autocast_context, native_cpu_bf16

__all__ = ["PEERS", "Peer", "equal_grid_px", "section_peers", "shared_rounds", "speed_ratio"]

OUR_PATCH = 14  # ViT-S/14


@dataclass(frozen=True)
class Peer:
    """An RF-DETR size: its class in ``rfdetr``, native resolution (px) and patch size."""

    cls: str
    px: int
    patch: int

    @property
    def grid(self) -> int:
        return self.px // self.patch


PEERS: Dict[str, Peer] = {
    "RF-DETR-N": Peer("RFDETRNano", 384, 16),
    "RF-DETR-S": Peer("RFDETRSmall", 512, 16),
    "RF-DETR-M": Peer("RFDETRMedium", 576, 16),
}


def equal_grid_px(grid: int, patch: int = OUR_PATCH) -> int:
    """The image side giving ``grid`` patches a side with ``patch``-px patches."""
    return grid * patch


def speed_ratio(reference_ms: float, ms: float) -> float:
    """How many times faster than the reference a row is (reference time / its time)."""
    return reference_ms / ms


def shared_rounds(calls: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: str,
                  wrap: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Dict[str, float]:
    """``{name: ms}``: each call of ``calls`` once per round for ``repeats`` rounds (after ``warmup``
    untimed rounds), reduced with :data:`dinov2od.benchmark.measure.STAT`."""
    times: Dict[str, List[float]] = {k: [] for k in calls}
    for r in range(warmup + repeats):
        for name, fn in calls.items():
            with wrap():
                measure._sync(device)
                t0 = measure.CLOCK["now"]()
                fn()
                measure._sync(device)
                dt = (measure.CLOCK["now"]() - t0) * 1e3
            if r >= warmup:
                times[name].append(dt)
    pick = min if measure.STAT["name"] == "min" else statistics.median
    return {k: pick(v) for k, v in times.items()}


# ---------------------------------------------------------------- the two projects' models


def _rfdetr():
    """The ``rfdetr`` module, quiet, or None when it is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import rfdetr
    except ImportError:
        return None
    logging.getLogger("rf-detr").setLevel(logging.ERROR)
    return rfdetr


def build_peer(name: str, device: str):
    """(RF-DETR ``nn.Module`` in eval mode, its post-processor, its builder args), random init."""
    rfdetr = _rfdetr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapper = getattr(rfdetr, PEERS[name].cls)(pretrain_weights=None, device=device)
    ctx = wrapper.model
    return ctx.model.to(device).eval(), ctx.postprocess, ctx.args


def peer_inference_calls(module, postprocess, px: int, device: str) -> Dict[str, Callable[[], object]]:
    """``{"eager": call, "export": call}`` of one RF-DETR module on a normalized (1, 3, px, px) image."""
    x = torch.randn(1, 3, px, px, device=device)
    sizes = torch.tensor([[px, px]], device=device)
    exported = copy.deepcopy(module)
    exported.export()

    def eager():
        return postprocess(module(x), target_sizes=sizes)

    def export():
        boxes, logits = exported(x)[:2]
        return postprocess({"pred_logits": logits, "pred_boxes": boxes}, target_sizes=sizes)

    return {"eager": eager, "export": export}


def our_presets() -> Tuple[str, ...]:
    return ("default", "efficient")


def build_ours(preset: str, device: str):
    """(dinov2od detector in eval mode, a criterion for its training iteration), ViT-S/14, random init."""
    from dinov2od.benchmark.models import build_model
    from dinov2od.modeling import HungarianMatcher, SetCriterion

    model, _ = build_model("vits14", preset, device)
    criterion = SetCriterion(num_classes=model.num_classes,
                             matcher=HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
                             num_aux_layers=model.decoder.num_layers - 1,
                             two_stage=model.decoder.options.two_stage).to(device)
    return model.eval(), criterion


def our_inference_call(model, px: int, device: str) -> Callable[[], object]:
    from dinov2od.benchmark.model import end_to_end

    x = torch.rand(1, 3, px, px, device=device)
    return lambda: end_to_end(model, x)


def _count_gflop(fn: Callable[[], object], module: torch.nn.Module) -> Optional[float]:
    try:
        with torch.no_grad(), measure.grads_off(module):
            return measure.count_flops(fn) / 1e9
    except Exception:  # noqa: BLE001 - a FLOP count is a courtesy column
        return None


# ---------------------------------------------------------------- training iteration


def peer_train_step(module, args, batch: int, px: int, device: str) -> Callable[[], float]:
    """One RF-DETR training iteration as its trainer makes it (whole model, its criterion)."""
    from rfdetr.models.lwdetr import build_criterion_and_postprocessors

    criterion, _ = build_criterion_and_postprocessors(args)
    criterion.to(device)
    weights = criterion.weight_dict
    images = torch.randn(batch, 3, px, px, device=device)
    targets = random_targets(batch, args.num_classes, device)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        module.train()
        out = module(images, targets)
        losses = criterion(out, targets)
        loss = sum(losses[k] * weights[k] for k in losses if k in weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def our_train_step(model, criterion, batch: int, px: int, device: str) -> Callable[[], float]:
    """One dinov2od training iteration (the preset's trainable parameters, its SetCriterion)."""
    images = torch.rand(batch, 3, px, px, device=device)
    targets = random_targets(batch, model.num_classes, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model.train()
        out = model(images, targets=targets)
        losses = criterion(out, targets)
        loss = sum(v * criterion.weight_of(k) for k, v in losses.items() if k.startswith("loss"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# ---------------------------------------------------------------- the section


def _dtypes(args, device: str) -> List[str]:
    out = []
    for dt in args.peer_dtypes:
        if dt == "bf16" and device == "cpu" and not native_cpu_bf16():
            print("  (bf16 skipped: this CPU has no native bfloat16; dinov2od.layers.precision)")
            continue
        out.append(dt)
    return out


def _inference_table(args, device: str, peers: List[str]) -> List[dict]:
    rows = []
    ours = {p: build_ours(p, device)[0] for p in our_presets()}
    for name in peers:
        peer = PEERS[name]
        module, post, _ = build_peer(name, device)
        our_px = equal_grid_px(peer.grid)
        calls = {f"{name} {k}": fn for k, fn in peer_inference_calls(module, post, peer.px, device).items()}
        for preset, model in ours.items():
            calls[f"dinov2od {preset}"] = our_inference_call(model, our_px, device)
        flops = {}
        for key, fn in calls.items():
            flops[key] = _count_gflop(fn, module if key.startswith("RF") else ours[key.split()[-1]])
        if flops[f"{name} export"] is None:  # (the counter fails on the export graph: the same computation)
            flops[f"{name} export"] = flops[f"{name} eager"]
        for dt in _dtypes(args, device):
            def wrap(dt=dt):
                stack = contextlib.ExitStack()
                stack.enter_context(torch.inference_mode())
                stack.enter_context(autocast_context(device, dt))
                return stack

            # the machine's matmul rate in this dtype, in the same rounds (dtype tensors: autocast casts nothing)
            kernels = measure.matmul_kernels(dt, device)
            ms = shared_rounds({**calls, **{k: fn for k, (fn, _) in kernels.items()}}, args.peer_repeats,
                               args.warmup, device, wrap)
            rates = {k: kernels[k][1] / (ms.pop(k) * 1e-3) / 1e9 for k in kernels}
            rate = measure.matmul_rate(rates, dt)
            ref = min(ms[f"{name} eager"], ms[f"{name} export"])
            for key, t in ms.items():
                px = peer.px if key.startswith("RF") else our_px
                gfs = flops[key] / (t * 1e-3) if flops[key] else None
                rows.append(dict(grid=peer.grid, dtype=dt, model=key, px=px, ms=t, gflop=flops[key],
                                 gflops_s=gfs, matmul_rate=rate, of_matmul=gfs / rate if gfs and rate else None,
                                 speed=speed_ratio(ref, t), peer=name))
            _print_inference(rows[-len(ms):], rates)
    return rows


def _print_inference(rows: List[dict], rates: Optional[Dict[str, float]] = None) -> None:
    r0 = rows[0]
    dt = r0["dtype"]
    print(f"\n{r0['grid']}x{r0['grid']} tokens, batch 1, {dt}, {cpu_tag()}: speed = {r0['peer']}'s faster time / "
          f"this row's; % of {dt} matmul = GFLOP/s over the best {dt} matmul rate of the same rounds")
    if rates:
        print("matmul rate, same rounds and threads: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in rates.items()))
    print(f"| model | px | ms | GFLOP | GFLOP/s | % of {dt} matmul | speed vs {r0['peer']} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g = f"{r['gflop']:.1f}" if r["gflop"] else "-"
        gfs = f"{r['gflops_s']:.1f}" if r.get("gflops_s") else "-"
        of = f"{100 * r['of_matmul']:.0f}%" if r.get("of_matmul") else "-"
        print(f"| {r['model']} | {r['px']} | {r['ms']:.1f} | {g} | {gfs} | {of} | {r['speed']:.2f}x |", flush=True)


def _train_table(args, device: str, peer_name: str) -> List[dict]:
    rows = []
    peer = PEERS[peer_name]
    for grid in args.peer_train_grids:
        calls, mem = {}, {}
        module, _, pargs = build_peer(peer_name, device)
        calls[f"{peer_name}"] = peer_train_step(module, pargs, args.peer_train_batch, grid * peer.patch, device)
        for preset in our_presets():
            model, crit = build_ours(preset, device)
            calls[f"dinov2od {preset}"] = our_train_step(model, crit, args.peer_train_batch, equal_grid_px(grid), device)
        # like for like with RF-DETR's recipe, which trains its whole ViT: the default with the ViT trained too
        model, crit = build_ours("default", device)
        for p in model.backbone.parameters():
            p.requires_grad_(True)
        calls["dinov2od default, ViT trained"] = our_train_step(model, crit, args.peer_train_batch,
                                                                equal_grid_px(grid), device)
        for key, fn in calls.items():  # warm-up and peak memory, one model at a time
            fn()
            with measure.PeakMemory(device) as m:
                fn()
            mem[key] = m.peak_mb
        ms = shared_rounds(calls, args.peer_train_repeats, 0, device)
        batch = args.peer_train_batch
        ref = ms[peer_name]
        block = []
        for key, t in ms.items():
            px = grid * (peer.patch if key == peer_name else OUR_PATCH)
            block.append(dict(grid=grid, model=key, px=px, ms=t, images_s=batch / t * 1e3, peak_mb=mem[key],
                              speed=speed_ratio(ref, t)))
        where = cpu_tag() if device == "cpu" else device
        print(f"\ntraining iteration, batch {batch}, {grid}x{grid} tokens, fp32, {where}: speed = {peer_name}'s time / "
              "this row's")
        print("| model | px | ms / iteration | images/s | peak memory MiB | speed |")
        print("|---|---|---|---|---|---|")
        for r in block:
            print(f"| {r['model']} | {r['px']} | {r['ms']:.0f} | {r['images_s']:.2f} | {r['peak_mb']:.0f} | "
                  f"{r['speed']:.2f}x |", flush=True)
        rows += block
    return rows


def targets_lines(rows: List[dict], train_rows: List[dict], peer: str = "RF-DETR-S", device: str = "cpu",
                  native_bf16: Optional[bool] = None, tag: Optional[str] = None) -> List[str]:
    """The verdict of each of :data:`dinov2od.benchmark.targets.PEER_TARGETS` (and the training
    iteration's) from the rows of this run, each with the CPU kind (``tag``, default :func:`cpu_tag`)
    and, where measured, the preset's share of the matmul rate in that dtype. A bf16 target on a CPU
    without native bf16 reads ``n/a: no native bf16``; a dtype not run reads ``not measured``."""
    if device == "cpu" and native_bf16 is None:
        native_bf16 = native_cpu_bf16()
    native = True if device != "cpu" else bool(native_bf16)
    tag = tag if tag is not None else (cpu_tag() if device == "cpu" else f"[{device}]")
    lines = []
    for t in PEER_TARGETS:
        r = [x for x in rows if x["peer"] == peer and x["dtype"] == t.dtype and x["model"] == f"dinov2od {t.preset}"]
        if not r and (not t.native_bf16 or native):
            continue  # (that dtype was not asked for)
        limit = (f"; {100 * r[0]['of_matmul']:.0f}% of the {t.dtype} matmul rate {r[0]['matmul_rate']:.1f} GFLOP/s"
                 if r and r[0].get("of_matmul") else "")
        lines.append(f"{t.preset} vs {peer}, {t.dtype}: {t.verdict(r[0]['speed'] if r else None, native)}{limit} {tag}")
    for r in train_rows:
        if r["model"].startswith("dinov2od"):
            lines.append(f"training, {r['model']} vs {peer}, {r['grid']}x{r['grid']} tokens: {r['speed']:.2f}x "
                         f"(target >= {TRAIN_TARGET:.2f}x: {'met' if r['speed'] >= TRAIN_TARGET else 'NOT met'}) {tag}")
    return lines


def section_peers(args: argparse.Namespace) -> list:
    """RF-DETR vs dinov2od (module docstring); nothing without ``rfdetr``."""
    if _rfdetr() is None:
        print("\nsection peers: rfdetr is not installed; `make env-peers`, then "
              "`.venv-peers/bin/python tools/benchmark.py --section peers` (docs/speed.md)")
        return []
    from importlib.metadata import version

    measure.STAT["name"] = args.stat
    if args.clock == "process":  # this process's CPU time (with --threads 1 on a busy machine)
        measure.CLOCK["now"] = time.process_time
    print(f"\nsection peers: rfdetr {version('rfdetr')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, {args.stat} of {args.peer_repeats} shared rounds, {cpu_tag()}; FLOPs: "
          f"{measure.FLOP_COUNTER}, counted once in fp32")
    out = []
    for device in args.devices:
        rows = _inference_table(args, device, args.peers)
        train_rows = _train_table(args, device, "RF-DETR-S") if args.peer_train_batch > 0 else []
        print(f"\ntargets ({device}):")
        for line in targets_lines(rows, train_rows, device=device):
            print("  " + line)
        out += rows + train_rows
    return out
