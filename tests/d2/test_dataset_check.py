"""The start-up dataset check means what it says, and Roboflow's dataset category is no class
(issue 29, items 3 and 4).

Each test builds the json by hand, the way the tool that makes such a file writes it, and shows
both what the check reports and, as its negative control, what happens without it: the header-only
mode passes a truncated file that training then fails on; Detectron2's own registration makes a
phantom class of Roboflow's dataset category; Detectron2's loader silently merges two images of one
id, or stops with a TypeError deep in a sort. Tiny images; the whole file runs in a few seconds.
"""
import copy
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.structures import Boxes, BoxMode, Instances

from tests.helpers import ROOT
from dinov2od.d2.config import check_config_datasets, load_config
from dinov2od.d2.data.dataset_mapper import DetrDatasetMapper
from dinov2od.d2.data.datasets import DatasetError, check_coco_dataset
from tests.helpers.user_data import unique_dataset_name, write_roboflow_dataset

CUSTOM_PY = os.path.join(ROOT, "configs/custom.py")
CUSTOM_YAML = os.path.join(ROOT, "configs/yaml/custom.yaml")


def _write_images(folder, sizes, colour=(90, 120, 60)):
    """JPEGs ``im{i}.jpg`` of the given (width, height), each with a bright rectangle."""
    os.makedirs(folder, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        a = np.full((h, w, 3), colour, np.uint8)
        a[h // 4: h // 2, w // 4: w // 2] = 230
        Image.fromarray(a).save(os.path.join(folder, f"im{i}.jpg"), quality=90)


def _coco(images, annotations, categories=None):
    return {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}


def _dump(folder, data, name="ann.json"):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3])
    with Image.open(path) as im:  # the header still reads: only decoding finds the damage
        assert im.size[0] > 0


# ---------------------------------------------------------------------------- 1. truncated files
@pytest.mark.parametrize("split", ["train", "valid"])
def test_truncated_jpeg_is_found_before_training(tmp_path, split):
    """A JPEG cut short (header intact) in the training or the validation split stops the run at
    start-up, naming the file. Negative control: the header-only mode passes it, and the file is
    what training (or evaluation, for the validation split) would fail on later."""
    root = write_roboflow_dataset(str(tmp_path / "data"), num_train=4, num_valid=4)
    data = json.load(open(os.path.join(root, split, "_annotations.coco.json")))
    jpeg = next(im["file_name"] for im in data["images"] if im["file_name"].endswith(".jpg"))
    _truncate(os.path.join(root, split, jpeg))
    cfg = load_config(CUSTOM_PY, [f"dataset.root={root}", f"dataset.name={unique_dataset_name('trunc')}"])
    with pytest.raises(DatasetError, match=rf"{jpeg}: cannot be decoded as an image \(OSError: image file is truncated"):
        check_config_datasets(cfg)
    # negative control: the header-only mode (the old check) does not see it ...
    cfg = load_config(CUSTOM_PY, [f"dataset.root={root}", f"dataset.name={unique_dataset_name('trunch')}",
                                  "dataset.check_images=header"])
    check_config_datasets(cfg)
    # ... and it is what the mapper (training; evaluation reads images the same way) fails on
    mapper = DetrDatasetMapper(is_train=split == "train", augmentations=[], image_format="RGB")
    record = {"file_name": os.path.join(root, split, jpeg), "height": 1, "width": 1, "annotations": []}
    with pytest.raises(ValueError, match=rf"Cannot decode image file .*{jpeg}"):
        mapper(record)


def _check_as_rank(rank, world, port, root, out):
    """One process of a 2-process gloo job: the start-up check as train_net runs it; writes the images
    this rank opened and the error it raised (if any) to ``out``/rank<r>.json."""
    import torch.distributed as dist

    from dinov2od.d2.data.datasets import check as check_module

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    opened, size = [], check_module._image_size

    def spy(path, decode):
        opened.append(os.path.basename(path))
        return size(path, decode)

    check_module._image_size = spy
    error = None
    try:
        cfg = load_config(CUSTOM_PY, [f"dataset.root={root}", "dataset.name=ddp_check"])
        check_config_datasets(cfg, ("train",))
    except DatasetError as e:
        error = str(e)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"opened": opened, "error": error}, f)
    dist.destroy_process_group()


