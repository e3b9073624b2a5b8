"""The start-up check of a COCO-format dataset (your own, or a YOLO / Pascal VOC folder read into one).

:func:`check_coco_dataset` reads the whole json and decodes every image once (or reads the headers
only, ``check="header"``): every problem that would stop or silently spoil training or evaluation
is reported together, naming the files and ids, before training starts; what training and COCO
evaluation do with boxes that need no fix (zero size, beyond the image, ``iscrowd``, one object
annotated twice) is one warning line each. The list is in docs/your_data.md.
"""
from __future__ import annotations

import logging
import math
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple, Union

from .folder import EDGE_TOLERANCE, SKIP_CHECK_HINT, _categories, _read_json, check_mode, problems_error

__all__ = ["CocoSummary", "check_coco_dataset", "json_version", "near_duplicates"]

logger = logging.getLogger("dinov2od")


@dataclass
class CocoSummary:
    """What :func:`check_coco_dataset` found."""

    json_file: str
    num_images: int = 0
    num_images_with_boxes: int = 0  # images with at least one usable (non-crowd, positive-area) box
    num_boxes: int = 0  # usable boxes: non-crowd, positive width and height
    num_degenerate: int = 0  # boxes of zero or negative width/height (the mapper skips them)
    num_crowd: int = 0  # iscrowd boxes: not trained on; ignore regions in COCO evaluation
    num_beyond: int = 0  # boxes reaching more than EDGE_TOLERANCE px beyond their image (training clips them)
    images: Union[bool, str] = False  # how the image files were opened: "decode", "header" or False
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)


