"""The efficient preset: the default model with less work where it buys little accuracy.

* windowed attention (16 x 16 patches) in every block that is not tapped (ViT-S/B: 8 of 12
  blocks), as RF-DETR and ViTDet do; the tapped blocks keep global attention;
* two pyramid levels (strides 14 and 28 px) instead of four: no stride-7 level, whose
  transposed conv and 3x3 conv at 4x the patch grid cost more than the rest of the neck;
* three decoder layers instead of six.

Use it like the default: ``from .common.models.dinov2_detr_efficient import model``.
Measured speed: docs/speed.md, "The efficient preset".
"""
from .dinov2_detr import model

model.detector.backbone.window_size = 16  # patches per window side; window_blocks: the untapped blocks
model.detector.scale_factors = (1.0, 0.5)
model.detector.num_decoder_layers = 3
