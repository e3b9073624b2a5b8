"""ONNX export of :class:`~dinov2od.modeling.DINOv2ObjectDetector` and an onnxruntime runner.

The exported graph (:class:`DetectorGraph`) takes what the plain API takes, as a padded batch:

=============  =================================  ==============================================
input          shape                              meaning
=============  =================================  ==============================================
``images``     (B, 3, H, W) float32               RGB in [0, 1] (``ToTensor()``), padded at the
                                                  bottom/right (values under the padding are
                                                  ignored); normalized inside the graph
``image_sizes`` (B, 2) int64                      valid ``(height, width)`` of each image
=============  =================================  ==============================================

and returns ``pred_logits`` (B, Q, K) sigmoid logits, ``pred_boxes`` (B, Q, 4) normalized
``(cx, cy, w, h)`` of each valid image, and the top-k post-processing of
:func:`~dinov2od.modeling.topk_detections`: ``boxes`` (B, k, 4) ``(x0, y0, x1, y1)`` in pixels,
``scores`` (B, k), ``labels`` (B, k) int64. Batch, height and width are dynamic: every size the
model computes from them (padding to whole patches, the per-image position-embedding resize, the
pyramid levels, the deformable-attention level shapes) is a value of the graph, not a constant.

The deformable attention is exported as its PyTorch path (``GridSample``, opset >= 16).

The file's ``metadata_props`` (:func:`onnx_metadata`) describe the graph and, when the model holds
them (:meth:`DINOv2ObjectDetector.set_classes`; a trained checkpoint does), its classes:
``class_names`` and ``class_ids`` (the dataset's own category id of each label), both JSON lists
(:func:`class_metadata_props`, read back by :func:`onnx_classes`). :meth:`OnnxDetector.predict`
then returns ``category_ids`` and ``names`` as the plain API does.
"""
from __future__ import annotations

import inspect
import json
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from dinov2od.modeling import DINOv2ObjectDetector, pad_to_multiple, topk_detections

__all__ = [
    "DetectorGraph",
    "KIND_KEY",
    "MIN_OPSET",
    "OnnxDetector",
    "add_metadata",
    "check_exportable",
    "class_metadata_props",
    "export_detector",
    "masks_from_sizes",
    "onnx_classes",
    "onnx_metadata",
    "quiet_export",
]

OUTPUT_NAMES = ("pred_logits", "pred_boxes", "boxes", "scores", "labels")
MIN_OPSET = 17  # LayerNormalization (17), GridSample (16)
KIND_KEY = "dinov2od.graph"
CLASS_NAMES_KEY = "class_names"  # JSON list: the name of label i
CLASS_IDS_KEY = "class_ids"  # JSON list: the dataset's category id of label i


def check_exportable(detector: nn.Module) -> None:
    """Refuse options whose computation cannot be written into an ONNX graph.

    Raises:
        ValueError: naming the option and the fix.
    """
    if not isinstance(detector, DINOv2ObjectDetector):
        raise ValueError(f"expected a DINOv2ObjectDetector, got {type(detector).__name__}")
    nms = getattr(detector.decoder, "two_stage_nms", 0.0)
    if nms > 0:
        raise ValueError(
            f"two_stage_nms={nms} cannot be exported to ONNX: the NMS of the two-stage query selection "
            "is a per-image Python loop around torchvision.ops.nms with a data-dependent number of kept "
            "boxes. Export a model built with two_stage_nms=0 (set model.detector.two_stage_nms=0; the "
            "weights are the same, only the query selection changes).")


def masks_from_sizes(image_sizes: Tensor, height, width) -> Tensor:
    """(B, 2) valid ``(h, w)`` -> (B, height, width) bool padding masks (True = padded)."""
    ys = torch.arange(height, device=image_sizes.device)[None, :, None]
    xs = torch.arange(width, device=image_sizes.device)[None, None, :]
    return (ys >= image_sizes[:, 0, None, None]) | (xs >= image_sizes[:, 1, None, None])


class DetectorGraph(nn.Module):
    """The computation written into the ONNX graph (see the module docstring).

    Args:
        detector: a :class:`DINOv2ObjectDetector` (put in eval mode).
        topk: detections per image of the in-graph post-processing.
    """

    def __init__(self, detector: DINOv2ObjectDetector, topk: int = 100):
        super().__init__()
        check_exportable(detector)
        self.detector = detector.eval()
        self.topk = int(topk)

    def forward(self, images: Tensor, image_sizes: Tensor) -> Tuple[Tensor, ...]:
        """
        Args:
            images: (B, 3, H, W) RGB in [0, 1], padded bottom/right.
            image_sizes: (B, 2) int64 valid ``(height, width)``.

        Returns:
            pred_logits, pred_boxes, boxes, scores, labels (see the module docstring).
        """
        d = self.detector
        x = d.normalize(images)
        masks = masks_from_sizes(image_sizes, images.shape[-2], images.shape[-1])
        x, masks = pad_to_multiple(x, masks, d.backbone.patch_size)
        out = d.forward_padded(x, masks, image_sizes)
        boxes, scores, labels = topk_detections(out["pred_logits"], out["pred_boxes"], image_sizes, self.topk)
        return out["pred_logits"], out["pred_boxes"], boxes, scores, labels


