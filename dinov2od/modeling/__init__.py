"""The detector in plain PyTorch + transformers + peft + scipy (no Detectron2 import).

Pieces: :class:`DINOv2Backbone` / :class:`DINOv3Backbone` (a DINOv2 or DINOv3 ViT with LoRA, taps
from several blocks, behind one interface, :class:`ViTBackbone`; :func:`build_backbone` picks one by
``family`` from :data:`BACKBONES`, where ``@register_backbone("name")`` adds a family; all in
:mod:`dinov2od.modeling.backbones`),
:class:`SimpleFeaturePyramid` (neck), :class:`DeformableDecoder` (decoder + heads),
:class:`HungarianMatcher`, :class:`SetCriterion`, and :class:`DINOv2ObjectDetector`
composing them. Constructing never downloads; weights load only when asked for::

    from dinov2od.modeling import DINOv2ObjectDetector, DINOv2Backbone
    model = DINOv2ObjectDetector(num_classes=80)    # ViT-S/14 arch (arch=None, no weights), random init
    model = DINOv2ObjectDetector(num_classes=80, backbone=dict(pretrained="facebook/dinov2-base"))  # the
    # configs' model (configs/common/models/dinov2_detr.py, configs/yaml/*.yaml name ViT-B/14, arch="base")
    model = DINOv2ObjectDetector(num_classes=80, **PRESETS["efficient"])  # a preset (.presets)
    model = DINOv2ObjectDetector(num_classes=80, backbone=dict(pretrained="dinov2_vitb14_pretrain.pth"))
    model = DINOv2ObjectDetector(num_classes=80, backbone=dict(family="dinov3", arch="small"))  # S/16
    model = DINOv2ObjectDetector(num_classes=80, backbone=dict(
        family="dinov3", pretrained="facebook/dinov3-vitb16-pretrain-lvd1689m"))  # or a folder / Meta's .pth
    out = model(images, masks)  # images (B,3,H,W) RGB in [0, 1]; masks (B,H,W) True=pad
    dets = model.predict([img1, img2])  # per image: boxes (x0,y0,x1,y1 px), scores, labels
    out["pred_logits"]  # (B, Q, K) sigmoid logits
    out["pred_boxes"]   # (B, Q, 4) cxcywh in [0, 1] of each unpadded image

Architectures: ``arch="small"|"base"|"large"|"giant"`` (+ ``registers=True``) are the
released DINOv2 ViTs; with ``family="dinov3"``, ``arch="small"|"small_plus"|"base"|"large"|
"huge_plus"|"7b"`` are the released DINOv3 ViTs (:data:`DINOV3_ARCHS`). ``arch="tiny"`` (width
96, 4 blocks, 3 heads, MLP ratio 2) has no released weights and is for CPU tests and demos. Any
field can be overridden with plain kwargs, e.g. a tiny random-init ViT trained end to end::

    backbone = DINOv2Backbone(
        arch="tiny",
        arch_overrides=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=96),
        num_taps=2, lora_rank=0, freeze=False)
    model = DINOv2ObjectDetector(num_classes=3, backbone=backbone, hidden_dim=64,
                                 scale_factors=(1.0, 0.5), num_queries=20, num_decoder_layers=2,
                                 num_heads=4, dim_feedforward=128)

Loss: ``criterion = SetCriterion(num_classes, HungarianMatcher(), num_aux_layers=model.num_aux_outputs,
two_stage=...)``; ``losses = criterion(out, targets)`` (unweighted) and
``sum(losses[k] * criterion.weight_dict[k] for k in losses)``. In training, pass the targets to
the model too (``model(images, targets=targets)``): the denoising queries (``dn_groups``) are
built from them. Layer-wise LR decay of a fine-tuned ViT: :func:`backbone_lr_decay`.

Options and their defaults are written once, in dataclasses: :class:`DecoderOptions`,
:class:`BackboneOptions` (shared by every backbone family), :class:`CriterionOptions`,
:class:`MatcherOptions`; the constructors read their defaults from them, and the lazy configs and
yacs keys (:mod:`dinov2od.d2.config`) are derived from them. Named presets: :data:`PRESETS`.
"""
from .backbones import (
    ARCHS,
    BACKBONE_FAMILIES,
    BackboneOptions,
    BACKBONES,
    DINOV3_ARCHS,
    DINOV3_HUB_IDS,
    HUB_IDS,
    DINOv2Backbone,
    DINOv3Backbone,
    PretrainedWeightsUnavailable,
    ViTBackbone,
    build_backbone,
    build_dinov2_config,
    build_dinov3_config,
    dinov3_official_to_hf_state_dict,
    hf_to_official_state_dict,
    official_to_hf_state_dict,
    pad_to_multiple,
    register_backbone,
    valid_sizes_from_mask,
)
from .criterion import CriterionOptions, SetCriterion
from .decoder import DecoderLayer, DecoderOptions, DeformableDecoder, EncoderLayer, inverse_sigmoid
from .detector import DINOv2ObjectDetector, topk_detections
from .lr_decay import backbone_lr_decay, num_vit_layers, vit_lr_decay_factor
from .matcher import HungarianMatcher, MatcherOptions, focal_class_cost
from .neck import LayerNorm2d, SimpleFeaturePyramid
from .presets import PRESETS
from .train_queries import DenoisingQueries, make_denoising_queries

__all__ = [
    "ARCHS",
    "BACKBONES",
    "BACKBONE_FAMILIES",
    "BackboneOptions",
    "CriterionOptions",
    "DINOV3_ARCHS",
    "DINOV3_HUB_IDS",
    "HUB_IDS",
    "DINOv2Backbone",
    "DINOv3Backbone",
    "DINOv2ObjectDetector",
    "DecoderLayer",
    "DecoderOptions",
    "DenoisingQueries",
    "DeformableDecoder",
    "EncoderLayer",
    "HungarianMatcher",
    "LayerNorm2d",
    "MatcherOptions",
    "PRESETS",
    "PretrainedWeightsUnavailable",
    "SetCriterion",
    "SimpleFeaturePyramid",
    "ViTBackbone",
    "backbone_lr_decay",
    "build_backbone",
    "build_dinov2_config",
    "build_dinov3_config",
    "dinov3_official_to_hf_state_dict",
    "focal_class_cost",
    "inverse_sigmoid",
    "hf_to_official_state_dict",
    "make_denoising_queries",
    "num_vit_layers",
    "official_to_hf_state_dict",
    "pad_to_multiple",
    "register_backbone",
    "topk_detections",
    "valid_sizes_from_mask",
    "vit_lr_decay_factor",
]
