"""Your own COCO-format data: find the splits in a folder, register them with their classes known at
once, and check the files before training.

Layouts :func:`find_coco_splits` recognises under a root folder:

* Roboflow's / RF-DETR's COCO export: ``train/``, ``valid/`` (or ``val/``), ``test/``, each holding
  its images and ``_annotations.coco.json``;
* COCO's own: ``annotations/instances_<split>*.json`` with images in ``<split>*/`` (e.g.
  ``annotations/instances_train2017.json`` + ``train2017/``), ``<split>`` one of train, val, test.

An explicit json + image folder per split needs no layout (:func:`register_coco_folder`'s
``train_json`` / ``train_images`` / ``val_json`` / ``val_images``).

Registration reads the json's ``categories`` right away and fills the dataset's metadata
(``thing_classes``, ``thing_dataset_id_to_contiguous_id``, the same values Detectron2's
``load_coco_json`` sets later), so the class count is known, and checked against the model, before
anything is built. :func:`check_coco_dataset` reads the whole json and every image's header once:
missing or undecodable files, sizes that differ from the json, unknown image or category ids and
malformed boxes are reported together, naming the files, before training starts.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = [
    "CocoSummary",
    "DatasetError",
    "check_coco_dataset",
    "find_coco_splits",
    "read_coco_categories",
    "register_coco_dataset",
    "register_coco_folder",
]

logger = logging.getLogger("dinov2od")

ROBOFLOW_JSON = "_annotations.coco.json"
SPLIT_ALIASES = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
SKIP_CHECK_HINT = (
    "or skip this check (e.g. on a large dataset you have checked before): dataset.check=False "
    "(lazy configs) / DATASETS.CHECK False (yacs)."
)


class DatasetError(ValueError):
    """A dataset's files or annotations cannot be trained on; the message names them and the fix."""


def _read_json(json_file: str) -> dict:
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"COCO json {json_file!r} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(
            f"COCO json {json_file!r} cannot be read as JSON ({e}); is the file empty or truncated? "
            "Export the annotations again."
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"COCO json {json_file!r} has no 'images' list; it is not a COCO instances file.")
    if not data.get("categories"):
        raise DatasetError(
            f"COCO json {json_file!r} has no 'categories': a detector needs the list of classes "
            "(e.g. [{\"id\": 1, \"name\": \"cat\"}, ...])."
        )
    return data


def _categories(data: dict, json_file: str) -> Tuple[List[str], List[int]]:
    cats = sorted(data["categories"], key=lambda c: c["id"])  # Detectron2's load_coco_json order
    ids = [int(c["id"]) for c in cats]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"COCO json {json_file!r} lists a category id twice: {ids}.")
    return [str(c["name"]) for c in cats], ids


def read_coco_categories(json_file: str) -> Tuple[List[str], List[int]]:
    """``(names, ids)`` of a COCO json's categories, in Detectron2's contiguous order (by id)."""
    return _categories(_read_json(json_file), json_file)


def register_coco_dataset(name: str, json_file: str, image_root: str, check: bool = True) -> None:
    """Register a COCO-format detection dataset (Detectron2's ``register_coco_instances``) with its
    classes in the metadata at once, so the class count is checked before the model is built.

    Args:
        name: dataset name to use in configs, e.g. ``"my_train"``.
        json_file: COCO instances json (``images``, ``annotations``, ``categories``).
        image_root: folder the json's ``file_name`` entries are relative to.
        check: training runs :func:`check_coco_dataset` on it before it starts (metadata
            ``dinov2od_check``).
    """
    names, ids = read_coco_categories(json_file)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("json_file", None) == json_file and meta.get("image_root", None) == image_root:
            return  # the same registration again (e.g. the config loaded twice)
        raise ValueError(
            f"Dataset {name!r} is already registered with {meta.get('json_file', '?')}; "
            f"pick another name for {json_file}."
        )
    register_coco_instances(name, {}, json_file, image_root)
    MetadataCatalog.get(name).set(
        thing_classes=names,
        thing_dataset_id_to_contiguous_id={d: i for i, d in enumerate(ids)},
        dinov2od_check=check,
    )


