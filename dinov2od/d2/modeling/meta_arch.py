"""The Detectron2 meta-architecture: Detectron2 inputs/outputs around ``DINOv2ObjectDetector``.

One class serves both config styles: ``@configurable`` + :meth:`DINOv2DETR.from_config`
builds it from a yacs ``cfg`` (``DefaultPredictor``, ``DefaultTrainer``), and the keyword
``__init__`` is what a lazy config's ``LazyCall(DINOv2DETR)(...)`` calls.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from dinov2od.layers import IMAGENET_MEAN, IMAGENET_STD, box_xyxy_to_cxcywh
from dinov2od.modeling import topk_detections

__all__ = ["DINOv2DETR", "padding_masks"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN_RGB = tuple(255.0 * m for m in IMAGENET_MEAN)  # 0-255 space (Detectron2's convention)
IMAGENET_STD_RGB = tuple(255.0 * s for s in IMAGENET_STD)


def padding_masks(image_sizes: Sequence[Sequence[int]], padded_hw: Sequence[int], device) -> Tensor:
    """Padding masks of a batch padded at the bottom/right.

    Args:
        image_sizes: per image (h, w) before padding.
        padded_hw: (H, W) of the padded batch.
        device: device of the result.

    Returns:
        (B, H, W) bool, True at padded pixels.
    """
    hw = _sizes_tensor(image_sizes, device)  # (B, 2)
    ys = torch.arange(padded_hw[0], device=device)[None, :, None]
    xs = torch.arange(padded_hw[1], device=device)[None, None, :]
    return (ys >= hw[:, 0, None, None]) | (xs >= hw[:, 1, None, None])


def _sizes_tensor(image_sizes: Sequence[Sequence[int]], device) -> Tensor:
    """Per-image (h, w) -> (B, 2) int64; the sizes stay graph values while tracing (ONNX export)."""
    return torch.stack([torch.stack([torch.as_tensor(h), torch.as_tensor(w)]) for h, w in image_sizes]).to(device)


def _warn_unless_imagenet_statistics(mean, std, input_format: str) -> None:
    """DINOv2 was trained on ImageNet-normalized RGB: say so when a yacs config normalizes otherwise."""
    order = slice(None) if input_format == "RGB" else slice(None, None, -1)
    expected = (list(IMAGENET_MEAN_RGB)[order], list(IMAGENET_STD_RGB)[order])
    if all(abs(a - b) < 1e-3 for a, b in zip([*mean, *std], [*expected[0], *expected[1]])):
        return
    logger.warning(
        "cfg.MODEL.PIXEL_MEAN=%s / PIXEL_STD=%s are not the ImageNet statistics DINOv2 was trained "
        "with (%s / %s in %s order). Merge configs/yaml/Base-DINOv2DETR.yaml (or a YAML based on it) "
        "unless this is intended.", list(mean), list(std), expected[0], expected[1], input_format,
    )


@META_ARCH_REGISTRY.register()
class DINOv2DETR(nn.Module):
    """DINOv2 + LoRA + deformable DETR as a Detectron2 meta-architecture.

    Input: ``list[dict]`` from a Detectron2 data loader, each with ``image`` (3, H, W) in
    ``input_format`` (0-255), optional ``height``/``width`` (output size) and, in training,
    ``instances`` with ``gt_boxes`` (XYXY_ABS) and ``gt_classes``.

    Output: in training, a dict of weighted losses; at inference, ``list[dict]`` with
    ``instances``: ``Instances(pred_boxes, scores, pred_classes)`` in the output size.
    """

    @configurable
    def __init__(
        self,
        *,
        detector: nn.Module,
        criterion: nn.Module,
        num_classes: int,
        pixel_mean: Sequence[float] = IMAGENET_MEAN_RGB,
        pixel_std: Sequence[float] = IMAGENET_STD_RGB,
        input_format: str = "RGB",
        size_divisibility: int = 14,
        test_topk: int = 100,
    ):
        """
        Args:
            detector: ``DINOv2ObjectDetector``: ``(images (B,3,H,W), masks (B,H,W)) -> dict``.
            criterion: ``SetCriterion`` returning unweighted losses, with ``weight_of(key)``
                (every loss's weight). Its ``num_aux_layers=None`` is set here to the detector's
                decoder layers - 1.
            num_classes: number of foreground classes (must match detector and dataset).
            pixel_mean, pixel_std: per-channel normalization in 0-255 space, in
                ``input_format`` order (Detectron2 convention).
            input_format: "RGB" or "BGR"; the model always sees RGB.
            size_divisibility: pad batches to a multiple of this (the ViT patch size).
            test_topk: detections kept per image, top-k over queries x classes.
        """
        super().__init__()
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"input_format must be 'RGB' or 'BGR', got {input_format!r}.")
        for name, mod in (("detector", detector), ("criterion", criterion)):
            n = getattr(mod, "num_classes", num_classes)
            if n != num_classes:
                raise ValueError(
                    f"The {name} has num_classes={n} but the meta-architecture has "
                    f"num_classes={num_classes}; set num_classes in one place in the config."
                )
        if getattr(criterion, "num_aux_layers", 0) is None:  # derived from the decoder's layers
            criterion.list_weights(getattr(detector, "num_aux_outputs", None), criterion.two_stage)
        self.detector = detector
        self.criterion = criterion
        self.num_classes = num_classes
        self.input_format = input_format
        self.size_divisibility = size_divisibility
        self.test_topk = test_topk
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        from ..config import build_criterion_from_cfg, build_detector_from_cfg

        _warn_unless_imagenet_statistics(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT)
        return {
            "detector": build_detector_from_cfg(cfg),
            "criterion": build_criterion_from_cfg(cfg),
            "num_classes": cfg.MODEL.DINOV2OD.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "input_format": cfg.INPUT.FORMAT,
            "size_divisibility": cfg.MODEL.DINOV2OD.SIZE_DIVISIBILITY,
            "test_topk": cfg.MODEL.DINOV2OD.TEST_TOPK,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]):
        """Normalize, convert to RGB and pad a batch.

        Returns:
            images: ImageList of (B, 3, H, W) ImageNet-normalized RGB, zero-padded.
            masks: (B, H, W) bool, True at padding.
        """
        images = []
        for x in batched_inputs:
            img = x["image"]
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"Expected an image tensor of shape (3, H, W) in {self.input_format}, got "
                    f"{tuple(img.shape)} for {x.get('file_name', 'an input')}; convert grayscale/RGBA "
                    "images to 3 channels (the dataset mapper does this)."
                )
            img = (img.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std
            images.append(img.flip(0) if self.input_format == "BGR" else img)  # (3, h, w) RGB
        images = ImageList.from_tensors(images, self.size_divisibility, pad_value=0.0)
        masks = padding_masks(images.image_sizes, images.tensor.shape[-2:], self.device)
        return images, masks

    def prepare_targets(self, batched_inputs: List[dict], image_sizes) -> List[Dict[str, Tensor]]:
        """Detectron2 instances -> criterion targets (labels, normalized cxcywh boxes, and the
        file name, which the criterion's class-id check names)."""
        targets = []
        for x, (h, w) in zip(batched_inputs, image_sizes):
            inst = x["instances"].to(self.device)
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(inst.gt_boxes.tensor.float() / scale)  # (n, 4)
            target = {"labels": inst.gt_classes.long(), "boxes": boxes}
            if "file_name" in x:
                target["name"] = x["file_name"]
            targets.append(target)
        return targets

    def weighted_losses(self, losses: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Multiply each loss by its weight, as the criterion resolves it (``criterion.weight_of``);
        losses weighted 0 are left out."""
        out = {}
        for k, v in losses.items():
            if not k.startswith("loss"):
                continue  # statistics such as class_error are not optimized
            w = self.criterion.weight_of(k)
            if w != 0:
                out[k] = v * w
        return out

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: Detectron2 inputs (see the class docstring).

        Returns:
            training: dict of weighted scalar losses.
            inference: list of ``{"instances": Instances}`` in the output size.
        """
        images, masks = self.preprocess_image(batched_inputs)
        targets = self.prepare_targets(batched_inputs, images.image_sizes) if self.training else None
        outputs = self.detector(images.tensor, masks, normalized=True, targets=targets)  # targets: denoising
        if self.training:
            return self.weighted_losses(self.criterion(outputs, targets))
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        processed = []
        for res, x, (h, w) in zip(results, batched_inputs, images.image_sizes):
            out_h, out_w = x.get("height", h), x.get("width", w)
            processed.append({"instances": detector_postprocess(res, out_h, out_w)})
        return processed

    def inference(self, logits: Tensor, boxes: Tensor, image_sizes) -> List[Instances]:
        """Top-k over queries x classes per image.

        Args:
            logits: (B, Q, C) sigmoid logits.
            boxes: (B, Q, 4) normalized cxcywh relative to each unpadded image.
            image_sizes: per image (h, w) after the mapper's resize.

        Returns:
            list of Instances in the (h, w) of each image.
        """
        sizes = _sizes_tensor(image_sizes, boxes.device)
        boxes_xyxy, scores, labels = topk_detections(logits, boxes, sizes, self.test_topk)
        results = []
        for i, (h, w) in enumerate(image_sizes):
            inst = Instances((h, w))
            inst.pred_boxes = Boxes(boxes_xyxy[i])  # (k, 4) absolute
            inst.scores = scores[i]
            inst.pred_classes = labels[i]
            results.append(inst)
        return results
