"""The dinov2od model: DINOv2 or DINOv3 ViT (+ LoRA) -> feature pyramid -> deformable DETR decoder.

``num_classes`` is set once, at ``model.num_classes``; the detector and the loss read it by
interpolation. Experiment files override fields, e.g. ``model.num_classes = 3``,
``model.detector.backbone.arch = "large"`` or ``model.detector.backbone.family = "dinov3"``
(see ``configs/coco_dinov3.py``).
"""
from detectron2.config import LazyCall as L

from dinov2od.d2 import DINOv2DETR
from dinov2od.d2.modeling.meta_arch import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB
from dinov2od.modeling import DINOv2ObjectDetector, HungarianMatcher, SetCriterion, build_backbone

model = L(DINOv2DETR)(
    num_classes=80,
    detector=L(DINOv2ObjectDetector)(
        num_classes="${..num_classes}",
        backbone=L(build_backbone)(
            family="dinov2",  # "dinov2" | "dinov3" (16-px patches: set model.size_divisibility = 16)
            arch="base",  # dinov2: "small" | "base" | "large" | "giant"; dinov3: + "small_plus" | "huge_plus" | "7b"
            registers=False,  # dinov2 only. True: the "with registers" ViT
            arch_overrides={},
            pretrained="facebook/dinov2-base",  # HF id, local folder, official .pth, or None
            out_indices=None,
            num_taps=4,
            lora_rank=8,
            lora_alpha=16.0,
            lora_dropout=0.0,
            lora_targets=("query", "value"),
            lora_blocks=None,  # None: every block; else 0-based block indices
            freeze=True,
            drop_path_rate=0.0,
            apply_layernorm=True,  # the ViT's final LayerNorm on every tapped output
            window_size=None,  # patches per window side: windowed attention in window_blocks
            window_blocks=None,  # None: every block that is not tapped
            pos_embed_init="sincos",  # dinov2, random-init ViTs only ("random": transformers' init)
            pos_interpolation="meta",  # dinov2: resizing the position embeddings, as Meta's code ("transformers")
            rope_train_augment=True,  # dinov3: the released RoPE coordinate augmentation in training mode
        ),
        hidden_dim=256,
        scale_factors=(2.0, 1.0, 0.5, 0.25),
        num_queries=300,
        num_decoder_layers=6,
        num_heads=8,
        num_points=4,
        dim_feedforward=1024,
        dropout=0.0,
        cross_attn="deformable",
        box_refine=True,
        two_stage=False,
        two_stage_nms=0.0,  # > 0: NMS IoU threshold of the two-stage query selection
        group_detr=1,
        num_encoder_layers=0,
        prior_prob=0.01,  # initial foreground probability of the class heads
        spatial_prior=0,  # > 0: width of a conv stem on the image added to every pyramid level
        # training-only queries (inference unchanged): contrastive denoising (DINO: dn_queries=200)
        dn_groups=0,  # > 0: fixed number of denoising groups (a positive + a negative per box each)
        dn_queries=0,  # > 0: DINO's budget instead, groups = dn_queries // (2 * most boxes per image)
        dn_label_noise=0.25,  # probability of a random label
        dn_box_noise=1.0,  # corner noise in half box sizes (positives < 1x, negatives 1-2x)
        o2m_queries=0,  # > 0: H-DETR's one-to-many queries (criterion.o2m_repeats, o2m_weight)
    ),
    criterion=L(SetCriterion)(
        num_classes="${..num_classes}",
        matcher=L(HungarianMatcher)(
            cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0
        ),
        weight_dict={"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0},
        focal_alpha=0.25,
        focal_gamma=2.0,
        num_aux_layers=None,  # None: the detector's decoder layers - 1 (DINOv2DETR sets it)
        two_stage="${..detector.two_stage}",
        class_loss="focal",  # "quality_focal": the target of a matched query is its box's IoU
        enc_loss="hungarian",  # two-stage proposals: "dense" = task-aligned, every token
        dense_topk=9,
        dense_alpha=1.0,  # the task-aligned metric: score^dense_alpha * IoU^dense_beta
        dense_beta=6.0,
        o2m_repeats=6,  # one-to-many queries: the targets repeated this many times (H-DETR: 6)
        o2m_weight=1.0,  # the _o2m losses' weight relative to the main ones
    ),
    pixel_mean=list(IMAGENET_MEAN_RGB),  # 0-255, in input_format order (Detectron2's convention)
    pixel_std=list(IMAGENET_STD_RGB),
    input_format="RGB",
    size_divisibility=14,
    test_topk=100,
)
