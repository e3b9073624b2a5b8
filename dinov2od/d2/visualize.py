"""Drawing predictions with Detectron2's :class:`Visualizer`."""
from __future__ import annotations

import os
from typing import List

import numpy as np
import torch

from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.visualizer import Visualizer

from .evaluation import eval_context
from .train_loop import unwrap_model

__all__ = ["draw_dataset_predictions", "draw_instances"]


def draw_instances(image_rgb: np.ndarray, instances, metadata, score_threshold: float) -> np.ndarray:
    """Draw the detections scoring at least ``score_threshold``.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image.
        instances: Instances with pred_boxes, scores, pred_classes in image coordinates.
        metadata: Detectron2 metadata with ``thing_classes``.
        score_threshold: minimum score drawn.

    Returns:
        (H, W, 3) uint8 RGB drawing.
    """
    instances = instances.to("cpu")
    instances = instances[instances.scores >= score_threshold]
    vis = Visualizer(image_rgb, metadata)
    return vis.draw_instance_predictions(instances).get_image()


@torch.no_grad()
def draw_dataset_predictions(
    model,
    test_loader_cfg,
    out_dir: str,
    num_images: int = 8,
    score_threshold: float = 0.5,
    ema=None,
) -> List[str]:
    """Run the model on the first images of a test loader and save drawings.

    Args:
        model: the meta-architecture.
        test_loader_cfg: the lazy config of the test loader (``cfg.dataloader.test``).
        out_dir: folder for the ``.jpg`` drawings.
        num_images: how many images to draw.
        score_threshold: minimum score drawn.
        ema: a ModelEMA whose weights are used, or None.

    Returns:
        paths of the written images.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = test_loader_cfg.dataset.names
    metadata = MetadataCatalog.get(names if isinstance(names, str) else names[0])
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    paths = []
    with eval_context(ema):
        for batch in instantiate(test_loader_cfg):
            for inputs, outputs in zip(batch, model(batch)):
                if len(paths) >= num_images:
                    break
                image = utils.read_image(inputs["file_name"], format="RGB")
                drawing = draw_instances(image, outputs["instances"], metadata, score_threshold)
                path = os.path.join(out_dir, os.path.basename(inputs["file_name"]).rsplit(".", 1)[0] + ".jpg")
                _save(drawing, path)
                paths.append(path)
            if len(paths) >= num_images:
                break
    model.train(was_training)
    return paths


def _save(image_rgb: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(image_rgb).save(path)
