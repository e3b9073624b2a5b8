"""The tiny training set-ups: overrides of configs/shapes.py (lazy, ``TINY``) and
configs/yaml/shapes.yaml (yacs, ``TINY_YACS``) that make a model and data tiny enough for CPU tests,
and tiny yacs models (Detectron2's ``build_model``, or ``DINOv2DETR`` directly) with checkpoints.

Torch and Detectron2 are imported inside the functions: conftest.py imports this module before torch
may be loaded, and the lists are read where Detectron2 is missing.
"""
import os

from tests.helpers import ROOT

# Overrides of configs/shapes.py that make a model and data tiny enough for CPU tests.
# The tiny test model keeps the plain recipe (random init, trained in full, one-to-one queries
# only); the demo's pretrained + LoRA path and its denoising / one-to-many queries have their own
# tests (tests/d2/test_configs.py, test_model.py, test_model_card.py).
TINY = [
    "model.detector.backbone.pretrained=None",  # the demo's pretrained file is width 192
    "model.detector.backbone.freeze=False",
    "model.detector.backbone.lora_rank=0",
    "model.detector.dn_groups=0",
    "model.detector.o2m_queries=0",
    "model.detector.backbone.arch_overrides.hidden_size=48",
    "model.detector.backbone.arch_overrides.num_hidden_layers=2",
    "model.detector.backbone.arch_overrides.num_attention_heads=2",
    "model.detector.backbone.arch_overrides.intermediate_size=96",
    "model.detector.hidden_dim=32",
    "model.detector.num_queries=10",
    "model.detector.num_decoder_layers=2",
    "model.detector.dim_feedforward=64",
    "dataloader.train.dataset.names=shapes_tiny_train",
    "dataloader.test.dataset.names=shapes_tiny_val",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentations.min_size_train=[112,126]",
    "dataloader.test.mapper.augmentations.min_size_test=112",
    "train.visualize.num_images=0",
    "train.log_period=2",
    "train.eval_period=0",
]

# The same tiny model for the yacs route (configs/yaml/shapes.yaml).
TINY_YACS = [
    "MODEL.DINOV2OD.BACKBONE.PRETRAINED", "",  # the demo's pretrained file is width 192
    "MODEL.DINOV2OD.BACKBONE.FREEZE", "False", "MODEL.DINOV2OD.BACKBONE.LORA_RANK", "0",
    "MODEL.DINOV2OD.DN.GROUPS", "0", "MODEL.DINOV2OD.O2M_QUERIES", "0",
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.hidden_size", "48",
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.num_hidden_layers", "2",
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.num_attention_heads", "2",
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.intermediate_size", "96",
    "MODEL.DINOV2OD.HIDDEN_DIM", "32", "MODEL.DINOV2OD.NUM_QUERIES", "10",
    "MODEL.DINOV2OD.DEC_LAYERS", "2", "MODEL.DINOV2OD.DIM_FEEDFORWARD", "64",
    "DATASETS.TRAIN", "('shapes_tiny_train',)", "DATASETS.TEST", "('shapes_tiny_val',)",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(112,)", "INPUT.MIN_SIZE_TEST", "112",
]

YACS_YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")
# Classes of the tiny yacs model's own, registered nowhere: they can only come from its checkpoint / graph.
TINY_CLASSES = (["ring", "box", "wedge"], [7, 11, 42])


def build_tiny_yacs_model(opts=()):
    """The tiny model of TINY_YACS (configs/yaml/shapes.yaml) through Detectron2's build_model, in eval mode."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from dinov2od.d2 import add_dinov2od_config

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(YACS_YAML)
    cfg.merge_from_list([*[str(v) for v in TINY_YACS], *opts])
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).eval()


def save_d2_checkpoint(model, path):
    """``model``'s weights as Detectron2's checkpointer saves them, at ``path`` (a ``.pth`` name)."""
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.basename(path)[:-4])
    return path


# A 2-block, width-48 ViT and a 2-layer, 12-query decoder of width 32 (either backbone family).
TINY_SIZES_YACS = [
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.hidden_size", 48,
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.num_hidden_layers", 2,
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.num_attention_heads", 2,
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.intermediate_size", 96,
    "MODEL.DINOV2OD.HIDDEN_DIM", 32,
    "MODEL.DINOV2OD.NUM_QUERIES", 12,
    "MODEL.DINOV2OD.DEC_LAYERS", 2,
    "MODEL.DINOV2OD.DIM_FEEDFORWARD", 64,
]
# The plain recipe (as TINY_YACS), tiny, with 12 queries: the model of `tiny_model` (tests/d2/test_model.py).
TINY_MODEL_YACS = [
    "MODEL.DINOV2OD.BACKBONE.PRETRAINED", "",  # the demo's pretrained file is width 192
    "MODEL.DINOV2OD.BACKBONE.FREEZE", False, "MODEL.DINOV2OD.BACKBONE.LORA_RANK", 0,
    "MODEL.DINOV2OD.DN.GROUPS", 0, "MODEL.DINOV2OD.O2M_QUERIES", 0,
    *TINY_SIZES_YACS,
]


def tiny_yacs_cfg(**extra):
    """A yacs config: configs/yaml/shapes.yaml, TINY_MODEL_YACS, then ``extra`` ({key: value})."""
    from detectron2.config import get_cfg

    from dinov2od.d2 import add_dinov2od_config

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(YACS_YAML)
    cfg.merge_from_list(TINY_MODEL_YACS)
    for k, v in extra.items():
        cfg.merge_from_list([k, v])
    return cfg


def tiny_model(seed=0, **kw):
    """``DINOv2DETR`` of ``tiny_yacs_cfg()`` (seed ``seed``; ``kw``: its constructor overrides), in eval mode."""
    import torch

    from dinov2od.d2 import DINOv2DETR

    torch.manual_seed(seed)
    return DINOv2DETR(tiny_yacs_cfg(), **kw).eval()