def test_a_distributed_job_shares_the_images_and_every_rank_reports_every_problem(tmp_path):
    """2 gloo processes (as ``--num-gpus 2``): each opens half of the images (before, every rank decoded
    the whole dataset: 8 GPUs, 8 decodes of COCO), and a truncated file in rank 1's half stops rank 0
    too, with the same message (the problems are gathered). Negative control: with the gather
    removed from check_datasets (gather=None), rank 0 raised nothing and would have gone on to wait
    for rank 1 in the first collective of training; this test then fails on rank 0's error."""
    import multiprocessing

    from tests.helpers.ddp_jobs import JOB_TIMEOUT, free_port

    root = write_roboflow_dataset(str(tmp_path / "data"), num_train=6, num_valid=2)
    data = json.load(open(os.path.join(root, "train", "_annotations.coco.json")))
    names = [os.path.basename(im["file_name"]) for im in data["images"]]
    bad = names[3]  # rank 1's share: images 1, 3, 5
    _truncate(os.path.join(root, "train", data["images"][3]["file_name"]))
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_check_as_rank, args=(r, 2, port, root, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOB_TIMEOUT)
        if p.is_alive():
            p.terminate()
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert sorted(ranks[0]["opened"]) == sorted(names[0::2]) and sorted(ranks[1]["opened"]) == sorted(names[1::2])
    for r in ranks:
        assert r["error"] is not None and f"{bad}: cannot be decoded as an image" in r["error"]
    assert ranks[0]["error"] == ranks[1]["error"]


def test_check_modes_in_both_config_styles(tmp_path):
    root = write_roboflow_dataset(str(tmp_path / "data"), num_train=2, num_valid=2)
    for opts, mode in (([], "decode"), (["dataset.check_images=header"], "header"), (["dataset.check=False"], False)):
        name = unique_dataset_name("mode")
        load_config(CUSTOM_PY, [f"dataset.root={root}", f"dataset.name={name}", *opts])
        assert MetadataCatalog.get(f"{name}_train").dinov2od_check == mode
    for opts, mode in (([], "decode"), (["DATASETS.CHECK_IMAGES", "header"], "header"), (["DATASETS.CHECK", "False"], False)):
        name = unique_dataset_name("ymode")
        load_config(CUSTOM_YAML, ["DATASETS.ROOT", root, "DATASETS.NAME", name, *opts])
        assert MetadataCatalog.get(f"{name}_train").dinov2od_check == mode
    with pytest.raises(ValueError, match=r"dataset\.check_images / DATASETS\.CHECK_IMAGES must be one of \['decode', 'header'\]"):
        load_config(CUSTOM_PY, [f"dataset.root={root}", f"dataset.name={unique_dataset_name('mode')}", "dataset.check_images=full"])


