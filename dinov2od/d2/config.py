"""yacs keys of dinov2od (``add_dinov2od_config``) and the builders that read them.

Usage::

    cfg = get_cfg()
    add_dinov2od_config(cfg)                                  # adds keys, changes no stock value
    cfg.merge_from_file("configs/yaml/shapes.yaml")           # _BASE_: Base-DINOv2DETR.yaml
    predictor = DefaultPredictor(cfg)

``add_dinov2od_config`` only *adds* keys: every key Detectron2 defines keeps its default and its
meaning (``get_cfg()`` + a stock meta-architecture work as before). The project's own choices for
Detectron2's keys (``META_ARCHITECTURE``, ``PIXEL_MEAN``/``PIXEL_STD``, ``INPUT.FORMAT``, the
solver, the crop) are in ``configs/yaml/Base-DINOv2DETR.yaml``.

Every added key is one row of :data:`KEYS`, next to the lazy-config field it mirrors. Rows under
``model.`` are read by :func:`model_arguments`, which turns a yacs config into the same argument
tree as ``configs/common/models/dinov2_detr.py``; adding a model option is adding one row
(``tests/d2/test_config_keys.py`` walks the lazy model config: every option leaf needs a row).
``num_aux_layers`` has none: ``DINOv2DETR`` derives it from the decoder layers in both styles.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from dinov2od.modeling import backbone_lr_decay

logger = logging.getLogger("dinov2od")

__all__ = [
    "KEYS",
    "BatchPlan",
    "add_dinov2od_config",
    "batch_plan",
    "config_style",
    "dataset_classes",
    "dataset_names",
    "is_lazy",
    "resolve_batch",
    "resolve_dataset",
    "load_config",
    "check_lazy_overrides",
    "UnknownKeyError",
    "WeightsUnavailableError",
    "backbone_option",
    "check_backbone_weights",
    "build_backbone_from_cfg",
    "build_criterion_from_cfg",
    "build_detector_from_cfg",
    "build_optimizer_from_cfg",
    "check_config_datasets",
    "check_datasets",
    "check_num_classes",
    "model_arguments",
]


def _or_none(value):
    """"" or [] in yacs (which has no None) -> None ("not set")."""
    return None if value in ("", [], ()) else value


def _positive_or_none(value):
    """0 in yacs (which has no None) -> None ("off")."""
    return value if value > 0 else None


# (yacs key, default, the lazy-config field it mirrors[, conversion of the yacs value])
KEYS: List[tuple] = [
    # --- the model (configs/common/models/dinov2_detr.py) -------------------------------------
    ("MODEL.DINOV2OD.NUM_CLASSES", 80, "model.num_classes"),
    ("MODEL.DINOV2OD.SIZE_DIVISIBILITY", 14, "model.size_divisibility"),
    ("MODEL.DINOV2OD.TEST_TOPK", 100, "model.test_topk"),  # detections per image (queries x classes)
    # a family of dinov2od.modeling.BACKBONES: "dinov2" | "dinov3" | one registered with @register_backbone;
    # SIZE_DIVISIBILITY: the family's patch (BACKBONES[family].default_patch_size: 14, DINOv3 16)
    ("MODEL.DINOV2OD.BACKBONE.FAMILY", "dinov2", "model.detector.backbone.family"),
    # one of BACKBONES[FAMILY].archs (dinov2: tiny | small | base | large | giant;
    # dinov3: tiny | small | small_plus | base | large | huge_plus | 7b)
    ("MODEL.DINOV2OD.BACKBONE.ARCH", "base", "model.detector.backbone.arch"),
    ("MODEL.DINOV2OD.BACKBONE.REGISTERS", False, "model.detector.backbone.registers"),  # dinov2 only
    ("MODEL.DINOV2OD.BACKBONE.PRETRAINED", "", "model.detector.backbone.pretrained", _or_none),  # "": random init
    ("MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES", CN(new_allowed=True), "model.detector.backbone.arch_overrides", dict),
    ("MODEL.DINOV2OD.BACKBONE.OUT_INDICES", [], "model.detector.backbone.out_indices", _or_none),  # []: evenly spaced
    ("MODEL.DINOV2OD.BACKBONE.NUM_TAPS", 4, "model.detector.backbone.num_taps"),
    ("MODEL.DINOV2OD.BACKBONE.LORA_RANK", 8, "model.detector.backbone.lora_rank"),
    ("MODEL.DINOV2OD.BACKBONE.LORA_ALPHA", 16.0, "model.detector.backbone.lora_alpha"),
    ("MODEL.DINOV2OD.BACKBONE.LORA_DROPOUT", 0.0, "model.detector.backbone.lora_dropout"),
    ("MODEL.DINOV2OD.BACKBONE.LORA_TARGETS", ["query", "value"], "model.detector.backbone.lora_targets", tuple),
    ("MODEL.DINOV2OD.BACKBONE.LORA_BLOCKS", [], "model.detector.backbone.lora_blocks", _or_none),  # []: every block
    ("MODEL.DINOV2OD.BACKBONE.FREEZE", True, "model.detector.backbone.freeze"),
    ("MODEL.DINOV2OD.BACKBONE.DROP_PATH_RATE", 0.0, "model.detector.backbone.drop_path_rate"),
    # the ViT's final LayerNorm on every tapped output
    ("MODEL.DINOV2OD.BACKBONE.APPLY_LAYERNORM", True, "model.detector.backbone.apply_layernorm"),
    # windowed attention: patches per window side (0: global attention in every block) ...
    ("MODEL.DINOV2OD.BACKBONE.WINDOW_SIZE", 0, "model.detector.backbone.window_size", _positive_or_none),
    # ... in these blocks ([]: every block that is not tapped)
    ("MODEL.DINOV2OD.BACKBONE.WINDOW_BLOCKS", [], "model.detector.backbone.window_blocks", _or_none),
    # dinov2, random-init ViT only: "sincos" | "random"
    ("MODEL.DINOV2OD.BACKBONE.POS_EMBED_INIT", "sincos", "model.detector.backbone.pos_embed_init"),
    # dinov2: resizing the position embeddings to another grid, "meta" (Meta's dinov2) | "transformers"
    ("MODEL.DINOV2OD.BACKBONE.POS_INTERPOLATION", "meta", "model.detector.backbone.pos_interpolation"),
    # dinov3: the released RoPE coordinate augmentation in training mode
    ("MODEL.DINOV2OD.BACKBONE.ROPE_TRAIN_AUGMENT", True, "model.detector.backbone.rope_train_augment"),
    ("MODEL.DINOV2OD.HIDDEN_DIM", 256, "model.detector.hidden_dim"),
    ("MODEL.DINOV2OD.SCALE_FACTORS", [2.0, 1.0, 0.5, 0.25], "model.detector.scale_factors", tuple),
    ("MODEL.DINOV2OD.NUM_QUERIES", 300, "model.detector.num_queries"),
    ("MODEL.DINOV2OD.DEC_LAYERS", 6, "model.detector.num_decoder_layers"),
    ("MODEL.DINOV2OD.ENC_LAYERS", 0, "model.detector.num_encoder_layers"),
    ("MODEL.DINOV2OD.NHEADS", 8, "model.detector.num_heads"),
    ("MODEL.DINOV2OD.NUM_POINTS", 4, "model.detector.num_points"),
    ("MODEL.DINOV2OD.DIM_FEEDFORWARD", 1024, "model.detector.dim_feedforward"),
    ("MODEL.DINOV2OD.DROPOUT", 0.0, "model.detector.dropout"),
    ("MODEL.DINOV2OD.CROSS_ATTN", "deformable", "model.detector.cross_attn"),
    ("MODEL.DINOV2OD.BOX_REFINE", True, "model.detector.box_refine"),
    ("MODEL.DINOV2OD.TWO_STAGE", False, "model.detector.two_stage"),
    ("MODEL.DINOV2OD.TWO_STAGE_NMS", 0.0, "model.detector.two_stage_nms"),  # > 0: IoU of NMS in query selection
    ("MODEL.DINOV2OD.GROUP_DETR", 1, "model.detector.group_detr"),
    ("MODEL.DINOV2OD.PRIOR_PROB", 0.01, "model.detector.prior_prob"),  # initial foreground probability
    ("MODEL.DINOV2OD.SPATIAL_PRIOR", 0, "model.detector.spatial_prior"),  # > 0: width of a conv stem
    # training-only queries (inference unchanged): contrastive denoising, H-DETR's one-to-many
    ("MODEL.DINOV2OD.DN.GROUPS", 0, "model.detector.dn_groups"),  # > 0: fixed number of groups
    ("MODEL.DINOV2OD.DN.QUERIES", 0, "model.detector.dn_queries"),  # > 0: DINO's budget instead
    ("MODEL.DINOV2OD.DN.LABEL_NOISE", 0.25, "model.detector.dn_label_noise"),
    ("MODEL.DINOV2OD.DN.BOX_NOISE", 1.0, "model.detector.dn_box_noise"),
    ("MODEL.DINOV2OD.O2M_QUERIES", 0, "model.detector.o2m_queries"),
    ("MODEL.DINOV2OD.LOSS.CLASS_WEIGHT", 2.0, "model.criterion.weight_dict.loss_class"),
    ("MODEL.DINOV2OD.LOSS.BBOX_WEIGHT", 5.0, "model.criterion.weight_dict.loss_bbox"),
    ("MODEL.DINOV2OD.LOSS.GIOU_WEIGHT", 2.0, "model.criterion.weight_dict.loss_giou"),
    ("MODEL.DINOV2OD.LOSS.FOCAL_ALPHA", 0.25, ("model.criterion.focal_alpha", "model.criterion.matcher.focal_alpha")),
    ("MODEL.DINOV2OD.LOSS.FOCAL_GAMMA", 2.0, ("model.criterion.focal_gamma", "model.criterion.matcher.focal_gamma")),
    ("MODEL.DINOV2OD.LOSS.CLASS_LOSS", "focal", "model.criterion.class_loss"),  # or "quality_focal"
    ("MODEL.DINOV2OD.LOSS.ENC_LOSS", "hungarian", "model.criterion.enc_loss"),  # two-stage: or "dense"
    ("MODEL.DINOV2OD.LOSS.DENSE_TOPK", 9, "model.criterion.dense_topk"),
    ("MODEL.DINOV2OD.LOSS.DENSE_ALPHA", 1.0, "model.criterion.dense_alpha"),  # score exponent of the assignment
    ("MODEL.DINOV2OD.LOSS.DENSE_BETA", 6.0, "model.criterion.dense_beta"),  # IoU exponent of the assignment
    ("MODEL.DINOV2OD.LOSS.O2M_REPEATS", 6, "model.criterion.o2m_repeats"),  # targets repeated for o2m queries
    ("MODEL.DINOV2OD.LOSS.O2M_WEIGHT", 1.0, "model.criterion.o2m_weight"),
    ("MODEL.DINOV2OD.MATCHER.COST_CLASS", 2.0, "model.criterion.matcher.cost_class"),
    ("MODEL.DINOV2OD.MATCHER.COST_BBOX", 5.0, "model.criterion.matcher.cost_bbox"),
    ("MODEL.DINOV2OD.MATCHER.COST_GIOU", 2.0, "model.criterion.matcher.cost_giou"),
    # --- training (configs/common/{train,optim,data}.py); read by trainer.TrainSettings.from_yacs
    ("SOLVER.OPTIMIZER", "SGD", "optimizer"),  # "SGD" (Detectron2's) or "ADAMW"
    ("SOLVER.BETAS", (0.9, 0.999), "optimizer.betas"),  # AdamW only
    # layer-wise LR decay of a fine-tuned ViT (RF-DETR: 0.8); 1 = off
    ("SOLVER.BACKBONE_LR_DECAY", 1.0, "optimizer.params.lr_factor_func.decay"),
    ("SOLVER.ACCUMULATE_STEPS", 1, "train.accumulate_steps"),  # micro-batches per optimizer step
    # batch per GPU (0 = off: IMS_PER_BATCH is the batch over all GPUs, as in Detectron2); with
    # EFFECTIVE_BATCH too, ACCUMULATE_STEPS = EFFECTIVE_BATCH / (IMS_PER_GPU x GPUs) (resolve_batch)
    ("SOLVER.IMS_PER_GPU", 0, "train.images_per_gpu"),
    ("SOLVER.EFFECTIVE_BATCH", 0, "train.effective_batch"),  # images per optimizer step; 0 = off
    ("SOLVER.LOG_PERIOD", 20, "train.log_period"),
    # True: clip the NORM_TYPE-norm of all gradients together to CLIP_VALUE (CLIP_TYPE "norm"),
    # after AMP unscaling, in the training loop; False: Detectron2's per-parameter clipping.
    ("SOLVER.CLIP_GRADIENTS.FULL_MODEL", False, "train.clip_grad"),
    ("SOLVER.AMP.PRECISION", "float16", "train.amp.precision"),  # or "bfloat16"
    ("SOLVER.EMA.ENABLED", False, "train.ema.enabled"),
    ("SOLVER.EMA.DECAY", 0.9997, "train.ema.decay"),
    ("SOLVER.EMA.EVAL_EMA", True, "train.ema.eval_ema"),  # evaluate the EMA weights
    ("TEST.QUANTIZE", "", "train.eval_quantize"),  # --eval-only: "int8" (CPU) evaluates an int8 copy
    ("INPUT.CROP.SIZE_RESIZE", [400, 500, 600], "dataloader.train.mapper.augmentations.crop_resize"),
    # the train set parsed once per machine, memory-mapped by every rank (dinov2od.d2.data_cache)
    ("DATALOADER.CACHE_DATASET", True, "dataloader.train.dataset.cache"),
    ("DATALOADER.CACHE_DIR", "", "dataloader.train.dataset.cache_dir", _or_none),  # "": $DINOV2OD_CACHE/datasets
    ("SOLVER.MAX_EPOCHS", 0, "train.epochs"),  # > 0: MAX_ITER (and STEPS, scaled) from the train set's size
    # --- your own COCO data (dinov2od.d2.datasets.folder), registered by load_config ------------
    ("DATASETS.ROOT", "", "dataset.root"),  # a Roboflow/RF-DETR export or COCO's folder layout, YOLO or VOC
    ("DATASETS.FORMAT", "auto", "dataset.format"),  # ROOT's layout: "auto" (from the folder) | coco | yolo | voc
    ("DATASETS.NAME", "custom", "dataset.name"),  # registered as <NAME>_train, <NAME>_val
    ("DATASETS.TRAIN_JSON", "", "dataset.train_json"),  # explicit files instead of (or over) ROOT
    ("DATASETS.TRAIN_IMAGES", "", "dataset.train_images"),
    ("DATASETS.TEST_JSON", "", "dataset.val_json"),
    ("DATASETS.TEST_IMAGES", "", "dataset.val_images"),
    ("DATASETS.CHECK", True, "dataset.check"),  # check every file before training
    ("DATASETS.CHECK_IMAGES", "decode", "dataset.check_images"),  # "decode" every image, or "header" only
]


def add_dinov2od_config(cfg: CN) -> CN:
    """Add the keys of :data:`KEYS` that ``cfg`` lacks (in place); existing keys are left alone.

    Returns:
        ``cfg``.
    """
    for key, default, *_ in KEYS:
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            if name not in node:
                node[name] = CN()
            node = node[name]
        if leaf not in node:
            node[leaf] = default.clone() if isinstance(default, CN) else default
    return cfg


def _set(tree: Dict[str, Any], path: str, value) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def model_arguments(cfg: CN) -> Dict[str, Any]:
    """The ``model.`` rows of :data:`KEYS` read from ``cfg``, as the lazy model config's tree.

    Returns:
        e.g. ``{"num_classes": 3, "detector": {"hidden_dim": 128, "backbone": {...}}, "criterion": {...}}``.
    """
    tree: Dict[str, Any] = {}
    for key, _, target, *convert in KEYS:
        targets = (target,) if isinstance(target, str) else target
        if not targets[0].startswith("model."):
            continue
        value = cfg
        for name in key.split("."):
            value = value[name]
        value = convert[0](value) if convert else value
        for t in targets:
            _set(tree, t[len("model."):], value)
    return tree


def build_backbone_from_cfg(cfg):
    """The backbone of ``cfg.MODEL.DINOV2OD.BACKBONE`` (``FAMILY`` picks a registered family)."""
    from dinov2od.modeling import build_backbone

    return build_backbone(**model_arguments(cfg)["detector"]["backbone"])


def build_detector_from_cfg(cfg):
    """``DINOv2ObjectDetector`` from ``cfg.MODEL.DINOV2OD``."""
    from dinov2od.modeling import DINOv2ObjectDetector

    args = model_arguments(cfg)
    detector = dict(args["detector"])
    detector["backbone"] = build_backbone_from_cfg(cfg)
    return DINOv2ObjectDetector(num_classes=args["num_classes"], **detector)


def build_criterion_from_cfg(cfg):
    """``SetCriterion`` (with its ``HungarianMatcher``) from ``cfg.MODEL.DINOV2OD``."""
    from dinov2od.modeling import HungarianMatcher, SetCriterion

    args = model_arguments(cfg)
    criterion = dict(args["criterion"])
    return SetCriterion(
        num_classes=args["num_classes"],
        matcher=HungarianMatcher(**criterion.pop("matcher")),
        num_aux_layers=None,  # DINOv2DETR sets it from the detector's decoder layers
        two_stage=args["detector"]["two_stage"],
        **criterion,
    )


def build_optimizer_from_cfg(cfg: CN, model):
    """The optimizer of ``cfg.SOLVER`` with Detectron2's parameter groups and gradient clipping.

    Parameter groups come from Detectron2's ``get_default_optimizer_params`` with the stock keys
    (``BASE_LR``, ``WEIGHT_DECAY``, ``WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``,
    ``WEIGHT_DECAY_BIAS``) and ``SOLVER.BACKBONE_LR_DECAY`` as its ``lr_factor_func``.
    ``CLIP_GRADIENTS`` keeps Detectron2's per-parameter meaning unless ``CLIP_GRADIENTS.FULL_MODEL``,
    in which case the training loop clips instead.
    """
    s = cfg.SOLVER
    params = get_default_optimizer_params(
        model,
        base_lr=s.BASE_LR,
        weight_decay=s.WEIGHT_DECAY,
        weight_decay_norm=s.WEIGHT_DECAY_NORM,
        bias_lr_factor=s.BIAS_LR_FACTOR,
        weight_decay_bias=s.WEIGHT_DECAY_BIAS,
        lr_factor_func=backbone_lr_decay(s.BACKBONE_LR_DECAY, model=model),  # name -> LR factor
    )
    name = s.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer = torch.optim.AdamW(params, lr=s.BASE_LR, betas=tuple(s.BETAS), weight_decay=s.WEIGHT_DECAY)
    elif name == "SGD":
        optimizer = torch.optim.SGD(
            params, lr=s.BASE_LR, momentum=s.MOMENTUM, nesterov=s.NESTEROV, weight_decay=s.WEIGHT_DECAY
        )
    else:
        raise ValueError(f"SOLVER.OPTIMIZER={s.OPTIMIZER!r} is not supported; use 'ADAMW' or 'SGD'.")
    if s.CLIP_GRADIENTS.FULL_MODEL:
        return optimizer
    return maybe_add_gradient_clipping(cfg, optimizer)


def dataset_classes(name: str) -> Optional[List[str]]:
    """The class names of registered dataset ``name``: its metadata's ``thing_classes``, else the
    categories of the json its metadata names (read without loading the dataset), else None."""
    meta = MetadataCatalog.get(name)
    classes = meta.get("thing_classes", None)
    if classes is None and meta.get("json_file", None) and os.path.isfile(meta.json_file):
        from .datasets.folder import read_coco_categories

        classes = read_coco_categories(meta.json_file)[0]
    return None if classes is None else list(classes)


def _num_classes_error(name: str, classes: Sequence[str], num_classes: int) -> ValueError:
    return ValueError(
        f"Dataset {name!r} has {len(classes)} classes ({list(classes)[:10]}"
        f"{'...' if len(classes) > 10 else ''}) but the model has num_classes={num_classes}. "
        f"Set num_classes={len(classes)} in the config (lazy: `num_classes` at the top of the "
        "model config, e.g. `model.num_classes=N`, or None to take it from dataset.root; yacs: "
        "MODEL.DINOV2OD.NUM_CLASSES, 0 to take it from DATASETS.ROOT)."
    )


def check_num_classes(model, dataset_names: Sequence[str]) -> None:
    """Raise a clear error when a dataset's class count differs from the model's ``num_classes``.

    Args:
        model: the meta-architecture (or a DDP wrapper of it), or the ``num_classes`` itself.
        dataset_names: a name or list of registered dataset names.
    """
    num_classes = model if isinstance(model, int) or model is None else getattr(model, "module", model).num_classes
    if num_classes is None:  # not resolved yet (a lazy config that takes it from its data)
        return
    names = [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    for name in names:
        classes = dataset_classes(name)
        if classes is not None and len(classes) != num_classes:
            raise _num_classes_error(name, classes, num_classes)


_CHECKED: set = set()


def check_datasets(dataset_names: Sequence[str]) -> None:
    """Run :func:`~dinov2od.d2.datasets.check_coco_dataset` (files, sizes, ids, boxes) on each dataset
    registered with the check on (``register_coco_dataset(check=True)``: ``dataset.root`` /
    ``DATASETS.ROOT`` data), once per process, before the model is built."""
    from .datasets.folder import check_coco_dataset

    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        mode = meta.get("dinov2od_check", False)  # "decode" (or True), "header", False
        key = (meta.get("json_file", None), meta.get("image_root", None), mode)
        if not mode or key in _CHECKED:
            continue
        s = check_coco_dataset(meta.get("dinov2od_source_json", key[0]), key[1], check_files=mode)
        _CHECKED.add(key)
        logger.info(
            "Checked %s: %d images (%d with boxes), %d boxes, %d classes; %s", name, s.num_images,
            s.num_images_with_boxes, s.num_boxes, len(meta.thing_classes),
            "every file decodes and has the json's size" if mode != "header" else
            "every file's header reads and has the json's size (headers only: a truncated file is not found)")


# ---------------------------------------------------------------------------- batch per GPU
@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How a training step's images are made up: ``images_per_gpu`` on each of ``world_size``
    processes (GPUs), ``accumulate_steps`` micro-batches per optimizer step."""

    images_per_gpu: int
    world_size: int
    accumulate_steps: int

    @property
    def total_batch_size(self) -> int:
        """Images of one micro-batch over all processes (``total_batch_size`` / ``IMS_PER_BATCH``)."""
        return self.images_per_gpu * self.world_size

    @property
    def effective_batch(self) -> int:
        """Images per optimizer step."""
        return self.total_batch_size * self.accumulate_steps

    def __str__(self) -> str:
        gpus = "GPU" if self.world_size == 1 else "GPUs"
        return (f"{self.images_per_gpu} images/GPU x {self.world_size} {gpus} x {self.accumulate_steps} "
                f"accumulation = {self.effective_batch}")


