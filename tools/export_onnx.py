#!/usr/bin/env python
"""Export a dinov2od model to ONNX (opset >= 17) and check it with onnxruntime.

    python tools/export_onnx.py --config-file configs/shapes.py \
        --weights output/shapes/model_final_ema.pth --output model.onnx --check
    python tools/export_onnx.py --config-file configs/yaml/shapes.yaml --format detectron2 \
        --weights output/shapes/model_final_ema.pth --output model_d2.onnx --check

``--format detector`` (default) exports the plain ``DINOv2ObjectDetector`` with top-k
post-processing: inputs ``images`` (B, 3, H, W) float32 RGB in [0, 1] and ``image_sizes`` (B, 2)
int64; outputs ``pred_logits``, ``pred_boxes``, ``boxes`` (x0, y0, x1, y1 px), ``scores``,
``labels``; batch, height and width dynamic. ``--format detectron2`` exports the meta-architecture
through Detectron2's ``TracingAdapter``: input ``image`` (3, H, W) float32 0-255 in the config's
input format, outputs ``pred_boxes``, ``pred_classes``, ``scores``, ``image_size``; one image, H and
W dynamic. ``tools/predict.py --onnx FILE`` runs either with the config's test-time resize.

``--check`` runs the graph with onnxruntime and the model with PyTorch on a random batch of two
sizes that differ from the export's and prints the largest differences.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

logger = logging.getLogger("dinov2od.export")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="lazy .py or yacs .yaml config")
    p.add_argument("--weights", default=None,
                   help="checkpoint (.pth or .safetensors, read without running code from it: SECURITY.md); "
                        "none = random init (for tests)")
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--format", default="detector", choices=["detector", "detectron2"],
                   help="detector: plain DINOv2ObjectDetector + top-k, batched; detectron2: the "
                        "meta-architecture through TracingAdapter, one image")
    p.add_argument("--size", type=int, nargs=2, default=(448, 448), metavar=("H", "W"),
                   help="image size of the tracing example (height and width stay dynamic)")
    p.add_argument("--batch", type=int, default=2, help="batch of the tracing example (detector format)")
    p.add_argument("--topk", type=int, default=None, help="detections per image (default: the config's)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch after exporting")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides (key=value or KEY VALUE)")
    return p.parse_args(argv)


def build_model(args):
    """The meta-architecture with the weights ``tools/predict.py`` would run (EMA when present)."""
    import dinov2od.d2  # noqa: F401  (registers the meta-architecture)
    from dinov2od.d2.config import is_lazy
    from dinov2od.d2.engine.predictor import LazyPredictor, load_inference_config

    cfg = load_inference_config(args.config_file, args.opts, args.weights)  # classes from the checkpoint
    if not args.weights:
        logger.warning("no --weights: exporting a randomly initialized model")
    if is_lazy(cfg):
        if not args.weights:
            from detectron2.config import instantiate

            return instantiate(cfg.model).eval()
        return LazyPredictor(cfg, args.weights, device="cpu").model
    from detectron2.modeling import build_model as d2_build_model

    from dinov2od.d2.checkpoint import load_inference_weights

    cfg.MODEL.DEVICE = "cpu"
    model = d2_build_model(cfg).eval()
    if args.weights:  # refused unless the file fits the model (its EMA weights when it has them)
        load_inference_weights(model, args.weights)
    return model


def check_detector(path, detector, size, topk):
    """Largest |onnxruntime - PyTorch| on a padded batch of two sizes unlike the export's."""
    from dinov2od.export import OnnxDetector

    h, w = size
    sizes = [(h + 37, w - 23 if w > 60 else w + 19), (max(28, h // 2 + 5), max(28, w * 2 // 3))]
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, a, b, generator=g) for a, b in sizes]
    with torch.no_grad():
        ref = detector(images)
        dets = detector.predict(images, topk=topk)
    out = OnnxDetector(path)(*OnnxDetector.batch(images))
    same = all((out["labels"][i] == d["labels"].numpy()).all() for i, d in enumerate(dets))
    return {"sizes": sizes, "pred_logits": float(np.abs(out["pred_logits"] - ref["pred_logits"].numpy()).max()),
            "pred_boxes": float(np.abs(out["pred_boxes"] - ref["pred_boxes"].numpy()).max()),
            "same top-k labels": bool(same)}


def check_meta_arch(path, model, size):
    import onnxruntime as ort

    h, w = size
    image = torch.randint(0, 256, (3, h + 37, w + 19), generator=torch.Generator().manual_seed(1)).float()
    with torch.no_grad():
        ref = model([{"image": image}])[0]["instances"]
    boxes, classes, scores, _ = ort.InferenceSession(path).run(None, {"image": image.numpy()})
    return {"sizes": [tuple(image.shape[1:])],
            "scores": float(np.abs(scores - ref.scores.numpy()).max()) if len(scores) == len(ref) else "count differs",
            "pred_boxes (px)": float(np.abs(boxes - ref.pred_boxes.tensor.numpy()).max()) if len(boxes) == len(ref) else "-",
            "same classes": bool(len(classes) == len(ref) and (classes == ref.pred_classes.numpy()).all())}


def main(argv=None):
    from detectron2.utils.logger import setup_logger

    from dinov2od.export import export_detector
    from dinov2od.export.d2 import export_meta_arch
    from dinov2od.modeling.checkpoint_io import UnsafeCheckpointError

    args = parse_args(argv)
    setup_logger(name="dinov2od")
    try:
        model = build_model(args)
    except UnsafeCheckpointError as e:  # --weights needs full unpickling: the message names the opt-in
        raise SystemExit(f"export_onnx.py: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    topk = args.topk or getattr(model, "test_topk", 100)
    if args.format == "detector":
        export_detector(model.detector, args.output, args.size, args.batch, topk, args.opset)
    else:
        fmt_image = torch.randint(0, 256, (3, *args.size), generator=torch.Generator().manual_seed(0)).float()
        export_meta_arch(model, args.output, fmt_image, args.opset)
    logger.info("Wrote %s (%.1f MB, opset %d, format %s)", args.output, os.path.getsize(args.output) / 2**20,
                args.opset, args.format)
    result = None
    if args.check:
        if args.format == "detector":
            result = check_detector(args.output, model.detector, args.size, topk)
        else:
            result = check_meta_arch(args.output, model, args.size)
        logger.info("onnxruntime vs PyTorch: %s", result)
    return result


if __name__ == "__main__":
    main()
