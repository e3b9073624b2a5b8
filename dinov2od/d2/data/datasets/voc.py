"""Pascal VOC folders read into COCO form (:func:`read_voc`): ``Annotations/*.xml`` + ``JPEGImages/``,
splits from ``ImageSets/Main`` or a fixed hash of each file name; what the reader decides is in
:mod:`dinov2od.d2.data.datasets.formats`' docstring and docs/your_data.md."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

from .folder import DatasetError, problems_error
from .formats import IMAGE_EXTENSIONS, NO_SKIP_HINT, Splits, _categories, _read_sizes

__all__ = ["find_voc_splits", "read_voc"]

logger = logging.getLogger("dinov2od")

VOC_SPLIT_FILES = ("train", "val", "trainval", "test")
VOC_VAL_EVERY = 5  # without ImageSets/Main: 1 image in VOC_VAL_EVERY (by name hash) is for validation


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
