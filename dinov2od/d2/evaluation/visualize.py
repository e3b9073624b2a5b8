"""Drawing predictions with Detectron2's :class:`Visualizer`."""
from __future__ import annotations

import os
from typing import List

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.utils.visualizer import Visualizer

from ..data.dataset_mapper import read_image
from ..data.metadata import metadata_for_model, model_classes
from .evaluator import eval_context

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
        out_dir: folder for the ``.jpg`` drawings, named by each image's path relative to the
            dataset's ``image_root`` (else its base name) with ``.jpg`` appended (``a/x.png`` ->
            ``a/x.png.jpg``), so images of the same name do not overwrite each other.
        num_images: how many images to draw.
        score_threshold: minimum score drawn.
        ema: a ModelEMA whose weights are used, or None.

    The labels are the classes stored in the model (the training dataset's, see
    :mod:`dinov2od.d2.data.metadata`), else the test dataset's; images are read with
    :func:`~dinov2od.d2.data.dataset_mapper.read_image` (16-bit grayscale PNGs are not drawn white).

    Returns:
        paths of the written images.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = test_loader_cfg.dataset.names
    dataset_meta = MetadataCatalog.get(names if isinstance(names, str) else names[0])
    metadata = metadata_for_model(model) if model_classes(model) is not None else dataset_meta
    image_root = dataset_meta.get("image_root", None)
    model = model.module if isinstance(model, DistributedDataParallel) else model  # (evaluation sits below engine/)
    was_training = model.training
    model.eval()
    paths = []
    with eval_context(ema):
        for batch in instantiate(test_loader_cfg):
            for inputs, outputs in zip(batch, model(batch)):
                if len(paths) >= num_images:
                    break
                image = read_image(inputs["file_name"], format="RGB")
                drawing = draw_instances(image, outputs["instances"], metadata, score_threshold)
                path = os.path.join(out_dir, _drawing_name(inputs["file_name"], image_root))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                _save(drawing, path)
                paths.append(path)
            if len(paths) >= num_images:
                break
    model.train(was_training)
    return paths


def _drawing_name(file_name: str, image_root=None) -> str:
    """``file_name`` relative to ``image_root`` when inside it (else its base name), ``.jpg`` appended."""
    name = os.path.basename(file_name)
    if image_root:
        rel = os.path.relpath(os.path.abspath(file_name), os.path.abspath(image_root))
        if not rel.startswith(os.pardir + os.sep) and rel != os.pardir:
            name = rel
    return name + ".jpg"


def _save(image_rgb: np.ndarray, path: str) -> None:
    from PIL import Image

    Image.fromarray(image_rgb).save(path)