# ---------------------------------------------------------------------------- 2. Roboflow's dataset category
def _roboflow_split(folder, num_images, first_id=0):
    """A split as Roboflow writes it: info, licenses, the dataset itself as category 0 (no boxes;
    the supercategory of every class), 0-based image and annotation ids, empty segmentation."""
    sizes = [(96, 80)] * num_images
    _write_images(folder, sizes)
    images, annotations = [], []
    for i, (w, h) in enumerate(sizes):
        images.append({"id": i, "license": 1, "file_name": f"im{i}.jpg", "height": h, "width": w,
                       "date_captured": "2024-01-01T00:00:00+00:00"})
        for cat, box in ((1, [24, 20, 24, 20]), (2, [60, 40, 20, 30])):
            annotations.append({"id": len(annotations), "image_id": i, "category_id": cat, "bbox": box,
                                "area": box[2] * box[3], "segmentation": [], "iscrowd": 0})
    data = {
        "info": {"year": "2024", "version": "1", "description": "Exported from roboflow.com", "contributor": "",
                 "url": "https://public.roboflow.com/object-detection/undefined", "date_created": "2024-01-01"},
        "licenses": [{"id": 1, "url": "https://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}],
        "categories": [{"id": 0, "name": "my-dataset", "supercategory": "none"},
                       {"id": 1, "name": "ellipse", "supercategory": "my-dataset"},
                       {"id": 2, "name": "rect", "supercategory": "my-dataset"}],
        "images": images,
        "annotations": annotations,
    }
    _dump(folder, data, "_annotations.coco.json")
    return data


def test_roboflow_dataset_category_is_no_class_and_evaluation_keeps_the_ids(tmp_path, caplog):
    root = str(tmp_path / "rf")
    _roboflow_split(os.path.join(root, "train"), 3)
    val = _roboflow_split(os.path.join(root, "valid"), 2)
    name = unique_dataset_name("rf")
    caplog.set_level(logging.INFO, logger="dinov2od")
    cfg = load_config(CUSTOM_PY, [f"dataset.root={root}", f"dataset.name={name}",
                                  f"train.output_dir={tmp_path}/out"])
    assert cfg.model.num_classes == 2
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"{name}_{split}")
        assert meta.thing_classes == ["ellipse", "rect"]
        assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1}  # the json's ids, not renumbered
        assert not meta.json_file.startswith(root)  # the copy Detectron2 reads is not in the user's folder
    assert "category 'my-dataset' (id 0) has no boxes and is the supercategory of every other category" in caplog.text
    assert json.load(open(os.path.join(root, "valid/_annotations.coco.json")))["categories"][0]["id"] == 0  # untouched
    check_config_datasets(cfg)  # the check reads the user's own file and passes
    # the loader: contiguous labels 0, 1 for ids 1, 2 (no AssertionError from a changed thing_classes)
    dicts = DatasetCatalog.get(f"{name}_train")
    assert sorted({a["category_id"] for d in dicts for a in d["annotations"]}) == [0, 1]
    # the classes a trained model carries: the user's names and ids
    from dinov2od.d2.data.metadata import classes_from_dataset

    assert classes_from_dataset(f"{name}_train") == (["ellipse", "rect"], [1, 2])
    # evaluation: COCOEvaluator on perfect predictions gives 100 AP per class, no nan row, ids 1 and 2
    from detectron2.evaluation import COCOEvaluator

    evaluator = COCOEvaluator(f"{name}_val", output_dir=str(tmp_path / "eval"))
    evaluator.reset()
    for img in val["images"]:
        anns = [a for a in val["annotations"] if a["image_id"] == img["id"]]
        inst = Instances((img["height"], img["width"]))
        inst.pred_boxes = Boxes(torch.tensor([BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
                                              for a in anns], dtype=torch.float32))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] - 1 for a in anns])  # labels 0, 1
        evaluator.process([{"image_id": img["id"]}], [{"instances": inst}])
    res = evaluator.evaluate()["bbox"]
    assert res["AP"] == pytest.approx(100.0) and res["AP-ellipse"] == pytest.approx(100.0)
    assert res["AP-rect"] == pytest.approx(100.0) and not any(k.endswith("my-dataset") for k in res)
    written = json.load(open(tmp_path / "eval" / "coco_instances_results.json"))
    assert sorted({r["category_id"] for r in written}) == [1, 2]
    # negative control for the annotation ids: pycocotools on the user's own file (ids from 0, as
    # Roboflow writes them) scores the same perfect detections below 100 (id 0 reads as "no match")
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(os.path.join(root, "valid/_annotations.coco.json"))
        ev = COCOeval(gt, gt.loadRes(written), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] < 0.9
    # negative control: Detectron2's registration of the same file (what main did) has a phantom class
    register_coco_instances(f"{name}_d2", {}, os.path.join(root, "train/_annotations.coco.json"),
                            os.path.join(root, "train"))
    DatasetCatalog.get(f"{name}_d2")
    assert MetadataCatalog.get(f"{name}_d2").thing_classes == ["my-dataset", "ellipse", "rect"]


def test_a_category_with_boxes_or_without_the_supercategory_pattern_stays_a_class(tmp_path):
    from dinov2od.d2.data.datasets.folder import coco_classes

    data = _roboflow_split(str(tmp_path / "a"), 1)
    assert coco_classes(data, "x")[:2] == (["ellipse", "rect"], [1, 2])
    used = copy.deepcopy(data)
    used["annotations"][0]["category_id"] = 0  # a box of it: a class
    assert coco_classes(used, "x")[:2] == (["my-dataset", "ellipse", "rect"], [0, 1, 2])
    other = copy.deepcopy(data)
    other["categories"][2]["supercategory"] = "shapes"  # not every class under it
    assert coco_classes(other, "x")[:2] == (["my-dataset", "ellipse", "rect"], [0, 1, 2])


