"""YOLO folders read into COCO form (:func:`read_yolo`): a ``data.yaml`` naming the classes and the
splits' image folders, a label file per image; what the reader decides is in
:mod:`dinov2od.d2.data.datasets.formats`' docstring and docs/your_data.md."""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Tuple

from .folder import DatasetError, problems_error
from .formats import IMAGE_EXTENSIONS, NO_SKIP_HINT, Splits, _categories, _read_sizes, _rel

__all__ = ["find_yolo_yaml", "read_yolo", "yolo_label_file"]

logger = logging.getLogger("dinov2od")

YOLO_YAMLS = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
YOLO_SPLIT_KEYS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
# a YOLO coordinate beyond this is not normalised (pixels, most likely); slight overhangs are boxes
# beyond the image, which the start-up check reports
YOLO_MAX_COORD = 2.0


def find_yolo_yaml(root: str) -> Optional[str]:
    """The dataset yaml of a YOLO folder: data.yaml (or data.yml, dataset.yaml), else the one other
    ``*.yaml`` / ``*.yml`` in ``root`` that has ``names``; None if there is none."""
    for name in YOLO_YAMLS:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    if not os.path.isdir(root):
        return None
    import yaml

    found = []
    for name in sorted(os.listdir(root)):
        if name.lower().endswith((".yaml", ".yml")) and os.path.isfile(os.path.join(root, name)):
            try:
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    data = yaml.safe_load(f)
            except Exception:  # noqa: BLE001  (not ours to judge: another yaml)
                continue
            if isinstance(data, dict) and "names" in data:
                found.append(os.path.join(root, name))
    return found[0] if len(found) == 1 else None


def _yolo_names(data: dict, yaml_file: str) -> List[str]:
    names = data.get("names")
    if isinstance(names, list) and names:
        out = [str(n) for n in names]
    elif isinstance(names, dict) and names:
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            keys = None
        if keys != list(range(len(names))):
            raise DatasetError(
                f"{yaml_file}: 'names' as a mapping needs the class indices 0..{len(names) - 1} as keys "
                f"(e.g. {{0: cat, 1: dog}}), got {list(names)}."
            )
        out = [str(names[k] if k in names else names[str(k)]) for k in keys]
    else:
        raise DatasetError(
            f"{yaml_file}: no class names. A YOLO dataset yaml lists them as 'names: [cat, dog]' or "
            "'names: {0: cat, 1: dog}' (the class index of the label files is the position)."
        )
    nc = data.get("nc")
    if nc is not None and nc != len(out):
        raise DatasetError(f"{yaml_file}: nc: {nc} but 'names' has {len(out)} entries {out[:10]}; make them agree.")
    return out


def _yolo_base(data: dict, yaml_file: str) -> str:
    """The folder the yaml's split paths are relative to: ``path:`` (absolute, or relative to the
    yaml's folder) when it exists, else the yaml's folder (a dataset moved since it was written)."""
    here = os.path.dirname(os.path.abspath(yaml_file))
    path = data.get("path")
    if path:
        base = path if os.path.isabs(str(path)) else os.path.join(here, str(path))
        if os.path.isdir(base):
            return os.path.normpath(base)
        logger.info("%s: path: %s does not exist; the split paths are read relative to %s", yaml_file, path, here)
    return here


def _resolve(entry: str, base: str) -> str:
    """A split path of the yaml: relative to ``base``; a ``../`` that leads nowhere is dropped (what
    Ultralytics does for Roboflow's exports, which write ``train: ../train/images`` next to
    ``train/``)."""
    entry = os.path.expanduser(str(entry))
    path = os.path.normpath(entry if os.path.isabs(entry) else os.path.join(base, entry))
    while not os.path.exists(path) and entry.startswith("../"):
        entry = entry[3:]
        path = os.path.normpath(os.path.join(base, entry))
    return path


