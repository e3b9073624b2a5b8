"""Register the built-in shapes splits (``shapes_train``, ``shapes_val``) with Detectron2.

Registration is cheap (paths only); the images are generated into the cache folder the
first time a split is loaded or when :func:`register_shapes` is called with
``generate=True``. Evaluation uses the standard COCO route (``evaluator_type="coco"``,
``json_file`` in the metadata), exactly as :func:`register_coco_instances` sets it up.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.datasets import load_coco_json

from .shapes import SHAPES_CLASSES, SHAPES_SPLITS, default_shapes_root, ensure_shapes_split

__all__ = ["register_shapes", "subset_dataset_dicts"]


def register_shapes(
    root: Optional[str] = None,
    generate: bool = False,
    prefix: str = "shapes",
    num_images: Optional[Dict[str, int]] = None,
) -> None:
    """Register ``{prefix}_train`` and ``{prefix}_val`` (idempotent).

    Args:
        root: folder holding ``shapes/``; defaults to ``$DINOV2OD_DATASETS`` or ``./datasets``.
        generate: generate missing splits now instead of on first load.
        prefix: dataset name prefix (tests register small copies under other names).
        num_images: per split image count overriding the defaults, e.g. ``{"train": 16}``.
    """
    root = root or default_shapes_root()
    num_images = num_images or {}
    for split in SHAPES_SPLITS:
        name = f"{prefix}_{split}"
        if generate:
            ensure_shapes_split(split, root, num_images.get(split))
        if name in DatasetCatalog.list():
            continue
        image_root = os.path.join(root, "shapes", split)
        json_file = os.path.join(image_root, "annotations.json")

        def _load(split=split, name=name, root=root, n=num_images.get(split)):
            json_file, image_root = ensure_shapes_split(split, root, n)  # generate on first use
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, _load)
        MetadataCatalog.get(name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(SHAPES_CLASSES),
        )


def subset_dataset_dicts(names, num_images: int, filter_empty: bool = True) -> List[dict]:
    """The first ``num_images`` images of registered dataset(s), e.g. for overfitting checks.

    Args:
        names: a registered dataset name or a list of them.
        num_images: how many images to keep (in the dataset's order).
        filter_empty: drop images without annotations first.

    Returns:
        list of Detectron2 dataset dicts.
    """
    dicts = get_detection_dataset_dicts(names, filter_empty=filter_empty)
    if num_images > len(dicts):
        raise ValueError(f"Asked for {num_images} images but {names!r} has only {len(dicts)}.")
    return dicts[:num_images]
