"""``tools/benchmark.py --section model``: the whole detector, inference and training.

For each (backbone, preset, image size) it measures, in one process and one run:

* inference at each ``--batches`` (no grad): end to end (the plain API, ``model(images)`` +
  :func:`topk_detections`) and the same computation split into its parts (pre-processing,
  backbone, neck, decoder, post-processing), timed stage by stage inside one call;
* one training iteration (forward parts, loss, backward, AdamW step) at ``--train-batch``;
* FLOPs of both (``torch.utils.flop_counter``: matrix products, convolutions and attention;
  grid sampling and element-wise ops are not counted), achieved GFLOP/s, and peak memory (CPU:
  the resident set's peak above its level before the call, sampled every millisecond; CUDA:
  ``max_memory_allocated``);
* the same inference through onnxruntime (``--runtime onnx``: the graph of
  :func:`dinov2od.export.export_detector`, same threads);
* ``--dtypes``: ``fp32``; ``fp32-plain`` (fp32 with the CPU inference path of
  :mod:`dinov2od.layers.fused_linear` / :mod:`dinov2od.modeling.inference` off: the A/B of that path
  in one run); ``bf16`` autocast (refused on CPUs without native bf16); ``int8`` (the copy of
  :func:`dinov2od.modeling.quantize.quantize_dynamic_int8`, CPU).

The yardstick: the machine's fp32 linear rate at the shape of the ViT-S MLP at 448 px (1024 tokens,
384 -> 1536) and at 1536^3, for ``F.linear`` (what ``nn.Linear`` runs, the issue's yardstick) and, on
the CPU, oneDNN's matmul (faster on some CPUs; the CPU inference path uses it). It is measured in
the same rounds as each row's model: every round runs the yardstick kernels, one end-to-end call and
one staged call, so that a shared host's changing load weighs on the model and its yardstick alike.
Tables print in Markdown.

Presets are the lazy model configs (``configs/common/models/dinov2_detr.py``, ``..._efficient.py``
and the demo's ``configs/shapes.py``), random-initialized; without Detectron2 the default and
efficient presets are built from :data:`PLAIN_PRESETS` (the same models; tests/test_d2_configs.py)
and the demo and the training iteration are skipped.
"""
from __future__ import annotations

import math
import os
import statistics
import threading
import contextlib
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dinov2od.layers.precision import autocast_context
from dinov2od.modeling import BACKBONES as FAMILIES
from dinov2od.modeling import DINOv2ObjectDetector, topk_detections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "default": "configs/common/models/dinov2_detr.py",
    "efficient": "configs/common/models/dinov2_detr_efficient.py",
    "demo": "configs/shapes.py",
}


def _backbone(**overrides) -> Tuple[dict, int]:
    """(keyword overrides of the preset's backbone, the patch size of their family in the registry)."""
    return overrides, FAMILIES[overrides.get("family", "dinov2")].default_patch_size


# Backbones by name: keyword overrides of the preset's backbone (any registered family), and the patch
# size (sizes given in px for 14-px patches are scaled so that every backbone sees the same token grid).
BACKBONES: Dict[str, Tuple[dict, int]] = {
    "vits14": _backbone(arch="small"),
    "vitb14": _backbone(arch="base"),
    "dinov3-s16": _backbone(family="dinov3", arch="small"),  # 512 px = DINOv2-S/14's 448 px token grid
}
STAGES = ("pre", "backbone", "neck", "decoder", "post")
TRAIN_STAGES = ("backbone", "neck", "decoder", "loss", "backward", "step")


# ---------------------------------------------------------------- measuring


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
    from dinov2od.layers import cpu_attention

    # dinov2od's attention kernel is no aten op: count torch's (same FLOPs)
    with env_set(cpu_attention.ENV, "0"), fc.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    by_op = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in by_op.items() if "scaled_dot_product" in str(op))
    return float(counter.get_total_flops()), float(attention)


