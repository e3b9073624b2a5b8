"""The usable boxes of a COCO json as numpy arrays (:class:`BoxTable`), kept per file when the json is
parsed (:func:`remember_boxes`, called by ``folder._read_json``) so that the size advice
(:mod:`dinov2od.d2.data.datasets.sizes`) does not parse it again (:func:`box_table`)."""
from __future__ import annotations

import itertools
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

logger = logging.getLogger("dinov2od")

__all__ = ["BoxTable", "box_table", "boxes_from_coco", "remember_boxes"]

MAX_JSON_BYTES = 100 << 20  # a json not already read is read here only up to this size


@dataclass
class BoxTable:
    """The usable boxes of one COCO json (float64 numpy arrays, one entry per box) and its images."""

    json_file: str
    width: np.ndarray  # box width in the image's own pixels, clipped to the image
    height: np.ndarray
    image_width: np.ndarray  # the size of the box's image
    image_height: np.ndarray
    category: np.ndarray  # int64 category id
    class_names: Dict[int, str]  # category id -> name
    image_sizes: np.ndarray  # (num_images, 2) width, height of every image with a size

    @property
    def num_boxes(self) -> int:
        return int(self.width.size)

    @staticmethod
    def concat(tables: Sequence["BoxTable"]) -> "BoxTable":
        """One table of several (e.g. several training datasets); ids keep their names."""
        if len(tables) == 1:
            return tables[0]
        names: Dict[int, str] = {}
        for t in tables:
            names.update(t.class_names)
        cat = lambda key: np.concatenate([getattr(t, key) for t in tables])  # noqa: E731
        return BoxTable(", ".join(t.json_file for t in tables), cat("width"), cat("height"), cat("image_width"),
                        cat("image_height"), cat("category"), names, cat("image_sizes"))


def boxes_from_coco(data: dict, json_file: str = "") -> BoxTable:
    """The boxes training uses from a parsed COCO json: not ``iscrowd``, of a known image (with a
    size) and category, clipped to the image (as training clips them), positive width and height.
    Entries the start-up check would refuse are skipped, not raised on."""
    sizes: Dict[object, Tuple[float, float]] = {}
    for im in data.get("images") or []:
        try:
            w, h = float(im["width"]), float(im["height"])
            sizes[im["id"]] = (w, h)
        except (KeyError, TypeError, ValueError):
            continue
    names: Dict[int, str] = {}
    for c in data.get("categories") or []:
        if isinstance(c, dict) and isinstance(c.get("id"), int):
            names[c["id"]] = str(c.get("name", c["id"]))
    anns = data.get("annotations") or []
    try:  # the fast path (a well-formed file: COCO's 860k boxes in about a second)
        arr = _fast_rows(anns, sizes, names)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):  # the check reports what is wrong
        arr = _slow_rows(anns, sizes, names)
    return BoxTable(
        json_file=json_file,
        width=arr[:, 0].copy(), height=arr[:, 1].copy(), image_width=arr[:, 2].copy(), image_height=arr[:, 3].copy(),
        category=arr[:, 4].astype(np.int64), class_names=names,
        image_sizes=np.array(list(sizes.values()), dtype=np.float64).reshape(-1, 2),
    )


def _fast_rows(anns: list, sizes: Dict[object, Tuple[float, float]], names: Dict[int, str]) -> np.ndarray:
    """(w, h, image w, image h, category) of the usable boxes, in numpy; raises on a malformed entry."""
    if not anns:
        return np.zeros((0, 5))
    n = len(anns)
    crowd = np.fromiter((a.get("iscrowd", 0) for a in anns), np.int64, n) != 0
    boxes = [a["bbox"] for a in anns]
    if not all(len(v) == 4 for v in boxes):
        raise ValueError("bbox length")
    box = np.fromiter(itertools.chain.from_iterable(boxes), np.float64, 4 * n).reshape(n, 4)
    index = {i: k for k, i in enumerate(sizes)}
    image = np.array(list(sizes.values()), dtype=np.float64).reshape(-1, 2)[
        np.fromiter((index[a["image_id"]] for a in anns), np.int64, n)]
    cats = [a["category_id"] for a in anns]
    if not all(type(c) is int for c in cats):  # noqa: E721 (a bool or float id is no category here)
        raise TypeError("category ids")
    cat = np.array(cats, dtype=np.int64)
    x0, y0 = np.maximum(box[:, 0], 0.0), np.maximum(box[:, 1], 0.0)
    w = np.minimum(box[:, 0] + box[:, 2], image[:, 0]) - x0  # clipped to the image, as training does
    h = np.minimum(box[:, 1] + box[:, 3], image[:, 1]) - y0
    with np.errstate(invalid="ignore"):
        keep = ~crowd & np.isin(cat, np.array(list(names), dtype=np.int64)) & (w > 0) & (h > 0)
    keep &= np.isfinite(w) & np.isfinite(h)
    return np.stack([w, h, image[:, 0], image[:, 1], cat.astype(np.float64)], 1)[keep]


def _slow_rows(anns: list, sizes: Dict[object, Tuple[float, float]], names: Dict[int, str]) -> np.ndarray:
    """The same, entry by entry, skipping what is malformed."""
    rows: List[Tuple[float, float, float, float, int]] = []
    append = rows.append
    for a in anns:
        try:
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            iw, ih = sizes[a["image_id"]]
            c = a["category_id"]
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
        if c not in names:
            continue
        w = min(x + w, iw) - max(x, 0.0)  # clipped to the image, as training does
        h = min(y + h, ih) - max(y, 0.0)
        if w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h):
            append((w, h, iw, ih, c))
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


_TABLES: "OrderedDict[tuple, BoxTable]" = OrderedDict()
_KEEP = 8  # tables kept (train and val of a few datasets)


def remember_boxes(json_file: str, data: dict) -> None:
    """Keep the boxes of a json just parsed (called by the dataset reader), so that the size advice
    does not parse it again. Main process only; once per file version; never raises."""
    try:
        from detectron2.utils import comm

        if comm.get_rank() != 0:
            return
        from .check import json_version

        key = json_version(json_file)
        if key is None or key in _TABLES:
            return
        _TABLES[key] = boxes_from_coco(data, json_file)
        while len(_TABLES) > _KEEP:
            _TABLES.popitem(last=False)
    except Exception as e:  # advice only: never stops a run
        logger.debug("size advice: could not keep the boxes of %s (%s)", json_file, e)


def box_table(json_file: str, max_bytes: int = MAX_JSON_BYTES) -> Optional[BoxTable]:
    """The boxes of ``json_file``: those kept when it was read, else read now if it is at most
    ``max_bytes`` (None when it is larger or missing)."""
    from .check import json_version

    key = json_version(json_file)
    if key is None:
        return None
    if key in _TABLES:
        return _TABLES[key]
    if key[2] > max_bytes:
        return None
    import json

    with open(json_file, encoding="utf-8") as f:
        data = json.load(f)
    table = boxes_from_coco(data, json_file)
    _TABLES[key] = table
    return table
