"""The whole-model section (``tools/benchmark.py --section model``): the detector, inference and training.

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
* ``--dtypes``: ``fp32``; ``fp32-plain`` (fp32 with the CPU inference path off:
  :func:`dinov2od.benchmark.models.plain_path`, the A/B of that path in one run); ``bf16``
  autocast (refused on CPUs without native bf16); ``int8`` (the copy of
  :func:`dinov2od.modeling.quantize.quantize_dynamic_int8`, CPU).

The yardstick: the machine's fp32 linear rate at the shape of the ViT-S MLP at 448 px (1024 tokens,
384 -> 1536) and at 1536^3, for ``F.linear`` (what ``nn.Linear`` runs, the issue's yardstick) and, on
the CPU, oneDNN's matmul (faster on some CPUs; the CPU inference path uses it). It is measured in
the same rounds as each row's model: every round runs the yardstick kernels, one end-to-end call and
one staged call, so that a shared host's changing load weighs on the model and its yardstick alike.
Tables print in Markdown.

The models and presets: :mod:`dinov2od.benchmark.models` (without Detectron2 the demo and the
training iteration are skipped); the measuring: :mod:`dinov2od.benchmark.measure`; the speed targets
(data) and their summary lines: :mod:`dinov2od.benchmark.targets`.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from dinov2od.benchmark.measure import (
    CLOCK,
    STAT,
    PeakMemory,
    Stopwatch,
    FLOP_COUNTER,
    count_flops,
    count_flops_split,
    grads_off,
    matmul_kernels,
    matmul_rate,
    median_of,
    median_stages,
    profile_top_ops,
    run_rounds,
    yardstick_rates,
)
from dinov2od.benchmark.cpu_kind import cpu_tag
from dinov2od.benchmark.models import (DEMO_OVERRIDES, PLAIN_PRESETS, build_model, is_demo, plain_path, random_targets,
                                       token_size, variant)
from dinov2od.benchmark.targets import targets_summary
from dinov2od.layers.precision import autocast_context
from dinov2od.modeling import DINOv2ObjectDetector, topk_detections

STAGES = ("pre", "backbone", "neck", "decoder", "post")
TRAIN_STAGES = ("backbone", "neck", "decoder", "loss", "backward", "step")


# ---------------------------------------------------------------- the measured computations


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


def inference_calls(net, images: torch.Tensor, device: str, amp: str, plain: bool):
    """``(e2e, staged)``: :func:`end_to_end` and :func:`staged_inference` of ``net`` under inference
    mode, ``amp`` autocast and, with ``plain``, the CPU inference path off."""
    dev = device.split(":")[0]

    def e2e():
        with torch.inference_mode(), autocast_context(dev, amp), plain_path(net, plain):
            return end_to_end(net, images)

    def staged():
        with torch.inference_mode(), autocast_context(dev, amp), plain_path(net, plain):
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



# ---------------------------------------------------------------- rows


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


INFER_HEADER = ("| model | px | batch | runtime | dtype | e2e ms | pre | backbone | neck | decoder | post | "
                "e2e / backbone | GFLOP | GFLOP/s | % of F.linear | % of oneDNN | % of matmul, same dtype | peak MB |")
TRAIN_HEADER = ("| model | px | batch | iteration ms | backbone | neck | decoder | loss | backward | step | "
                "GFLOP | GFLOP/s | peak MB |")


def row_dtype(dtype: str) -> Optional[str]:
    """The matmul dtype of a ``--dtypes`` entry (``fp32-plain`` -> fp32, ``bf16-plain`` -> bf16; int8: None)."""
    base = dtype.split("-")[0]
    return base if base in ("fp32", "bf16") else None


def infer_row(name, px, batch, runtime, dtype, e2e, parts, flops, linear, peak, mm_rate=None) -> str:
    """One inference row; ``linear``: (F.linear rate, oneDNN rate or None) measured next to it;
    ``mm_rate``: the best matmul rate in the row's dtype (:func:`~dinov2od.benchmark.measure.matmul_kernels`)."""
    parts = parts or {}
    bb = parts.get("backbone")
    gfs = flops / (e2e * 1e-3) / 1e9 if flops and e2e else None
    pct = [_fmt(100 * gfs / rate if gfs and rate else None, ".0f") for rate in (*linear, mm_rate)]
    cells = [name, str(px), str(batch), runtime, dtype, _fmt(e2e)] + [_fmt(parts.get(s)) for s in STAGES] + [
        _fmt(e2e / bb if bb else None, ".2f"), _fmt(flops / 1e9 if flops else None), _fmt(gfs)] + pct + [
        _fmt(peak, ".0f")]
    return "| " + " | ".join(cells) + " |"


