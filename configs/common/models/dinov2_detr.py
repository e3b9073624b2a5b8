"""The dinov2od model: DINOv2 or DINOv3 ViT (+ LoRA) -> feature pyramid -> deformable DETR decoder.

Every option and its default is declared once, in ``dinov2od.modeling`` (``DecoderOptions``,
``BackboneOptions``, ``CriterionOptions``, ``MatcherOptions`` and the constructors' signatures,
each documented there); :func:`~dinov2od.d2.config.lazy_model` builds this config from them, with
the configs' ViT-B/14 (``dinov2od.d2.config.model.CONFIG_MODEL``). This file states what differs:
the pretrained weights. ``num_classes`` is set once, at ``model.num_classes``; the detector and the
loss read it by interpolation. Experiment files override fields, e.g. ``model.num_classes = 3``,
``model.detector.backbone.arch = "large"`` or ``model.detector.backbone.family = "dinov3"``
(16-px patches: ``model.size_divisibility = 16``, see ``configs/coco_dinov3.py``).
"""
from dinov2od.d2.config import lazy_model

model = lazy_model()
model.detector.backbone.pretrained = "facebook/dinov2-base"  # HF id, local folder, official .pth, or None
