"""YOLO and Pascal VOC datasets, read into COCO form so that one registration, one start-up check
and one evaluator (Detectron2's ``COCOEvaluator``) serve every format.

:func:`find_dataset_splits` finds the splits of a folder in any layout (``format="auto"``, the
default, looks at the folder; ``"coco"``, ``"yolo"``, ``"voc"`` force one). For a YOLO or VOC
folder each split is read into a COCO dict in memory (:func:`read_yolo`, :func:`read_voc`), written
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
label/annotation file) are one :class:`~dinov2od.d2.datasets.folder.DatasetError` listing them
all, as the start-up check does; the check itself then runs on the converted json, and its
messages name the label file and line or the XML file and object of each box.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from .folder import (
    DatasetError,
    ROBOFLOW_JSON,
    _image_size,
    find_coco_splits,
    problems_error,
    write_cache_json,
)

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "check_format",
    "detect_format",
    "find_dataset_splits",
    "find_voc_splits",
    "find_yolo_yaml",
    "read_dataset",
    "read_voc",
    "read_yolo",
]

logger = logging.getLogger("dinov2od")

FORMATS = ("auto", "coco", "yolo", "voc")
# the image files a YOLO split folder is searched for (Ultralytics' list, the common part)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".mpo")
YOLO_YAMLS = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
YOLO_SPLIT_KEYS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
VOC_SPLIT_FILES = ("train", "val", "trainval", "test")
VOC_VAL_EVERY = 5  # without ImageSets/Main: 1 image in VOC_VAL_EVERY (by name hash) is for validation
# a YOLO coordinate beyond this is not normalised (pixels, most likely); slight overhangs are boxes
# beyond the image, which the start-up check reports
YOLO_MAX_COORD = 2.0
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


# ---------------------------------------------------------------------------- YOLO
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


# ---------------------------------------------------------------------------- Pascal VOC
def _is_voc(root: str) -> bool:
    ann = os.path.join(root, "Annotations")
    return os.path.isdir(ann) and os.path.isdir(os.path.join(root, "JPEGImages")) and any(
        f.lower().endswith(".xml") for f in os.listdir(ann)
    )


def _val_by_hash(stem: str) -> bool:
    return int(hashlib.sha1(stem.encode("utf-8")).hexdigest()[:8], 16) % VOC_VAL_EVERY == 0


def find_voc_splits(root: str) -> Dict[str, List[str]]:
    """The image ids (XML stems) of each split of a VOC folder.

    With ``ImageSets/Main``: ``test.txt`` present: train = ``trainval.txt`` (else train + val),
    val = none, test = ``test.txt`` (VOC 2007's protocol: train on trainval, evaluate on test);
    else train = ``train.txt`` (else ``trainval.txt``), val = ``val.txt``. Without it: every XML of
    ``Annotations/``, one in :data:`VOC_VAL_EVERY` (by a hash of its name, so an image keeps its
    split when others are added) for validation, the others for training.
    """
    main = os.path.join(root, "ImageSets", "Main")
    lists = {}
    for split in VOC_SPLIT_FILES:
        path = os.path.join(main, f"{split}.txt")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                lists[split] = [line.split()[0] for line in f if line.strip()]
    if lists:
        if "test" in lists:
            train = lists.get("trainval") or lists.get("train", []) + lists.get("val", [])
            out = {"train": train, "test": lists["test"]}
        else:
            out = {"train": lists.get("train") or lists.get("trainval", [])}
            if lists.get("val") and lists.get("train"):
                out["val"] = lists["val"]
        if not out["train"]:
            raise DatasetError(f"{main}: no training list (train.txt or trainval.txt with image ids).")
        logger.info("%s (VOC): splits from ImageSets/Main: %s", root,
                    ", ".join(f"{k} {len(v)} images" for k, v in out.items()))
        return out
    stems = sorted(f[:-4] for f in os.listdir(os.path.join(root, "Annotations")) if f.lower().endswith(".xml"))
    out = {"train": [s for s in stems if not _val_by_hash(s)], "val": [s for s in stems if _val_by_hash(s)]}
    logger.warning(
        "%s (VOC): no ImageSets/Main/{train,val,trainval,test}.txt; split by a hash of each file name: %d images "
        "for training, %d for validation (about 1 in %d; an image keeps its split when others are added). "
        "Write ImageSets/Main/train.txt and val.txt (one image id a line) to choose.",
        root, len(out["train"]), len(out["val"]), VOC_VAL_EVERY,
    )
    if not out["val"]:
        del out["val"]
    return out


def _parse_xml(path: str) -> Tuple[ET.Element, Dict[ET.Element, int]]:
    """The XML tree and the line of each element (for messages); ``ExpatError`` if malformed."""
    import xml.parsers.expat

    builder, lines = ET.TreeBuilder(), {}
    parser = xml.parsers.expat.ParserCreate()

    def start(tag, attrs):
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    with open(path, "rb") as f:
        parser.ParseFile(f)
    return builder.close(), lines


def _text(el: Optional[ET.Element], tag: str) -> Optional[str]:
    child = None if el is None else el.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def _voc_image(root: str, stem: str, tree: Optional[ET.Element]) -> Optional[str]:
    """The image of ``Annotations/<stem>.xml``: ``JPEGImages/<stem>.<ext>`` (VOC's devkit and
    Detectron2 take ``<stem>.jpg``), else the XML's ``<filename>`` in ``JPEGImages/``."""
    folder = os.path.join(root, "JPEGImages")
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if os.path.isfile(os.path.join(folder, stem + ext)):
            return stem + ext
    name = _text(tree, "filename")
    if name and os.path.isfile(os.path.join(folder, name)):
        return name
    return None


def read_voc(root: str, splits: Optional[Dict[str, List[str]]] = None) -> Splits:
    """A Pascal VOC folder (``Annotations/*.xml``, ``JPEGImages/``, optional ``ImageSets/Main``) as
    COCO dicts per split (:func:`find_voc_splits`).

    Classes: the ``<name>`` tags of every XML in ``Annotations/`` (all splits, so every split has
    the same classes), sorted; category ids 0..K-1 in that order. Boxes: Detectron2's
    ``load_voc_instances`` convention (``xmin - 1, ymin - 1, xmax, ymax``: VOC's pixel indices are
    1-based and inclusive). ``difficult`` objects: ``iscrowd: 1`` (see the module doc). The image
    size is the XML's ``<size>`` (the start-up check compares it with the file), else the file's.
    ``file_name`` is relative to ``JPEGImages/``; image ids are 1..N in the split's order.
    """
    splits = splits or find_voc_splits(root)
    ann_dir = os.path.join(root, "Annotations")
    problems: List[str] = []
    parsed: Dict[str, Optional[Tuple[ET.Element, dict]]] = {}
    missing = set()
    all_stems = sorted(f[:-4] for f in os.listdir(ann_dir) if f.lower().endswith(".xml"))
    for stem in sorted(set(all_stems) | {s for ids in splits.values() for s in ids}):
        path, rel = os.path.join(ann_dir, stem + ".xml"), f"Annotations/{stem}.xml"
        if not os.path.isfile(path):
            missing.add(stem)
            parsed[stem] = None
            continue
        try:
            parsed[stem] = _parse_xml(path)
        except Exception as e:  # noqa: BLE001  (ExpatError, OSError)
            where = f" line {e.lineno}" if hasattr(e, "lineno") else ""
            problems.append(f"{rel}{where}: not well-formed XML ({e})")
            parsed[stem] = None
    names = sorted({n for p in parsed.values() if p for o in p[0].findall("object") for n in [_text(o, "name")] if n})
    if not names and not problems:
        raise DatasetError(f"{ann_dir}: no <object><name> in any XML file; there is no class to train.")
    cat_of = {n: i for i, n in enumerate(names)}
    out: Splits = {}
    points, renamed, difficult = [], [], 0
    for split, stems in splits.items():
        images, annotations = [], []
        missing_size = []
        for image_id, stem in enumerate(stems, 1):
            rel = f"Annotations/{stem}.xml"
            if stem in missing:
                problems.append(f"{rel}: not found (listed in ImageSets/Main/ for {split})")
                continue
            if parsed[stem] is None:
                continue  # not well-formed: reported above
            tree, lines = parsed[stem]
            file_name = _voc_image(root, stem, tree)
            if file_name is None:
                problems.append(f"{rel}: no image JPEGImages/{stem}.jpg (or .png, ...), nor <filename> "
                                f"{_text(tree, 'filename')!r} in JPEGImages/")
                continue
            tag = _text(tree, "filename")
            if tag and os.path.splitext(tag)[0] != stem:
                renamed.append(f"{rel} <filename>{tag}</filename>, read JPEGImages/{file_name}")
            size = tree.find("size")
            try:
                width, height = int(float(_text(size, "width"))), int(float(_text(size, "height")))
            except (TypeError, ValueError):
                width = height = 0
            if width <= 0 or height <= 0:  # labelImg writes 0 at times: the file's own size
                missing_size.append(stem)
                found = _read_sizes([os.path.join(root, "JPEGImages", file_name)])[0]
                if isinstance(found, Exception):
                    problems.append(f"{file_name}: cannot be opened ({found}), and {rel} has no <size>")
                    continue
                width, height = found
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                           "dinov2od_source": rel})
            for k, obj in enumerate(tree.findall("object"), 1):
                where = f"{rel} line {lines.get(obj, '?')} (object {k})"
                name = _text(obj, "name")
                box = obj.find("bndbox")
                try:
                    x0, y0, x1, y1 = (float(_text(box, t)) for t in ("xmin", "ymin", "xmax", "ymax"))
                    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                        raise ValueError
                except (TypeError, ValueError):
                    problems.append(f"{where}: <bndbox> needs the numbers xmin, ymin, xmax, ymax, found "
                                    f"{[_text(box, t) for t in ('xmin', 'ymin', 'xmax', 'ymax')]}")
                    continue
                if not name:
                    problems.append(f"{where}: <object> without a <name>")
                    continue
                if x0 == x1 and y0 == y1:
                    points.append(f"{where} ({name} at {x0:g},{y0:g})")
                crowd = _text(obj, "difficult") in ("1", "true", "True")
                difficult += crowd
                bbox = [x0 - 1.0, y0 - 1.0, x1 - x0 + 1.0, y1 - y0 + 1.0]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_of[name],
                                    "bbox": bbox, "area": max(bbox[2], 0) * max(bbox[3], 0), "iscrowd": int(crowd),
                                    "dinov2od_source": where})
        if missing_size:
            logger.info("%s (VOC, %s): %d XML files have no <size> (or 0); the image files' sizes are used (first: %s)",
                        root, split, len(missing_size), missing_size[0])
        logger.info("%s (VOC, %s): %d images, %d objects, %d classes %s", root, split, len(images),
                    len(annotations), len(names), names[:10])
        out[split] = ({"info": {"dinov2od_converted_from": f"{root} (VOC, {split})"}, "images": images,
                       "annotations": annotations, "categories": _categories(names)},
                      os.path.join(root, "JPEGImages"))
    if problems:
        raise problems_error(f"{root} (VOC)", problems, NO_SKIP_HINT)
    if points:
        logger.warning(
            "%s (VOC): %d object(s) are a single point (xmin = xmax and ymin = ymax; first: %s): read as 1x1 px "
            "boxes (VOC's pixel indices are inclusive), most likely a click, not an object; delete them from the XML",
            root, len(points), points[0])
    if renamed:
        logger.warning("%s (VOC): %d XML file(s) name another image in <filename> (first: %s); the image of each "
                       "XML is JPEGImages/<its own name>, as VOC's devkit and Detectron2 read it",
                       root, len(renamed), renamed[0])
    if difficult:
        logger.info("%s (VOC): %d difficult object(s): not trained on, and ignore regions in evaluation "
                    "(iscrowd), as VOC's evaluation ignores them", root, difficult)
    return out


# ---------------------------------------------------------------------------- any format
def detect_format(root: str) -> str:
    """``"coco"``, ``"yolo"`` or ``"voc"``: the layout of ``root`` (in that order when several
    match); FileNotFoundError listing every layout looked for when none does."""
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
    jsons (:func:`~dinov2od.d2.datasets.folder.find_coco_splits`), or, for YOLO / VOC, the cached
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
