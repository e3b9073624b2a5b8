#!/usr/bin/env python
"""Run a trained dinov2od model on image files or folders.

    python tools/predict.py --config-file configs/shapes.py --weights output/shapes/model_final.pth \\
        --input datasets/shapes/val --output output/predict

    python tools/predict.py --config-file output/custom/config.yaml --weights output/custom/model_final.pth \\
        --input photos/ --output output/photos    # a lazy run's saved config

    python tools/predict.py --config-file configs/shapes.py --onnx model.onnx --input img.jpg  # tools/export_onnx.py

    python tools/predict.py ... --weights model_final.pth --device cpu --int8  # int8 linear layers (CPU)

Configs: a lazy ``.py``, a lazy run's saved ``config.yaml``, or a yacs ``.yaml`` (run through
Detectron2's ``DefaultPredictor``); none of them needs its dataset: a config whose class count comes
from the data (``model.num_classes=None``, ``NUM_CLASSES: 0``) takes it from the checkpoint.

Inputs: image files and folders; folders are searched with their sub-folders (``--no-recursive``:
only the folder itself) for the extensions in ``IMAGE_EXTS``. Files that cannot be decoded are
skipped with a warning. 16-bit grayscale PNGs are scaled to 0-255 (not clipped to white).

Outputs, in ``--output`` (refused when it is, or is inside, an input folder, or when a drawing would
land in an input folder or on an input file). An output folder that is not empty is refused, so one
folder never mixes two runs: give another ``--output``, or ``--overwrite`` to first remove an earlier
predict.py run's drawings and predictions from it. predict.py marks its folders with a small file,
``.dinov2od-predict.json``; ``--overwrite`` clears only a folder that has it, and removes only what
predict.py writes (``predictions.json``, ``predictions.jsonl`` and drawings, ``*.<image ext>.jpg``).
While a run writes, it holds a lock on the folder (``flock`` on ``.dinov2od-predict.lock``): a second
predict.py into the same folder stops at once, naming the run that holds it.

* one drawing per image (Detectron2's ``Visualizer``, detections scoring >= ``--score-threshold``),
  named by the image's path relative to the input root (the folder given; with several inputs, the
  folder holding them all) with its own extension kept and ``.jpg`` appended:
  ``--input photos`` draws ``photos/a/x.jpg`` as ``a/x.jpg.jpg`` and ``photos/x.png`` as ``x.png.jpg``.
* ``predictions.jsonl``, written as the images are processed, one line per image, flushed: ``{"image_id",
  "file_name", "drawing", "detections": [...]}``, or ``{"image_id", "file_name", "skipped": reason}``
  for an undecodable file; a run that stops early keeps every image done before.
* ``predictions.json`` at the end (written to a temporary file and renamed): every detection as a
  COCO result list (``image_id``, ``file_name``, ``category_id``, ``category_name``, ``bbox`` XYWH
  in pixels, ``score``), not filtered by ``--score-threshold``.

``category_id`` and ``category_name`` are the training dataset's own ids and names, stored in the
checkpoint (or the ONNX graph), so the dataset need not be registered. ``--dataset NAME`` (a
registered dataset) reports its classes instead, e.g. for checkpoints saved before the classes were
stored, which otherwise report ``class_0..class_{K-1}`` with ids ``0..K-1``. When no detection
reaches ``--score-threshold`` the log gives the highest score seen and a threshold that draws it.
"""
import argparse
import contextlib
import json
import logging
import math
import os
import sys
from typing import List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from detectron2.utils.logger import setup_logger  # noqa: E402

import dinov2od.d2  # noqa: E402,F401
from dinov2od.d2.checkpoint import atomic_write  # noqa: E402
from dinov2od.modeling.checkpoint_io import UnsafeCheckpointError  # noqa: E402
from dinov2od.d2.data.dataset_mapper import read_image  # noqa: E402
from dinov2od.d2.evaluation import detections_to_coco_results  # noqa: E402
from dinov2od.d2.evaluation.visualize import draw_instances  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DRAWING_SUFFIX = ".jpg"  # appended to the image's relative path: x.png -> x.png.jpg
MARKER = ".dinov2od-predict.json"  # marks a folder as predict.py's output: --overwrite may clear it
LOCK = ".dinov2od-predict.lock"  # held (flock) while a predict.py run writes into the folder
logger = logging.getLogger("dinov2od.predict")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in --help."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument("--config-file", required=True, help="lazy .py, a lazy run's saved config.yaml, or a yacs .yaml")
    p.add_argument("--weights", default=None,
                   help="checkpoint (.pth or .safetensors) to load (required unless --onnx); read without running "
                        "code from it (SECURITY.md)")
    p.add_argument("--onnx", default=None, help="run this graph (tools/export_onnx.py) with onnxruntime instead")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--no-recursive", action="store_true", help="do not search the sub-folders of an input folder")
    p.add_argument("--output", default="output/predict",
                   help="folder for the drawings, predictions.jsonl and predictions.json (not inside an input folder)")
    p.add_argument("--overwrite", action="store_true",
                   help="--output holds an earlier predict.py run: remove its drawings and predictions first "
                        "(only in a folder predict.py marked as its own; other files are kept)")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="minimum score drawn (predictions.json keeps every detection); with the demo and custom "
                        "recipes' quality focal loss a score estimates the box's IoU, so good boxes score 0.4-0.8")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    p.add_argument("--int8", action="store_true",
                   help="CPU: run an int8 dynamic-quantized copy of the model (dinov2od.modeling.quantize)")
    p.add_argument("--dataset", default=None,
                   help="a registered dataset whose class names and ids to report instead of the checkpoint's")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (key=value or KEY VALUE)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- inputs and outputs