@contextlib.contextmanager
def plain_path(on: bool = True):
    """The ``fp32-plain`` rows: the CPU inference path off (``DINOV2OD_FUSED_LINEAR=0``: no fused
    ViT blocks or oneDNN products; one value projection per decoder layer), for an A/B in one run."""
    if not on:
        yield
        return
    from dinov2od.layers.fused_linear import ENV
    from dinov2od.modeling.decoder import DeformableDecoder

    stacked, DeformableDecoder.stack_value_proj = DeformableDecoder.stack_value_proj, False
    try:
        with env_set(ENV, "0"):
            yield
    finally:
        DeformableDecoder.stack_value_proj = stacked


@contextlib.contextmanager
def env_set(name: str, value: str):
    """The environment variable ``name`` set to ``value`` inside the block, restored after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


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


# ---------------------------------------------------------------- models and inputs


# Without Detectron2 (the modern stack, the GPU machine) the lazy configs cannot be read; these
# keyword overrides of DINOv2ObjectDetector's defaults (= configs/common/models/dinov2_detr.py) give
# the efficient preset instead (tests/test_d2_configs.py checks they build the same models).
PLAIN_PRESETS = {
    "default": {},
    "efficient": dict(backbone=dict(window_size=16), scale_factors=(1.0, 0.5), num_decoder_layers=3),
}


def build_model(backbone: str, preset: str, device: str) -> Tuple[DINOv2ObjectDetector, Optional[torch.nn.Module]]:
    """A random-initialized (detector, criterion) of ``preset`` with ``backbone``'s ViT (the demo
    preset keeps its own tiny ViT). Without Detectron2: the detector of :data:`PLAIN_PRESETS` and
    no criterion."""
    overrides, _ = BACKBONES[backbone]
    try:
        from detectron2.config import LazyConfig, instantiate
    except ImportError:
        if preset not in PLAIN_PRESETS:
            raise RuntimeError(f"preset {preset!r} is read from a lazy config, which needs Detectron2")
        kwargs = dict(PLAIN_PRESETS[preset])
        kwargs["backbone"] = dict(kwargs.get("backbone", {}), **overrides, pretrained=None)
        return DINOv2ObjectDetector(num_classes=80, **kwargs).to(device), None
    cfg = LazyConfig.load(os.path.join(ROOT, PRESETS[preset]))
    bb = cfg.model.detector.backbone
    bb.pretrained = None
    if preset != "demo":
        bb.update(overrides)
        bb.arch_overrides = {}
    meta = instantiate(cfg.model)
    return meta.detector.to(device), meta


def token_size(px: int, backbone: str) -> int:
    """``px`` (for 14-px patches) -> the size giving ``backbone`` the same token grid."""
    return round(px / 14 * BACKBONES[backbone][1])


def random_targets(batch: int, num_classes: int, device: str, n: int = 5) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=g).to(device),
                    "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return out


# ---------------------------------------------------------------- the measured computations


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


def staged_forward(model: DINOv2ObjectDetector, images: torch.Tensor, clock: Stopwatch, targets=None,
                   mark_pre: bool = True):
    """``model(images, targets=targets)`` split at the module boundaries (pre, backbone, neck,
    decoder marks; without ``mark_pre`` the padding counts to the backbone). Returns the outputs
    and the (B, 2) image sizes."""
    x, masks, valid_hw = model.pad(model.normalize(images), None)
    if mark_pre:
        clock.mark("pre")
    features, patch_mask = model.backbone.forward_padded(x, valid_hw)
    clock.mark("backbone")
    prior = model.spatial_prior(x, masks) if model.spatial_prior is not None else None
    maps, level_masks = model.neck(features, patch_mask, prior)
    clock.mark("neck")
    sizes = torch.tensor(images.shape[-2:], device=images.device).expand(images.shape[0], 2)
    # (the targets feed the denoising queries of a preset that has them)
    out = model.decoder(maps, level_masks, model.valid_ratios(maps, sizes.to(x.dtype)), targets=targets)
    clock.mark("decoder")
    return out, sizes


def staged_inference(model: DINOv2ObjectDetector, images: torch.Tensor, device: str) -> Dict[str, float]:
    """``model(images)`` + top-k, split at the module boundaries; returns ms per stage."""
    clock = Stopwatch(device)
    out, sizes = staged_forward(model, images, clock)
    topk_detections(out["pred_logits"], out["pred_boxes"], sizes, 100)
    clock.mark("post")
    return clock.ms()


def end_to_end(model: DINOv2ObjectDetector, images: torch.Tensor):
    out = model(images)
    sizes = torch.tensor(images.shape[-2:], device=images.device).expand(images.shape[0], 2)
    return topk_detections(out["pred_logits"], out["pred_boxes"], sizes, 100)


def variant(model: DINOv2ObjectDetector, dtype: str, device: str, quantized: dict):
    """What a ``--dtypes`` entry runs: ``(module, autocast dtype, plain path)``, or None where it does
    not apply (``int8`` and ``fp32-plain`` are CPU paths). ``quantized`` caches the int8 copy."""
    if dtype in ("int8", "fp32-plain") and device.split(":")[0] != "cpu":
        return None
    if dtype == "int8":
        if "int8" not in quantized:
            from dinov2od.modeling.quantize import quantize_dynamic_int8

            quantized["int8"] = quantize_dynamic_int8(model)
        return quantized["int8"], "fp32", False
    return model, ("fp32" if dtype == "fp32-plain" else dtype), dtype == "fp32-plain"


def inference_calls(net, images: torch.Tensor, device: str, amp: str, plain: bool):
    """``(e2e, staged)``: :func:`end_to_end` and :func:`staged_inference` of ``net`` under inference
    mode, ``amp`` autocast and, with ``plain``, the CPU inference path off."""
    dev = device.split(":")[0]

    def e2e():
        with torch.inference_mode(), autocast_context(dev, amp), plain_path(plain):
            return end_to_end(net, images)

    def staged():
        with torch.inference_mode(), autocast_context(dev, amp), plain_path(plain):
            return staged_inference(net, images, device)

    return e2e, staged


def staged_train_step(model, meta, optimizer, images, targets, device) -> Dict[str, float]:
    """One training iteration split into forward parts, loss, backward and the optimizer step."""
    clock = Stopwatch(device)
    out, _ = staged_forward(model, images, clock, targets=targets, mark_pre=False)
    loss = sum(meta.weighted_losses(meta.criterion(out, targets)).values())
    clock.mark("loss")
    loss.backward()
    clock.mark("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    clock.mark("step")
    return clock.ms()


def median_stages(fn: Callable[[], Dict[str, float]], repeats: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    runs = [fn() for _ in range(repeats)]
    if STAT["name"] == "min":  # the fastest call, whole
        return min(runs, key=lambda r: sum(r.values()))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# ---------------------------------------------------------------- rows


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


INFER_HEADER = ("| model | px | batch | runtime | dtype | e2e ms | pre | backbone | neck | decoder | post | "
                "e2e / backbone | GFLOP | GFLOP/s | % of F.linear | % of oneDNN | peak MB |")
TRAIN_HEADER = ("| model | px | batch | iteration ms | backbone | neck | decoder | loss | backward | step | "
                "GFLOP | GFLOP/s | peak MB |")


def infer_row(name, px, batch, runtime, dtype, e2e, parts, flops, linear, peak) -> str:
    """One inference row; ``linear``: (F.linear rate, oneDNN rate or None) measured next to it."""
    parts = parts or {}
    bb = parts.get("backbone")
    gfs = flops / (e2e * 1e-3) / 1e9 if flops and e2e else None
    pct = [_fmt(100 * gfs / rate if gfs and rate else None, ".0f") for rate in linear]
    cells = [name, str(px), str(batch), runtime, dtype, _fmt(e2e)] + [_fmt(parts.get(s)) for s in STAGES] + [
        _fmt(e2e / bb if bb else None, ".2f"), _fmt(flops / 1e9 if flops else None), _fmt(gfs)] + pct + [
        _fmt(peak, ".0f")]
    return "| " + " | ".join(cells) + " |"


def train_row(name, px, batch, total, parts, flops, peak) -> str:
    gfs = flops / (total * 1e-3) / 1e9 if flops else None
    cells = [name, str(px), str(batch), _fmt(total)] + [_fmt(parts.get(s)) for s in TRAIN_STAGES] + [
        _fmt(flops / 1e9 if flops else None), _fmt(gfs), _fmt(peak, ".0f")]
    return "| " + " | ".join(cells) + " |"


def profile_top_ops(fn: Callable[[], object], top: int = 15) -> str:
    """torch.profiler's table of the ops taking the most self CPU time in one call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ---------------------------------------------------------------- the section


