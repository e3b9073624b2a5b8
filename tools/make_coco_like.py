"""Write a synthetic COCO-train-sized annotation file (for start-up benchmarks and tests).

    python tools/make_coco_like.py /tmp/coco_like                 # 118,287 images, ~860k boxes (~450 MB)
    python tools/make_coco_like.py /tmp/coco_small --num-images 50 # a small one

Writes ``<folder>/annotations.json`` and ``<folder>/images/`` with a handful of real small
JPEG files that every image entry reuses by ``file_name`` (its width/height are the file's). The
json has COCO's layout and proportions: COCO's 80 category ids (1..90 with its ten gaps), ~7.3
boxes per image on average (geometric-like, some images without boxes: ~1% as in COCO train),
each box with a polygon ``segmentation`` of 8 to 24 points (~500 bytes per annotation, like
instances_train2017.json). Deterministic for a given ``--seed``. The json is streamed in chunks,
so writing it needs ~1 GiB of memory whatever its size.

Register it with ``register_coco_instances(name, {}, "<folder>/annotations.json", "<folder>/images")``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

import numpy as np

COCO_IMAGES = 118287
# COCO's category ids: 1..90 without these ten
COCO_GAPS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_CATEGORY_IDS = [i for i in range(1, 91) if i not in COCO_GAPS]
# the real image files (width, height) reused by file_name
IMAGE_SIZES = [(64, 48), (48, 64), (80, 60), (56, 56), (96, 64)]

__all__ = ["COCO_CATEGORY_IDS", "COCO_IMAGES", "make_coco_like"]


def _write_images(folder: str) -> List[tuple]:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    files = []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(IMAGE_SIZES):
        name = f"img{i}.jpg"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        files.append((name, w, h))
    return files


def make_coco_like(folder: str, num_images: int = COCO_IMAGES, seed: int = 0, chunk: int = 5000) -> str:
    """Write ``<folder>/annotations.json`` (+ ``<folder>/images``); returns the json's path."""
    files = _write_images(os.path.join(folder, "images"))
    rng = np.random.default_rng(seed)
    json_path = os.path.join(folder, "annotations.json")
    tmp = json_path + ".tmp"
    cats = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in COCO_CATEGORY_IDS]
    # boxes per image: 0 for ~1% of images, else 1 + geometric, mean ~7.3 (COCO train: 860001 / 118287)
    counts = np.where(rng.random(num_images) < 0.01, 0, rng.geometric(1 / 7.4, num_images))
    ann_id = 1
    with open(tmp, "w") as f:
        f.write('{"info": {"description": "synthetic COCO-like (tools/make_coco_like.py)"}, "licenses": [], ')
        f.write('"categories": ' + json.dumps(cats) + ', "images": [')
        for start in range(0, num_images, chunk):
            ids = range(start, min(start + chunk, num_images))
            imgs = []
            for i in ids:
                name, w, h = files[i % len(files)]
                imgs.append({"id": i + 1, "file_name": name, "width": w, "height": h, "license": 1,
                             "coco_url": "", "date_captured": "2013-11-14 11:18:45"})
            f.write(("," if start else "") + json.dumps(imgs)[1:-1])
        f.write('], "annotations": [')
        first = True
        for start in range(0, num_images, chunk):
            anns = []
            for i in range(start, min(start + chunk, num_images)):
                n = int(counts[i])
                if not n:
                    continue
                _, w, h = files[i % len(files)]
                x0 = rng.random(n) * (w - 4)
                y0 = rng.random(n) * (h - 4)
                bw = 2 + rng.random(n) * (w - x0 - 2)
                bh = 2 + rng.random(n) * (h - y0 - 2)
                cls = rng.integers(0, len(COCO_CATEGORY_IDS), n)
                npts = rng.integers(8, 25, n)
                for k in range(n):
                    t = np.linspace(0, 2 * np.pi, int(npts[k]), endpoint=False)
                    px = x0[k] + bw[k] * (0.5 + 0.5 * np.cos(t))
                    py = y0[k] + bh[k] * (0.5 + 0.5 * np.sin(t))
                    poly = np.round(np.stack([px, py], 1).ravel(), 2).tolist()
                    anns.append({
                        "id": ann_id, "image_id": i + 1, "category_id": COCO_CATEGORY_IDS[int(cls[k])],
                        "bbox": [round(float(x0[k]), 2), round(float(y0[k]), 2), round(float(bw[k]), 2),
                                 round(float(bh[k]), 2)],
                        "area": round(float(bw[k] * bh[k] * 0.785), 2), "iscrowd": 0, "segmentation": [poly],
                    })
                    ann_id += 1
            if anns:
                f.write(("" if first else ",") + json.dumps(anns)[1:-1])
                first = False
        f.write("]}")
    os.replace(tmp, json_path)
    return json_path


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (flags: ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="output folder (annotations.json + images/)")
    parser.add_argument("--num-images", type=int, default=COCO_IMAGES, help="images (default: COCO train's 118287)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    path = make_coco_like(args.folder, args.num_images, args.seed)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