def onnx_metadata(path: str) -> Dict[str, str]:
    """The ``metadata_props`` of an ONNX file (what :func:`export_detector` wrote there)."""
    import onnx

    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def class_metadata_props(detector: nn.Module) -> Dict[str, str]:
    """The ``metadata_props`` that carry ``detector``'s classes into an ONNX file: ``class_names``
    and ``class_ids`` as JSON lists, or ``{}`` when the model holds none (saved before models
    stored their classes)."""
    names, ids = getattr(detector, "class_names", None), getattr(detector, "class_ids", None)
    if names is None:
        return {}
    return {CLASS_NAMES_KEY: json.dumps(list(names), ensure_ascii=False),
            CLASS_IDS_KEY: json.dumps([int(i) for i in ids])}


def onnx_classes(meta: Dict[str, str]) -> Optional[Tuple[List[str], List[int]]]:
    """``(names, dataset ids)`` stored in an ONNX file's metadata (:func:`onnx_metadata`, or
    onnxruntime's ``custom_metadata_map``), or None when the file has none."""
    if CLASS_NAMES_KEY not in meta:
        return None
    names = [str(n) for n in json.loads(meta[CLASS_NAMES_KEY])]
    ids = [int(i) for i in json.loads(meta[CLASS_IDS_KEY])] if CLASS_IDS_KEY in meta else list(range(len(names)))
    if len(ids) != len(names):
        raise ValueError(f"The graph's metadata has {len(names)} class names but {len(ids)} class ids.")
    return names, ids


def add_metadata(path: str, props: Dict[str, str]) -> None:
    """Add ``props`` to the ONNX file's ``metadata_props`` (values as strings), check and save it."""
    import onnx

    model = onnx.load(path)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=str(v))
    onnx.checker.check_model(model)
    onnx.save(model, path)