def batch_plan(images_per_gpu: int, effective_batch: int, world_size: int, accumulate_steps: int = 1,
               names: Sequence[str] = ("images_per_gpu", "effective_batch")) -> BatchPlan:
    """The batch arithmetic, in one place: images per GPU x GPUs x accumulation = effective batch.

    Args:
        images_per_gpu: images each process loads per micro-batch (> 0).
        effective_batch: images per optimizer step; 0 keeps ``accumulate_steps`` (the effective
            batch then grows with the GPU count).
        world_size: the number of processes (GPUs) of the job.
        accumulate_steps: micro-batches per step when ``effective_batch`` is 0.
        names: the config keys of the first two arguments, for the error message.

    Returns:
        e.g. ``batch_plan(8, 64, 4)`` -> 8 images/GPU x 4 GPUs x 2 accumulation = 64.

    Raises:
        ValueError: the numbers cannot meet (``effective_batch`` is not a multiple of
            ``images_per_gpu x world_size``), naming them.
    """
    if int(images_per_gpu) <= 0 or int(world_size) <= 0:
        raise ValueError(f"{names[0]}={images_per_gpu} on {world_size} GPUs: both must be positive.")
    if not effective_batch:
        if int(accumulate_steps) <= 0:
            raise ValueError(f"accumulate_steps={accumulate_steps} must be positive.")
        return BatchPlan(int(images_per_gpu), int(world_size), int(accumulate_steps))
    per_step = images_per_gpu * world_size
    if effective_batch <= 0 or effective_batch % per_step:
        fits = [n for n in range(1, effective_batch + 1) if effective_batch % (images_per_gpu * n) == 0]
        raise ValueError(
            f"{names[1]}={effective_batch} cannot be made of {names[0]}={images_per_gpu} x {world_size} GPUs "
            f"({per_step} images per micro-batch): {effective_batch} is not a multiple of {per_step}. Run on a "
            f"GPU count that fits ({', '.join(map(str, fits)) or 'none'}), or change {names[0]} or {names[1]} "
            f"so that {names[1]} is a multiple of {names[0]} x GPUs."
        )
    return BatchPlan(int(images_per_gpu), int(world_size), effective_batch // per_step)


def resolve_batch(cfg, world_size: Optional[int] = None) -> Optional[BatchPlan]:
    """Derive the loader's batch over all processes and the gradient accumulation from the batch per
    GPU, in place, and log the arithmetic ("8 images/GPU x 4 GPUs x 2 accumulation = 64").

    * lazy ``train.images_per_gpu`` (+ ``train.effective_batch``), yacs ``SOLVER.IMS_PER_GPU``
      (+ ``SOLVER.EFFECTIVE_BATCH``): ``dataloader.train.total_batch_size`` / ``SOLVER.IMS_PER_BATCH``
      = images per GPU x ``world_size``, and with an effective batch ``train.accumulate_steps`` /
      ``SOLVER.ACCUMULATE_STEPS`` = effective batch / that (:func:`batch_plan`); the values in
      the config are overwritten.
    * unset (None / 0, the default): the total batch and accumulation stay as the config gives them.

    Args:
        cfg: a lazy or (unfrozen) yacs config.
        world_size: the job's process count (default: the current process group's).

    Returns:
        the plan (None when the batch per GPU is off and the total batch does not split evenly).
    """
    from detectron2.utils import comm

    world_size = comm.get_world_size() if world_size is None else int(world_size)
    if is_lazy(cfg):
        t = cfg.get("train", None) or {}
        per_gpu, effective, accumulate = t.get("images_per_gpu", None), t.get("effective_batch", None), \
            t.get("accumulate_steps", 1)
        names = ("train.images_per_gpu", "train.effective_batch")
        loader = cfg.get("dataloader", {}).get("train", None)
        total = loader.get("total_batch_size", None) if loader is not None else None
    else:
        s = cfg.SOLVER
        per_gpu, effective, accumulate, total = s.IMS_PER_GPU, s.EFFECTIVE_BATCH, s.ACCUMULATE_STEPS, s.IMS_PER_BATCH
        names = ("SOLVER.IMS_PER_GPU", "SOLVER.EFFECTIVE_BATCH")
        if per_gpu and s.REFERENCE_WORLD_SIZE:
            raise ValueError(
                f"SOLVER.IMS_PER_GPU={per_gpu} and SOLVER.REFERENCE_WORLD_SIZE={s.REFERENCE_WORLD_SIZE} both scale "
                "the batch with the GPU count: set REFERENCE_WORLD_SIZE 0 (or IMS_PER_GPU 0 for Detectron2's rescaling).")
    if not per_gpu:
        if effective:
            raise ValueError(f"{names[1]}={effective} needs {names[0]} (the images each GPU loads per micro-batch), "
                             f"e.g. {names[0]}=8.")
        if not total or total % world_size or (not is_lazy(cfg) and cfg.SOLVER.REFERENCE_WORLD_SIZE):
            return None  # Detectron2's own rules (and messages) apply
        plan = BatchPlan(total // world_size, world_size, int(accumulate or 1))
        logger.info("Batch: %s (the total batch of the config; %s sets it per GPU)", plan, names[0])
        return plan
    plan = batch_plan(int(per_gpu), int(effective or 0), world_size, int(accumulate or 1), names)
    if is_lazy(cfg):
        cfg.dataloader.train.total_batch_size = plan.total_batch_size
        cfg.train.accumulate_steps = plan.accumulate_steps
        derived = "dataloader.train.total_batch_size=%d, train.accumulate_steps=%d"
    else:
        cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUMULATE_STEPS = plan.total_batch_size, plan.accumulate_steps
        derived = "SOLVER.IMS_PER_BATCH %d, SOLVER.ACCUMULATE_STEPS %d"
    logger.info("Batch: %s (" + derived + ")", plan, plan.total_batch_size, plan.accumulate_steps)
    return plan


# ---------------------------------------------------------------------------- loading a config
def config_style(path: str) -> str:
    """``"lazy"`` or ``"yacs"``: by extension for ``.py``, by content for YAML (a lazy run's saved
    ``config.yaml`` has lower-case ``model``/``train``/``dataloader`` sections, yacs upper-case ones).
    """
    if path.endswith(".py"):
        return "lazy"
    if not path.endswith((".yaml", ".yml")):
        raise ValueError(f"A config is a lazy config (.py or a saved config.yaml) or a yacs .yaml, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    with open(path) as f:
        content = yaml.safe_load(f) or {}
    lazy_sections = {"model", "train", "dataloader", "optimizer", "lr_multiplier"}
    return "lazy" if isinstance(content, dict) and lazy_sections & set(content) else "yacs"


def load_config(path: str, overrides: Sequence[str] = (), resolve_data: bool = True, batch: bool = True,
                world_size: Optional[int] = None, check_weights: bool = False):
    """Load a lazy (``.py``, or a lazy run's saved ``config.yaml``) or yacs (``.yaml``) config, apply
    the command line's overrides, derive the batch from the batch per GPU (:func:`resolve_batch`),
    then register the config's own data (``dataset.root`` / ``DATASETS.ROOT``, see
    :func:`resolve_dataset`).

    Args:
        path: the config file.
        overrides: ``key=value`` (lazy) or ``KEY VALUE`` (yacs) items.
        resolve_data: register and check the config's datasets; prediction and export, which need
            no data, pass False (the classes then come from the checkpoint). The batch is only
            resolved with the data.
        batch: resolve the batch per GPU (``--eval-only`` passes False: no training batch).
        world_size: the job's process count for the batch (default: the current process group's).
        check_weights: first make sure that the backbone's pretrained weights can be had
            (:func:`check_backbone_weights`: a hub id that is not cached while the hub is off or
            does not answer stops here, before the data); ``tools/train_net.py`` passes True.

    Returns:
        an OmegaConf ``DictConfig`` (lazy) or an unfrozen yacs ``CfgNode``.
    """
    if config_style(path) == "lazy":
        cfg = LazyConfig.load(path)
        overrides = [str(o).strip() for o in overrides]
        check_lazy_overrides(cfg, overrides, path)  # an unknown key: an error before anything is built
        typed = [_override_key(o).lstrip("+") for o in overrides]
        cfg = LazyConfig.apply_overrides(cfg, [_python_none(o.lstrip("+")) for o in overrides])
    else:
        cfg = get_cfg()
        add_dinov2od_config(cfg)
        cfg.merge_from_file(path)
        overrides = list(overrides)
        try:
            cfg.merge_from_list(overrides)
        except (KeyError, AssertionError) as e:  # yacs: "Non-existent key: SOLVER.MAX_ITR"
            if "Non-existent key" not in str(e):
                raise
            bad = str(e).rsplit(": ", 1)[-1].strip("'\" ")
            raise UnknownKeyError(_unknown_keys_message([bad], _yacs_keys(cfg), path, lazy=False)) from None
        typed = [str(k) for k in overrides[0::2]]
    schedule = _schedule_origin(cfg, typed, path)
    if check_weights:
        check_backbone_weights(cfg, path)
    if resolve_data:
        if batch:
            resolve_batch(cfg, world_size)
        resolve_dataset(cfg)
        if schedule is not None:
            logger.info(schedule())
    return cfg


# ---------------------------------------------------------------------------- the backbone's weights
class WeightsUnavailableError(OSError):
    """The backbone's pretrained weights name a hub id that cannot be had here (offline, not cached)."""


def _official_dinov2_file(repo_id: str) -> str:
    """Meta's file name of a DINOv2 hub id's weights (``dinov2_vits14_pretrain.pth``), else ``""``."""
    from dinov2od.modeling.backbones.dinov2 import HUB_IDS

    if repo_id not in HUB_IDS:
        return ""
    arch, registers = HUB_IDS[repo_id]
    return f"dinov2_vit{arch[0]}14{'_reg4' if registers else ''}_pretrain.pth"


def backbone_option(cfg, name: str):
    """The backbone's option ``name`` (e.g. ``"pretrained"``, ``"arch"``) in a lazy config
    (``model.detector.backbone.<name>``, None when unset) or a yacs one (``MODEL.DINOV2OD.BACKBONE.<NAME>``)."""
    if is_lazy(cfg):
        from omegaconf import OmegaConf

        return OmegaConf.select(cfg, f"model.detector.backbone.{name}", default=None)
    return cfg.MODEL.DINOV2OD.BACKBONE.get(name.upper(), None)


def check_backbone_weights(cfg, path: str = "the config", timeout: Optional[float] = None) -> None:
    """Stop at once when the backbone's ``pretrained`` is a Hugging Face hub id that cannot be loaded
    here: not in the local cache, and ``HF_HUB_OFFLINE=1`` or the hub does not answer within
    ``timeout`` seconds (:func:`dinov2od.modeling.backbones.loading.hub_weights_problem`). Local
    folders and files, cached ids and no weights pass without a look-up.

    Raises:
        WeightsUnavailableError: naming the id, the reason, and the three ways on: a
            ``save_pretrained`` folder or Meta's ``.pth`` for the config key, or the offline config
            ``configs/custom_tiny.py`` (yacs: ``configs/yaml/custom_tiny.yaml``).
    """
    from dinov2od.modeling.backbones.loading import HUB_PROBE_TIMEOUT, hub_id, hub_weights_problem

    lazy = is_lazy(cfg)
    repo_id = hub_id(backbone_option(cfg, "pretrained"))
    if repo_id is None:
        return
    problem = hub_weights_problem(repo_id, HUB_PROBE_TIMEOUT if timeout is None else timeout)
    if problem is None:
        return
    key = "model.detector.backbone.pretrained" if lazy else "MODEL.DINOV2OD.BACKBONE.PRETRAINED"
    sep = "=" if lazy else " "
    tiny, other = ("configs/custom_tiny.py", "configs/yaml/custom_tiny.yaml") if lazy else (
        "configs/yaml/custom_tiny.yaml", "configs/custom_tiny.py")
    folder = repo_id.rsplit("/", 1)[-1]
    official = _official_dinov2_file(repo_id)
    pth = f"/path/to/{official}" if official else "/path/to/meta_checkpoint.pth"
    raise WeightsUnavailableError(
        f"The backbone's weights {repo_id!r} ({key} in {path}) cannot be loaded here: {problem}. "
        "Stopped before reading the data or training. Either\n"
        f"  - fetch them once where the hub is reachable, `huggingface-cli download {repo_id} --local-dir "
        f"{folder}` (or `hf download`; a folder as transformers' save_pretrained writes it: config.json + "
        f"model.safetensors), bring the folder here and add {key}{sep}/path/to/{folder};\n"
        f"  - or use Meta's official checkpoint of the same ViT: {key}{sep}{pth};\n"
        f"  - or train offline with the project's own tiny backbone (nothing to download; made for the CPU "
        f"demo, pretrained on generated glyphs, not photographs): --config-file {tiny} (the other config "
        f"style: {other})."
    )


# ---------------------------------------------------------------------------- command-line overrides
class UnknownKeyError(KeyError):
    """A command-line override names a key that the config does not have."""

    def __str__(self) -> str:  # KeyError's own would quote the message and escape its newlines
        return str(self.args[0]) if self.args else ""


def _python_none(item: str) -> str:
    """``key=None`` as the config files write it means None; Hydra's override grammar would read it
    as the string "None" (its None is ``null``), which then fails far from the command line."""
    key, sep, value = item.partition("=")
    return f"{key}=null" if sep and value.strip() == "None" else item


def _override_key(item: str) -> str:
    """The dotted key of a lazy override ``key=value`` (with its ``+`` when it adds a key)."""
    return item.split("=", 1)[0].strip()


def _lazy_target(node: dict):
    """The callable of a ``LazyCall`` node (a saved config.yaml names it as a string), or None."""
    target = node.get("_target_")
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:
            return None
    return target if callable(target) else None


def _kwargs_followed(target) -> Optional[set]:
    """The names the project's ``**kwargs`` callables pass on: the detector's decoder options, the
    backbone families' options (None: a callable whose ``**kwargs`` is not followed)."""
    from dinov2od.modeling import BACKBONES, DecoderOptions, DINOv2ObjectDetector, build_backbone
    from dinov2od.modeling.backbones.registry import family_options

    if isinstance(target, type) and issubclass(target, DINOv2ObjectDetector):
        return {f.name for f in dataclasses.fields(DecoderOptions)} - {"num_levels", "num_layers"}
    if target is build_backbone:
        return {name for cls in BACKBONES.values() for name in family_options(cls)}
    return None


def _parameters(target) -> Optional[set]:
    """The keyword arguments ``target`` takes (None: any, a ``**kwargs`` that is not followed)."""
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return names
    followed = _kwargs_followed(target)
    return None if followed is None else names | followed


def _is_known(tree: Any, parts: Sequence[str]) -> bool:
    """Whether the dotted key ``parts`` names a node of the plain config ``tree``: written in the
    config, a parameter of the callable of a ``LazyCall`` node, or under an empty dict (a mapping
    that is filled freely, such as ``model.detector.backbone.arch_overrides``)."""
    node = tree
    for part in parts:
        if not isinstance(node, dict):
            return False  # below a value
        if part in node:
            node = node[part]
            continue
        if not node:
            return True
        if "_target_" not in node:
            return False
        target = _lazy_target(node)
        params = None if target is None else _parameters(target)
        return params is None or part in params  # below an unwritten parameter: not checked
    return True


def _lazy_keys(tree: Any, prefix: str = "") -> List[str]:
    """Every dotted key of ``tree`` (sections and values) and the parameters of its LazyCall nodes."""
    if not isinstance(tree, dict):
        return []
    names = set(tree) - {"_target_"}
    if "_target_" in tree:
        target = _lazy_target(tree)
        names |= (_parameters(target) or set()) if target is not None else set()
    out = []
    for name in sorted(names):
        out.append(prefix + name)
        out.extend(_lazy_keys(tree.get(name), f"{prefix}{name}."))
    return out


def _yacs_keys(cfg: CN, prefix: str = "") -> List[str]:
    out = []
    for name, value in cfg.items():
        out.append(prefix + name)
        if isinstance(value, CN):
            out.extend(_yacs_keys(value, f"{prefix}{name}."))
    return out


def _nearest_keys(key: str, known: Sequence[str]) -> List[str]:
    """The known keys nearest to ``key``: a misspelt name among its section's names first, then
    the whole key among all keys (a name in the wrong section)."""
    parts, known_set = key.split("."), set(known)
    i = len(parts) - 1
    while i > 0 and ".".join(parts[:i]) not in known_set:
        i -= 1
    prefix = ".".join(parts[:i]) + "." if i else ""
    names = {k[len(prefix):] for k in known if k.startswith(prefix) and "." not in k[len(prefix):]}
    close = [prefix + n for n in difflib.get_close_matches(parts[i], names, n=3, cutoff=0.6)]
    rest = ".".join(parts[i + 1:])
    close = [f"{c}.{rest}" if rest and f"{c}.{rest}" in known_set else c for c in close]
    return (close or difflib.get_close_matches(key, known, n=3, cutoff=0.8)
            or [k for k in known if k.rsplit(".", 1)[-1] == parts[-1]][:3])  # the same name elsewhere


def _unknown_keys_message(unknown: Sequence[str], known: Sequence[str], path: str, lazy: bool = True) -> str:
    lines = [f"Unknown config key{'s' if len(unknown) > 1 else ''} on the command line for {path}:"]
    for key in unknown:
        close = _nearest_keys(key, known)
        lines.append(f"  {key}: " + (f"did you mean {' or '.join(close)}?" if close else "no similar key."))
    if lazy:
        lines.append(
            "A key must be written in the config (configs/common/*.py declare the project's keys with "
            "their defaults) or be an argument of the callable its LazyCall section builds. To add a "
            f"genuinely new key, prefix it with '+': +{unknown[0]}=VALUE.")
    else:
        lines.append("yacs keys are those of get_cfg() and add_dinov2od_config (dinov2od.d2.config.KEYS); "
                     "a new key is added in code (a row of KEYS), not on the command line.")
    return "\n".join(lines)


def check_lazy_overrides(cfg, overrides: Sequence[str], path: str = "the config") -> None:
    """Refuse ``key=value`` overrides whose key the lazy config ``cfg`` does not know, naming each
    and the nearest known keys; ``+key=value`` adds a key on purpose and is not checked.

    Raises:
        UnknownKeyError: (a ``KeyError``) with the unknown keys and suggestions.
    """
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=False)
    keys = [_override_key(str(o)) for o in overrides if "=" in str(o)]
    unknown = [k for k in keys if not k.startswith(("+", "~")) and not _is_known(tree, k.split("."))]
    if unknown:
        raise UnknownKeyError(_unknown_keys_message(unknown, _lazy_keys(tree), path))


def _epochs(value) -> float:
    """``train.epochs`` / ``SOLVER.MAX_EPOCHS`` as a number; None, 0 and "None" (as an override
    types it) are 0, off."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return 0
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        raise ValueError(f"train.epochs / SOLVER.MAX_EPOCHS must be a number of epochs, got {value!r}") from None


def _schedule_origin(cfg, typed: Sequence[str], path: str):
    """Settle which of the iterations and the epochs sets the schedule: what the command line gives
    wins over the config file (an explicit max_iter turns the file's epochs off); both on the
    command line is an error. Returns a function that, once the epochs are converted, gives the
    one log line that says which set it (None when the config has no schedule)."""
    lazy = is_lazy(cfg)
    if lazy and "train" not in cfg:
        return None
    it_key, ep_key = ("train.max_iter", "train.epochs") if lazy else ("SOLVER.MAX_ITER", "SOLVER.MAX_EPOCHS")

    def fmt(key, value):
        return f"{key}={value}" if lazy else f"{key} {value}"

    def values():
        if lazy:
            return cfg.train.get("max_iter", None), _epochs(cfg.train.get("epochs", None))
        return cfg.SOLVER.MAX_ITER, _epochs(cfg.SOLVER.MAX_EPOCHS)

    max_iter, epochs = values()
    typed_iter, typed_epochs = it_key in typed, ep_key in typed
    if typed_iter and typed_epochs and epochs > 0:
        raise ValueError(
            f"{fmt(it_key, max_iter)} and {fmt(ep_key, epochs)} are both on the command line: give one, "
            f"{it_key} for a number of iterations or {ep_key} for passes over the training set "
            f"({fmt(ep_key, 0)} turns the epochs off).")
    if typed_iter:
        if epochs > 0:  # the file's epochs would overwrite what the user typed
            if lazy:
                cfg.train.epochs = None
            else:
                cfg.SOLVER.MAX_EPOCHS = 0
            return lambda: (f"schedule: {fmt(it_key, max_iter)} from the command line "
                            f"({fmt(ep_key, epochs)} from {path} not used)")
        return lambda: f"schedule: {fmt(it_key, max_iter)} from the command line"
    if epochs > 0:
        where = "the command line" if typed_epochs else path
        return lambda: (f"schedule: {fmt(ep_key, epochs)} from {where} sets {fmt(it_key, values()[0])} "
                        f"({fmt(it_key, max_iter)} from {path} not used)")
    return lambda: f"schedule: {fmt(it_key, max_iter)} from {path}"


def is_lazy(cfg) -> bool:
    """Whether ``cfg`` is a lazy config (else yacs)."""
    return not isinstance(cfg, CN)


def _dataset_options(cfg) -> Dict[str, Any]:
    if is_lazy(cfg):
        d = cfg.get("dataset", None) or {}
        opts = {k: d.get(k, None) for k in ("root", "name", "train_json", "train_images", "val_json", "val_images")}
        opts["check"] = d.get("check", True)
        opts["check_images"] = d.get("check_images", "decode")
        opts["format"] = d.get("format", "auto")
        return opts
    d = cfg.DATASETS
    return {"root": d.ROOT, "name": d.NAME, "train_json": d.TRAIN_JSON, "train_images": d.TRAIN_IMAGES,
            "val_json": d.TEST_JSON, "val_images": d.TEST_IMAGES, "check": d.CHECK,
            "check_images": d.get("CHECK_IMAGES", "decode"), "format": d.get("FORMAT", "auto")}


def dataset_names(cfg) -> Dict[str, List[str]]:
    """{"train": [...], "test": [...]} dataset names a config trains and evaluates on."""
    if not is_lazy(cfg):
        return {"train": list(cfg.DATASETS.TRAIN), "test": list(cfg.DATASETS.TEST)}
    out = {}
    for split in ("train", "test"):
        loader = cfg.get("dataloader", {}).get(split, None)
        names = loader.dataset.get("names", None) if loader is not None and "dataset" in loader else None
        out[split] = [] if names is None else [names] if isinstance(names, str) else list(names)
    return out


def check_config_datasets(cfg, splits: Sequence[str] = ("train", "test")) -> List[str]:
    """:func:`check_datasets` and the class-count check for the datasets of ``splits`` of a config
    (lazy or yacs), before its model is built; returns their names."""
    names = [n for split in splits for n in dataset_names(cfg)[split]]
    check_datasets(names)
    check_num_classes(cfg.model.num_classes if is_lazy(cfg) else cfg.MODEL.DINOV2OD.NUM_CLASSES, names)
    if "train" in splits:  # training: object sizes at the input size, a suggested size (main process, once)
        from .datasets.sizes import advise_input_size

        advise_input_size(cfg, dataset_names(cfg)["train"])
    return names


def resolve_dataset(cfg) -> None:
    """Complete ``cfg`` from its data, in place, before anything is built.

    * ``dataset.root`` / ``DATASETS.ROOT`` (or the explicit json + images keys): register the splits
      (:func:`~dinov2od.d2.datasets.register_coco_folder`), train on ``<name>_train`` and evaluate
      on ``<name>_val``; ``num_classes`` comes from the data when unset (lazy None, yacs 0).
    * every dataset the config names must be registered (else an error with the fix), and its class
      count must equal ``num_classes`` (else an error naming both numbers).
    * ``train.epochs`` / ``SOLVER.MAX_EPOCHS`` > 0: iterations from the training images with boxes
      (``ceil(epochs * images / (batch * accumulate_steps))``); yacs ``STEPS`` are scaled with
      ``MAX_ITER``. Each derived value is logged.
    """
    from .datasets.folder import check_mode, register_coco_folder

    opts = _dataset_options(cfg)
    lazy = is_lazy(cfg)
    if opts["root"] or opts["train_json"]:
        names = register_coco_folder(
            opts["root"] or None, opts["name"] or "custom", opts["train_json"] or None, opts["train_images"] or None,
            opts["val_json"] or None, opts["val_images"] or None,
            check=check_mode(opts["check_images"], "dataset.check_images / DATASETS.CHECK_IMAGES")
            if opts["check"] else False,
            format=opts["format"],
        )
        test = [names["val"]] if "val" in names else []
        if not test:
            logger.warning("No validation split found: evaluation is turned off (give dataset.val_json).")
        if lazy:
            cfg.dataloader.train.dataset.names = names["train"]
            if "test" in cfg.dataloader:
                cfg.dataloader.test.dataset.names = test[0] if test else names["train"]
            if not test:
                cfg.dataloader.evaluator = None
        else:
            cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (names["train"],), tuple(test)
        classes = dataset_classes(names["train"])
        num_classes = cfg.model.get("num_classes", None) if lazy else cfg.MODEL.DINOV2OD.NUM_CLASSES
        if not num_classes:  # lazy None / yacs 0: from the data
            if lazy:
                cfg.model.num_classes = len(classes)
            else:
                cfg.MODEL.DINOV2OD.NUM_CLASSES = len(classes)
            logger.info("num_classes=%d from %s: %s", len(classes), names["train"], classes)
    _check_registered_and_classes(cfg)
    _epochs_to_iterations(cfg)


def _check_registered_and_classes(cfg) -> None:
    lazy = is_lazy(cfg)
    num_classes = cfg.get("model", {}).get("num_classes", None) if lazy else cfg.MODEL.DINOV2OD.NUM_CLASSES
    registered = set(DatasetCatalog.list())
    all_names = dataset_names(cfg)
    if not all_names["train"] and not all_names["test"]:
        raise ValueError(
            "The config names no dataset. For your own COCO data set "
            + ("dataset.root=FOLDER" if lazy else "DATASETS.ROOT FOLDER") + " (see docs/your_data.md)."
        )
    for split, names in all_names.items():
        for name in names:
            if name not in registered:
                key = "dataloader.%s.dataset.names" % split if lazy else "DATASETS.%s" % split.upper()
                raise KeyError(
                    f"Dataset {name!r} ({key}) is not registered. For your own COCO data set "
                    + ("dataset.root=FOLDER (or dataset.train_json=... dataset.train_images=...)" if lazy else
                       "DATASETS.ROOT FOLDER (or DATASETS.TRAIN_JSON / TRAIN_IMAGES): a yacs config cannot run "
                       "Python to register it")
                    + "; see docs/your_data.md."
                )
            classes = dataset_classes(name)
            if isinstance(num_classes, int) and classes is not None and len(classes) != num_classes:
                raise _num_classes_error(name, classes, num_classes)


def _epochs_to_iterations(cfg) -> None:
    from .datasets.folder import check_coco_dataset

    lazy = is_lazy(cfg)
    epochs = _epochs(cfg.get("train", {}).get("epochs", None) if lazy else cfg.SOLVER.MAX_EPOCHS)
    if epochs <= 0:
        return
    names = dataset_names(cfg)["train"]
    images = 0
    for name in names:
        meta = MetadataCatalog.get(name)
        if not meta.get("json_file", None):
            raise ValueError(f"train.epochs / SOLVER.MAX_EPOCHS needs the size of {name!r}, which names no json_file.")
        json_file = meta.get("dinov2od_source_json", meta.json_file)  # the user's file (errors name it)
        images += check_coco_dataset(json_file, meta.image_root, check_files=False).num_images_with_boxes
    if lazy:
        batch, accumulate = cfg.dataloader.train.total_batch_size, cfg.train.get("accumulate_steps", 1)
    else:
        batch, accumulate = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.ACCUMULATE_STEPS
    max_iter = max(1, math.ceil(epochs * images / (batch * accumulate)))
    how = f"{epochs} epochs x {images} training images with boxes / ({batch} images x {accumulate} accumulation)"
    if lazy:
        cfg.train.max_iter = max_iter
        logger.info("train.max_iter=%d: %s", max_iter, how)
        return
    old = cfg.SOLVER.MAX_ITER
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = tuple(max(1, round(s * max_iter / old)) for s in cfg.SOLVER.STEPS if s < old)
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max_iter // 10)
    logger.info("SOLVER.MAX_ITER=%d: %s; STEPS scaled to %s", max_iter, how, cfg.SOLVER.STEPS)