def list_images(inputs: Sequence[str], recursive: bool = True) -> List[Tuple[str, str]]:
    """Expand files and folders into ``(path, name)`` pairs, sorted by name.

    ``name`` is the path relative to the input root: a folder input's files relative to that folder;
    a file input's base name; with several inputs, relative to the deepest folder that holds them
    all (``--input a b`` names ``a/x.jpg`` and ``b/x.jpg`` apart). Distinct files get distinct names.

    Args:
        inputs: image files (any extension) and folders (searched for ``IMAGE_EXTS``).
        recursive: search the sub-folders of a folder.

    Raises:
        FileNotFoundError: an input that does not exist, or no image at all.
    """
    found = []  # (path as found, folder the input stands for)
    for path in inputs:
        if os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                found.extend((os.path.join(folder, f), path) for f in sorted(files) if f.lower().endswith(IMAGE_EXTS))
                if not recursive:
                    break
        elif os.path.isfile(path):
            found.append((path, os.path.dirname(path) or "."))
        else:
            raise FileNotFoundError(f"--input {path!r} is neither a file nor a folder.")
    if not found:
        raise FileNotFoundError(
            f"No images ({', '.join(IMAGE_EXTS)}) found in {list(inputs)}"
            + (" (sub-folders not searched: --no-recursive)." if not recursive else "."))
    roots = {os.path.abspath(root) for _, root in found}
    base = next(iter(roots)) if len(roots) == 1 else os.path.commonpath(sorted(roots))
    out, seen = [], set()
    for path, _ in found:
        key = os.path.abspath(path)
        if key not in seen:  # the same file given twice
            seen.add(key)
            out.append((path, os.path.relpath(key, base)))
    return sorted(out, key=lambda item: item[1])


def drawing_name(name: str) -> str:
    """The drawing's path inside ``--output`` for an image named ``name`` (see :func:`list_images`):
    the extension is kept and ``.jpg`` appended (``a/x.png`` -> ``a/x.png.jpg``), so ``x.jpg`` and
    ``x.png`` do not overwrite each other."""
    return name + DRAWING_SUFFIX


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(output: str, inputs: Sequence[str], images: Sequence[Tuple[str, str]]) -> None:
    """Refuse an output that would overwrite the user's files or land among them.

    Raises:
        SystemExit: ``output`` is, or is inside, an input folder; or a drawing would be written into
            an input folder or over an input file.
    """
    out = os.path.realpath(output)
    folders = [(given, os.path.realpath(given)) for given in inputs if os.path.isdir(given)]
    for given, folder in folders:
        if _inside(out, folder):
            raise SystemExit(
                f"predict.py: --output {output!r} is {'the' if out == folder else 'inside the'} input folder "
                f"{given!r}: the drawings would be written among your images (and found as inputs next time). "
                f"Give an --output outside it, e.g. --output {os.path.join(os.path.dirname(folder), 'predict')}.")
    files = {os.path.realpath(path): path for path, _ in images}
    for path, name in images:
        target = os.path.realpath(os.path.join(output, drawing_name(name)))
        if target in files:
            raise SystemExit(f"predict.py: the drawing of {path!r} would overwrite the input file {files[target]!r}; "
                             "give another --output.")
        for given, folder in folders:
            if _inside(target, folder):
                raise SystemExit(f"predict.py: the drawing of {path!r} would be written into the input folder "
                                 f"{given!r} ({target}); give another --output.")


