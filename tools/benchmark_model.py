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
* bfloat16 autocast inference (``--dtypes bf16``), refused on CPUs without native bf16.

The yardstick, measured first in the same run: the machine's fp32 ``F.linear`` rate at the shape
of the ViT-S MLP at 448 px (1024 tokens, 384 -> 1536) and at 1536^3; the larger is the yardstick. Tables print in Markdown.

Presets are the lazy model configs (``configs/common/models/dinov2_detr.py``, ``..._efficient.py``
and the demo's ``configs/shapes.py``), random-initialized; without Detectron2 only the default
preset is available (built from ``DINOv2ObjectDetector``'s defaults, which equal the config's).
"""
from __future__ import annotations

import os
import statistics
import threading
import contextlib
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dinov2od.layers.precision import autocast_context
from dinov2od.modeling import DINOv2ObjectDetector, topk_detections

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {
    "default": "configs/common/models/dinov2_detr.py",
    "efficient": "configs/common/models/dinov2_detr_efficient.py",
    "demo": "configs/shapes.py",
}
# Backbones by name: keyword overrides of the preset's DINOv2Backbone, and the patch size (sizes
# given in px for 14-px patches are scaled so that every backbone sees the same token grid).
BACKBONES: Dict[str, Tuple[dict, int]] = {
    "vits14": (dict(arch="small"), 14),
    "vitb14": (dict(arch="base"), 14),
    "dinov3-s16": (dict(family="dinov3", arch="small"), 16),  # 512 px = DINOv2-S/14's 448 px token grid
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
    with fc.FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return float(counter.get_total_flops())


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


def linear_yardstick(device: str, repeats: int = 20) -> Dict[str, float]:
    """fp32 ``F.linear`` GFLOP/s at the ViT-S MLP shape (1024 x 384 -> 1536) and at 1536^3."""
    out = {}
    for name, (m, k, n) in {"vit-s mlp 1024x384x1536": (1024, 384, 1536), "1536^3": (1536, 1536, 1536)}.items():
        x = torch.randn(m, k, device=device)
        w = torch.randn(n, k, device=device)
        ms = median_of(lambda: F.linear(x, w), repeats, 3, device)
        out[name] = 2 * m * k * n / (ms * 1e-3) / 1e9
    return out


# ---------------------------------------------------------------- models and inputs


def build_model(backbone: str, preset: str, device: str) -> Tuple[DINOv2ObjectDetector, Optional[torch.nn.Module]]:
    """A random-initialized (detector, criterion) of ``preset`` with ``backbone``'s ViT (the demo
    preset keeps its own tiny ViT)."""
    overrides, _ = BACKBONES[backbone]
    try:
        from detectron2.config import LazyConfig, instantiate
    except ImportError:
        if preset != "default":
            raise RuntimeError(f"preset {preset!r} is read from a lazy config, which needs Detectron2")
        return DINOv2ObjectDetector(num_classes=80, backbone=dict(overrides, pretrained=None)).to(device), None
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
                "e2e / backbone | GFLOP | GFLOP/s | % of linear | peak MB |")
TRAIN_HEADER = ("| model | px | batch | iteration ms | backbone | neck | decoder | loss | backward | step | "
                "GFLOP | GFLOP/s | peak MB |")


def infer_row(name, px, batch, runtime, dtype, e2e, parts, flops, linear, peak) -> str:
    parts = parts or {}
    bb = parts.get("backbone")
    gfs = flops / (e2e * 1e-3) / 1e9 if flops and e2e else None
    cells = [name, str(px), str(batch), runtime, dtype, _fmt(e2e)] + [_fmt(parts.get(s)) for s in STAGES] + [
        _fmt(e2e / bb if bb else None, ".2f"), _fmt(flops / 1e9 if flops else None), _fmt(gfs),
        _fmt(100 * gfs / linear if gfs else None, ".0f"), _fmt(peak, ".0f")]
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


def measure_model(args, backbone: str, preset: str, px: int, device: str, linear: float, results: dict):
    name = f"{backbone}-{preset}" if preset != "demo" else "demo"
    model, meta = build_model(backbone, preset, device)
    model.eval()
    size = token_size(px, backbone) if preset != "demo" else px
    for batch in args.batches:
        images = torch.rand(batch, 3, size, size, device=device)
        for dtype in args.dtypes:
            def e2e():
                with torch.inference_mode(), autocast_context(device.split(":")[0], dtype):
                    return end_to_end(model, images)

            try:
                e2e()
            except RuntimeError as err:  # bf16 refused on this CPU: say so in the table
                print(f"| {name} | {px} | {batch} | torch | {dtype} | refused: {str(err).split(':')[0]} |", flush=True)
                continue
            with PeakMemory(device) as mem:
                e2e()
            ms = median_of(e2e, args.model_repeats, 1, device)

            def staged():
                with torch.inference_mode(), autocast_context(device.split(":")[0], dtype):
                    return staged_inference(model, images, device)

            parts = median_stages(staged, args.model_repeats, 1)

            def e2e_no_grad():  # torch 2.3's flop counter sees nothing under inference_mode
                with torch.no_grad(), autocast_context(device.split(":")[0], dtype):
                    return end_to_end(model, images)

            with grads_off(model):
                flops = count_flops(e2e_no_grad)
            if batch == 1 and dtype == "fp32":  # the backbone's own FLOPs (windowed attention check)
                with torch.no_grad(), grads_off(model):
                    x, _, valid_hw = model.pad(model.normalize(images), None)
                    results[(name, size, "backbone_flops")] = count_flops(lambda: model.backbone.forward_padded(x, valid_hw))
            print(infer_row(name, size, batch, "torch-" + device, dtype, ms, parts, flops, linear, mem.peak_mb), flush=True)
            results[(name, size, batch, "torch", dtype)] = dict(e2e=ms, flops=flops, **parts)
            if args.profile and batch == args.batches[0]:
                results.setdefault("profiles", []).append((f"{name} {size}px b{batch} {dtype}", profile_top_ops(e2e)))
        if "onnx" in args.runtimes and device == "cpu":
            measure_onnx(args, model, name, size, batch, linear, results)
    if args.train_batch and meta is not None:
        measure_train(args, model, meta, name, size, device, results)
    del model, meta


def measure_onnx(args, model, name, size, batch, linear, results):
    import tempfile

    from dinov2od.export import OnnxDetector, export_detector

    key = (name, size)
    if key not in results.setdefault("onnx_files", {}):
        path = os.path.join(tempfile.mkdtemp(prefix="dinov2od-bench-"), "model.onnx")
        t0 = time.perf_counter()
        export_detector(model, path, image_size=(size, size), batch_size=2)
        print(f"<!-- exported {name} at {size}px to ONNX in {time.perf_counter() - t0:.0f} s -->", flush=True)
        results["onnx_files"][key] = path
    runner = OnnxDetector(results["onnx_files"][key], threads=args.threads)
    images = torch.rand(batch, 3, size, size).numpy()
    sizes = torch.tensor([[size, size]] * batch).numpy()
    with PeakMemory("cpu") as mem:
        runner(images, sizes)
    ms = median_of(lambda: runner(images, sizes), args.model_repeats, 1, "cpu")
    flops = results.get((name, size, batch, "torch", "fp32"), {}).get("flops")
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


def targets_summary(results: dict, linear: float, backbone: str = "vits14", px: int = 448) -> List[str]:
    """The whole-model targets (set for ViT-S at 448 px, batch 1, fp32), from one run's rows."""
    lines = [f"\n{backbone} at {px} px, batch 1:"]
    d = results.get((f"{backbone}-default", px, 1, "torch", "fp32"))
    e = results.get((f"{backbone}-efficient", px, 1, "torch", "fp32"))
    for preset, r in (("default", d), ("efficient", e)):
        if not r:
            continue
        ratio = r["e2e"] / r["backbone"]
        g = r["flops"] / (r["e2e"] * 1e-3) / 1e9
        lines.append(f"- {preset}: end-to-end / backbone alone {ratio:.2f}x (target <= 1.25x: "
                     f"{'met' if ratio <= 1.25 else 'NOT met'}); {g:.1f} GFLOP/s = {100 * g / linear:.0f}% of the fp32 "
                     f"linear rate {linear:.1f} (target >= 85%: {'met' if g >= 0.85 * linear else 'NOT met'})")
    if d and e:
        sp = d["e2e"] / e["e2e"]
        lines.append(f"- efficient preset vs default: {sp:.2f}x faster (target >= 1.3x: {'met' if sp >= 1.3 else 'NOT met'})")
    fd, fe = results.get((f"{backbone}-default", px, "backbone_flops")), results.get((f"{backbone}-efficient", px, "backbone_flops"))
    if d and e and fd and fe:  # same ViT and taps; the efficient preset windows the untapped blocks
        flop_saving, time_saving = 1 - fe / fd, 1 - e["backbone"] / d["backbone"]
        lines.append(f"- windowed attention (backbone alone): {100 * flop_saving:.1f}% fewer FLOPs, {100 * time_saving:.1f}% "
                     f"less time = {100 * time_saving / flop_saving:.0f}% of the FLOP saving delivered (target >= 80%: "
                     f"{'met' if time_saving >= 0.8 * flop_saving else 'NOT met'})")
    bf = results.get((f"{backbone}-default", px, 1, "torch", "bf16"))
    if d and bf:
        lines.append(f"- bf16 autocast vs fp32 inference: {d['e2e'] / bf['e2e']:.2f}x faster")
    o = results.get((f"{backbone}-default", px, 1, "onnx", "fp32"))
    if d and o:
        lines.append(f"- onnxruntime vs PyTorch (fp32, b1): {d['e2e'] / o['e2e']:.2f}x")
    return lines


