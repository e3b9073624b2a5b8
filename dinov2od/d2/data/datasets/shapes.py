"""The built-in "shapes" detection dataset: procedurally generated, deterministic, COCO format.

Each image has a textured, noisy background (value noise of several octaves, a colour
gradient, stripes and pixel noise) and 1-8 filled shapes (circle, square, triangle) of
random colour, rotation and size. Sizes are drawn log-uniformly so that COCO's small
(< 32^2 px), medium and large (> 96^2 px) ranges are all populated. Shapes may occlude
each other, but every shape keeps at least ``MIN_VISIBLE`` of its pixels visible; its
box and area are those of the visible pixels (COCO's convention for occluded objects).

The images and ``annotations.json`` are written once to ``<root>/shapes/<split>/`` and
reused; ``root`` defaults to ``$DINOV2OD_DATASETS`` or ``./datasets``. Generation is seeded
per image, so two machines produce identical files.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import multiprocessing
import os
import sys
import threading
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "default_shapes_root",
    "ensure_shapes_split",
    "generate_shapes_image",
]

logger = logging.getLogger(__name__)

SHAPES_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle")
# split name -> (number of images, base seed)
SHAPES_SPLITS: Dict[str, Tuple[int, int]] = {"train": (2000, 0), "val": (200, 1_000_003)}
GENERATOR_VERSION = 1
MIN_SIDE, MAX_SIDE = 192, 256  # image height/width range in pixels
# COCO area ranges (small, medium, large) in pixels, the chance of drawing each, and the
# area of each class per unit extent squared (circle: pi/4, square: 1, triangle: sqrt(3)/4)
AREA_RANGES = ((80.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 150.0**2))
AREA_PROBS = (0.35, 0.4, 0.25)
AREA_PER_EXTENT2 = (math.pi / 4, 1.0, math.sqrt(3) / 4)
MIN_VISIBLE = 0.6  # fraction of a shape that must stay visible after occlusion
MIN_CONTRAST = 60.0  # RGB distance between a shape's colour and the background under it


def default_shapes_root() -> str:
    """Folder holding ``shapes/``: ``$DINOV2OD_DATASETS`` or ``./datasets``."""
    return os.environ.get("DINOV2OD_DATASETS", "datasets")


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1] from a random ``cells x cells`` grid upsampled bilinearly.

    Returns:
        (h, w) float32 array.
    """
    grid = (rng.random((cells + 1, cells + 1)) * 255).astype(np.uint8)
    up = Image.fromarray(grid, mode="L").resize((w, h), resample=Image.BILINEAR)
    return np.asarray(up, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured, noisy RGB background.

    Returns:
        (h, w, 3) float32 array in [0, 255].
    """
    base = rng.uniform(0, 255, size=3)
    tint = rng.uniform(-120, 120, size=3)
    noise = sum(_value_noise(rng, h, w, c) * a for c, a in ((3, 0.5), (8, 0.3), (24, 0.2)))
    img = base[None, None, :] + (noise[..., None] - 0.5) * tint[None, None, :] * 2
    # a linear colour gradient
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.uniform(-1, 1, size=2)
    ramp = (gx / w * direction[0] + gy / h * direction[1])[..., None]
    img = img + ramp * rng.uniform(-60, 60, size=3)[None, None, :]
    # stripes (a distractor texture) in half the images
    if rng.random() < 0.5:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 30)
        phase = (gx * math.cos(angle) + gy * math.sin(angle)) / period * 2 * math.pi
        img = img + (np.sin(phase)[..., None] * rng.uniform(5, 35)) * rng.choice([-1, 1], 3)
    return np.clip(img, 0, 255)


def _shape_polygon(
    rng: np.random.Generator, cls: int, cx: float, cy: float, size: float
) -> Optional[List[Tuple[float, float]]]:
    """Vertices of a square or triangle of extent ``size`` centred at (cx, cy); None for circles."""
    if SHAPES_CLASSES[cls] == "circle":
        return None
    n = 4 if SHAPES_CLASSES[cls] == "square" else 3
    # square: circumradius = side / sqrt(2); triangle: equilateral with circumradius size / sqrt(3)
    radius = size / math.sqrt(2) if n == 4 else size / math.sqrt(3)
    theta = rng.uniform(0, 2 * math.pi)
    return [
        (cx + radius * math.cos(theta + 2 * math.pi * k / n),
         cy + radius * math.sin(theta + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _draw_mask(h: int, w: int, cls: int, cx: float, cy: float, size: float, poly) -> np.ndarray:
    """Binary (h, w) mask of one shape."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if poly is None:
        r = size / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(poly, fill=1)
    return np.asarray(canvas, dtype=bool)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random RGB colour at least ``MIN_CONTRAST`` away from the mean background ``under``."""
    colour = rng.uniform(0, 255, size=3)
    for _ in range(50):
        if np.linalg.norm(colour - under) >= MIN_CONTRAST:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour


def generate_shapes_image(seed: int) -> Tuple[np.ndarray, List[dict]]:
    """Generate one image and its annotations.

    Args:
        seed: the image's seed; the same seed gives the same image.

    Returns:
        image: (H, W, 3) uint8 RGB array.
        annotations: list of dicts with ``bbox`` (XYWH of the visible pixels, float),
            ``area`` (visible pixel count) and ``category_id`` (1-based, COCO style).
    """
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    img = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int32)  # index of the shape visible at each pixel
    full_area: List[int] = []
    classes: List[int] = []
    num_target = int(rng.integers(1, 9))
    for _ in range(num_target * 8):  # bounded number of placement attempts
        if len(classes) == num_target:
            break
        cls = int(rng.integers(len(SHAPES_CLASSES)))
        lo, hi = AREA_RANGES[int(rng.choice(len(AREA_RANGES), p=AREA_PROBS))]
        area = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
        size = math.sqrt(area / AREA_PER_EXTENT2[cls])  # extent in pixels
        half = size / 2 * (1.16 if SHAPES_CLASSES[cls] != "circle" else 1.0)
        if 2 * half + 2 >= min(h, w):
            continue
        cx, cy = rng.uniform(half + 1, w - half - 1), rng.uniform(half + 1, h - half - 1)
        mask = _draw_mask(h, w, cls, cx, cy, size, _shape_polygon(rng, cls, cx, cy, size))
        if mask.sum() < 16:
            continue
        trial = owner.copy()
        trial[mask] = len(classes)
        visible = [np.count_nonzero(trial == j) / full_area[j] for j in range(len(classes))]
        if visible and min(visible) < MIN_VISIBLE:
            continue  # would hide too much of an earlier shape
        colour = _pick_colour(rng, img[mask].mean(axis=0))
        texture = (_value_noise(rng, h, w, 12)[..., None] - 0.5) * rng.uniform(0, 70)
        img[mask] = np.clip(colour[None, :] + texture[mask], 0, 255)
        owner = trial
        full_area.append(int(mask.sum()))
        classes.append(cls)
    img = img + rng.normal(0, rng.uniform(3, 12), size=img.shape)  # sensor noise
    annotations = []
    for j, cls in enumerate(classes):
        ys, xs = np.nonzero(owner == j)
        x0, y0 = float(xs.min()), float(ys.min())
        annotations.append(
            {
                "bbox": [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0],
                "area": float(len(xs)),
                "category_id": cls + 1,
                "iscrowd": 0,
            }
        )
    return np.clip(img, 0, 255).astype(np.uint8), annotations


def _write_image(job: Tuple[int, str]) -> Tuple[Tuple[int, int], List[dict]]:
    """Generate the image of seed ``job[0]``, save it as JPEG at ``job[1]``; return (h, w), annotations."""
    image, annos = generate_shapes_image(job[0])
    Image.fromarray(image).save(job[1], quality=92)
    return image.shape[:2], annos


def _split_dir(root: str, split: str) -> str:
    return os.path.join(root, "shapes", split)


def _stamp(num_images: int, seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "num_images": num_images, "seed": seed}


def _is_main_guard(test: ast.expr) -> bool:
    """Whether ``test`` is ``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    left, right = test.left, test.comparators[0]

    def name(x):
        return isinstance(x, ast.Name) and x.id == "__name__"

    def main(x):
        return isinstance(x, ast.Constant) and x.value == "__main__"

    return (name(left) and main(right)) or (main(left) and name(right))


def _unguarded_main_script() -> Optional[str]:
    """The script that worker processes would re-run unprotected, or None when they may be started.

    A process started with ``spawn`` (macOS, Windows; the start method used here everywhere) first
    imports the parent's ``__main__`` file as ``__mp_main__``: the script's top-level code runs
    again, and where it reaches this generator again the worker dies and ``Pool.map`` waits
    forever. That is the case when the main module's top-level code is running right now (it called
    us) at a line outside an ``if __name__ == "__main__":`` block. No file (an interactive session,
    ``python -c``, a notebook): nothing is re-run.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not os.path.isfile(path):
        return None
    frame = sys._getframe(1)
    if threading.current_thread() is not threading.main_thread():
        frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None and not (frame.f_globals is main.__dict__ and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:  # the script's top level is not running (e.g. called at exit): be safe
        return path
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return path
    line = frame.f_lineno
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_guard(node.test) and node.lineno <= line <= (node.end_lineno or line):
            return None
    return path


def ensure_shapes_split(
    split: str, root: Optional[str] = None, num_images: Optional[int] = None, workers: Optional[int] = None
) -> Tuple[str, str]:
    """Generate ``split`` into the cache folder unless an identical copy is already there.

    Generation runs in worker processes (``spawn``) when the caller allows it, else in this
    process: a script that calls this at its top level without an ``if __name__ == "__main__":``
    guard would be re-run by each worker (see :func:`_unguarded_main_script`); it is told so in
    the log and gets the same files, in one process.

    Args:
        split: "train" or "val".
        root: folder holding ``shapes/``; defaults to :func:`default_shapes_root`.
        num_images: override the split's size (e.g. a small copy for tests); the images are a
            prefix of the full split's.
        workers: worker processes (default: up to 4, one per CPU and per 64 images); 1 or 0
            generates in this process.

    Returns:
        (json_file, image_root) of the split.
    """
    if split not in SHAPES_SPLITS:
        raise ValueError(f"Unknown shapes split {split!r}; expected one of {sorted(SHAPES_SPLITS)}.")
    default_num, seed = SHAPES_SPLITS[split]
    num_images = default_num if num_images is None else int(num_images)
    out_dir = _split_dir(root or default_shapes_root(), split)
    json_file = os.path.join(out_dir, "annotations.json")
    if os.path.isfile(json_file):
        with open(json_file) as f:
            info = json.load(f).get("info", {})
        if info.get("dinov2od_shapes") == _stamp(num_images, seed):
            return json_file, out_dir
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(seed + i, os.path.join(out_dir, f"{i:06d}.jpg")) for i in range(num_images)]
    if workers is None:
        workers = min(os.cpu_count() or 1, 4, max(1, num_images // 64))
    workers = max(1, min(int(workers), num_images))
    unguarded = _unguarded_main_script() if workers > 1 else None
    if unguarded:
        logger.info(
            "Generating the shapes '%s' split (%d images) into %s in this process: %s calls the generator "
            "outside an `if __name__ == \"__main__\":` block, and worker processes would run that script again. "
            "Put the call under that guard to generate with %d processes.", split, num_images, out_dir, unguarded,
            workers,
        )
        workers = 1
    elif multiprocessing.current_process().daemon and workers > 1:  # a daemon (a pool worker) has no children
        workers = 1
    if workers > 1:  # each image depends on its seed only, so the files are the same either way
        logger.info("Generating the shapes '%s' split (%d images) into %s with %d worker processes ...",
                    split, num_images, out_dir, workers)
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_write_image, jobs, chunksize=max(1, min(32, num_images // workers)))
    else:
        if not unguarded:
            logger.info("Generating the shapes '%s' split (%d images) into %s ...", split, num_images, out_dir)
        results = [_write_image(job) for job in jobs]
    images, annotations = [], []
    for i, ((h, w), annos) in enumerate(results):
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "height": h, "width": w})
        for anno in annos:
            annotations.append(dict(anno, id=len(annotations) + 1, image_id=i + 1))
    coco = {
        "info": {"description": "dinov2od shapes", "dinov2od_shapes": _stamp(num_images, seed)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(SHAPES_CLASSES)],
    }
    tmp = json_file + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(coco, f)
    os.replace(tmp, json_file)  # atomic: a half-written json is never picked up
    return json_file, out_dir
