"""Drawing predictions with Detectron2's :class:`Visualizer`, and a predictor for lazy configs."""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.utils.visualizer import Visualizer

from .engine import unwrap_model
from .training import eval_context

__all__ = ["LazyPredictor", "draw_dataset_predictions", "draw_instances", "instances_to_coco_json"]


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


def instances_to_coco_json(instances, image_id, metadata=None) -> List[dict]:
    """Detections of one image as COCO result dicts.

    Args:
        instances: Instances with pred_boxes (XYXY_ABS), scores, pred_classes.
        image_id: the ``image_id`` written into each result.
        metadata: optional Detectron2 metadata; with ``thing_dataset_id_to_contiguous_id`` the
            dataset's own category ids are written, with ``thing_classes`` a ``category_name``.

    Returns:
        list of dicts with ``image_id``, ``category_id``, ``bbox`` (XYWH pixels), ``score``.
    """
    instances = instances.to("cpu")
    boxes = instances.pred_boxes.tensor.numpy().copy()  # (n, 4) XYXY
    boxes[:, 2:] -= boxes[:, :2]
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", None) if metadata is not None else None
    reverse = {v: k for k, v in id_map.items()} if id_map else {}
    names = metadata.get("thing_classes", None) if metadata is not None else None
    out = []
    for box, score, cls in zip(boxes.tolist(), instances.scores.tolist(), instances.pred_classes.tolist()):
        r = {"image_id": image_id, "category_id": int(reverse.get(cls, cls)), "bbox": box, "score": float(score)}
        if names:
            r["category_name"] = names[cls]
        out.append(r)
    return out


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


class LazyPredictor:
    """Like Detectron2's ``DefaultPredictor``, for a lazy config.

    Builds ``cfg.model``, loads ``checkpoint`` (its EMA weights when present and
    ``use_ema``), and applies the test loader's resize.
    """

    def __init__(self, cfg, checkpoint: str, device: Optional[str] = None, use_ema: bool = True):
        from .engine import ModelEMA

        self.model = instantiate(cfg.model).to(device or cfg.train.device).eval()
        ema = ModelEMA(self.model)
        DetectionCheckpointer(self.model, ema=ema).load(checkpoint)
        if use_ema and ema.num_updates > 0:  # the checkpoint holds EMA weights
            with torch.no_grad():
                params = dict(self.model.named_parameters())
                params.update(dict(self.model.named_buffers()))
                for k, v in ema.shadow.items():
                    params[k].copy_(v)
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