def quiet_export(module: nn.Module, args: tuple, path: str, **kwargs) -> None:
    """``torch.onnx.export`` (TorchScript tracing) without the tracer's warnings about Python
    values: the graph's dynamic sizes are checked by running it at other sizes instead.

    torch >= 2.9 defaults to its torch.export-based exporter (``dynamo=True``), which cannot follow
    the graph's data-dependent shapes (valid sizes, padding masks); the TorchScript exporter, which
    these graphs are written and tested for, is asked for by name where the argument exists."""
    if _EXPORT_HAS_DYNAMO_ARG:
        kwargs.setdefault("dynamo", False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(Constant folding|Exporting aten::index|"
                                "The shape inference of prim::Constant|legacy TorchScript-based ONNX).*")
        torch.onnx.export(module, args, path, do_constant_folding=True, **kwargs)


_EXPORT_HAS_DYNAMO_ARG = "dynamo" in inspect.signature(torch.onnx.export).parameters


def sample_batch(image_size: Sequence[int], batch_size: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """A random padded batch for tracing: the last image is smaller than the others (so tracing
    runs the padded code path).

    Returns:
        images (B, 3, H, W) in [0, 1], image_sizes (B, 2) int64.
    """
    h, w = (int(s) for s in image_size)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch_size, 3, h, w, generator=g)
    sizes = torch.tensor([[h, w]] * batch_size)
    if batch_size > 1:
        sizes[-1] = torch.tensor([max(1, h * 3 // 4), max(1, w * 2 // 3)])
    return images, sizes


def export_detector(detector: DINOv2ObjectDetector, path: str, image_size: Sequence[int] = (448, 448),
                    batch_size: int = 2, topk: int = 100, opset: int = MIN_OPSET,
                    dynamic_size: bool = True) -> str:
    """Export ``detector`` (+ top-k) to an ONNX file.

    Args:
        detector: the model (any weights; moved to CPU float32 eval mode for the export).
        path: output ``.onnx`` file.
        image_size: ``(H, W)`` of the tracing batch (and the fixed size when not ``dynamic_size``).
        batch_size: batch of the tracing example (the batch axis is dynamic).
        topk: detections per image of the in-graph post-processing.
        opset: ONNX opset, >= 17.
        dynamic_size: height and width are dynamic axes.

    Returns:
        path.

    Raises:
        ValueError: an option that cannot be exported (see :func:`check_exportable`), opset < 17.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset={opset}: the graph needs opset >= {MIN_OPSET} (LayerNormalization, GridSample)")
    graph = DetectorGraph(detector, topk).cpu().float().eval()
    images, sizes = sample_batch(image_size, batch_size)
    axes = {"images": {0: "batch"}, "image_sizes": {0: "batch"}}
    if dynamic_size:
        axes["images"].update({2: "height", 3: "width"})
    axes.update({name: {0: "batch"} for name in OUTPUT_NAMES})
    quiet_export(graph, (images, sizes), path, opset_version=opset, input_names=["images", "image_sizes"],
                  output_names=list(OUTPUT_NAMES), dynamic_axes=axes)
    d = graph.detector
    add_metadata(path, {
        KIND_KEY: "detector", "input": "images: (B,3,H,W) float32 RGB in [0,1]; image_sizes: (B,2) int64 (h,w)",
        "num_classes": d.num_classes, "num_queries": d.num_queries, "topk": topk,
        "patch_size": d.backbone.patch_size, "dynamic_size": int(dynamic_size),
        "export_size": f"{images.shape[-2]}x{images.shape[-1]}", **class_metadata_props(d)})
    return path


ImageLike = Union[np.ndarray, Tensor]


def _to_numpy(x: ImageLike) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


class OnnxDetector:
    """Runs a graph written by :func:`export_detector` with onnxruntime.

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime intra-op threads (None: its default).
        providers: onnxruntime execution providers.
    """

    def __init__(self, path: str, threads: Optional[int] = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=list(providers))
        names = [i.name for i in self.session.get_inputs()]
        if names != ["images", "image_sizes"]:
            raise ValueError(f"{path} is not a dinov2od detector graph (inputs {names}; expected images, "
                             "image_sizes): export it with tools/export_onnx.py --format detector")
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        classes = onnx_classes(self.metadata)
        #: the name and the dataset's category id of each label (None: the graph holds no classes)
        self.class_names, self.class_ids = classes if classes is not None else (None, None)
        self.num_classes = int(self.metadata["num_classes"]) if "num_classes" in self.metadata else None

    def __call__(self, images: ImageLike, image_sizes: ImageLike) -> Dict[str, np.ndarray]:
        """Run the graph on a padded batch (see the module docstring); returns the five outputs."""
        feeds = {"images": _to_numpy(images).astype(np.float32, copy=False),
                 "image_sizes": _to_numpy(image_sizes).astype(np.int64, copy=False)}
        return dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feeds)))

    @staticmethod
    def batch(images: Sequence[ImageLike]) -> Tuple[np.ndarray, np.ndarray]:
        """(3, H_i, W_i) images -> a zero-padded (B, 3, H, W) batch and its (B, 2) sizes."""
        arrays = [_to_numpy(im).astype(np.float32, copy=False) for im in images]
        if not arrays or any(a.ndim != 3 or a.shape[0] != 3 for a in arrays):
            raise ValueError("images must be a non-empty list of (3, H, W) RGB arrays in [0, 1]")
        h = max(a.shape[1] for a in arrays)
        w = max(a.shape[2] for a in arrays)
        batch = np.zeros((len(arrays), 3, h, w), np.float32)
        for i, a in enumerate(arrays):
            batch[i, :, : a.shape[1], : a.shape[2]] = a
        return batch, np.array([a.shape[1:] for a in arrays], np.int64)

    def predict(self, images: Sequence[ImageLike], threshold: float = 0.0) -> List[Dict[str, np.ndarray]]:
        """Like :meth:`DINOv2ObjectDetector.predict`: per image ``boxes`` (n, 4) ``(x0, y0, x1, y1)``
        in pixels, ``scores`` (n,), ``labels`` (n,) (contiguous ``0..K-1``), for (3, H_i, W_i) RGB
        images in [0, 1]; when the graph holds its classes, also ``category_ids`` (n,) int64 (the
        dataset's own ids) and ``names`` (a list of n class names)."""
        out = self(*self.batch(images))
        keep = out["scores"] >= threshold
        results = [dict(boxes=b[k], scores=s[k], labels=lab[k])
                   for b, s, lab, k in zip(out["boxes"], out["scores"], out["labels"], keep)]
        if self.class_names is not None:
            id_table = np.asarray(self.class_ids, np.int64)
            for r in results:
                r["category_ids"] = id_table[r["labels"]]
                r["names"] = [self.class_names[i] for i in r["labels"].tolist()]
        return results
