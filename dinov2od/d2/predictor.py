"""A ``DefaultPredictor`` for lazy configs (yacs configs use Detectron2's own)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.config import instantiate

from .checkpoint import load_inference_weights

__all__ = ["LazyPredictor"]


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
