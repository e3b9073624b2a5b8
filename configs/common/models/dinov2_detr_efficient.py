"""The efficient preset: the default model with less work where it buys little accuracy
(``dinov2od.modeling.PRESETS["efficient"]``, which says what it changes and why: windowed
attention in the untapped blocks, two pyramid levels, three decoder layers).

Use it like the default: ``from .common.models.dinov2_detr_efficient import model``.
Measured speed: docs/speed.md, "The efficient preset".
"""
from dinov2od.d2.config import apply_preset

from .dinov2_detr import model

apply_preset(model, "efficient")