def _image_size(path: str, decode: bool) -> Tuple[int, int]:
    """(width, height) as Detectron2 will see the image: after EXIF orientation. ``decode``: every
    pixel is decoded (PIL ``load()``, as training reads the file), so a truncated file raises."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # a broken EXIF block: Detectron2 ignores it as well
            orientation = 1
        if decode:
            im.load()
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _check_image(image_root: str, img: dict, decode: bool) -> Optional[str]:
    file_name = img.get("file_name")
    if not file_name:
        return f"image id {img.get('id')!r} has no file_name"
    path = os.path.join(image_root, file_name)
    if not os.path.isfile(path):
        return f"{file_name}: file not found under {image_root}"
    try:
        w, h = _image_size(path, decode)
    except Exception as e:  # PIL raises several types for undecodable files
        return f"{file_name}: cannot be decoded as an image ({type(e).__name__}: {e})"
    jw, jh = img.get("width"), img.get("height")
    if jw is not None and jh is not None and (int(jw), int(jh)) != (w, h):
        says = img.get("dinov2od_source") or "the json"  # a VOC XML's <size>
        return f"{file_name}: {says} says {jw}x{jh} (width x height), the file is {w}x{h}"
    if min(w, h) < 14:
        return f"{file_name}: {w}x{h} px is smaller than one ViT patch (14-16 px)"
    return None


def _examples(items: List[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _check_json(data: dict, json_file: str, summary: CocoSummary) -> None:
    """Everything :func:`check_coco_dataset` checks without opening an image file."""
    problems, warnings = summary.problems, summary.warnings
    names, cat_ids = _categories(data, json_file)
    # ---- categories: one name per class
    by_name: Dict[str, List[int]] = defaultdict(list)
    for n, i in zip(names, cat_ids):
        by_name[n].append(i)
    for n, ids in by_name.items():
        if len(ids) > 1:
            problems.append(
                f"category name {n!r} is used by ids {ids}: a class needs its own name (predictions and the "
                "AP table would show the same name twice); merge them into one category or rename one"
            )
    # ---- images: one id each, all of one type, a size
    images = data["images"]
    files_of: Dict[object, List[str]] = defaultdict(list)
    kinds: Dict[str, List[str]] = defaultdict(list)
    for img in images:
        if not isinstance(img, dict) or "id" not in img:
            problems.append(f"images entry {str(img)[:80]} has no 'id'")
            continue
        iid = img["id"]
        if isinstance(iid, (list, dict)):
            problems.append(f"image id {iid!r} ({img.get('file_name')}) is not a number")
            continue
        files_of[iid].append(str(img.get("file_name")))
        kinds["str" if isinstance(iid, str) else "int"].append(f"{iid!r} ({img.get('file_name')})")
        if img.get("width") is None or img.get("height") is None:
            problems.append(
                f"image id {iid!r} ({img.get('file_name')}): no width/height in the json (Detectron2's loader needs them)"
            )
    if len(kinds) > 1:
        problems.append(
            f"image ids mix integers (e.g. {_examples(kinds['int'], 2)}) and strings (e.g. {_examples(kinds['str'], 2)}): "
            "Detectron2's loader sorts the ids and stops with \"TypeError: '<' not supported between instances of "
            "'str' and 'int'\". Fix: write every image id as an integer, in images[].id and annotations[].image_id"
        )
    for iid, files in files_of.items():
        if len(files) > 1:
            problems.append(
                f"image id {iid!r} is listed {len(files)} times ({', '.join(files)}): Detectron2 keeps only one "
                "of these images and gives it the boxes of all of them; give each image its own id"
            )
    size_of = {img["id"]: (img.get("width"), img.get("height"), img.get("file_name"))
               for img in images if isinstance(img, dict) and not isinstance(img.get("id"), (list, dict, type(None)))}
    # ---- annotations
    known_cats = set(cat_ids)
    ann_ids = Counter()
    with_boxes, crowd_images, beyond_images = set(), set(), set()
    degenerate, crowd, beyond, usable = [], [], [], []
    for ann in data.get("annotations") or []:
        if not isinstance(ann, dict):
            problems.append(f"annotations entry {str(ann)[:80]} is not an object")
            continue
        ann_ids[ann.get("id")] += 1
        iid = ann.get("image_id")
        where = f"annotation id {ann.get('id')} (image id {iid!r}"
        if iid not in size_of:
            problems.append(f"{where}): no image has this id")
            continue
        width, height, file_name = size_of[iid]
        src = ann.get("dinov2od_source")  # the label file and line / XML object of a converted dataset
        where += f", {file_name}" + (f", {src})" if src else ")")
        if ann.get("category_id") not in known_cats:
            problems.append(f"{where}: category_id {ann.get('category_id')} is not in 'categories' {sorted(known_cats)}")
            continue
        box = ann.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box
        ):
            problems.append(f"{where}: bbox {box!r} is not four finite numbers [x, y, width, height]")
            continue
        if box[2] <= 0 or box[3] <= 0:
            summary.num_degenerate += 1
            degenerate.append(f"{where} bbox {box}")
            continue
        x0, y0, x1, y1 = box[0], box[1], box[0] + box[2], box[1] + box[3]
        if width is not None and height is not None:
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                problems.append(
                    f"{where}: bbox {box} lies entirely outside the {width}x{height} image (training would drop it, "
                    "evaluation would count it as an object never found); are the coordinates for another image "
                    "size, or width and height swapped?"
                )
                continue
            tol = EDGE_TOLERANCE
            if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
                summary.num_beyond += 1
                beyond_images.add(iid)
                beyond.append(f"{where} bbox {box} in {width}x{height}")
        if ann.get("iscrowd", 0):
            summary.num_crowd += 1
            crowd_images.add(iid)
            crowd.append(where)
            continue
        summary.num_boxes += 1
        with_boxes.add(iid)
        usable.append((iid, ann.get("category_id"), x0, y0, x1, y1, where))
    repeated = [f"{i} ({n}x)" for i, n in ann_ids.items() if n > 1]
    if repeated:
        problems.append(
            f"annotation ids listed more than once: {_examples(repeated, 5)}; Detectron2's loader refuses the file "
            "(\"Annotation ids ... are not unique\"). Give each annotation its own id"
        )
    summary.num_images_with_boxes = len(with_boxes)
    if degenerate:
        warnings.append(
            f"{len(degenerate)} box(es) of zero or negative width/height (first: {degenerate[0]}); "
            "training skips them."
        )
    if beyond:
        warnings.append(
            f"{len(beyond)} box(es) in {len(beyond_images)} image(s) reach more than {EDGE_TOLERANCE:g} px beyond their "
            f"image (first: {beyond[0]}); training clips them to the image (Detectron2's "
            "transform_instance_annotations); COCO evaluation compares predictions with the box as written, so "
            "even a perfect detection of such an object has IoU < 1. Clip them in the json to score the visible part."
        )
    if crowd:
        warnings.append(
            f"{len(crowd)} iscrowd box(es) in {len(crowd_images)} image(s) (first: {crowd[0]}); training "
            "ignores them (Detectron2's mapper drops crowd boxes; an image with only crowd boxes is left out); COCO "
            "evaluation treats them as ignore regions: a detection on one is neither a hit nor a false positive."
        )
    twice = near_duplicates(usable)
    if twice:
        warnings.append(
            f"{len(twice)} pair(s) of boxes of one class in one image overlap with IoU >= {DUPLICATE_IOU:g} (first: "
            f"{twice[0]}): most likely one object annotated twice. Training learns it twice; COCO evaluation expects "
            "two detections there, so one box counts as missed and the AP is lower than the detector's. Delete one "
            "box of each pair."
        )


DUPLICATE_IOU = 0.9  # two boxes of one class in one image overlapping this much are one object twice
_NEIGHBOURS = 8  # boxes compared with each box: its next ones by (image, class, x0)


def near_duplicates(rows: List[tuple], iou: float = DUPLICATE_IOU) -> List[str]:
    """Pairs of ``rows`` ``(image_id, category_id, x0, y0, x1, y1, where)`` of one image and class
    whose IoU is at least ``iou``, as "where + where" lines. Each box is compared with its next
    :data:`_NEIGHBOURS` boxes in (image, class, x0) order: a vectorised pass, linear in the number of
    boxes (a near duplicate has nearly the same x0; in a crowd of more boxes between them, it can be
    missed)."""
    import numpy as np

    if len(rows) < 2:
        return []
    groups: Dict[tuple, int] = {}
    g = np.array([groups.setdefault((str(r[0]), str(r[1])), len(groups)) for r in rows])
    b = np.array([r[2:6] for r in rows], dtype=np.float64)
    order = np.lexsort((b[:, 0], g))
    g, b = g[order], b[order]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    found = []
    for k in range(1, min(_NEIGHBOURS, len(rows) - 1) + 1):
        i, j = np.arange(len(rows) - k), np.arange(k, len(rows))
        w = np.clip(np.minimum(b[i, 2], b[j, 2]) - np.maximum(b[i, 0], b[j, 0]), 0, None)
        h = np.clip(np.minimum(b[i, 3], b[j, 3]) - np.maximum(b[i, 1], b[j, 1]), 0, None)
        inter = w * h
        same = (g[i] == g[j]) & (inter >= iou * (area[i] + area[j] - inter))
        found += [tuple(sorted((int(order[a]), int(order[c])))) for a, c in zip(i[same], j[same])]
    return [f"{rows[a][6]} and {rows[c][6]}" for a, c in sorted(found)]


def check_coco_dataset(
    json_file: str, image_root: str, check_files: Union[bool, str] = True, threads: Optional[int] = None,
    shard: Tuple[int, int] = (0, 1), gather: Optional[Callable[[List[tuple]], List[tuple]]] = None,
) -> CocoSummary:
    """Check a COCO detection dataset before training; raise one error listing every problem.

    Errors (all raised together, naming the files and ids): the json does not parse or has no
    images or categories; a category id twice; a category name twice; an image id twice; image ids
    that mix integers and strings; an image without width/height; an annotation id twice; an
    annotation of an unknown image or category, or whose box is not four finite numbers, or lies
    entirely outside its image; and, with ``check_files``, an image file missing, not decoding
    (``"decode"``: every pixel, so a truncated file is found), smaller than a patch or of another
    size than the json's. Warnings (one line each, with counts): boxes of zero size (skipped),
    boxes reaching beyond the image (clipped by training), ``iscrowd`` boxes (ignored by training,
    ignore regions in evaluation). docs/your_data.md lists what happens to the data in each case.

    Args:
        json_file, image_root: as registered.
        check_files: True or "decode": decode every image (threads in parallel: PIL releases the
            GIL while decoding); "header": read each image's header only; False: the json only.
        threads: decoding threads (default: ``min(32, cpus + 4)``).
        shard: ``(index, count)``: open only every ``count``-th image from ``index`` (the processes of
            a distributed job each open their share; the json-level checks run in every process).
        gather: with ``shard``: given this process's image problems as ``(image index, message)``,
            returns those of every process (all ranks call it: a collective), so every rank raises
            the same error.

    Raises:
        DatasetError: naming the json, the first problems (with their count) and the fix.
    """
    mode = check_mode(check_files, "check_files")
    version = json_version(json_file)
    data = _read_json(json_file)
    passed = _JSON_PASSED.get(version)
    if passed is None:
        summary = CocoSummary(json_file=json_file, num_images=len(data["images"]), images=mode)
        _check_json(data, json_file, summary)
        if not summary.problems and version is not None:
            _JSON_PASSED[version] = replace(summary, problems=[], warnings=list(summary.warnings))
    else:  # the json passed once in this process (the epochs count reads it before the check)
        summary = replace(passed, problems=[], warnings=list(passed.warnings), images=mode)
    problems = summary.problems
    if mode:
        index, count = shard
        images = [im for im in data["images"] if isinstance(im, dict)]
        mine = list(range(index, len(images), count))
        decode = mode == "decode"
        with ThreadPoolExecutor(threads or min(32, (os.cpu_count() or 1) + 4)) as pool:
            found = [(i, p) for i, p in zip(mine, pool.map(lambda i: _check_image(image_root, images[i], decode), mine))
                     if p]
        problems.extend(p for _, p in sorted(gather(found) if gather is not None else found))
    # a YOLO / VOC folder read into a json (dinov2od.d2.data.datasets.formats): messages name the folder too
    source = (data.get("info") or {}).get("dinov2od_converted_from") if isinstance(data.get("info"), dict) else None
    label = f"{source}, read as {json_file}" if source else json_file
    if problems:
        raise problems_error(label, problems, f"Fix the files or the json, {SKIP_CHECK_HINT}")
    for line in summary.warnings:
        if (json_file, line) not in _WARNED:  # once per process (the epochs count reads the json too)
            _WARNED.add((json_file, line))
            logger.warning("%s: %s", label, line)
    return summary


_WARNED: set = set()
_JSON_PASSED: Dict[tuple, CocoSummary] = {}  # json_version -> the json-level part of a check it passed


def json_version(json_file: str) -> Optional[tuple]:
    """``(real path, mtime, size)`` of a file: a key that changes when the file does (None: missing)."""
    try:
        st = os.stat(json_file)
    except OSError:
        return None
    return os.path.realpath(json_file), st.st_mtime_ns, st.st_size
