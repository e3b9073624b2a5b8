"""The "glyphs" images: procedurally generated data for pretraining a backbone (not the demo's task).

A generator of its own, separate from the demo's "shapes" dataset (``dinov2od/d2/data/datasets/shapes.py``):
other object classes (12 glyphs, none of them a circle, square or triangle), other backgrounds
(sums of random plane waves, blurred noise, line clutter), its own seeds, and images drawn on the
fly, never written to disk. Each glyph is a filled, randomly rotated and stretched outline of
random colour and size (10 to 150 px across); glyphs may occlude each other.

Besides the RGB image, :func:`generate_glyphs_image` returns the per-pixel owner map, so dense
targets (class coverage per patch, each patch's object box, a fine foreground mask) follow from it
exactly.
"""
from __future__ import annotations

import functools
import math
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["GLYPH_CLASSES", "GLYPH_SEED_TAG", "generate_glyphs_image"]

GLYPH_CLASSES: Tuple[str, ...] = (
    "pentagon", "hexagon", "star4", "star5", "cross", "ring",
    "crescent", "half_disc", "letter_L", "letter_T", "letter_H", "arrow",
)
# Mixed into every seed, so no glyphs image shares a random stream with another generator.
GLYPH_SEED_TAG = 0x61797068  # "glyph"
MIN_EXTENT, MAX_EXTENT = 10.0, 150.0  # glyph size (pixels across), drawn log-uniformly
MIN_CONTRAST = 60.0


