"""A ``DefaultPredictor`` for lazy configs (yacs configs use Detectron2's own), and the config of a
trained model for prediction and export (:func:`load_inference_config`)."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.config import instantiate

from ..checkpoint.checkpointer import load_inference_weights
from ..config import backbone_option, is_lazy, load_config
from ..data.metadata import classes_in_checkpoint

__all__ = ["LazyPredictor", "load_inference_config"]

logger = logging.getLogger("dinov2od")


def load_inference_config(config_file: str, overrides: Sequence[str] = (), weights: Optional[str] = None):
    """The config to predict or export with: :func:`~dinov2od.d2.config.load_config` without the
    data (the classes come from the checkpoint), and, when the config leaves the class count to the
    data (lazy ``model.num_classes=None``, yacs ``NUM_CLASSES 0``: ``configs/custom.py``), the count
    stored in ``weights``.

    Raises:
        ValueError: the count is left to the data and ``weights`` holds no classes.
    """
    cfg = load_config(config_file, overrides, resolve_data=False)
    lazy = is_lazy(cfg)
    if weights:
        _backbone_from_weights(cfg, weights)
    key, example = ("model.num_classes", "model.num_classes=3") if lazy else (
        "MODEL.DINOV2OD.NUM_CLASSES", "MODEL.DINOV2OD.NUM_CLASSES 3")
    if (cfg.model.get("num_classes", None) if lazy else cfg.MODEL.DINOV2OD.NUM_CLASSES):
        return cfg
    classes = classes_in_checkpoint(weights) if weights else None
    if classes is None:
        raise ValueError(
            f"The config leaves {key} to the data, and {weights or 'no checkpoint'} holds no class names (saved "
            f"before dinov2od stored them, or none given): give the class count, e.g. {example}.")
    if lazy:
        cfg.model.num_classes = len(classes[0])
    else:
        cfg.MODEL.DINOV2OD.NUM_CLASSES = len(classes[0])
    logger.info("%s=%d from %s: %s", key, len(classes[0]), weights, classes[0])
    return cfg


def _backbone_from_weights(cfg, weights: str) -> None:
    """Build the backbone without its pretrained weights when they are a Hugging Face hub id that is not
    in the local cache and the architecture is named: ``weights`` holds every backbone tensor (the load
    refuses a file that does not fit the model exactly), so downloading them to overwrite them is not
    needed, and an offline machine predicts with a DINOv2 run's own config (``configs/custom.py``)."""
    from dinov2od.modeling.backbones.loading import cached_hub_folder, hub_id

    repo_id = hub_id(backbone_option(cfg, "pretrained"))
    if repo_id is None or not backbone_option(cfg, "arch") or cached_hub_folder(repo_id) is not None:
        return
    if is_lazy(cfg):
        cfg.model.detector.backbone.pretrained = None
    else:
        cfg.MODEL.DINOV2OD.BACKBONE.PRETRAINED = ""
    logger.info("The backbone's pretrained weights %r are not in the Hugging Face cache and not needed: "
                "every backbone tensor comes from %s.", repo_id, weights)


class LazyPredictor:
    """Like Detectron2's ``DefaultPredictor``, for a lazy config.

    Builds ``cfg.model``, loads ``checkpoint`` (its EMA weights when it holds them and
    ``use_ema``; a file that does not fit the model is refused: :func:`load_inference_weights`),
    and applies the test loader's resize. Takes one image in the model's
    ``input_format`` (``predictor.input_format``).
    """

    def __init__(self, cfg, checkpoint: str, device: Optional[str] = None, use_ema: bool = True):
        """
        Args:
            cfg: a lazy config with ``model`` and ``dataloader.test``.
            checkpoint: a training checkpoint or a weights file (e.g. ``model_final_ema.pth``).
            device: "cpu" or "cuda"; default ``cfg.train.device``.
            use_ema: use the checkpoint's EMA weights when it has them.
        """
        self.model = instantiate(cfg.model).to(device or cfg.train.device).eval()
        load_inference_weights(self.model, checkpoint, use_ema)
        augs = instantiate(cfg.dataloader.test.mapper.get("augmentations", []))
        self.aug = T.AugmentationList(list(augs))
        self.input_format = self.model.input_format

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> dict:
        """
        Args:
            image: (H, W, 3) uint8 in the model's ``input_format``.

        Returns:
            ``{"instances": Instances}`` in the image's coordinates.
        """
        h, w = image.shape[:2]
        aug_input = T.AugInput(image)
        self.aug(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        return self.model([{"image": tensor, "height": h, "width": w}])[0]
