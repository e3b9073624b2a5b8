"""dinov2od: a DINOv2 + LoRA backbone with a deformable DETR decoder, on Detectron2."""

__version__ = "0.1.0"
