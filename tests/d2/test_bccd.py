"""A real photographed dataset in three layouts: BCCD (datasets/BCCD, blood-cell microscopy, MIT
licence, (c) 2017 shenggan), 8 training and 4 validation images with their XMLs copied in VOC's
layout, then written by this test's own few-line converters as YOLO (data.yaml + train/images +
train/labels, Roboflow's ``../train/images`` paths) and as a Roboflow COCO export (category ids 1..3
plus Roboflow's dataset category 0). The three registrations must give the same dataset dicts
(files, sizes, boxes to float rounding, classes by name), and a VOC folder trains and evaluates
end to end on the offline config, predicting VOC's ids 0..2 with BCCD's names.

Negative controls, run by hand when this test was written: the YOLO converter here writing the
box centre without VOC's ``- 1`` made the comparison fail (boxes 0.5 px apart); the VOC reader
without ``xmin - 1`` did as well; the COCO json's category 2 renamed made it fail (names differ).
"""
import json
import os
import shutil
import xml.etree.ElementTree as ET

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog

from dinov2od.d2.data.datasets import register_coco_folder
from tests.helpers import ROOT
from tests.helpers.configs import TINY

BCCD = os.path.join(ROOT, "datasets", "BCCD")
NAMES = ["Platelets", "RBC", "WBC"]  # VOC: the sorted <name> tags, ids 0..2
LAZY = next(p for p in (os.path.join(ROOT, "configs", n) for n in ("custom_tiny.py", "shapes.py")) if os.path.isfile(p))

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(BCCD, "Annotations")), reason="datasets/BCCD not present")


def _ids(split, n):
    with open(os.path.join(BCCD, "ImageSets", "Main", f"{split}.txt")) as f:
        return [line.strip() for line in f if line.strip()][:n]


def _objects(stem):
    """(name, xmin, ymin, xmax, ymax) of an XML, read here with ElementTree, and the image size."""
    root = ET.parse(os.path.join(BCCD, "Annotations", stem + ".xml")).getroot()
    size = (int(root.find("size/width").text), int(root.find("size/height").text))
    return size, [(o.find("name").text, *(float(o.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")))
                  for o in root.findall("object")]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bccd")
    splits = {"train": _ids("train", 8), "val": _ids("val", 4)}
    voc, yolo, coco = tmp / "voc", tmp / "yolo", tmp / "coco"
    # VOC: the original files, a subset
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for split, stems in splits.items():
        (voc / "ImageSets/Main" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
        for s in stems:
            shutil.copy(os.path.join(BCCD, "Annotations", s + ".xml"), voc / "Annotations")
            shutil.copy(os.path.join(BCCD, "JPEGImages", s + ".jpg"), voc / "JPEGImages")
    # YOLO and COCO, written here (VOC's 1-based inclusive corners: x0 = xmin - 1, x1 = xmax)
    (yolo / "data.yaml").parent.mkdir(parents=True)
    (yolo / "data.yaml").write_text(f"train: ../train/images\nval: ../valid/images\nnc: 3\nnames: {NAMES}\n")
    for split, folder in (("train", "train"), ("val", "valid")):
        (yolo / folder / "images").mkdir(parents=True)
        (yolo / folder / "labels").mkdir(parents=True)
        (coco / folder).mkdir(parents=True)
        images, annotations = [], []
        for i, s in enumerate(splits[split]):
            (w, h), objs = _objects(s)
            shutil.copy(os.path.join(BCCD, "JPEGImages", s + ".jpg"), yolo / folder / "images")
            shutil.copy(os.path.join(BCCD, "JPEGImages", s + ".jpg"), coco / folder)
            lines = [f"{NAMES.index(n)} {(x0 - 1 + x1) / 2 / w} {(y0 - 1 + y1) / 2 / h} {(x1 - x0 + 1) / w} "
                     f"{(y1 - y0 + 1) / h}" for n, x0, y0, x1, y1 in objs]
            (yolo / folder / "labels" / (s + ".txt")).write_text("\n".join(lines) + "\n")
            images.append({"id": 100 + i, "file_name": s + ".jpg", "width": w, "height": h})
            annotations += [{"id": len(annotations), "image_id": 100 + i, "category_id": NAMES.index(n) + 1,
                             "bbox": [x0 - 1, y0 - 1, x1 - x0 + 1, y1 - y0 + 1], "area": (x1 - x0 + 1) * (y1 - y0 + 1),
                             "iscrowd": 0} for n, x0, y0, x1, y1 in objs]
        categories = [{"id": 0, "name": "cells", "supercategory": "none"}] + [
            {"id": k + 1, "name": n, "supercategory": "cells"} for k, n in enumerate(NAMES)]
        (coco / folder / "_annotations.coco.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return {"voc": str(voc), "yolo": str(yolo), "coco": str(coco)}


def _records(name):
    """A registered split's dicts, with class names for ids and boxes rounded to 1e-4 px."""
    classes = MetadataCatalog.get(name).thing_classes
    return [(os.path.basename(d["file_name"]), d["width"], d["height"],
             sorted((classes[a["category_id"]], tuple(round(v, 4) for v in a["bbox"]), a.get("iscrowd", 0))
                    for a in d["annotations"]))
            for d in DatasetCatalog.get(name)]


def test_voc_yolo_and_coco_registrations_give_the_same_dicts(layouts):
    names = {fmt: register_coco_folder(root, name=f"bccd_{fmt}", format=fmt) for fmt, root in layouts.items()}
    for fmt in layouts:
        assert MetadataCatalog.get(names[fmt]["train"]).thing_classes == NAMES
    assert MetadataCatalog.get(names["voc"]["train"]).thing_dataset_id_to_contiguous_id == {0: 0, 1: 1, 2: 2}
    assert MetadataCatalog.get(names["coco"]["train"]).thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    for split in ("train", "val"):
        voc, yolo, coco = (_records(names[fmt][split]) for fmt in ("voc", "yolo", "coco"))
        assert len(voc) == {"train": 8, "val": 4}[split] and all(r[1:3] == (640, 480) for r in voc)
        assert sum(len(r[3]) for r in voc) > 50  # real images hold many cells
        assert voc == coco
        assert yolo == voc  # through normalised coordinates: equal to 1e-4 px


def test_bccd_trains_and_evaluates_from_its_voc_folder(layouts, train_net, tmp_path):
    out = str(tmp_path / "out")
    tiny = [o for o in TINY if not o.startswith(("dataloader.train.dataset.names", "dataloader.test.dataset.names"))]
    results = train_net.run(LAZY, f"dataset.root={layouts['voc']}", "dataset.name=bccd_e2e",
                            f"train.output_dir={out}", "train.max_iter=2", "train.epochs=None", *tiny)
    assert "bbox" in results
    dets = json.load(open(os.path.join(out, "inference", "coco_instances_results.json")))
    assert dets and {d["category_id"] for d in dets} <= {0, 1, 2}  # VOC's ids
    from dinov2od.d2.data.metadata import classes_in_checkpoint

    assert classes_in_checkpoint(os.path.join(out, "model_final.pth")) == (NAMES, [0, 1, 2])