def _yolo_images(entries, base: str, yaml_file: str, key: str, problems: List[str]) -> List[str]:
    """Image files of one split entry: a folder (searched recursively), a .txt listing image paths
    (relative to the .txt's folder), or a list of those."""
    images: List[str] = []
    for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
        path = _resolve(entry, base)
        if os.path.isdir(path):
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                images += [os.path.join(folder, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(path) and path.lower().endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        p = line if os.path.isabs(line) else os.path.join(os.path.dirname(path), line)
                        if not os.path.exists(p) and not os.path.isabs(line):
                            p = os.path.join(base, line)
                        images.append(os.path.normpath(p))
        else:
            problems.append(f"{yaml_file}: {key}: {entry} -> {path} is neither a folder of images nor a .txt list")
    return images


def yolo_label_file(image: str) -> str:
    """Where YOLO keeps an image's labels: the last ``images`` folder of its path replaced by
    ``labels``, the extension by ``.txt`` (``train/images/a.jpg`` -> ``train/labels/a.txt``,
    ``images/train/a.jpg`` -> ``labels/train/a.txt``; Ultralytics' rule)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return os.path.splitext(sb.join(image.rsplit(sa, 1)))[0] + ".txt"


def _yolo_boxes(label_file: str, rel: str, num_classes: int, problems: List[str]) -> List[Tuple[int, List[float], int]]:
    """``(class, [cx, cy, w, h], line)`` of each line; problems name the file and the line."""
    boxes = []
    try:
        with open(label_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{rel}: cannot be read as text ({type(e).__name__}: {e})")
        return boxes
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        try:
            values = [float(v) for v in parts]
        except ValueError:
            values = None
        if values is None or not all(math.isfinite(v) for v in values) or not (
            len(values) == 5 or (len(values) >= 7 and len(values) % 2 == 1)
        ):
            problems.append(
                f"{rel} line {n}: {line.strip()[:80]!r} is not 'class cx cy w h' (5 numbers; a segment "
                "'class x1 y1 x2 y2 x3 y3 ...' is read as its bounding box)"
            )
            continue
        cls = values[0]
        if cls != int(cls) or not 0 <= cls < num_classes:
            problems.append(
                f"{rel} line {n}: class index {parts[0]} is not one of the {num_classes} names of the "
                f"dataset yaml (0..{num_classes - 1})"
            )
            continue
        coords = values[1:]
        if any(abs(v) > YOLO_MAX_COORD for v in coords):
            problems.append(
                f"{rel} line {n}: coordinates {parts[1:5]} are not normalised; YOLO's are fractions of the "
                "image's width and height (0..1), these look like pixels"
            )
            continue
        if len(coords) > 4:  # a segment: its bounding box
            xs, ys = coords[0::2], coords[1::2]
            coords = [(min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)]
        boxes.append((int(cls), coords, n))
    return boxes


def read_yolo(root: str, yaml_file: Optional[str] = None) -> Splits:
    """A YOLO dataset (Ultralytics / RF-DETR / Roboflow's YOLO export) as COCO dicts per split.

    Args:
        root: the folder holding the dataset yaml.
        yaml_file: the dataset yaml (default :func:`find_yolo_yaml`).

    Returns:
        ``{"train": (coco_dict, image_root), "val": ..., "test": ...}`` for the splits the yaml
        names; category ids are the class indices 0..K-1; ``file_name`` is relative to the yaml's
        ``path`` (its folder by default), image ids are 1..N in that order.
    """
    import yaml

    yaml_file = yaml_file or find_yolo_yaml(root)
    if yaml_file is None:
        raise FileNotFoundError(
            f"No YOLO dataset yaml in {root!r}: looked for {', '.join(YOLO_YAMLS)} (or one other *.yaml with "
            "'names'). It names the classes and the splits: names: [cat, dog], train: train/images, val: valid/images."
        )
    try:
        with open(yaml_file, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise DatasetError(f"{yaml_file} cannot be read as YAML ({e}).") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{yaml_file} is not a YOLO dataset yaml (a mapping with names, train, val).")
    names = _yolo_names(data, yaml_file)
    base = _yolo_base(data, yaml_file)
    problems: List[str] = []
    entries = {}
    for split, keys in YOLO_SPLIT_KEYS.items():
        key = next((k for k in keys if data.get(k)), None)
        if key is not None:
            entries[split] = (key, data[key])
    if "train" not in entries:
        raise DatasetError(f"{yaml_file} names no training split (train: train/images, or a list or .txt of images).")
    out: Splits = {}
    for split, (key, entry) in entries.items():
        images = _yolo_images(entry, base, yaml_file, key, problems)
        if not images:
            problems.append(f"{yaml_file}: {key}: {entry} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
            continue
        images = sorted(set(images), key=lambda p: _rel(p, base))
        coco_images, annotations, labelled = [], [], 0
        for image_id, (path, size) in enumerate(zip(images, _read_sizes(images)), 1):
            rel = _rel(path, base)
            label = yolo_label_file(path)
            label_rel = _rel(label, base)
            if isinstance(size, Exception):
                what = "file not found" if isinstance(size, FileNotFoundError) else f"cannot be opened ({size})"
                problems.append(f"{rel}: {what} (listed by {yaml_file} {key})")
                continue
            width, height = size
            coco_images.append({"id": image_id, "file_name": rel, "width": width, "height": height,
                                "dinov2od_source": label_rel})
            if not os.path.isfile(label):
                continue  # no label file: an image without objects
            labelled += 1
            for cls, (cx, cy, w, h), line in _yolo_boxes(label, label_rel, len(names), problems):
                box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                                    "bbox": box, "area": box[2] * box[3], "iscrowd": 0,
                                    "dinov2od_source": f"{label_rel} line {line}"})
        if split == "train" and labelled == 0 and coco_images:
            problems.append(
                f"{yaml_file}: none of the {len(coco_images)} training images has a label file (looked for "
                f"{_rel(yolo_label_file(images[0]), base)} for {_rel(images[0], base)}): labels/ must sit beside "
                "images/ (train/images + train/labels, or images/train + labels/train)"
            )
        logger.info(
            "%s (YOLO, %s): %d images, %d with a label file, %d boxes, %d classes %s",
            root, split, len(coco_images), labelled, len(annotations), len(names), names[:10],
        )
        out[split] = ({"info": {"dinov2od_converted_from": f"{root} (YOLO, {split})"},
                       "images": coco_images, "annotations": annotations, "categories": _categories(names)}, base)
    if problems:
        raise problems_error(f"{root} (YOLO)", problems, NO_SKIP_HINT)
    return out
