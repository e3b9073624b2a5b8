"""The yacs keys of dinov2od (``add_dinov2od_config``), one row of :data:`KEYS` each, next to the
lazy-config field it mirrors, and :func:`model_arguments`, which reads the model's rows.

Usage::

    cfg = get_cfg()
    add_dinov2od_config(cfg)                                  # adds keys, changes no stock value
    cfg.merge_from_file("configs/yaml/shapes.yaml")           # _BASE_: Base-DINOv2DETR.yaml
    predictor = DefaultPredictor(cfg)

``add_dinov2od_config`` only *adds* keys: every key Detectron2 defines keeps its default and its
meaning (``get_cfg()`` + a stock meta-architecture work as before). The project's own choices for
Detectron2's keys (``META_ARCHITECTURE``, ``PIXEL_MEAN``/``PIXEL_STD``, ``INPUT.FORMAT``, the
solver, the crop) are in ``configs/yaml/Base-DINOv2DETR.yaml``.

The model's rows (:data:`MODEL_KEYS`) name a yacs key and the lazy field it mirrors, no value: their
defaults are the declared ones (:func:`~.model.model_defaults`: the dataclasses of
:mod:`dinov2od.modeling`), converted to what yacs can hold (None as ``""``, ``[]`` or 0, tuples as
lists). :func:`model_arguments` turns a yacs config into the same argument tree as the lazy model
config; adding a model option is adding one row (``tests/d2/test_config_keys.py`` walks the lazy
model config: every option leaf needs a row). ``num_aux_layers`` has none: ``DINOv2DETR`` derives
it from the decoder layers in both styles. ``MODEL.DINOV2OD.PRESET`` names a preset of
:data:`dinov2od.modeling.PRESETS` (``configs/yaml/Base-DINOv2DETR-efficient.yaml``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterable, List, Tuple

from detectron2.config import CfgNode as CN

from .model import model_defaults, preset_changes

__all__ = ["MODEL_KEYS", "add_dinov2od_config", "model_arguments", "resolve_preset"]  # and KEYS, built on first use


def _or_none(value):
    """"" or [] in yacs (which has no None) -> None ("not set")."""
    return None if value in ("", [], ()) else value


def _positive_or_none(value):
    """0 in yacs (which has no None) -> None ("off")."""
    return value if value > 0 else None


class Conversion:
    """How a model value is held in yacs and read back: ``conversion(yacs_value)`` -> the model's
    value; ``conversion.to_yacs(model_value)`` -> the yacs value (for the defaults)."""

    def __init__(self, to_model: Callable, to_yacs: Callable):
        self.to_model, self.to_yacs = to_model, to_yacs

    def __call__(self, value):
        return self.to_model(value)


NONE_IS_EMPTY_STR = Conversion(_or_none, lambda v: "" if v is None else v)
NONE_IS_EMPTY_LIST = Conversion(_or_none, lambda v: [] if v is None else list(v))
NONE_IS_ZERO = Conversion(_positive_or_none, lambda v: 0 if v is None else v)
TUPLE = Conversion(tuple, list)
MAPPING = Conversion(dict, lambda v: CN(dict(v or {}), new_allowed=True))

# (yacs key, the lazy-config field(s) it mirrors[, conversion]); the default comes from the declaration
MODEL_KEYS: List[tuple] = [
    ("MODEL.DINOV2OD.NUM_CLASSES", "model.num_classes"),
    ("MODEL.DINOV2OD.SIZE_DIVISIBILITY", "model.size_divisibility"),
    ("MODEL.DINOV2OD.TEST_TOPK", "model.test_topk"),  # detections per image (queries x classes)
    # a family of dinov2od.modeling.BACKBONES: "dinov2" | "dinov3" | one registered with @register_backbone;
    # SIZE_DIVISIBILITY: the family's patch (BACKBONES[family].default_patch_size: 14, DINOv3 16)
    ("MODEL.DINOV2OD.BACKBONE.FAMILY", "model.detector.backbone.family"),
    # one of BACKBONES[FAMILY].archs (dinov2: tiny | small | base | large | giant;
    # dinov3: tiny | small | small_plus | base | large | huge_plus | 7b)
    ("MODEL.DINOV2OD.BACKBONE.ARCH", "model.detector.backbone.arch"),
    ("MODEL.DINOV2OD.BACKBONE.REGISTERS", "model.detector.backbone.registers"),  # dinov2 only
    ("MODEL.DINOV2OD.BACKBONE.PRETRAINED", "model.detector.backbone.pretrained", NONE_IS_EMPTY_STR),  # "": random init
    ("MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES", "model.detector.backbone.arch_overrides", MAPPING),
    # []: evenly spaced
    ("MODEL.DINOV2OD.BACKBONE.OUT_INDICES", "model.detector.backbone.out_indices", NONE_IS_EMPTY_LIST),
    ("MODEL.DINOV2OD.BACKBONE.NUM_TAPS", "model.detector.backbone.num_taps"),
    ("MODEL.DINOV2OD.BACKBONE.LORA_RANK", "model.detector.backbone.lora_rank"),
    ("MODEL.DINOV2OD.BACKBONE.LORA_ALPHA", "model.detector.backbone.lora_alpha"),
    ("MODEL.DINOV2OD.BACKBONE.LORA_DROPOUT", "model.detector.backbone.lora_dropout"),
    ("MODEL.DINOV2OD.BACKBONE.LORA_TARGETS", "model.detector.backbone.lora_targets", TUPLE),
    # []: every block
    ("MODEL.DINOV2OD.BACKBONE.LORA_BLOCKS", "model.detector.backbone.lora_blocks", NONE_IS_EMPTY_LIST),
    ("MODEL.DINOV2OD.BACKBONE.FREEZE", "model.detector.backbone.freeze"),
    ("MODEL.DINOV2OD.BACKBONE.DROP_PATH_RATE", "model.detector.backbone.drop_path_rate"),
    # the ViT's final LayerNorm on every tapped output
    ("MODEL.DINOV2OD.BACKBONE.APPLY_LAYERNORM", "model.detector.backbone.apply_layernorm"),
    # windowed attention: patches per window side (0: global attention in every block) ...
    ("MODEL.DINOV2OD.BACKBONE.WINDOW_SIZE", "model.detector.backbone.window_size", NONE_IS_ZERO),
    # ... in these blocks ([]: every block that is not tapped)
    ("MODEL.DINOV2OD.BACKBONE.WINDOW_BLOCKS", "model.detector.backbone.window_blocks", NONE_IS_EMPTY_LIST),
    # dinov2, random-init ViT only: "sincos" | "random"
    ("MODEL.DINOV2OD.BACKBONE.POS_EMBED_INIT", "model.detector.backbone.pos_embed_init"),
    # dinov2: resizing the position embeddings to another grid, "meta" (Meta's dinov2) | "transformers"
    ("MODEL.DINOV2OD.BACKBONE.POS_INTERPOLATION", "model.detector.backbone.pos_interpolation"),
    # dinov3: the released RoPE coordinate augmentation in training mode
    ("MODEL.DINOV2OD.BACKBONE.ROPE_TRAIN_AUGMENT", "model.detector.backbone.rope_train_augment"),
    ("MODEL.DINOV2OD.HIDDEN_DIM", "model.detector.hidden_dim"),
    ("MODEL.DINOV2OD.SCALE_FACTORS", "model.detector.scale_factors", TUPLE),
    ("MODEL.DINOV2OD.NUM_QUERIES", "model.detector.num_queries"),
    ("MODEL.DINOV2OD.DEC_LAYERS", "model.detector.num_decoder_layers"),
    ("MODEL.DINOV2OD.ENC_LAYERS", "model.detector.num_encoder_layers"),
    ("MODEL.DINOV2OD.NHEADS", "model.detector.num_heads"),
    ("MODEL.DINOV2OD.NUM_POINTS", "model.detector.num_points"),
    ("MODEL.DINOV2OD.DIM_FEEDFORWARD", "model.detector.dim_feedforward"),
    ("MODEL.DINOV2OD.DROPOUT", "model.detector.dropout"),
    ("MODEL.DINOV2OD.CROSS_ATTN", "model.detector.cross_attn"),
    ("MODEL.DINOV2OD.BOX_REFINE", "model.detector.box_refine"),
    ("MODEL.DINOV2OD.TWO_STAGE", "model.detector.two_stage"),
    ("MODEL.DINOV2OD.TWO_STAGE_NMS", "model.detector.two_stage_nms"),  # > 0: IoU of NMS in query selection
    ("MODEL.DINOV2OD.GROUP_DETR", "model.detector.group_detr"),
    ("MODEL.DINOV2OD.PRIOR_PROB", "model.detector.prior_prob"),  # initial foreground probability
    ("MODEL.DINOV2OD.SPATIAL_PRIOR", "model.detector.spatial_prior"),  # > 0: width of a conv stem
    # training-only queries (inference unchanged): contrastive denoising, H-DETR's one-to-many
    ("MODEL.DINOV2OD.DN.GROUPS", "model.detector.dn_groups"),  # > 0: fixed number of groups
    ("MODEL.DINOV2OD.DN.QUERIES", "model.detector.dn_queries"),  # > 0: DINO's budget instead
    ("MODEL.DINOV2OD.DN.LABEL_NOISE", "model.detector.dn_label_noise"),
    ("MODEL.DINOV2OD.DN.BOX_NOISE", "model.detector.dn_box_noise"),
    ("MODEL.DINOV2OD.O2M_QUERIES", "model.detector.o2m_queries"),
    ("MODEL.DINOV2OD.LOSS.CLASS_WEIGHT", "model.criterion.weight_dict.loss_class"),
    ("MODEL.DINOV2OD.LOSS.BBOX_WEIGHT", "model.criterion.weight_dict.loss_bbox"),
    ("MODEL.DINOV2OD.LOSS.GIOU_WEIGHT", "model.criterion.weight_dict.loss_giou"),
    ("MODEL.DINOV2OD.LOSS.FOCAL_ALPHA", ("model.criterion.focal_alpha", "model.criterion.matcher.focal_alpha")),
    ("MODEL.DINOV2OD.LOSS.FOCAL_GAMMA", ("model.criterion.focal_gamma", "model.criterion.matcher.focal_gamma")),
    ("MODEL.DINOV2OD.LOSS.CLASS_LOSS", "model.criterion.class_loss"),  # or "quality_focal"
    ("MODEL.DINOV2OD.LOSS.ENC_LOSS", "model.criterion.enc_loss"),  # two-stage: or "dense"
    ("MODEL.DINOV2OD.LOSS.DENSE_TOPK", "model.criterion.dense_topk"),
    ("MODEL.DINOV2OD.LOSS.DENSE_ALPHA", "model.criterion.dense_alpha"),  # score exponent of the assignment
    ("MODEL.DINOV2OD.LOSS.DENSE_BETA", "model.criterion.dense_beta"),  # IoU exponent of the assignment
    ("MODEL.DINOV2OD.LOSS.O2M_REPEATS", "model.criterion.o2m_repeats"),  # targets repeated for o2m queries
    ("MODEL.DINOV2OD.LOSS.O2M_WEIGHT", "model.criterion.o2m_weight"),
    ("MODEL.DINOV2OD.MATCHER.COST_CLASS", "model.criterion.matcher.cost_class"),
    ("MODEL.DINOV2OD.MATCHER.COST_BBOX", "model.criterion.matcher.cost_bbox"),
    ("MODEL.DINOV2OD.MATCHER.COST_GIOU", "model.criterion.matcher.cost_giou"),
]


def _lookup(tree: Dict[str, Any], path: str):
    for name in path.split("."):
        tree = tree[name]
    return tree


def _model_rows() -> List[tuple]:
    """:data:`MODEL_KEYS` with their defaults: the declared values (:func:`~.model.model_defaults`)
    converted to yacs."""
    defaults, rows = model_defaults(), []
    for key, target, *convert in MODEL_KEYS:
        targets = _targets(target)
        values = [_lookup(defaults, t[len("model."):]) for t in targets]
        if any(v != values[0] for v in values):
            raise ValueError(f"{key} mirrors {targets}, whose declared defaults differ: {values}")
        default = convert[0].to_yacs(values[0]) if convert else values[0]
        rows.append((key, default, target, *convert))
    return rows


# (yacs key, default, the lazy-config field it mirrors[, conversion of the yacs value]): the keys
# besides the model's options, with their defaults
OTHER_KEYS: List[tuple] = [
    # a preset of dinov2od.modeling.PRESETS ("efficient"); "": none (configs/common/models/<preset>.py in lazy)
    ("MODEL.DINOV2OD.PRESET", "", None),
    # --- training (configs/common/{train,optim,data}.py); read by dinov2od.d2.engine.settings.TrainSettings.from_yacs
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
    # the train set parsed once per machine, memory-mapped by every rank (dinov2od.d2.data.data_cache)
    ("DATALOADER.CACHE_DATASET", True, "dataloader.train.dataset.cache"),
    # "": $DINOV2OD_CACHE/datasets
    ("DATALOADER.CACHE_DIR", "", "dataloader.train.dataset.cache_dir", NONE_IS_EMPTY_STR),
    ("SOLVER.MAX_EPOCHS", 0, "train.epochs"),  # > 0: MAX_ITER (and STEPS, scaled) from the train set's size
    # --- your own COCO data (dinov2od.d2.data.datasets), registered by load_config ------------
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


@functools.lru_cache(maxsize=None)
def _keys() -> Tuple[tuple, ...]:
    return tuple(_model_rows() + OTHER_KEYS)


def __getattr__(name: str):
    # KEYS (every key add_dinov2od_config adds: (yacs key, default, lazy field[, conversion])) is built
    # on first use, not at import: the model's defaults include the meta-architecture's, and
    # dinov2od.d2.modeling imports this package
    if name == "KEYS":
        return list(_keys())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def add_dinov2od_config(cfg: CN) -> CN:
    """Add the keys of :data:`KEYS` that ``cfg`` lacks (in place); existing keys are left alone.

    Returns:
        ``cfg``.
    """
    for key, default, *_ in _keys():
        *parents, leaf = key.split(".")
        node = cfg
        for name in parents:
            if name not in node:
                node[name] = CN()
            node = node[name]
        if leaf not in node:
            node[leaf] = default.clone() if isinstance(default, CN) else default
    return cfg


def _targets(target) -> tuple:
    """A row's lazy field(s): None, one path, or several."""
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _set(tree: Dict[str, Any], path: str, value) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (yacs reads lists as tuples)
    return norm(a) == norm(b)


