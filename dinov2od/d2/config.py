"""yacs config keys for dinov2od (``add_dinov2od_config``) and builders reading them.

Usage::

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file("configs/yaml/shapes.yaml")
    predictor = DefaultPredictor(cfg)

Each key under ``MODEL.DINOV2OD`` maps to one keyword argument of the lazy model config
(``configs/common/models/dinov2_detr.py``), so both config styles build the same model.
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

__all__ = ["add_dinov2od_config", "build_backbone_from_cfg", "build_criterion_from_cfg", "build_detector_from_cfg"]


def add_dinov2od_config(cfg: CN) -> CN:
    """Add dinov2od's keys (and DETR-style defaults) to a Detectron2 yacs config, in place."""
    cfg.MODEL.META_ARCHITECTURE = "DINOv2DETR"
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]  # ImageNet, 0-255, RGB order
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]

    d = cfg.MODEL.DINOV2OD = CN()
    d.NUM_CLASSES = 80
    d.SIZE_DIVISIBILITY = 14
    d.TEST_TOPK = 100  # detections per image (top-k over queries x classes)

    b = d.BACKBONE = CN()
    b.FAMILY = "dinov2"  # dinov2 | dinov3 (then also SIZE_DIVISIBILITY: 16, the DINOv3 patch)
    # dinov2: tiny | small | base | large | giant; dinov3: tiny | small | small_plus | base | large | huge_plus | 7b
    b.ARCH = "base"
    b.REGISTERS = False  # dinov2 only
    b.PRETRAINED = ""  # "" = random init; HF id, local folder or official .pth
    b.ARCH_OVERRIDES = CN(new_allowed=True)  # e.g. hidden_size: 48
    b.OUT_INDICES = []  # [] = NUM_TAPS evenly spaced blocks
    b.NUM_TAPS = 4
    b.LORA_RANK = 8
    b.LORA_ALPHA = 16.0
    b.LORA_DROPOUT = 0.0
    b.LORA_TARGETS = ["query", "value"]
    b.FREEZE = True
    b.DROP_PATH_RATE = 0.0
    b.POS_EMBED_INIT = "sincos"  # dinov2, random-init ViT only: "sincos" | "random"
    b.ROPE_TRAIN_AUGMENT = True  # dinov3: the released RoPE coordinate augmentation in training mode

    d.HIDDEN_DIM = 256
    d.SCALE_FACTORS = [2.0, 1.0, 0.5, 0.25]
    d.NUM_QUERIES = 300
    d.DEC_LAYERS = 6
    d.ENC_LAYERS = 0
    d.NHEADS = 8
    d.NUM_POINTS = 4
    d.DIM_FEEDFORWARD = 1024
    d.DROPOUT = 0.0
    d.CROSS_ATTN = "deformable"
    d.BOX_REFINE = True
    d.TWO_STAGE = False
    d.TWO_STAGE_NMS = 0.0  # > 0: IoU threshold of NMS in the two-stage query selection
    d.GROUP_DETR = 1
    d.SPATIAL_PRIOR = 0  # > 0: width of a conv stem on the image added to every pyramid level
    d.DN = CN()  # contrastive denoising queries, training only
    d.DN.GROUPS = 0  # > 0: fixed number of groups
    d.DN.QUERIES = 0  # > 0: DINO's budget instead (groups = QUERIES // (2 * most boxes per image))
    d.DN.LABEL_NOISE = 0.25
    d.DN.BOX_NOISE = 1.0
    d.O2M_QUERIES = 0  # > 0: H-DETR's one-to-many queries, training only

    d.LOSS = CN()
    d.LOSS.CLASS_WEIGHT = 2.0
    d.LOSS.BBOX_WEIGHT = 5.0
    d.LOSS.GIOU_WEIGHT = 2.0
    d.LOSS.FOCAL_ALPHA = 0.25
    d.LOSS.FOCAL_GAMMA = 2.0
    d.LOSS.CLASS_LOSS = "focal"  # or "quality_focal" (IoU-aware target)
    d.LOSS.ENC_LOSS = "hungarian"  # two-stage proposals: "hungarian" (top-k) or "dense" (every token)
    d.LOSS.DENSE_TOPK = 9
    d.LOSS.O2M_REPEATS = 6  # one-to-many queries: the targets repeated this many times
    d.LOSS.O2M_WEIGHT = 1.0
    d.MATCHER = CN()
    d.MATCHER.COST_CLASS = 2.0
    d.MATCHER.COST_BBOX = 5.0
    d.MATCHER.COST_GIOU = 2.0

    s = cfg.SOLVER
    s.OPTIMIZER = "ADAMW"
    s.BASE_LR = 1e-4
    s.WEIGHT_DECAY = 1e-4
    s.BETAS = (0.9, 0.999)
    s.BACKBONE_LR_DECAY = 1.0  # layer-wise LR decay of a fine-tuned ViT (RF-DETR: 0.8); 1 = off
    s.ACCUMULATE_STEPS = 1
    s.LOG_PERIOD = 20
    s.CLIP_GRADIENTS.ENABLED = True
    s.CLIP_GRADIENTS.CLIP_TYPE = "full_model"  # the norm of all gradients together
    s.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    s.AMP.PRECISION = "float16"  # or "bfloat16"
    s.EMA = CN()
    s.EMA.ENABLED = False
    s.EMA.DECAY = 0.9997
    s.EMA.EVAL_EMA = True  # evaluate the EMA weights

    cfg.INPUT.RANDOM_FLIP = "horizontal"
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = [384, 600]
    cfg.INPUT.CROP.SIZE_RESIZE = [400, 500, 600]  # DETR: resize before the random crop
    return cfg