def train_row(name, px, batch, total, parts, flops, peak) -> str:
    gfs = flops / (total * 1e-3) / 1e9 if flops else None
    cells = [name, str(px), str(batch), _fmt(total)] + [_fmt(parts.get(s)) for s in TRAIN_STAGES] + [
        _fmt(flops / 1e9 if flops else None), _fmt(gfs), _fmt(peak, ".0f")]
    return "| " + " | ".join(cells) + " |"



# ---------------------------------------------------------------- the section


def measure_model(args, backbone: str, preset: str, px: int, device: str, results: dict):
    name = f"{backbone}-{preset}" if not is_demo(preset) else preset + "".join(f" {o}" for o in DEMO_OVERRIDES)
    model, meta = build_model(backbone, preset, device)
    model.eval()
    size = token_size(px, backbone) if not is_demo(preset) else px
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
            mm_dtype = row_dtype(dtype)
            yard, e2e_ms, stage_ms = run_rounds({0: (e2e, staged)}, args.model_repeats, device,
                                                matmul_kernels(mm_dtype, device) if mm_dtype else None)
            ms, parts = e2e_ms[0], stage_ms[0]
            linear = yardstick_rates(yard)
            mm_rate = matmul_rate(yard, mm_dtype) if mm_dtype else None
            results[(name, size, batch, dtype, "yardstick")] = linear
            print("<!-- linear yardstick in the rounds of %s %d px b%d %s: %s -->" % (
                name, size, batch, dtype, ", ".join(f"{k} {v:.1f}" for k, v in yard.items())), flush=True)

            def e2e_no_grad():  # torch 2.3's flop counter sees nothing under inference_mode
                with torch.no_grad(), autocast_context(device.split(":")[0], amp), plain_path(model, plain):
                    return end_to_end(model, images)

            with grads_off(model):  # int8: the fp32 model's count (int8 linears are not counted)
                flops, attention_flops = count_flops_split(e2e_no_grad)
            if batch == 1 and dtype == "fp32":  # the backbone's own FLOPs (windowed attention check)
                results[(name, size, "attention_flops")] = attention_flops
                with torch.no_grad(), grads_off(model):
                    x, _, valid_hw = model.pad(model.normalize(images), None)
                    results[(name, size, "backbone_flops")] = count_flops(lambda: model.backbone.forward_padded(x, valid_hw))
            print(infer_row(name, size, batch, "torch-" + device, dtype, ms, parts, flops, linear, mem.peak_mb, mm_rate),
                  flush=True)
            results[(name, size, batch, "torch", dtype)] = dict(e2e=ms, flops=flops, **parts)
            if args.profile and batch == args.batches[0]:
                results.setdefault("profiles", []).append((f"{name} {size}px b{batch} {dtype}", profile_top_ops(e2e)))
        if "onnx" in args.runtimes and device == "cpu":
            measure_onnx(args, model, name, size, batch, results)
    if args.train_batch and meta is not None:
        measure_train(args, model, meta, name, size, device, results)


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
    calls, extra, mm = {}, {}, {}
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
                if row_dtype(dtype):  # the matmul rate of each dtype measured, in the same rounds
                    mm.update(matmul_kernels(row_dtype(dtype), device))
    yard, e2e_ms, stage_ms = run_rounds(calls, args.model_repeats, device, {**extra, **mm})
    linear = yardstick_rates(yard)
    results: dict = {("attention kernel", size): [(name, yard[name]) for name in extra],
                     "matmul rates": {k: yard[k] for k in mm}}
    for name, dtype in calls:
        flops = table[(name, size, 1, "torch", dtype)]["flops"]
        results[(name, size, 1, "torch", dtype)] = dict(e2e=e2e_ms[(name, dtype)], flops=flops, **stage_ms[(name, dtype)])
        results[(name, size, 1, dtype, "yardstick")] = linear
        for what in ("backbone_flops", "attention_flops"):
            if (name, size, what) in table:
                results[(name, size, what)] = table[(name, size, what)]
    return results


