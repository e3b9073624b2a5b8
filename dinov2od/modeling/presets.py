"""Model presets: named changes to :class:`~dinov2od.modeling.DINOv2ObjectDetector`'s defaults,
each written once here and reached from every route:

* plain PyTorch: ``DINOv2ObjectDetector(num_classes=80, **PRESETS["efficient"])`` (a preset's
  ``backbone`` entry is a dict of backbone options; merge your own into it);
* lazy configs: ``configs/common/models/dinov2_detr_efficient.py`` applies it to the model config
  (``dinov2od.d2.config.apply_preset``);
* yacs: ``MODEL.DINOV2OD.PRESET "efficient"`` (``configs/yaml/Base-DINOv2DETR-efficient.yaml``);
* the benchmark: ``dinov2od.benchmark.models.PLAIN_PRESETS`` is this table.

``"efficient"``: the default model with less work where it buys little accuracy:

* windowed attention (16 x 16 patches) in every block that is not tapped (ViT-S/B: 8 of 12
  blocks), as RF-DETR and ViTDet do; the tapped blocks keep global attention;
* two pyramid levels (strides 14 and 28 px) instead of four: no stride-7 level, whose
  transposed conv and 3x3 conv at 4x the patch grid cost more than the rest of the neck;
* three decoder layers instead of six (the criterion's auxiliary layers follow).

Measured speed: docs/speed.md, "The efficient preset".
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["PRESETS"]

#: preset name -> keyword arguments of DINOv2ObjectDetector that differ from its defaults
PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "efficient": dict(backbone=dict(window_size=16), scale_factors=(1.0, 0.5), num_decoder_layers=3),
}