def measure_model(args, backbone: str, preset: str, px: int, device: str, results: dict):
    name = f"{backbone}-{preset}" if preset != "demo" else "demo"
    model, meta = build_model(backbone, preset, device)
    model.eval()
    size = token_size(px, backbone) if preset != "demo" else px
    quantized: dict = {}
    for batch in args.batches:
        images = torch.rand(batch, 3, size, size, device=device)
        for dtype in args.dtypes:
            v = variant(model, dtype, device, quantized)
            if v is None:
                continue
            net, amp, plain = v
            e2e, staged = inference_calls(net, images, device, amp, plain)
            try:
                e2e()
            except RuntimeError as err:  # bf16 refused on this CPU: say so in the table
                print(f"| {name} | {px} | {batch} | torch | {dtype} | refused: {str(err).split(':')[0]} |", flush=True)
                continue
            with PeakMemory(device) as mem:
                e2e()
            # the yardstick in the same rounds as the model: the machine's rate drifts on a shared host
            yard, e2e_ms, stage_ms = run_rounds({0: (e2e, staged)}, args.model_repeats, device)
            ms, parts = e2e_ms[0], stage_ms[0]
            linear = yardstick_rates(yard)
            results[(name, size, batch, dtype, "yardstick")] = linear
            print("<!-- linear yardstick in the rounds of %s %d px b%d %s: %s -->" % (
                name, size, batch, dtype, ", ".join(f"{k} {v:.1f}" for k, v in yard.items())), flush=True)

            def e2e_no_grad():  # torch 2.3's flop counter sees nothing under inference_mode
                with torch.no_grad(), autocast_context(device.split(":")[0], amp), plain_path(plain):
                    return end_to_end(model, images)

            with grads_off(model):  # int8: the fp32 model's count (int8 linears are not counted)
                flops, attention_flops = count_flops_split(e2e_no_grad)
            if batch == 1 and dtype == "fp32":  # the backbone's own FLOPs (windowed attention check)
                results[(name, size, "attention_flops")] = attention_flops
                with torch.no_grad(), grads_off(model):
                    x, _, valid_hw = model.pad(model.normalize(images), None)
                    results[(name, size, "backbone_flops")] = count_flops(lambda: model.backbone.forward_padded(x, valid_hw))
            print(infer_row(name, size, batch, "torch-" + device, dtype, ms, parts, flops, linear, mem.peak_mb), flush=True)
            results[(name, size, batch, "torch", dtype)] = dict(e2e=ms, flops=flops, **parts)
            if args.profile and batch == args.batches[0]:
                results.setdefault("profiles", []).append((f"{name} {size}px b{batch} {dtype}", profile_top_ops(e2e)))
        if "onnx" in args.runtimes and device == "cpu":
            measure_onnx(args, model, name, size, batch, results)
    if args.train_batch and meta is not None:
        measure_train(args, model, meta, name, size, device, results)
    del model, meta, quantized