def resolve_preset(cfg: CN, explicit: Iterable[str]) -> Dict[str, Any]:
    """Write ``MODEL.DINOV2OD.PRESET``'s values into ``cfg``'s keys, in place, except the keys in
    ``explicit`` (those the config files or the command line set: they win over the preset, even when
    their value is the base default), then clear ``PRESET`` so that :func:`model_arguments` does not
    apply it again. Returns the keys set, with their values."""
    preset = cfg.MODEL.DINOV2OD.get("PRESET", "")
    if not preset:
        return {}
    changes = preset_changes(preset, "MODEL.DINOV2OD.PRESET")
    explicit, written = set(explicit), {}
    for key, _default, target, *convert in _keys():
        hits = [t for t in _targets(target) if t in changes]
        if not hits or key in explicit:
            continue
        value = changes[hits[0]]
        value = convert[0].to_yacs(value) if convert else list(value) if isinstance(value, tuple) else value
        _set(cfg, key, value)
        written[key] = value
    cfg.MODEL.DINOV2OD.PRESET = ""
    return written


def model_arguments(cfg: CN) -> Dict[str, Any]:
    """The ``model.`` rows of :data:`KEYS` read from ``cfg``, as the lazy model config's tree.

    ``MODEL.DINOV2OD.PRESET`` (e.g. ``"efficient"``) sets its preset's values on the keys that
    ``cfg`` leaves at their defaults; a key set to another value wins over the preset. (Configs read by
    ``load_config``, as every tool does, have the preset resolved already by :func:`resolve_preset`,
    which knows what the files and the command line set, so a key typed at its base default wins too.)

    Returns:
        e.g. ``{"num_classes": 3, "detector": {"hidden_dim": 128, "backbone": {...}}, "criterion": {...}}``.
    """
    preset = cfg.MODEL.DINOV2OD.get("PRESET", "")
    changes = preset_changes(preset, "MODEL.DINOV2OD.PRESET") if preset else {}
    tree: Dict[str, Any] = {}
    for key, default, target, *convert in _keys():
        targets = _targets(target)
        if not targets or not targets[0].startswith("model."):
            continue
        value = cfg
        for name in key.split("."):
            value = value[name]
        at_default = _same(value, default)
        value = convert[0](value) if convert else value
        for t in targets:
            _set(tree, t[len("model."):], changes[t] if t in changes and at_default else value)
    return tree
