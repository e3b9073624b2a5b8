"""A user's own dataset, made the way a user's export looks and not with the project's generator.

Roboflow / RF-DETR layout (``train/``, ``valid/`` with ``_annotations.coco.json``), category ids
1, 5, 9 (not contiguous, not starting at 0), a third of the images in a sub-folder, grayscale,
RGBA and 16-bit grayscale PNGs next to JPEGs, and images without any box. Objects are filled
shapes drawn with PIL, one colour and form per class, so a briefly trained detector finds them.
"""
from __future__ import annotations

import json
import os
import random
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 1, "name": "apple"}, {"id": 5, "name": "brick"}, {"id": 9, "name": "kite"}]
COLOURS = {1: (230, 40, 40), 5: (40, 200, 60), 9: (60, 80, 240)}
SIZES = [(160, 120), (128, 160), (144, 144)]


def _draw(draw: ImageDraw.ImageDraw, cat: int, x: int, y: int, w: int, h: int) -> None:
    if cat == 1:
        draw.ellipse([x, y, x + w - 1, y + h - 1], fill=COLOURS[cat])
    elif cat == 5:
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=COLOURS[cat])
    else:
        draw.polygon([(x + w / 2, y), (x + w - 1, y + h - 1), (x, y + h - 1)], fill=COLOURS[cat])


def _save(img: Image.Image, path_no_ext: str, kind: int) -> str:
    """Save as JPEG (0), 8-bit grayscale PNG (1), RGBA PNG (2) or 16-bit grayscale PNG (3)."""
    if kind == 1:
        img = img.convert("L")
    elif kind == 2:
        img = img.convert("RGBA")
    elif kind == 3:
        wide = np.asarray(img.convert("L")).astype(np.uint16) * 257  # full 16-bit range
        img = Image.fromarray(wide)  # mode I;16
    ext = ".jpg" if kind == 0 else ".png"
    img.save(path_no_ext + ext)
    return ext


def write_split(folder: str, num_images: int, seed: int, empty_every: int = 7) -> Dict:
    """Write one split's images and ``_annotations.coco.json`` into ``folder``; return the json."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    images: List[dict] = []
    annotations: List[dict] = []
    for i in range(num_images):
        w, h = rng.choice(SIZES)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(30, 80) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        boxes = []
        if i % empty_every != empty_every - 1:  # every empty_every-th image has no object
            for _ in range(rng.randint(1, 2)):
                cat = rng.choice(CATEGORIES)["id"]
                bw, bh = rng.randint(36, 64), rng.randint(36, 64)
                x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
                _draw(draw, cat, x, y, bw, bh)
                boxes.append((cat, [x, y, bw, bh]))
        stem = f"{'sub/' if i % 3 == 0 else ''}img_{i:03d}"
        ext = _save(img, os.path.join(folder, stem), i % 4)
        image_id = 1000 + 3 * i  # ids that are not 0..N-1
        images.append({"id": image_id, "file_name": stem + ext, "width": w, "height": h})
        for cat, box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    with open(os.path.join(folder, "_annotations.coco.json"), "w") as f:
        json.dump(data, f)
    return data


def write_roboflow_dataset(root: str, num_train: int = 24, num_valid: int = 8) -> str:
    """A Roboflow-style export under ``root``; returns ``root``."""
    write_split(os.path.join(root, "train"), num_train, seed=1)
    write_split(os.path.join(root, "valid"), num_valid, seed=2)
    return root


def unique_dataset_name(prefix: str) -> str:
    """``prefix`` + the first number whose ``<name>_train`` is not registered yet (tests register
    datasets in one process, and Detectron2's catalog refuses a name twice)."""
    from detectron2.data import DatasetCatalog

    i = 0
    while f"{prefix}{i}_train" in DatasetCatalog.list():
        i += 1
    return f"{prefix}{i}"
