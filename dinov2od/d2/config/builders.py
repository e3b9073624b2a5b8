"""The model's pieces and the optimizer built from a yacs config (``DINOv2DETR.from_config`` and
the trainer read them); lazy configs build the same pieces with ``instantiate``."""
from __future__ import annotations

import torch

from detectron2.config import CfgNode as CN
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from dinov2od.modeling import backbone_lr_decay

from .keys import model_arguments

__all__ = ["build_backbone_from_cfg", "build_criterion_from_cfg", "build_detector_from_cfg", "build_optimizer_from_cfg"]


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