def _split_of(folder_name: str) -> Optional[str]:
    low = folder_name.lower()
    for split, aliases in SPLIT_ALIASES.items():
        if low in aliases:
            return split
    return None


def find_coco_splits(root: str) -> Dict[str, Tuple[str, str]]:
    """The COCO splits under ``root``: ``{"train": (json_file, image_root), "val": ..., "test": ...}``.

    Raises:
        FileNotFoundError: ``root`` does not exist, or holds neither layout (the message shows both).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Dataset folder {root!r} does not exist.")
    splits: Dict[str, Tuple[str, str]] = {}
    for entry in sorted(os.listdir(root)):  # Roboflow / RF-DETR: <split>/_annotations.coco.json
        split, folder = _split_of(entry), os.path.join(root, entry)
        if split and split not in splits and os.path.isfile(os.path.join(folder, ROBOFLOW_JSON)):
            splits[split] = (os.path.join(folder, ROBOFLOW_JSON), folder)
    ann_dir = os.path.join(root, "annotations")
    if not splits and os.path.isdir(ann_dir):  # COCO: annotations/instances_<split>*.json + <split>*/
        for fname in sorted(os.listdir(ann_dir)):
            m = re.fullmatch(r"instances_((train|val|test)\w*)\.json", fname)
            if not m or m.group(2) in splits:
                continue
            for image_dir in (m.group(1), m.group(2)):
                if os.path.isdir(os.path.join(root, image_dir)):
                    splits[m.group(2)] = (os.path.join(ann_dir, fname), os.path.join(root, image_dir))
                    break
    if "train" not in splits:
        raise FileNotFoundError(
            f"No COCO training split found in {root!r}. Expected one of:\n"
            f"  {root}/train/{ROBOFLOW_JSON} (+ valid/, test/)   Roboflow / RF-DETR export\n"
            f"  {root}/annotations/instances_train*.json + {root}/train*/   COCO's layout\n"
            "or give the files explicitly: dataset.train_json=... dataset.train_images=... (lazy) / "
            "DATASETS.TRAIN_JSON, DATASETS.TRAIN_IMAGES (yacs)."
        )
    return splits


def register_coco_folder(
    root: Optional[str] = None,
    name: str = "custom",
    train_json: Optional[str] = None,
    train_images: Optional[str] = None,
    val_json: Optional[str] = None,
    val_images: Optional[str] = None,
    check: bool = True,
) -> Dict[str, str]:
    """Register the splits of a dataset folder (or of explicit json + image folder pairs).

    Args:
        root: folder in one of the layouts of :func:`find_coco_splits`.
        name: prefix of the registered names (``<name>_train``, ``<name>_val``, ``<name>_test``).
        train_json, train_images, val_json, val_images: explicit files; they take precedence over
            what ``root`` holds. ``*_images`` defaults to the json's folder.
        check: see :func:`register_coco_dataset`.

    Returns:
        ``{"train": "<name>_train", "val": ...}`` for the splits found; "val" falls back to the
        test split when there is no validation split.
    """
    splits = find_coco_splits(root) if root else {}
    for split, json_file, images in (("train", train_json, train_images), ("val", val_json, val_images)):
        if json_file:
            splits[split] = (json_file, images or os.path.dirname(os.path.abspath(json_file)))
    if "train" not in splits:
        raise ValueError("Give a dataset folder (dataset.root / DATASETS.ROOT) or a training json (train_json).")
    names = {}
    for split, (json_file, image_root) in splits.items():
        names[split] = f"{name}_{split}"
        register_coco_dataset(names[split], os.path.abspath(json_file), os.path.abspath(image_root), check)
    if "val" not in names and "test" in names:
        names["val"] = names["test"]
    if names.get("val") and read_coco_categories(splits["train"][0]) != read_coco_categories(
        MetadataCatalog.get(names["val"]).json_file
    ):
        raise DatasetError(
            f"The training split ({splits['train'][0]}) and the evaluation split "
            f"({MetadataCatalog.get(names['val']).json_file}) list different categories; export them together."
        )
    return names


# ---------------------------------------------------------------------------- the start-up check
@dataclass
class CocoSummary:
    """What :func:`check_coco_dataset` found."""

    json_file: str
    num_images: int = 0
    num_images_with_boxes: int = 0  # images with at least one usable (non-crowd, positive-area) box
    num_boxes: int = 0
    num_degenerate: int = 0  # boxes of zero or negative width/height (the mapper skips them)
    problems: List[str] = field(default_factory=list)


def _image_size(path: str) -> Tuple[int, int]:
    """(width, height) as Detectron2 will see the image: after EXIF orientation, from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block: Detectron2 ignores it as well
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_image(image_root: str, img: dict) -> Optional[str]:
    file_name = img.get("file_name")
    if not file_name:
        return f"image id {img.get('id')} has no file_name"
    path = os.path.join(image_root, file_name)
    if not os.path.isfile(path):
        return f"{file_name}: file not found under {image_root}"
    try:
        w, h = _image_size(path)
    except Exception as e:  # PIL raises several types for undecodable files
        return f"{file_name}: cannot be decoded as an image ({type(e).__name__}: {e})"
    jw, jh = img.get("width"), img.get("height")
    if jw is not None and jh is not None and (int(jw), int(jh)) != (w, h):
        return f"{file_name}: the json says {jw}x{jh} (width x height), the file is {w}x{h}"
    if min(w, h) < 14:
        return f"{file_name}: {w}x{h} px is smaller than one ViT patch (14-16 px)"
    return None


