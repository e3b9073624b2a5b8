"""ONNX export of the Detectron2 meta-architecture, and a predictor that runs exported graphs.

:func:`export_meta_arch` traces :class:`~dinov2od.d2.DINOv2DETR` through Detectron2's
``TracingAdapter``, as Detectron2's ``tools/deploy/export_model.py`` does: the graph takes one
image as the model does, ``image`` (3, H, W) float32 in the config's ``INPUT.FORMAT`` (0-255, after
the test-time resize), H and W dynamic, and returns the ``Instances`` fields flattened:
``pred_boxes`` (k, 4) ``(x0, y0, x1, y1)`` in that image's pixels, ``pred_classes`` (k,) int64,
``scores`` (k,), ``image_size`` (2,). One image per call (Detectron2's deploy convention); the
plain-detector graph of :mod:`dinov2od.export.onnx` takes batches.

:class:`OnnxPredictor` is ``DefaultPredictor`` for either kind of graph: the config's test-time
resize, onnxruntime, then boxes scaled to the original image (``detector_postprocess``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.export import TracingAdapter
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances

from .onnx import (KIND_KEY, MIN_OPSET, OnnxDetector, add_metadata, quiet_export, check_exportable,
                   class_metadata_props, onnx_metadata)

__all__ = ["D2_OUTPUT_NAMES", "OnnxPredictor", "build_onnx_predictor", "export_meta_arch"]

D2_OUTPUT_NAMES = ("pred_boxes", "pred_classes", "scores", "image_size")


def export_meta_arch(model, path: str, image: torch.Tensor, opset: int = MIN_OPSET) -> str:
    """Export a :class:`~dinov2od.d2.DINOv2DETR` to ONNX through ``TracingAdapter``.

    Args:
        model: the meta-architecture (moved to CPU eval mode).
        path: output ``.onnx`` file.
        image: (3, H, W) example image in the model's ``input_format``, 0-255.
        opset: ONNX opset, >= 17.

    Returns:
        path.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset={opset}: the graph needs opset >= {MIN_OPSET} (LayerNormalization, GridSample)")
    check_exportable(model.detector)
    model = model.cpu().float().eval()
    adapter = TracingAdapter(model, [{"image": image.float()}]).eval()  # export restores its mode
    with torch.no_grad():
        adapter(*adapter.flattened_inputs)  # records the output schema
    fields = adapter.outputs_schema.schemas[0].schemas[0].keys  # Instances fields, sorted by name
    if tuple(fields) + ("image_size",) != D2_OUTPUT_NAMES:
        raise RuntimeError(f"unexpected Instances fields {fields}; expected {D2_OUTPUT_NAMES[:-1]}")
    quiet_export(adapter, adapter.flattened_inputs, path, opset_version=opset, input_names=["image"],
                  output_names=list(D2_OUTPUT_NAMES),
                  dynamic_axes={"image": {1: "height", 2: "width"}, **{n: {0: "detections"} for n in D2_OUTPUT_NAMES[:3]}})
    add_metadata(path, {KIND_KEY: "detectron2", "input_format": model.input_format,
                         "input": "image: (3,H,W) float32 0-255 in input_format, after the test resize",
                         "num_classes": model.num_classes, "topk": model.test_topk,
                         **class_metadata_props(model.detector)})
    return path