def measure_onnx(args, model, name, size, batch, results):
    import tempfile

    from dinov2od.export import OnnxDetector, export_detector

    key = (name, size)
    if key not in results.setdefault("onnx_files", {}):
        path = os.path.join(tempfile.mkdtemp(prefix="dinov2od-bench-"), "model.onnx")
        t0 = time.perf_counter()
        try:
            export_detector(model, path, image_size=(size, size), batch_size=2)
            import onnxruntime  # noqa: F401
        except ImportError as err:  # no onnx / onnxruntime installed
            print(f"| {name} | {size} | {batch} | onnxruntime | fp32 | skipped: {err} |", flush=True)
            results["onnx_files"][key] = None
            return
        print(f"<!-- exported {name} at {size}px to ONNX in {time.perf_counter() - t0:.0f} s -->", flush=True)
        results["onnx_files"][key] = path
    if results["onnx_files"][key] is None:
        return
    runner = OnnxDetector(results["onnx_files"][key], threads=args.threads)
    images = torch.rand(batch, 3, size, size).numpy()
    sizes = torch.tensor([[size, size]] * batch).numpy()
    with PeakMemory("cpu") as mem:
        runner(images, sizes)
    ms = median_of(lambda: runner(images, sizes), args.model_repeats, 1, "cpu")
    flops = results.get((name, size, batch, "torch", "fp32"), {}).get("flops")
    linear = results.get((name, size, batch, "fp32", "yardstick"), (None, None))
    print(infer_row(name, size, batch, "onnxruntime", "fp32", ms, None, flops, linear, mem.peak_mb), flush=True)
    results[(name, size, batch, "onnx", "fp32")] = dict(e2e=ms)