def _regular(n: int, r: float = 0.5, phase: float = 0.0) -> List[Tuple[float, float]]:
    return [(r * math.cos(phase + 2 * math.pi * k / n), r * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(n: int, inner: float) -> List[Tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = 0.5 if k % 2 == 0 else 0.5 * inner
        a = math.pi * k / n - math.pi / 2
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


# Polygons in unit coordinates (extent ~1, centred at 0); ring, crescent and half disc are drawn
# with ellipses / arcs instead.
_POLYGONS = {
    "pentagon": _regular(5, phase=-math.pi / 2),
    "hexagon": _regular(6),
    "star4": _star(4, 0.38),
    "star5": _star(5, 0.45),
    "cross": [(-0.15, -0.5), (0.15, -0.5), (0.15, -0.15), (0.5, -0.15), (0.5, 0.15), (0.15, 0.15),
              (0.15, 0.5), (-0.15, 0.5), (-0.15, 0.15), (-0.5, 0.15), (-0.5, -0.15), (-0.15, -0.15)],
    "letter_L": [(-0.35, -0.5), (-0.08, -0.5), (-0.08, 0.25), (0.35, 0.25), (0.35, 0.5), (-0.35, 0.5)],
    "letter_T": [(-0.45, -0.5), (0.45, -0.5), (0.45, -0.25), (0.13, -0.25), (0.13, 0.5), (-0.13, 0.5),
                 (-0.13, -0.25), (-0.45, -0.25)],
    "letter_H": [(-0.42, -0.5), (-0.17, -0.5), (-0.17, -0.12), (0.17, -0.12), (0.17, -0.5), (0.42, -0.5),
                 (0.42, 0.5), (0.17, 0.5), (0.17, 0.12), (-0.17, 0.12), (-0.17, 0.5), (-0.42, 0.5)],
    "arrow": [(-0.5, -0.1), (0.05, -0.1), (0.05, -0.32), (0.5, 0.0), (0.05, 0.32), (0.05, 0.1), (-0.5, 0.1)],
}


def _transform(pts, cx, cy, size, angle, stretch):
    c, s = math.cos(angle), math.sin(angle)
    out = []
    for x, y in pts:
        x, y = x * size * stretch, y * size / stretch
        out.append((cx + c * x - s * y, cy + s * x + c * y))
    return out


def _glyph_mask(h: int, w: int, name: str, cx: float, cy: float, size: float, angle: float,
                stretch: float, rng: np.random.Generator) -> np.ndarray:
    """Binary (h, w) mask of one glyph."""
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if name in _POLYGONS:
        draw.polygon(_transform(_POLYGONS[name], cx, cy, size, angle, stretch), fill=1)
        return np.asarray(canvas, dtype=bool)
    r = size / 2
    if name == "ring":
        inner = r * rng.uniform(0.45, 0.65)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0)
    elif name == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
        off = r * rng.uniform(0.35, 0.55)
        ox, oy = cx + off * math.cos(angle), cy + off * math.sin(angle)
        draw.ellipse([ox - r, oy - r, ox + r, oy + r], fill=0)
    elif name == "half_disc":
        start = math.degrees(angle)
        draw.pieslice([cx - r, cy - r, cx + r, cy + r], start, start + 180, fill=1)
    else:  # pragma: no cover - GLYPH_CLASSES and the drawing code are kept in step
        raise ValueError(f"unknown glyph {name!r}")
    return np.asarray(canvas, dtype=bool)


@functools.lru_cache(maxsize=64)
def _grid(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of an (h, w) image, float32 (shared, read-only)."""
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    gy.flags.writeable = gx.flags.writeable = False
    return gy, gx


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float32 in [0, 255]: plane waves or blurred noise, a ramp, sometimes line clutter."""
    gy, gx = _grid(h, w)
    img = np.broadcast_to(rng.uniform(30, 225, size=3).astype(np.float32), (h, w, 3)).copy()
    if rng.random() < 0.5:  # a sum of random plane waves, each with its own colour
        for _ in range(int(rng.integers(2, 5))):
            theta, period = rng.uniform(0, math.pi), rng.uniform(20, 200)
            wave = np.sin((gx * math.cos(theta) + gy * math.sin(theta)) * 2 * math.pi / period + rng.uniform(0, 6.3))
            img += wave[..., None] * rng.uniform(-45, 45, size=3).astype(np.float32)
    else:  # blurred noise at a random scale
        noise = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        noise = np.asarray(noise.filter(ImageFilter.GaussianBlur(rng.uniform(2, 12))), dtype=np.float32)
        img += (noise - noise.mean()) * rng.uniform(1.5, 5.0)
    direction = rng.uniform(-1, 1, size=2)
    img += ((gx / w * direction[0] + gy / h * direction[1])[..., None] * rng.uniform(-50, 50, size=3)).astype(np.float32)
    if rng.random() < 0.4:  # thin line clutter: edges that belong to no object
        canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 15))):
            x0, y0, x1, y1 = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)
            draw.line([(x0, y0), (x1, y1)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                      width=int(rng.integers(1, 3)))
        img = np.asarray(canvas, dtype=np.float32)
    return np.clip(img, 0, 255)


def generate_glyphs_image(seed: int, height: int = 224, width: int = 224, max_glyphs: int = 10,
                          extent: Tuple[float, float] = (MIN_EXTENT, MAX_EXTENT),
                          ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one glyphs image.

    Args:
        seed: the image's seed (mixed with :data:`GLYPH_SEED_TAG`); the same seed gives the same image.
        height, width: image size in pixels.
        max_glyphs: at most this many glyphs (at least 1 is attempted).
        extent: (smallest, largest) glyph size in pixels across, drawn log-uniformly (the largest is
            also capped at 0.8 of the shorter image side).

    Returns:
        image: (H, W, 3) uint8 RGB.
        owner: (H, W) int16, the index of the glyph visible at each pixel, -1 for background.
        classes: (N,) int64 class index (into :data:`GLYPH_CLASSES`) of each glyph.
    """
    rng = np.random.default_rng([GLYPH_SEED_TAG, int(seed)])
    h, w = int(height), int(width)
    img = _background(rng, h, w)
    owner = np.full((h, w), -1, dtype=np.int16)
    classes: List[int] = []
    full_area: List[int] = []
    ramp = _ramp(h, w, rng)
    target = int(rng.integers(1, max_glyphs + 1))
    for _ in range(target * 6):
        if len(classes) == target:
            break
        cls = int(rng.integers(len(GLYPH_CLASSES)))
        lo, hi = extent[0], max(min(extent[1], 0.8 * min(h, w)), extent[0])
        size = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
        stretch = float(np.exp(rng.uniform(-0.3, 0.3)))
        half = 0.6 * size * max(stretch, 1 / stretch)
        if 2 * half >= min(h, w):
            continue
        cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
        mask = _glyph_mask(h, w, GLYPH_CLASSES[cls], cx, cy, size, rng.uniform(0, 2 * math.pi), stretch, rng)
        if mask.sum() < 20:
            continue
        trial = owner.copy()
        trial[mask] = len(classes)
        if classes:
            left = np.bincount(trial.ravel() + 1, minlength=len(classes) + 2)[1:len(classes) + 1]
            if (left < 0.5 * np.asarray(full_area)).any():
                continue  # would hide more than half of an earlier glyph
        under = img[mask].mean(axis=0)
        colour = rng.uniform(0, 255, size=3)
        for _ in range(30):
            if np.linalg.norm(colour - under) >= MIN_CONTRAST:
                break
            colour = rng.uniform(0, 255, size=3)
        shade = (rng.random() - 0.5) * 60 * ramp[mask]
        img[mask] = np.clip(colour[None, :] + shade[:, None], 0, 255)
        owner = trial
        classes.append(cls)
        full_area.append(int(mask.sum()))
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(2, 10)
    return np.clip(img, 0, 255).astype(np.uint8), owner, np.asarray(classes, dtype=np.int64)


def _ramp(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) linear ramp in [-1, 1] along a random direction (shading inside a glyph)."""
    a = rng.uniform(0, 2 * math.pi)
    gy, gx = _grid(h, w)
    ramp = gx * math.cos(a) + gy * math.sin(a)
    return (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0) * 2 - 1
