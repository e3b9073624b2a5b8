#!/usr/bin/env python
"""Write a YOLO or Pascal VOC dataset as COCO jsons, in the Roboflow / RF-DETR layout.

    python tools/convert_dataset.py --input datasets/BCCD --output /data/BCCD_coco
    python tools/convert_dataset.py --input my_yolo --output my_coco --images reference

OUTPUT/train/_annotations.coco.json, OUTPUT/valid/... (the yaml's val, VOC's val.txt),
OUTPUT/test/... (the yaml's test, VOC's test.txt) with the images beside them: copied
(``--images copy``, the default: the output is a dataset of its own) or referenced by their
absolute paths (``--images reference``: nothing is copied; the json works only while the input
stays where it is). The splits, classes, ids and boxes are exactly what training on the input
folder reads (dinov2od.d2.data.datasets.formats): YOLO's class indices 0..K-1 and data.yaml's names;
VOC's class names sorted, ids 0..K-1, boxes as Detectron2's VOC loader reads them, ``difficult``
objects as ``iscrowd: 1``. No ``supercategory`` is written (the Roboflow dataset-category rule does
not apply to these files); annotation ids start at 1.

The output folder must not exist or be empty, and must not lie inside the input: nothing is
overwritten. The input is read with the same checks as training (a line, XML or file that cannot
be read stops the conversion with a list of them).
"""
import argparse
import json
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dinov2od.d2.data.datasets.folder import DatasetError  # noqa: E402
from dinov2od.d2.data.datasets.formats import read_dataset  # noqa: E402

SPLIT_FOLDERS = {"train": "train", "val": "valid", "test": "test"}  # Roboflow's folder names
logger = logging.getLogger("dinov2od.convert_dataset")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a YOLO folder (data.yaml) or a Pascal VOC folder (Annotations/)")
    p.add_argument("--output", required=True, help="a new (or empty) folder for the COCO jsons")
    p.add_argument("--format", default="auto", choices=("auto", "yolo", "voc"), help="the input's layout")
    p.add_argument("--images", default="copy", choices=("copy", "reference"),
                   help="copy the images beside the jsons, or reference them by absolute path")
    return p.parse_args(argv)


def _clean(data: dict) -> dict:
    """The COCO dict without the reader's ``dinov2od_source`` fields (label file / XML of each entry)."""
    drop = lambda d: {k: v for k, v in d.items() if k != "dinov2od_source"}  # noqa: E731
    return {"info": data.get("info", {}), "images": [drop(i) for i in data["images"]],
            "annotations": [drop(a) for a in data["annotations"]], "categories": data["categories"]}


def convert(input_dir: str, output_dir: str, fmt: str = "auto", images: str = "copy") -> dict:
    """Convert; returns ``{split folder: (images, boxes)}``."""
    src, out = os.path.realpath(input_dir), os.path.realpath(output_dir)
    if out == src or out.startswith(src + os.sep):
        raise SystemExit(f"convert_dataset.py: the output {output_dir} lies inside the input {input_dir}; "
                         "give a folder outside it (the input is never written to).")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SystemExit(f"convert_dataset.py: {output_dir} exists and is not an empty folder; nothing is overwritten. "
                         "Give a new folder.")
    try:
        fmt, splits = read_dataset(input_dir, fmt)
    except (DatasetError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"convert_dataset.py: {e}") from None
    written = {}
    for split, (data, image_root) in splits.items():
        folder = os.path.join(out, SPLIT_FOLDERS[split])
        os.makedirs(folder, exist_ok=True)
        data = _clean(data)
        data["info"] = {"description": f"{input_dir} ({fmt}, {split}) converted by dinov2od tools/convert_dataset.py"}
        seen = {}
        for img in data["images"]:
            source = os.path.join(image_root, img["file_name"])
            if images == "reference":
                img["file_name"] = os.path.abspath(source)
                continue
            name = os.path.basename(img["file_name"])
            if name in seen:
                raise SystemExit(f"convert_dataset.py: two images of {split} are named {name} ({seen[name]}, "
                                 f"{img['file_name']}); rename one, or use --images reference.")
            seen[name] = img["file_name"]
            shutil.copy2(source, os.path.join(folder, name))
            img["file_name"] = name
        with open(os.path.join(folder, "_annotations.coco.json"), "w", encoding="utf-8") as f:
            json.dump(data, f)
        written[SPLIT_FOLDERS[split]] = (len(data["images"]), len(data["annotations"]))
        print(f"{folder}/_annotations.coco.json: {len(data['images'])} images, {len(data['annotations'])} boxes, "
              f"{len(data['categories'])} classes {[c['name'] for c in data['categories']][:10]}")
    return written


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    args = parse_args(argv)
    convert(args.input, args.output, args.format, args.images)


if __name__ == "__main__":
    main()
