"""Deployment: ONNX export and onnxruntime inference.

:mod:`dinov2od.export.onnx` exports the plain :class:`~dinov2od.modeling.DINOv2ObjectDetector`
(no Detectron2 needed) and runs it with onnxruntime; :mod:`dinov2od.export.d2` exports the
Detectron2 meta-architecture through Detectron2's ``TracingAdapter`` and gives a predictor that
runs either graph with the config's test-time resize (``tools/predict.py --onnx``).
"""
from .onnx import DetectorGraph, OnnxDetector, check_exportable, export_detector, onnx_metadata

__all__ = ["DetectorGraph", "OnnxDetector", "check_exportable", "export_detector", "onnx_metadata"]