class OnnxPredictor:
    """Like Detectron2's ``DefaultPredictor``, running an exported graph with onnxruntime.

    Args:
        path: a graph from :func:`export_meta_arch` or :func:`~dinov2od.export.export_detector`.
        augmentations: the test-time resize (Detectron2 augmentations) applied before the graph.
        input_format: channel order of the images given to ``__call__`` ("RGB" or "BGR").
        topk: detections kept for the plain-detector graph (its own top-k is an upper bound).
        threads: onnxruntime intra-op threads.

    ``class_names`` / ``class_ids`` (the dataset's category id of each label) are those stored in
    the graph's metadata (None when it holds none) and ``num_classes`` the graph's class count, so
    :func:`dinov2od.d2.data.metadata.metadata_for_model` takes a predictor as it takes a model.
    """

    def __init__(self, path: str, augmentations: Sequence, input_format: str = "BGR", topk: int = 100,
                 threads: Optional[int] = None):
        import onnxruntime as ort

        from .onnx import onnx_classes

        meta = onnx_metadata(path)
        self.kind = meta.get(KIND_KEY)
        if self.kind not in ("detector", "detectron2"):
            raise ValueError(f"{path} was not written by tools/export_onnx.py (no {KIND_KEY!r} metadata)")
        self.aug = T.AugmentationList(list(augmentations))
        self.input_format = input_format
        self.model_format = meta.get("input_format", "RGB")
        self.topk = topk
        classes = onnx_classes(meta)
        self.class_names, self.class_ids = classes if classes is not None else (None, None)
        self.num_classes = int(meta["num_classes"]) if "num_classes" in meta else None
        if self.kind == "detector":
            self.runner = OnnxDetector(path, threads)
        else:
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = int(threads)
            self.runner = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, image: np.ndarray) -> dict:
        """
        Args:
            image: (H, W, 3) uint8 in ``input_format``.

        Returns:
            ``{"instances": Instances}`` with ``pred_boxes``, ``scores``, ``pred_classes`` in the
            image's coordinates.
        """
        h, w = image.shape[:2]
        aug_input = T.AugInput(image)
        self.aug(aug_input)
        img = aug_input.image
        rh, rw = img.shape[:2]
        if self.kind == "detectron2":
            if self.input_format != self.model_format:
                img = img[:, :, ::-1]
            feed = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32)
            boxes, classes, scores, _ = self.runner.run(list(D2_OUTPUT_NAMES), {"image": feed})
        else:
            rgb = img[:, :, ::-1] if self.input_format == "BGR" else img
            feed = np.ascontiguousarray(rgb.transpose(2, 0, 1))[None].astype(np.float32) / 255.0
            out = self.runner(feed, np.array([[rh, rw]], np.int64))
            boxes, scores, classes = (out[k][0, : self.topk] for k in ("boxes", "scores", "labels"))
        inst = Instances((rh, rw))
        inst.pred_boxes = Boxes(torch.from_numpy(np.asarray(boxes, np.float32)))
        inst.scores = torch.from_numpy(np.asarray(scores, np.float32))
        inst.pred_classes = torch.from_numpy(np.asarray(classes, np.int64))
        return {"instances": detector_postprocess(inst, h, w)}


def build_onnx_predictor(config_file: str, onnx_path: str, opts: List[str] = (),
                         dataset: Optional[str] = None) -> Tuple[OnnxPredictor, str, object]:
    """An :class:`OnnxPredictor` with a config's test-time resize (``tools/predict.py --onnx``).

    Args:
        config_file: the lazy (``.py`` or a run's saved ``config.yaml``) or yacs config.
        onnx_path: the graph.
        opts: config overrides.
        dataset: a registered dataset whose classes to report instead of the graph's (an
            unregistered name is an error).

    Returns:
        (predictor, the channel order it takes, metadata with the classes to report: the graph's own
        names and dataset ids, see :func:`dinov2od.d2.data.metadata.metadata_for_model`), as
        ``tools/predict.py``'s ``build_predictor``.
    """
    from dinov2od.d2.config import is_lazy, load_config
    from dinov2od.d2.data.metadata import metadata_for_model

    cfg = load_config(config_file, opts, resolve_data=False)  # the classes come from the graph
    if is_lazy(cfg):
        from detectron2.config import instantiate

        augs = instantiate(cfg.dataloader.test.mapper.get("augmentations", []))
        fmt = cfg.model.get("input_format", "RGB")
        topk = cfg.model.get("test_topk", 100)
    else:
        augs = [T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)]
        fmt = "BGR"  # as DefaultPredictor, which converts to cfg.INPUT.FORMAT itself
        topk = cfg.MODEL.DINOV2OD.TEST_TOPK
    predictor = OnnxPredictor(onnx_path, augs, fmt, topk)
    return predictor, fmt, metadata_for_model(predictor, dataset)