def _earlier_outputs(output: str) -> Tuple[List[str], List[str]]:
    """(files predict.py writes, other entries) under ``output``, as paths relative to it (the marker
    in neither)."""
    ours, others = [], []
    drawing_exts = tuple(ext + DRAWING_SUFFIX for ext in IMAGE_EXTS)
    for folder, dirs, files in os.walk(output):
        dirs.sort()
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(folder, f), output)
            if rel in (MARKER, LOCK):
                continue
            low = f.lower()
            if (rel in ("predictions.json", "predictions.jsonl") or low.endswith(drawing_exts)
                    or (folder == output and low.startswith("predictions.json.tmp"))):
                ours.append(rel)
            else:
                others.append(rel)
    return ours, others


def check_output_folder(output: str, overwrite: bool) -> None:
    """Refuse an ``--output`` that is not empty, unless ``overwrite`` and predict.py marked it as its own.

    Raises:
        SystemExit: naming the folder, what it holds and the choices.
    """
    if not os.path.isdir(output):
        if os.path.exists(output):
            raise SystemExit(f"predict.py: --output {output!r} is a file, not a folder; give a folder.")
        return
    entries = sorted(set(os.listdir(output)) - {MARKER, LOCK})
    if not entries:
        return
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} in all)" if len(entries) > 5 else "")
    if not os.path.isfile(os.path.join(output, MARKER)):
        raise SystemExit(
            f"predict.py: --output {output!r} is not empty ({shown}) and is not a predict.py output folder "
            f"(no {MARKER} in it), so nothing in it is removed, --overwrite included. Give another --output "
            "(a new or empty folder). (A folder of an earlier predict.py version has no marker: delete it "
            "yourself if it is one.)")
    if not overwrite:
        raise SystemExit(
            f"predict.py: --output {output!r} holds an earlier predict.py run ({shown}); this run's drawings and "
            "predictions would mix with its. Give another --output, or --overwrite to remove that run's drawings "
            "and predictions first.")


def clear_earlier_run(output: str) -> List[str]:
    """Remove an earlier predict.py run's files from ``output`` (:func:`_earlier_outputs`; other files stay),
    with a log line. Returns the paths removed, relative to ``output``."""
    ours, others = _earlier_outputs(output)
    for rel in ours:
        os.remove(os.path.join(output, rel))
    folders = set()  # the drawings' sub-folders and their parents: removed deepest first, once empty
    for rel in ours:
        rel = os.path.dirname(rel)
        while rel:
            folders.add(rel)
            rel = os.path.dirname(rel)
    for rel in sorted(folders, key=lambda d: d.count(os.sep), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(output, rel))
    if ours:
        logger.info("--overwrite: removed the earlier run's %d files from %s (%s%s)%s", len(ours), output,
                    ", ".join(ours[:5]), ", ..." if len(ours) > 5 else "",
                    f"; kept {len(others)} other files" if others else "")
    return ours


# ---------------------------------------------------------------------------- the model
def build_predictor(args):
    """(predictor taking an image in its channel order, that order, metadata with the classes to report)."""
    from dinov2od.d2.config import is_lazy
    from dinov2od.d2.data.metadata import metadata_for_model
    from dinov2od.d2.engine.predictor import load_inference_config

    try:  # the classes come from the checkpoint
        cfg = load_inference_config(args.config_file, args.opts, args.weights)
    except ValueError as e:
        raise SystemExit(f"predict.py: {e}") from None
    if is_lazy(cfg):
        from dinov2od.d2.engine.predictor import LazyPredictor

        predictor = LazyPredictor(cfg, args.weights, device=args.device)
        fmt = predictor.input_format
    else:
        from detectron2.engine import DefaultPredictor

        from dinov2od.d2.checkpoint import load_inference_weights

        cfg.MODEL.WEIGHTS = ""  # DefaultPredictor's loader skips tensors that do not fit; load strictly below
        if args.device:
            cfg.MODEL.DEVICE = args.device
        predictor = DefaultPredictor(cfg)
        load_inference_weights(predictor.model, args.weights)
        fmt = "BGR"  # DefaultPredictor takes BGR images and converts them to cfg.INPUT.FORMAT itself
    return predictor, fmt, metadata_for_model(predictor.model, args.dataset)