# ---------------------------------------------------------------------------- 3. ids
def test_duplicate_image_id_is_an_error_naming_both_files(tmp_path):
    folder = str(tmp_path)
    _write_images(folder, [(64, 48), (64, 48), (64, 48)])
    data = _coco([{"id": 1, "file_name": "im0.jpg", "width": 64, "height": 48},
                  {"id": 1, "file_name": "im1.jpg", "width": 64, "height": 48},
                  {"id": 2, "file_name": "im2.jpg", "width": 64, "height": 48}],
                 [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "iscrowd": 0},
                  {"id": 2, "image_id": 2, "category_id": 2, "bbox": [1, 1, 20, 20], "iscrowd": 0}])
    path = _dump(folder, data)
    with pytest.raises(DatasetError, match=r"image id 1 is listed 2 times \(im0\.jpg, im1\.jpg\): Detectron2 keeps only one"):
        check_coco_dataset(path, folder)
    # negative control: Detectron2's loader silently keeps 2 of the 3 images
    assert len(load_coco_json(path, folder)) == 2


def test_mixed_image_id_types_are_an_error_with_the_fix(tmp_path):
    folder = str(tmp_path)
    _write_images(folder, [(64, 48), (64, 48)])
    data = _coco([{"id": 1, "file_name": "im0.jpg", "width": 64, "height": 48},
                  {"id": "b", "file_name": "im1.jpg", "width": 64, "height": 48}],
                 [{"id": 1, "image_id": "b", "category_id": 1, "bbox": [1, 1, 20, 20], "iscrowd": 0}])
    path = _dump(folder, data)
    with pytest.raises(DatasetError, match=r"image ids mix integers \(e\.g\. 1 \(im0\.jpg\)\) and strings "
                                           r"\(e\.g\. 'b' \(im1\.jpg\)\).*Fix: write every image id as an integer"):
        check_coco_dataset(path, folder)
    with pytest.raises(TypeError, match="'<' not supported between instances of 'str' and 'int'"):
        load_coco_json(path, folder)  # negative control: what training met on main


def test_duplicate_category_names_and_annotation_ids_are_errors(tmp_path):
    folder = str(tmp_path)
    _write_images(folder, [(64, 48)])
    data = _coco([{"id": 1, "file_name": "im0.jpg", "width": 64, "height": 48}],
                 [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 20, 20], "iscrowd": 0},
                  {"id": 7, "image_id": 1, "category_id": 4, "bbox": [30, 1, 20, 20], "iscrowd": 0}],
                 [{"id": 1, "name": "cat"}, {"id": 4, "name": "cat"}])
    path = _dump(folder, data)
    with pytest.raises(DatasetError) as err:
        check_coco_dataset(path, folder)
    msg = str(err.value)
    assert "2 problem(s)" in msg and "category name 'cat' is used by ids [1, 4]" in msg
    assert "annotation ids listed more than once: 7 (2x)" in msg
    # negative control: Detectron2 takes the two names as two classes
    name = unique_dataset_name("dupname")
    data["annotations"][1]["id"] = 8
    path = _dump(folder, data, "ok_ids.json")
    register_coco_instances(name, {}, path, folder)
    DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).thing_classes == ["cat", "cat"]


# ---------------------------------------------------------------------------- 4. boxes
def test_boxes_beyond_the_image_are_clipped_and_counted_outside_ones_refused(tmp_path, caplog):
    folder = str(tmp_path)
    _write_images(folder, [(64, 48), (64, 48)])
    images = [{"id": 1, "file_name": "im0.jpg", "width": 64, "height": 48},
              {"id": 2, "file_name": "im1.jpg", "width": 64, "height": 48}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [-6, 10, 30, 20], "iscrowd": 0},  # 6 px left
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [40, 30, 30, 30], "iscrowd": 0},  # right + bottom
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [10, 10, 54.5, 20], "iscrowd": 0}]  # 0.5 px: within
    path = _dump(folder, _coco(images, anns))
    caplog.set_level(logging.WARNING, logger="dinov2od")
    summary = check_coco_dataset(path, folder)
    assert summary.num_beyond == 2 and summary.num_boxes == 3
    assert "2 box(es) in 2 image(s) reach more than 1 px beyond their image (first: annotation id 1" in caplog.text
    assert "training clips them to the image" in caplog.text
    # what training does with them: Detectron2's transform clips to the image
    clipped = d2_utils.transform_instance_annotations(
        {"bbox": [-6, 10, 30, 20], "bbox_mode": BoxMode.XYWH_ABS}, T.TransformList([]), (48, 64))
    assert clipped["bbox"].tolist() == [0, 10, 24, 30]
    # a box entirely outside: an error (training would drop it, evaluation count a miss)
    anns.append({"id": 4, "image_id": 1, "category_id": 1, "bbox": [70, 10, 10, 10], "iscrowd": 0})
    path = _dump(folder, _coco(images, anns))
    with pytest.raises(DatasetError, match=r"annotation id 4 \(image id 1, im0\.jpg\): bbox \[70, 10, 10, 10\] lies "
                                           r"entirely outside the 64x48 image"):
        check_coco_dataset(path, folder)
    outside = d2_utils.transform_instance_annotations(  # negative control: training would drop it silently
        {"bbox": [70, 10, 10, 10], "bbox_mode": BoxMode.XYWH_ABS}, T.TransformList([]), (48, 64))
    inst = d2_utils.annotations_to_instances([dict(outside, category_id=0)], (48, 64))
    assert len(d2_utils.filter_empty_instances(inst)) == 0


