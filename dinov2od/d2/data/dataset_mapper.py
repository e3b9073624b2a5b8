"""A DETR-style dataset mapper on top of Detectron2's :class:`DatasetMapper`.

Differences from Detectron2's mapper:

* DETR's training augmentation (random flip; with probability 0.5 a resize followed by a
  random crop; then a multi-scale shortest-edge resize), built from
  ``detectron2.data.transforms`` by :func:`build_detr_augmentation`.
* Input checks with clear errors or warnings instead of crashes deep in the model:

  - an image file that cannot be decoded -> ``ValueError`` naming the file;
  - grayscale, palette or RGBA images -> converted to the configured 3-channel format;
  - 16-bit (and 32-bit integer) grayscale images -> scaled to 8 bits (:func:`read_image`; PIL's
    own conversion clips every value above 255, which makes a 16-bit PNG all white);
  - an image with no annotations -> an empty ``Instances`` (the loss handles it);
  - a box with zero or negative width/height -> skipped with a warning naming the file.

  Class ids are checked once, by the loss (``SetCriterion``), whose error names the file.
"""
from __future__ import annotations

import copy
import logging
from typing import List

import numpy as np
import torch

import detectron2.data.transforms as T
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils

__all__ = ["DetrDatasetMapper", "build_detr_augmentation", "read_image"]

logger = logging.getLogger(__name__)

# PIL modes of grayscale images with more than 8 bits per pixel, and their full-scale value
_WIDE_GRAY_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def read_image(file_name: str, format: str = "RGB") -> np.ndarray:
    """Detectron2's ``read_image`` (EXIF orientation, conversion to ``format``) that also reads
    16-bit grayscale images: their values are scaled to 0-255 (``v * 255 / 65535``). A 32-bit integer
    (``I``) image is scaled the same way when its values fit in 16 bits, else by its own maximum;
    a float (``F``) image is taken as 0-1 when its maximum is at most 1, else as 0-255 (clipped).

    Args:
        file_name: the image file.
        format: "RGB", "BGR" or another PIL mode (as Detectron2's).

    Returns:
        (H, W, C) uint8 in ``format``.
    """
    from PIL import Image

    with open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()
    image = utils._apply_exif_orientation(image)
    if image.mode in _WIDE_GRAY_MODES or image.mode in ("I", "F"):
        a = np.asarray(image).astype(np.float64)
        if image.mode == "F":
            full = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        elif image.mode == "I":
            full = 65535.0 if a.size == 0 or a.max() <= 65535 else float(a.max())
        else:
            full = float(_WIDE_GRAY_MODES[image.mode])
        a = np.clip(np.nan_to_num(a) * (255.0 / full), 0, 255)
        image = Image.fromarray(np.rint(a).astype(np.uint8), mode="L")
    return utils.convert_PIL_to_numpy(image, format)


def build_detr_augmentation(
    is_train: bool,
    min_size_train=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
    max_size_train: int = 1333,
    crop_resize=(400, 500, 600),
    crop_size=(384, 600),
    min_size_test: int = 800,
    max_size_test: int = 1333,
    random_flip: str = "horizontal",
) -> List[T.Augmentation]:
    """DETR's augmentation as a list of Detectron2 augmentations.

    Args:
        is_train: training (random) or test (deterministic resize) augmentation.
        min_size_train: shortest-edge choices of the final training resize.
        max_size_train: longest-edge limit of the training resize.
        crop_resize: shortest-edge choices of the resize before the random crop; an empty
            tuple disables the crop branch.
        crop_size: (min, max) side of the random crop in pixels ("absolute_range").
        min_size_test: shortest edge at test time; 0 keeps the image size.
        max_size_test: longest-edge limit at test time.
        random_flip: "horizontal", "vertical" or "none".

    Returns:
        list of :class:`detectron2.data.transforms.Augmentation`.
    """
    if not is_train:
        return [T.ResizeShortestEdge(min_size_test, max_size_test)] if min_size_test > 0 else []
    augs: List[T.Augmentation] = []
    if random_flip != "none":
        augs.append(
            T.RandomFlip(horizontal=random_flip == "horizontal", vertical=random_flip == "vertical")
        )
    if crop_resize:
        crop = T.AugmentationList(
            [
                T.ResizeShortestEdge(list(crop_resize), sample_style="choice"),
                T.RandomCrop("absolute_range", tuple(crop_size)),
            ]
        )
        augs.append(T.RandomApply(crop, prob=0.5))
    augs.append(T.ResizeShortestEdge(list(min_size_train), max_size_train, sample_style="choice"))
    return augs


class DetrDatasetMapper(DatasetMapper):
    """Map a Detectron2 dataset dict to the model's input, with DETR augmentation and checks.

    Output dict keys: ``image`` (3, H, W) uint8 tensor in ``image_format``, ``height``,
    ``width`` (the original size, used to rescale predictions), ``instances`` (training:
    ``gt_boxes`` XYXY_ABS in the augmented image, ``gt_classes`` int64).
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List[T.Augmentation],
        image_format: str = "RGB",
    ):
        """
        Args:
            is_train: whether annotations are kept (training) or dropped (inference).
            augmentations: Detectron2 augmentations applied in order.
            image_format: "RGB" or "BGR" (what the model's ``input_format`` expects).
        """
        super().__init__(is_train, augmentations=augmentations, image_format=image_format)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        if is_train:
            augs = build_detr_augmentation(
                True,
                min_size_train=cfg.INPUT.MIN_SIZE_TRAIN,
                max_size_train=cfg.INPUT.MAX_SIZE_TRAIN,
                crop_resize=cfg.INPUT.CROP.SIZE_RESIZE if cfg.INPUT.CROP.ENABLED else (),
                crop_size=cfg.INPUT.CROP.SIZE,
                random_flip=cfg.INPUT.RANDOM_FLIP,
            )
        else:
            augs = build_detr_augmentation(
                False, min_size_test=cfg.INPUT.MIN_SIZE_TEST, max_size_test=cfg.INPUT.MAX_SIZE_TEST
            )
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
        }

    def _read_image(self, dataset_dict: dict) -> np.ndarray:
        """Decode the image; a file that cannot be decoded raises an error naming it."""
        file_name = dataset_dict["file_name"]
        try:
            image = read_image(file_name, format=self.image_format)
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
            raise ValueError(
                f"Cannot decode image file {file_name!r} ({type(e).__name__}: {e}). "
                "Re-encode it as JPEG/PNG or remove it from the dataset's annotation file."
            ) from e
        utils.check_image_size(dataset_dict, image)
        return image

    def _check_annotations(self, dataset_dict: dict) -> None:
        """Drop zero-area boxes (with a warning)."""
        file_name = dataset_dict["file_name"]
        kept = []
        for anno in dataset_dict.get("annotations", []):
            box = utils.BoxMode.convert(list(anno["bbox"])[:4], anno["bbox_mode"], utils.BoxMode.XYXY_ABS)
            if not (box[2] > box[0] and box[3] > box[1]) or not np.all(np.isfinite(box)):
                logger.warning("Skipping a degenerate box %s (zero or negative area) in %s", anno["bbox"], file_name)
                continue
            kept.append(anno)
        dataset_dict["annotations"] = kept

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: one image's dict in Detectron2's dataset format.

        Returns:
            dict with ``image`` (3, H, W) uint8 tensor, ``height``, ``width`` and, in
            training, ``instances``.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = self._read_image(dataset_dict)  # (H, W, 3)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]  # (h, w) after augmentation
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        self._check_annotations(dataset_dict)
        self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