# ---------------------------------------------------------------------------- main
def _threshold_hint(best, threshold: float, num_images: int) -> None:
    """Log the highest score seen when nothing reached ``threshold``."""
    if best is None:
        return
    score, path = best
    if score >= threshold:
        return
    suggestion = math.floor(score * 100) / 100 if score >= 0.01 else score
    logger.warning(
        "No detection reached --score-threshold %g in %d image(s), so the drawings show none: the highest score "
        "was %.4f (%s). A briefly trained model scores low; try --score-threshold %g (predictions.json holds "
        "every detection).", threshold, num_images, score, path, suggestion)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="dinov2od")
    if args.int8 and args.onnx:
        raise SystemExit("predict.py: --int8 quantizes the PyTorch model; it does not apply to --onnx")
    if not args.onnx and not args.weights:
        raise SystemExit("predict.py: give --weights CHECKPOINT.pth (or --onnx MODEL.onnx)")
    images = list_images(args.input, recursive=not args.no_recursive)
    check_output(args.output, args.input, images)  # before anything is built or written
    check_output_folder(args.output, args.overwrite)
    try:
        if args.onnx:
            from dinov2od.export.d2 import build_onnx_predictor

            predictor, fmt, metadata = build_onnx_predictor(args.config_file, args.onnx, args.opts, args.dataset)
        else:
            predictor, fmt, metadata = build_predictor(args)
    except KeyError as e:  # an unregistered --dataset
        raise SystemExit(f"predict.py: {e.args[0] if e.args else e}") from e
    except UnsafeCheckpointError as e:  # --weights needs full unpickling: the message names the opt-in
        raise SystemExit(f"predict.py: {e}") from None
    num_classes = getattr(getattr(predictor, "model", predictor), "num_classes", None)
    if num_classes and len(metadata.thing_classes) != num_classes:
        raise SystemExit(f"predict.py: --dataset {args.dataset} has {len(metadata.thing_classes)} classes but the "
                         f"model predicts {num_classes}; leave --dataset out to use the checkpoint's classes.")
    if args.int8:
        from dinov2od.modeling.quantize import quantize_dynamic_int8

        predictor.model = quantize_dynamic_int8(predictor.model)
    lock = claim_output(args.output, args.overwrite)
    try:
        return _predict(args, predictor, fmt, metadata, images)
    finally:
        lock.release()


def claim_output(output: str, overwrite: bool):
    """Create ``output`` and hold its lock for this run; a second predict.py into the same folder stops,
    naming the run that holds it. The folder is checked again under the lock (another run may have
    written there since the first check), then an earlier run's files are removed if ``overwrite``."""
    from dinov2od.d2.checkpoint.run_folder import FolderLock

    os.makedirs(output, exist_ok=True)
    lock = FolderLock(output, LOCK)
    if not lock.try_acquire():
        raise SystemExit(f"predict.py: --output {output!r} is in use by another predict.py run ({lock.holder()}); "
                         "give another --output, or wait for that run to finish.")
    try:
        lock.write_holder()
        check_output_folder(output, overwrite)
        if overwrite:
            clear_earlier_run(output)
    except BaseException:
        lock.release()
        raise
    return lock


def _predict(args, predictor, fmt, metadata, images) -> List[dict]:
    """Write the predictions and drawings of ``images`` into ``args.output`` (claimed by the caller)."""
    with atomic_write(os.path.join(args.output, MARKER), "w") as f:
        json.dump({"tool": "tools/predict.py", "weights": args.weights or args.onnx, "inputs": args.input}, f)
    jsonl_path = os.path.join(args.output, "predictions.jsonl")
    json_path = os.path.join(args.output, "predictions.json")
    if os.path.isfile(json_path):  # an earlier run's: a predictions.json is always this run's, complete
        os.remove(json_path)
    results, drawn, best = [], 0, None
    with open(jsonl_path, "w") as jsonl:
        for i, (path, name) in enumerate(images):
            try:
                image = read_image(path, format=fmt)  # grayscale (16-bit too) and RGBA are converted
            except Exception as e:  # undecodable file: skip it, say which
                logger.warning("Skipping %s: cannot decode it (%s: %s)", path, type(e).__name__, e)
                jsonl.write(json.dumps({"image_id": i, "file_name": path, "skipped": f"{type(e).__name__}: {e}"}) + "\n")
                jsonl.flush()
                continue
            instances = predictor(image)["instances"].to("cpu")
            if len(instances) and (best is None or float(instances.scores.max()) > best[0]):
                best = (float(instances.scores.max()), path)
            rgb = image[:, :, ::-1] if fmt == "BGR" else image
            drawing = draw_instances(rgb, instances, metadata, args.score_threshold)
            out_path = os.path.join(args.output, drawing_name(name))
            os.makedirs(os.path.dirname(out_path), exist_ok=True)
            Image.fromarray(drawing).save(out_path, format="JPEG")
            drawn += 1
            dets = detections_to_coco_results(instances, image_id=i, metadata=metadata)
            for r in dets:
                r["file_name"] = path
            results.extend(dets)
            jsonl.write(json.dumps({"image_id": i, "file_name": path, "drawing": drawing_name(name),
                                    "detections": dets}) + "\n")
            jsonl.flush()
    with atomic_write(json_path, "w") as f:
        json.dump(results, f)
    logger.info("Wrote %d detections for %d images to %s (and %s) and drawings to %s/",
                len(results), drawn, json_path, jsonl_path, args.output)
    _threshold_hint(best, args.score_threshold, drawn)
    return results


if __name__ == "__main__":
    main()