def test_crowd_boxes_are_reported_with_what_training_and_evaluation_do(tmp_path, caplog):
    folder = str(tmp_path)
    _write_images(folder, [(64, 48), (64, 48)])
    images = [{"id": 1, "file_name": "im0.jpg", "width": 64, "height": 48},
              {"id": 2, "file_name": "im1.jpg", "width": 64, "height": 48}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [30, 10, 30, 30], "area": 900, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 30], "area": 900, "iscrowd": 1}]
    path = _dump(folder, _coco(images, anns))
    caplog.set_level(logging.WARNING, logger="dinov2od")
    summary = check_coco_dataset(path, folder)
    assert (summary.num_crowd, summary.num_boxes, summary.num_images_with_boxes) == (2, 1, 1)
    assert "2 iscrowd box(es) in 2 image(s) (first: annotation id 2 (image id 1, im0.jpg)); training ignores them" in caplog.text
    # training: the mapper keeps the one non-crowd box; the crowd-only image is left out
    dicts = load_coco_json(path, folder, None)
    for d in dicts:
        for a in d["annotations"]:
            a["category_id"] -= 1
    mapper = DetrDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    assert len(mapper(dicts[0])["instances"]) == 1
    assert [d["image_id"] for d in filter_images_with_only_crowd_annotations(dicts)] == [1]
    # evaluation: a detection on a crowd region is neither a hit nor a false positive
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(path)
        dets = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "score": 0.9},
                {"image_id": 1, "category_id": 1, "bbox": [30, 10, 30, 30], "score": 0.95},
                {"image_id": 2, "category_id": 2, "bbox": [5, 5, 30, 30], "score": 0.99}]
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # the crowd detections cost nothing


# ---------------------------------------------------------------------------- 5. the shapes generator
# The user's script. It loads shapes.py on its own (numpy and PIL only) to keep the test fast: the
# package import (Detectron2, torch) takes seconds per process on a loaded 2-core machine.
SCRIPT = """
import importlib.util, logging, sys
logging.basicConfig(level=logging.INFO)
spec = importlib.util.spec_from_file_location("shapes_standalone", {path!r})
shapes = importlib.util.module_from_spec(spec)
sys.modules["shapes_standalone"] = shapes  # so that workers can unpickle its functions
spec.loader.exec_module(shapes)
{call}
"""


@pytest.mark.parametrize("guard", [False, True])
def test_shapes_generation_from_a_script_without_main_guard_does_not_hang(tmp_path, guard):
    """Worker processes started with spawn re-run the caller's script; without a main guard they
    die and the pool waited forever (negative control, the old code: this unguarded script, with
    130 images, timed out). Now such a caller generates in its own process, and says why; a guarded
    one gets its worker processes."""
    import subprocess
    import sys

    call = f"shapes.ensure_shapes_split('val', root={str(tmp_path)!r}, num_images=8, workers=2)"
    if guard:
        call = "if __name__ == '__main__':\n    " + call
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT.format(path=os.path.join(ROOT, "dinov2od/d2/data/datasets/shapes.py"), call=call))
    out = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    coco = json.load(open(tmp_path / "shapes" / "val" / "annotations.json"))
    assert len(coco["images"]) == 8 and len(os.listdir(tmp_path / "shapes" / "val")) == 9
    if guard:
        assert "with 2 worker processes" in out.stderr
    else:
        assert f"in this process: {script} calls the generator outside an `if __name__ == \"__main__\":` block" in out.stderr