def section_model(args) -> list:
    STAT["name"] = args.stat
    if args.clock == "process":
        CLOCK["now"] = time.process_time
    try:
        import detectron2  # noqa: F401  (the efficient and demo presets are lazy configs)
    except ImportError:
        skipped = [p for p in args.presets if p != "default"]
        if skipped:
            print(f"note: Detectron2 is not installed: presets {skipped} (lazy configs) are skipped; "
                  "the training iteration needs the criterion from a lazy config too", flush=True)
        args.presets = [p for p in args.presets if p == "default"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and args.device in ("auto", "cuda") else [])
    if args.device == "cuda":
        devices = ["cuda"]
    for device in devices:
        yard = linear_yardstick(device, repeats=max(5, 2 * args.model_repeats))
        linear = max(yard.values())
        print(f"\n### model section, {device}: fp32 linear yardstick " +
              ", ".join(f"{k}: {v:.1f} GFLOP/s" for k, v in yard.items()) +
              f" (the '% of linear' column uses {linear:.1f})\n", flush=True)
        results: dict = {}
        print(INFER_HEADER)
        print("|" + "---|" * (INFER_HEADER.count("|") - 1), flush=True)
        for backbone in args.backbones:
            for preset in args.presets:
                if preset == "demo":
                    continue
                for px in args.sizes:
                    measure_model(args, backbone, preset, px, device, linear, results)
        if "demo" in args.presets:
            measure_model(args, args.backbones[0], "demo", args.demo_size, device, linear, results)
        if results.get("train_rows"):
            print(f"\none training iteration (AdamW, {args.train_batch} images, 5 random boxes each), {device}\n")
            print(TRAIN_HEADER)
            print("|" + "---|" * (TRAIN_HEADER.count("|") - 1))
            print("\n".join(results["train_rows"]))
        print()
        for px in args.sizes:
            for backbone in args.backbones:
                for line in targets_summary(results, linear, backbone, token_size(px, backbone)):
                    print(line)
        for title, table in results.get("profiles", []):
            print(f"\ntorch.profiler, top ops by self CPU time: {title}\n{table}")
    return []
