"""YOLO and Pascal VOC datasets, read into COCO form so that one registration, one start-up check
and one evaluator (Detectron2's ``COCOEvaluator``) serve every format.

:func:`find_dataset_splits` finds the splits of a folder in any layout (``format="auto"``, the
default, looks at the folder; ``"coco"``, ``"yolo"``, ``"voc"`` force one). For a YOLO or VOC
folder each split is read into a COCO dict in memory (:func:`~dinov2od.d2.data.datasets.yolo.read_yolo`,
:func:`~dinov2od.d2.data.datasets.voc.read_voc`), written
once as a json into the dataset cache (``$DINOV2OD_CACHE/datasets/json/``, never beside the user's
files; the name holds a hash of the content) and registered like a COCO json. The images are the
user's files, read where they are.

Ids the user sees (predictions, checkpoints, ``coco_instances_results.json``):

* YOLO: the class indices of the label files, 0..K-1, with data.yaml's ``names``;
* VOC: 0..K-1 in the sorted order of the ``<name>`` tags of every XML file in ``Annotations/``.

What the readers decide (docs/your_data.md, "YOLO and Pascal VOC"):

* YOLO: a missing or empty label file is an image without objects; a segment line (``class x1 y1
  x2 y2 ...``) is read as its bounding box; a line that is neither, a class index outside
  ``names``, or coordinates that are not normalised is an error naming the file and the line.
* VOC: boxes follow Detectron2's ``load_voc_instances`` (VOC's 1-based inclusive pixel indices:
  ``xmin - 1, ymin - 1, xmax, ymax``); ``difficult`` objects are ``iscrowd: 1`` boxes, ignored by
  training and ignore regions in COCO evaluation, as VOC's own evaluation ignores them; splits from
  ``ImageSets/Main`` (with a ``test.txt``: train on ``trainval``, evaluate on ``test``, VOC 2007's
  protocol; else ``train`` / ``val``); without ``ImageSets/Main``, a fixed split by a hash of each
  file name (about 1 image in 5 for validation).

Problems found while reading (a line or XML that cannot be read, an unknown class, a missing
label/annotation file) are one :class:`~dinov2od.d2.data.datasets.folder.DatasetError` listing them
all, as the start-up check does; the check itself then runs on the converted json, and its
messages name the label file and line or the XML file and object of each box.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from .check import _image_size
from .folder import (
    ROBOFLOW_JSON,
    find_coco_splits,
    write_cache_json,
)

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "check_format",
    "detect_format",
    "find_dataset_splits",
    "read_dataset",
]

FORMATS = ("auto", "coco", "yolo", "voc")
# the image files a YOLO split folder is searched for (Ultralytics' list, the common part)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo")
NO_SKIP_HINT = "Fix the files: a line or file that cannot be read cannot be trained on."

Splits = Dict[str, Tuple[dict, str]]  # split -> (COCO dict, image root its file_names are relative to)


def check_format(fmt: Optional[str]) -> str:
    """``fmt`` lower-cased, ``"auto"`` for None / ""; a ValueError naming the choices otherwise."""
    value = "auto" if fmt in (None, "") else str(fmt).lower()
    if value not in FORMATS:
        raise ValueError(
            f"dataset.format / DATASETS.FORMAT must be one of {list(FORMATS)} (auto: from the folder), got {fmt!r}."
        )
    return value


def _rel(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel


def _read_sizes(paths: Sequence[str]) -> List[object]:
    """(width, height) after EXIF rotation of each file (its header only), or the exception."""

    def one(path):
        try:
            return _image_size(path, decode=False)
        except Exception as e:  # noqa: BLE001  (PIL raises several types)
            return e

    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 4)) as pool:
        return list(pool.map(one, paths))


def _categories(names: Sequence[str]) -> List[dict]:
    # no "supercategory": the Roboflow dataset-category rule (folder.roboflow_supercategory) never applies
    return [{"id": i, "name": n} for i, n in enumerate(names)]


# ---------------------------------------------------------------------------- any format
def detect_format(root: str) -> str:
    """``"coco"``, ``"yolo"`` or ``"voc"``: the layout of ``root`` (in that order when several
    match); FileNotFoundError listing every layout looked for when none does."""
    from .voc import _is_voc  # the readers import this module's helpers
    from .yolo import find_yolo_yaml

    if not os.path.isdir(root):
        raise FileNotFoundError(f"Dataset folder {root!r} does not exist.")
    try:
        find_coco_splits(root)
        return "coco"
    except FileNotFoundError:
        pass
    if find_yolo_yaml(root):
        return "yolo"
    if _is_voc(root):
        return "voc"
    raise FileNotFoundError(
        f"{root!r} is not a dataset folder in a layout read here. Looked for:\n"
        f"  COCO (Roboflow / RF-DETR export): {root}/train/{ROBOFLOW_JSON} (+ valid/, test/)\n"
        f"  COCO (COCO's layout): {root}/annotations/instances_train*.json + {root}/train*/\n"
        f"  YOLO: {root}/data.yaml (names + train/val paths; or data.yml, dataset.yaml) with images/ and "
        "labels/ side by side (train/images + train/labels, or images/train + labels/train)\n"
        f"  Pascal VOC: {root}/Annotations/*.xml + {root}/JPEGImages/ (+ ImageSets/Main/*.txt)\n"
        "or give the files: dataset.train_json=... dataset.train_images=... (lazy) / DATASETS.TRAIN_JSON, "
        "DATASETS.TRAIN_IMAGES (yacs); dataset.format=coco|yolo|voc (DATASETS.FORMAT) forces a layout."
    )


def read_dataset(root: str, fmt: str = "auto") -> Tuple[str, Splits]:
    """``(format, {split: (coco_dict, image_root)})`` of a YOLO or VOC folder (``fmt`` "auto" detects
    it; a COCO folder is a ValueError: its json is read as it is)."""
    from .voc import _is_voc, read_voc  # the readers import this module's helpers
    from .yolo import read_yolo

    fmt = check_format(fmt)
    fmt = detect_format(root) if fmt == "auto" else fmt
    if fmt == "yolo":
        return fmt, read_yolo(root)
    if fmt == "voc":
        if not _is_voc(root):
            raise FileNotFoundError(
                f"{root!r} is not a Pascal VOC folder: expected {root}/Annotations/*.xml and {root}/JPEGImages/.")
        return fmt, read_voc(root)
    raise ValueError(f"{root!r} is a COCO dataset already (its jsons are read as they are).")


def find_dataset_splits(root: str, fmt: str = "auto") -> Dict[str, Tuple[str, str]]:
    """``{split: (json_file, image_root)}`` of a dataset folder in any format: a COCO folder's own
    jsons (:func:`~dinov2od.d2.data.datasets.folder.find_coco_splits`), or, for YOLO / VOC, the cached
    json of each converted split (the same content is written once)."""
    fmt = check_format(fmt)
    if fmt == "coco" or (fmt == "auto" and detect_format(root) == "coco"):
        return find_coco_splits(root)
    fmt, splits = read_dataset(root, fmt)
    label = os.path.basename(os.path.normpath(os.path.abspath(root))) or "dataset"
    out = {}
    for split, (data, image_root) in splits.items():
        text = json.dumps(data, sort_keys=True)
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
        out[split] = (write_cache_json(data, f"{fmt}-{label}-{split}-{digest}.json", text), image_root)
    return out