def check_coco_dataset(json_file: str, image_root: str, check_files: bool = True, threads: int = 8) -> CocoSummary:
    """Check a COCO detection dataset before training; raise one error listing every problem.

    Checked: the json parses and has images and categories; every image file exists, decodes its
    header, is at least one patch in size and has the json's width and height; every annotation
    names a known image and a known category and has a box of four finite numbers. Boxes of zero
    or negative size are counted and reported as a warning (training skips them).

    Args:
        json_file, image_root: as registered.
        check_files: also open every image file's header (threads in parallel).

    Raises:
        DatasetError: naming the json, the first problems (with their count) and the fix.
    """
    data = _read_json(json_file)
    _, cat_ids = _categories(data, json_file)
    summary = CocoSummary(json_file=json_file, num_images=len(data["images"]))
    problems = summary.problems
    image_ids = {img.get("id") for img in data["images"]}
    known_cats = set(cat_ids)
    with_boxes = set()
    for ann in data.get("annotations", []):
        where = f"annotation id {ann.get('id')} (image id {ann.get('image_id')})"
        if ann.get("image_id") not in image_ids:
            problems.append(f"{where}: no image has this id")
            continue
        if ann.get("category_id") not in known_cats:
            problems.append(f"{where}: category_id {ann.get('category_id')} is not in 'categories' {sorted(known_cats)}")
            continue
        box = ann.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in box
        ):
            problems.append(f"{where}: bbox {box!r} is not four finite numbers [x, y, width, height]")
            continue
        if box[2] <= 0 or box[3] <= 0:
            summary.num_degenerate += 1
            continue
        summary.num_boxes += 1
        if not ann.get("iscrowd", 0):
            with_boxes.add(ann["image_id"])
    summary.num_images_with_boxes = len(with_boxes)
    if check_files:
        with ThreadPoolExecutor(threads) as pool:
            problems.extend(p for p in pool.map(lambda im: _check_image(image_root, im), data["images"]) if p)
    if problems:
        shown = "\n  - ".join(problems[:12])
        more = f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise DatasetError(
            f"{json_file}: {len(problems)} problem(s) found before training:\n  - {shown}{more}\n"
            f"Fix the files or the json, {SKIP_CHECK_HINT}"
        )
    if summary.num_degenerate:
        logger.warning(
            "%s: %d box(es) of zero or negative width/height; training skips them.", json_file, summary.num_degenerate
        )
    return summary