def limit_lines(rounds: dict, backbone: str, size: int) -> List[str]:
    """The distance to the physical limit, from :func:`shared_rounds`' results: each preset's end-to-end
    GFLOP/s in each dtype over the machine's best matmul rate in that dtype, measured in the same rounds
    (:func:`~dinov2od.benchmark.measure.matmul_kernels`), and the bf16 / fp32 matmul rate ratio."""
    rates = rounds.get("matmul rates") or {}
    if not rates:
        return []
    best = {dt: matmul_rate(rates, dt) for dt in ("fp32", "bf16")}
    lines = ["- matmul rate in these rounds (" + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " GFLOP/s)"
             + (f": bf16 / fp32 = {best['bf16'] / best['fp32']:.2f}x" if best["fp32"] and best["bf16"] else "")
             + f" {cpu_tag()}"]
    for key in sorted(k for k in rounds if isinstance(k, tuple) and len(k) == 5 and k[0].startswith(backbone)
                      and k[1] == size and k[3] == "torch"):
        dt, r = row_dtype(key[4]), rounds[key]
        if dt and best.get(dt) and r.get("flops"):
            gfs = r["flops"] / (r["e2e"] * 1e-3) / 1e9
            lines.append(f"- distance to the physical limit, {key[0]} {key[4]}: {gfs:.1f} GFLOP/s end to end = "
                         f"{100 * gfs / best[dt]:.0f}% of the {dt} matmul rate {best[dt]:.1f}")
    return lines


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



def section_model(args) -> list:
    STAT["name"] = args.stat
    DEMO_OVERRIDES[:] = list(args.demo_overrides or [])
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
        print(f"\n### model section, {device}{', ' + cpu_tag() if device == 'cpu' else ''}: '% of F.linear' / "
              "'% of oneDNN': achieved GFLOP/s over the best fp32 "
              "rate of F.linear (nn.Linear) / oneDNN's matmul at 1024x384x1536 and 1536^3, measured in the same "
              "rounds as each row's model (the lines in <!-- -->; onnxruntime rows: the fp32 row's); '% of matmul, "
              "same dtype': over the best of torch.mm and oneDNN's linear at 1536^3 in the row's dtype (fp32 or "
              "bf16; same rounds), the distance to the physical limit; int8 rows "
              f"use the fp32 FLOP count; FLOPs: {FLOP_COUNTER}; {STAT['name']} of {args.model_repeats} rounds\n",
              flush=True)
        results: dict = {}
        print(INFER_HEADER)
        print("|" + "---|" * (INFER_HEADER.count("|") - 1), flush=True)
        for backbone in args.backbones:
            for preset in args.presets:
                if is_demo(preset):
                    continue
                for px in args.sizes:
                    measure_model(args, backbone, preset, px, device, results)
        for preset in [p for p in args.presets if is_demo(p)]:
            measure_model(args, args.backbones[0], preset, args.demo_size, device, results)
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
                    lines = targets_summary(rounds, backbone, size) + limit_lines(rounds, backbone, size)
                    yard = rounds.get((f"{backbone}-default", size, 1, "fp32", "yardstick"))
                    if yard is not None:  # (not measured when --dtypes has no fp32, e.g. a bf16 --profile run)
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

