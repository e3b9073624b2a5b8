#!/usr/bin/env python
"""Run a trained dinov2od model on image files or folders.

    python tools/predict.py --config-file configs/shapes.py --weights output/shapes/model_final.pth \
        --input datasets/shapes/val --output output/predict

    python tools/predict.py --config-file configs/shapes.py --onnx model.onnx --input img.jpg  # tools/export_onnx.py

    python tools/predict.py ... --weights model_final.pth --device cpu --int8  # int8 linear layers (CPU)

Writes one drawing per image (Detectron2's ``Visualizer``) and ``predictions.json``: COCO-style
results (``file_name``, ``category_id``, ``category_name``, ``bbox`` XYWH in pixels, ``score``).
Lazy (``.py``) and yacs (``.yaml``) configs are both accepted; yacs configs go through
Detectron2's ``DefaultPredictor``. Files that cannot be decoded are skipped with a warning.
"""
import argparse
import glob
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import dinov2od.d2  # noqa: E402,F401
from dinov2od.d2.evaluation import detections_to_coco_results  # noqa: E402
from dinov2od.d2.visualize import draw_instances  # noqa: E402

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
logger = logging.getLogger("dinov2od.predict")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="lazy .py or yacs .yaml config")
    p.add_argument("--weights", default=None, help="checkpoint (.pth) to load (required unless --onnx)")
    p.add_argument("--onnx", default=None, help="run this graph (tools/export_onnx.py) with onnxruntime instead")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--output", default="output/predict", help="folder for drawings and predictions.json")
    p.add_argument("--score-threshold", type=float, default=0.5, help="minimum score drawn")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the config's)")
    p.add_argument("--int8", action="store_true",
                   help="CPU: run an int8 dynamic-quantized copy of the model (dinov2od.modeling.quantize)")
    p.add_argument("--dataset", default=None, help="registered dataset whose class names to use")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (key=value or KEY VALUE)")
    return p.parse_args(argv)


def list_images(inputs):
    """Expand files and folders into a sorted list of image paths."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            files.extend(f for f in sorted(glob.glob(os.path.join(path, "*"))) if f.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {path!r} is neither a file nor a folder.")
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_EXTS)}) found in {inputs}.")
    return files


def build_predictor(args):
    """(predictor taking a BGR/RGB image in its ``input_format``, input_format, metadata)."""
    if args.config_file.endswith(".py"):
        from detectron2.config import LazyConfig

        from dinov2od.d2.predictor import LazyPredictor

        cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
        predictor = LazyPredictor(cfg, args.weights, device=args.device)
        names = cfg.dataloader.test.dataset.names
        dataset = args.dataset or (names if isinstance(names, str) else names[0])
        return predictor, predictor.input_format, MetadataCatalog.get(dataset)
    from detectron2.config import get_cfg
    from detectron2.engine import DefaultPredictor

    from dinov2od.d2 import add_dinov2od_config

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    if args.device:
        cfg.MODEL.DEVICE = args.device
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")
    # DefaultPredictor takes BGR images and converts them to cfg.INPUT.FORMAT itself
    return DefaultPredictor(cfg), "BGR", MetadataCatalog.get(dataset)


def _load_category_ids(metadata) -> None:
    """Load a registered dataset once so that its metadata maps class indices to json ids."""
    from detectron2.data import DatasetCatalog

    if metadata.name in DatasetCatalog.list() and not metadata.get("thing_dataset_id_to_contiguous_id", None):
        DatasetCatalog.get(metadata.name)


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="dinov2od")
    if args.int8 and args.onnx:
        raise SystemExit("predict.py: --int8 quantizes the PyTorch model; it does not apply to --onnx")
    if args.onnx:
        from dinov2od.export.d2 import build_onnx_predictor

        predictor, fmt, metadata = build_onnx_predictor(args.config_file, args.onnx, args.opts, args.dataset)
    elif not args.weights:
        raise SystemExit("predict.py: give --weights CHECKPOINT.pth (or --onnx MODEL.onnx)")
    else:
        predictor, fmt, metadata = build_predictor(args)
        if args.int8:
            from dinov2od.modeling.quantize import quantize_dynamic_int8

            predictor.model = quantize_dynamic_int8(predictor.model)
    _load_category_ids(metadata)
    os.makedirs(args.output, exist_ok=True)
    results, drawn = [], 0
    for i, path in enumerate(list_images(args.input)):
        try:
            image = utils.read_image(path, format=fmt)  # grayscale/RGBA are converted
        except Exception as e:  # undecodable file: skip it, say which
            logger.warning("Skipping %s: cannot decode it (%s: %s)", path, type(e).__name__, e)
            continue
        instances = predictor(image)["instances"].to("cpu")
        rgb = image[:, :, ::-1] if fmt == "BGR" else image
        drawing = draw_instances(rgb, instances, metadata, args.score_threshold)
        out_path = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".jpg")
        Image.fromarray(drawing).save(out_path)
        drawn += 1
        for r in detections_to_coco_results(instances, image_id=i, metadata=metadata):
            r["file_name"] = path
            results.append(r)
    json_path = os.path.join(args.output, "predictions.json")
    with open(json_path, "w") as f:
        json.dump(results, f)
    logger.info(
        "Wrote %d detections for %d images to %s and drawings to %s/", len(results), drawn, json_path, args.output
    )
    return results


if __name__ == "__main__":
    main()