def measure_train(args, model, meta, name, size, device, results):
    model.train()
    batch = args.train_batch
    images = torch.rand(batch, 3, size, size, device=device)
    targets = random_targets(batch, model.num_classes, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step():
        return staged_train_step(model, meta, optimizer, images, targets, device)

    step()
    with PeakMemory(device) as mem:
        step()
    parts = median_stages(step, max(1, args.model_repeats // 2), 0)
    total = sum(parts.values())

    def fwd_bwd():
        x = model(images, targets=targets)
        sum(meta.weighted_losses(meta.criterion(x, targets)).values()).backward()
        optimizer.zero_grad(set_to_none=True)

    flops = count_flops(fwd_bwd)
    results.setdefault("train_rows", []).append(train_row(name, size, batch, total, parts, flops, mem.peak_mb))
    model.eval()


def shared_rounds(args, backbone: str, px: int, device: str, table: dict) -> dict:
    """The numbers of the speed targets, measured in shared rounds: each round runs the yardstick
    kernels, then every variant (default and efficient presets in each ``--dtypes`` entry that the
    table measured at batch 1) end to end and staged. A ratio between two of them (efficient vs
    default, int8 vs fp32, end to end vs backbone, model vs yardstick) then compares numbers taken
    under the same load of a shared host, which the table's one-row-after-another measurement
    cannot. FLOP counts are the table's. Returns results keyed as :func:`targets_summary` reads them."""
    size = token_size(px, backbone)
    images = torch.rand(1, 3, size, size, device=device)
    calls, extra = {}, {}
    for preset in ("default", "efficient"):
        model, _ = build_model(backbone, preset, device)
        model.eval()
        if preset == "default":  # torch's attention kernel alone, at the default ViT's global attention
            extra = attention_kernel(model.backbone, size, device)
        name, quantized = f"{backbone}-{preset}", {}
        for dtype in args.dtypes:
            v = variant(model, dtype, device, quantized)
            if v is not None and (name, size, 1, "torch", dtype) in table:  # (bf16 refused: not in the table)
                net, amp, plain = v
                calls[(name, dtype)] = inference_calls(net, images, device, amp, plain)
    yard, e2e_ms, stage_ms = run_rounds(calls, args.model_repeats, device, extra)
    linear = yardstick_rates(yard)
    results: dict = {("attention kernel", size): [(name, yard[name]) for name in extra]}
    for name, dtype in calls:
        flops = table[(name, size, 1, "torch", dtype)]["flops"]
        results[(name, size, 1, "torch", dtype)] = dict(e2e=e2e_ms[(name, dtype)], flops=flops, **stage_ms[(name, dtype)])
        results[(name, size, 1, dtype, "yardstick")] = linear
        for what in ("backbone_flops", "attention_flops"):
            if (name, size, what) in table:
                results[(name, size, what)] = table[(name, size, what)]
    return results


def attention_kernel(backbone, size: int, device: str) -> Dict[str, Tuple[Callable[[], object], int]]:
    """``{name: (call, FLOPs)}`` of the attention kernels for a ViT block of ``backbone`` at ``size``
    px, batch 1, with global attention, on q/k/v laid out as the block makes them (strided views of
    one q/k/v product): first the one the fp32 model runs (dinov2od's AVX-512 kernel where
    :func:`dinov2od.layers.cpu_attention.cpu_attention_enabled`, else torch's), then torch's
    ``F.scaled_dot_product_attention`` if that was not it."""
    from dinov2od.layers.cpu_attention import cpu_attention, cpu_attention_enabled

    heads, dim = backbone.num_heads, backbone.embed_dim
    tokens = (size // backbone.patch_size) ** 2 + 1 + backbone.num_register_tokens
    qkv = torch.randn(1, tokens, 3, heads, dim // heads, device=device)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    shape, flops = f"1x{heads}x{tokens}x{dim // heads}", 4 * heads * tokens ** 2 * (dim // heads)
    with torch.no_grad():
        ours = cpu_attention_enabled(q, k, v)
    kernels = {f"dinov2od attention {shape}": ((lambda: cpu_attention(q, k, v)), flops)} if ours else {}
    kernels[f"torch attention {shape}"] = ((lambda: F.scaled_dot_product_attention(q, k, v)), flops)
    return kernels


def targets_summary(results: dict, backbone: str = "vits14", px: int = 448) -> List[str]:
    """The whole-model targets (set for ViT-S at 448 px, batch 1, fp32), from one run's rows.

    The rate target is judged against ``F.linear`` (``nn.Linear``, the issue's yardstick); the
    share of oneDNN's faster matmul rate, measured next to it, is printed beside it."""
    lines = [f"\n{backbone} at {px} px, batch 1:"]
    d = results.get((f"{backbone}-default", px, 1, "torch", "fp32"))
    e = results.get((f"{backbone}-efficient", px, 1, "torch", "fp32"))
    for preset, r in (("default", d), ("efficient", e)):
        if not r:
            continue
        ratio = r["e2e"] / r["backbone"]
        g = r["flops"] / (r["e2e"] * 1e-3) / 1e9
        flin, onednn = results[(f"{backbone}-{preset}", px, 1, "fp32", "yardstick")]
        strict = f"; {100 * g / onednn:.0f}% of oneDNN's {onednn:.1f}" if onednn else ""
        lines.append(f"- {preset}: end-to-end / backbone alone {ratio:.2f}x (target <= 1.25x: "
                     f"{'met' if ratio <= 1.25 else 'NOT met'}); {g:.1f} GFLOP/s = {100 * g / flin:.0f}% of the fp32 "
                     f"F.linear rate {flin:.1f} (target >= 85%: {'met' if g >= 0.85 * flin else 'NOT met'}){strict}")
    lines += floor_lines(results, backbone, px)
    if d and e:
        sp = d["e2e"] / e["e2e"]
        lines.append(f"- efficient preset vs default: {sp:.2f}x faster (target >= 1.3x: {'met' if sp >= 1.3 else 'NOT met'})")
    fd, fe = results.get((f"{backbone}-default", px, "backbone_flops")), results.get((f"{backbone}-efficient", px, "backbone_flops"))
    if d and e and fd and fe and fe >= fd:
        lines.append(f"- windowed attention: no FLOPs saved at {px} px (windows larger than the grid pad it)")
    elif d and e and fd and fe:  # same ViT and taps; the efficient preset windows the untapped blocks
        flop_saving, time_saving = 1 - fe / fd, 1 - e["backbone"] / d["backbone"]
        lines.append(f"- windowed attention (backbone alone): {100 * flop_saving:.1f}% fewer FLOPs, {100 * time_saving:.1f}% "
                     f"less time = {100 * time_saving / flop_saving:.0f}% of the FLOP saving delivered (target >= 80%: "
                     f"{'met' if time_saving >= 0.8 * flop_saving else 'NOT met'})")
    pl = results.get((f"{backbone}-default", px, 1, "torch", "fp32-plain"))
    if d and pl:
        lines.append(f"- the CPU inference path (fused blocks, one value projection) vs the plain one: "
                     f"{pl['e2e'] / d['e2e']:.2f}x faster end to end, backbone {pl['backbone'] / d['backbone']:.2f}x, "
                     f"decoder {pl['decoder'] / d['decoder']:.2f}x")
    bf = results.get((f"{backbone}-default", px, 1, "torch", "bf16"))
    if d and bf:
        lines.append(f"- bf16 autocast vs fp32 inference: {d['e2e'] / bf['e2e']:.2f}x faster")
    q = results.get((f"{backbone}-default", px, 1, "torch", "int8"))
    if d and q:
        sp = d["e2e"] / q["e2e"]
        lines.append(f"- int8 dynamic quantization vs fp32 inference: {sp:.2f}x faster (target >= 1.3x: "
                     f"{'met' if sp >= 1.3 else 'NOT met'}; its AP: docs/speed.md)")
    o = results.get((f"{backbone}-default", px, 1, "onnx", "fp32"))
    if d and o:
        lines.append(f"- onnxruntime vs PyTorch (fp32, b1): {d['e2e'] / o['e2e']:.2f}x")
    return lines


def floor_lines(results: dict, backbone: str, px: int) -> List[str]:
    """What the first two targets ask of each part of the fp32 model, from its FLOP split and the
    times of the same rounds:

    * end to end <= 1.25x the backbone: the FLOPs after the backbone (neck, decoder, heads) over
      the backbone's; at one rate per FLOP the ratio is ``total / backbone FLOPs``, so the target
      asks the rest to run ``(total - backbone) / (0.25 backbone)`` times the backbone's rate per
      FLOP, printed beside the rate ratio measured;
    * >= 85% of the F.linear rate: with attention's share ``a`` of the FLOPs at the measured rate
      ``s`` of torch's attention kernel alone (as a share of F.linear's), the other FLOPs and all
      FLOP-free work must run at ``(1 - a) / (1 / 0.85 - a / s)`` of F.linear; printed beside what
      they ran at (the end-to-end time less attention's FLOPs at the kernel's rate). Global
      attention only: the kernel is measured at the default ViT's shape, so the windowed
      (efficient) preset gets no such line."""
    lines = []
    for preset in ("default", "efficient"):
        name = f"{backbone}-{preset}"
        r, fb = results.get((name, px, 1, "torch", "fp32")), results.get((name, px, "backbone_flops"))
        if not r or not fb or r["flops"] <= fb:
            continue
        rest, t_rest = r["flops"] - fb, r["e2e"] - r["backbone"]
        measured = (rest / t_rest) / (fb / r["backbone"]) if t_rest > 0 else float("inf")
        lines.append(f"- {preset}: after the backbone (neck, decoder, heads) {rest / 1e9:.1f} GFLOP = {100 * rest / fb:.0f}% "
                     f"of the backbone's {fb / 1e9:.1f}: at one rate per FLOP end to end / backbone = "
                     f"{r['flops'] / fb:.2f}x; the 1.25x target needs them at {rest / (0.25 * fb):.2f}x the backbone's "
                     f"rate per FLOP, they ran at {measured:.2f}x")
    r, fa = results.get((f"{backbone}-default", px, 1, "torch", "fp32")), results.get((f"{backbone}-default", px, "attention_flops"))
    kernel = results.get(("attention kernel", px))
    if r and fa and kernel:
        (kname, rate), others = kernel[0], kernel[1:]  # the model's kernel first (attention_kernel)
        flin = results[(f"{backbone}-default", px, 1, "fp32", "yardstick")][0]
        a, s = fa / r["flops"], rate / flin
        room = 1 / 0.85 - a / s
        need = f"{100 * (1 - a) / room:.0f}%" if room > 0 else "more than any rate (unreachable)"
        t_other = r["e2e"] * 1e-3 - fa / (rate * 1e9)
        ran = f"{100 * (r['flops'] - fa) / t_other / 1e9 / flin:.0f}%" if t_other > 0 else "-"
        beside = "".join(f" ({n}: {g:.1f})" for n, g in others)
        lines.append(f"- default: attention is {100 * a:.0f}% of its FLOPs; the attention kernel it runs, alone ({kname}), ran "
                     f"{rate:.1f} GFLOP/s{beside} = {100 * s:.0f}% of F.linear in these rounds, so the 85% target needs the "
                     f"other {100 * (1 - a):.0f}% of the FLOPs, with all FLOP-free work (norms, softmax, sampling, copies), at "
                     f"{need} of F.linear; they ran at {ran}")
    return lines


def section_model(args) -> list:
    STAT["name"] = args.stat
    if args.clock == "process":
        CLOCK["now"] = time.process_time
    try:
        import detectron2  # noqa: F401  (the efficient and demo presets are lazy configs)
    except ImportError:
        skipped = [p for p in args.presets if p not in PLAIN_PRESETS]
        print(f"note: Detectron2 is not installed: presets {sorted(PLAIN_PRESETS)} are built from PLAIN_PRESETS"
              + (f", {skipped} (lazy configs) are skipped" if skipped else "")
              + "; the training iteration needs the criterion from a lazy config and is skipped", flush=True)
        args.presets = [p for p in args.presets if p in PLAIN_PRESETS]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and args.device in ("auto", "cuda") else [])
    if args.device == "cuda":
        devices = ["cuda"]
    for device in devices:
        print(f"\n### model section, {device}: '% of F.linear' / '% of oneDNN': achieved GFLOP/s over the best fp32 "
              "rate of F.linear (nn.Linear) / oneDNN's matmul at 1024x384x1536 and 1536^3, measured in the same "
              "rounds as each row's model (the lines in <!-- -->; onnxruntime rows: the fp32 row's); int8 rows "
              f"use the fp32 FLOP count; {STAT['name']} of {args.model_repeats} rounds\n", flush=True)
        results: dict = {}
        print(INFER_HEADER)
        print("|" + "---|" * (INFER_HEADER.count("|") - 1), flush=True)
        for backbone in args.backbones:
            for preset in args.presets:
                if preset == "demo":
                    continue
                for px in args.sizes:
                    measure_model(args, backbone, preset, px, device, results)
        if "demo" in args.presets:
            measure_model(args, args.backbones[0], "demo", args.demo_size, device, results)
        if results.get("train_rows"):
            print(f"\none training iteration (AdamW, {args.train_batch} images, 5 random boxes each), {device}\n")
            print(TRAIN_HEADER)
            print("|" + "---|" * (TRAIN_HEADER.count("|") - 1))
            print("\n".join(results["train_rows"]))
        print()
        shared = 1 in args.batches and {"default", "efficient"} <= set(args.presets)
        for px in args.sizes:
            for backbone in args.backbones:
                size = token_size(px, backbone)
                if shared:
                    print(f"\ntargets of {backbone} at {size} px, batch 1, measured in {args.model_repeats} shared rounds "
                          "(each: the yardstick kernels, then every preset and dtype end to end and staged; "
                          f"{STAT['name']} per variant):")
                    rounds = shared_rounds(args, backbone, px, device, results)
                    onnx = results.get((f"{backbone}-default", size, 1, "onnx", "fp32"))
                    if onnx:  # not in the rounds: the table's
                        rounds[(f"{backbone}-default", size, 1, "onnx", "fp32")] = onnx
                    lines = targets_summary(rounds, backbone, size)
                    yard = rounds[(f"{backbone}-default", size, 1, "fp32", "yardstick")]
                    lines.insert(1, f"- yardstick in these rounds: F.linear {yard[0]:.1f} GFLOP/s"
                                 + (f", oneDNN {yard[1]:.1f}" if yard[1] else ""))
                    for i, key in enumerate(sorted(k for k in rounds if len(k) == 5 and k[3] == "torch")):
                        r = rounds[key]
                        lines.insert(2 + i, f"- {key[0]} {key[4]}: end to end {r['e2e']:.1f} ms, backbone "
                                     f"{r['backbone']:.1f}, neck {r['neck']:.1f}, decoder {r['decoder']:.1f}")
                else:
                    lines = targets_summary(results, backbone, size)
                for line in lines:
                    print(line)
        for title, table in results.get("profiles", []):
            print(f"\ntorch.profiler, top ops by self CPU time: {title}\n{table}")
    return []