def build_backbone_from_cfg(cfg):
    """The backbone of ``cfg.MODEL.DINOV2OD.BACKBONE`` (``FAMILY`` picks DINOv2 or DINOv3)."""
    from dinov2od.modeling import build_backbone

    b = cfg.MODEL.DINOV2OD.BACKBONE
    return build_backbone(
        family=b.FAMILY,
        arch=b.ARCH,
        registers=b.REGISTERS,
        arch_overrides=dict(b.ARCH_OVERRIDES),
        pretrained=b.PRETRAINED or None,
        out_indices=list(b.OUT_INDICES) or None,
        num_taps=b.NUM_TAPS,
        lora_rank=b.LORA_RANK,
        lora_alpha=b.LORA_ALPHA,
        lora_dropout=b.LORA_DROPOUT,
        lora_targets=tuple(b.LORA_TARGETS),
        freeze=b.FREEZE,
        drop_path_rate=b.DROP_PATH_RATE,
        pos_embed_init=b.POS_EMBED_INIT,
        rope_train_augment=b.ROPE_TRAIN_AUGMENT,
    )


def build_detector_from_cfg(cfg):
    """``DINOv2ObjectDetector`` from ``cfg.MODEL.DINOV2OD``."""
    from dinov2od.modeling import DINOv2ObjectDetector

    d = cfg.MODEL.DINOV2OD
    return DINOv2ObjectDetector(
        num_classes=d.NUM_CLASSES,
        backbone=build_backbone_from_cfg(cfg),
        hidden_dim=d.HIDDEN_DIM,
        scale_factors=tuple(d.SCALE_FACTORS),
        num_queries=d.NUM_QUERIES,
        num_decoder_layers=d.DEC_LAYERS,
        num_heads=d.NHEADS,
        num_points=d.NUM_POINTS,
        dim_feedforward=d.DIM_FEEDFORWARD,
        dropout=d.DROPOUT,
        cross_attn=d.CROSS_ATTN,
        box_refine=d.BOX_REFINE,
        two_stage=d.TWO_STAGE,
        group_detr=d.GROUP_DETR,
        num_encoder_layers=d.ENC_LAYERS,
        two_stage_nms=d.TWO_STAGE_NMS,
        spatial_prior=d.SPATIAL_PRIOR,
        dn_groups=d.DN.GROUPS,
        dn_queries=d.DN.QUERIES,
        dn_label_noise=d.DN.LABEL_NOISE,
        dn_box_noise=d.DN.BOX_NOISE,
        o2m_queries=d.O2M_QUERIES,
    )


def build_criterion_from_cfg(cfg):
    """``SetCriterion`` (with its ``HungarianMatcher``) from ``cfg.MODEL.DINOV2OD``."""
    from dinov2od.modeling import HungarianMatcher, SetCriterion

    d = cfg.MODEL.DINOV2OD
    return SetCriterion(
        num_classes=d.NUM_CLASSES,
        matcher=HungarianMatcher(
            cost_class=d.MATCHER.COST_CLASS,
            cost_bbox=d.MATCHER.COST_BBOX,
            cost_giou=d.MATCHER.COST_GIOU,
            focal_alpha=d.LOSS.FOCAL_ALPHA,
            focal_gamma=d.LOSS.FOCAL_GAMMA,
        ),
        weight_dict={
            "loss_class": d.LOSS.CLASS_WEIGHT,
            "loss_bbox": d.LOSS.BBOX_WEIGHT,
            "loss_giou": d.LOSS.GIOU_WEIGHT,
        },
        focal_alpha=d.LOSS.FOCAL_ALPHA,
        focal_gamma=d.LOSS.FOCAL_GAMMA,
        num_aux_layers=d.DEC_LAYERS - 1,
        two_stage=d.TWO_STAGE,
        class_loss=d.LOSS.CLASS_LOSS,
        enc_loss=d.LOSS.ENC_LOSS,
        dense_topk=d.LOSS.DENSE_TOPK,
        o2m_repeats=d.LOSS.O2M_REPEATS,
        o2m_weight=d.LOSS.O2M_WEIGHT,
    )
