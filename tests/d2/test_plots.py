"""The pictures a run leaves in its output folder (dinov2od/d2/evaluation/plots.py), checked by their numbers.

- the confusion matrix on a hand-built case whose every kind of cell (correct, wrong class,
  background false positive, missed, a duplicate, a crowd region, same-class preference) has a
  known count, through the array function and through the COCO jsons of the entry;
- the PR curves' areas against pycocotools' own ``stats``, and per_class_ap.csv against
  pycocotools run on each class alone, on hand-made ground truth and detections;
- results.png's series from a hand-written metrics.json (a resumed run, evaluation lines, a line
  cut short, aux layers, none of AP);
- one tiny training (lazy) and one ``--eval-only`` (yacs) through tools/train_net.py leave the
  files, and a picture that fails to draw does not fail the run.
"""
import contextlib
import csv
import io
import json
import math
import os

import numpy as np
import pytest

from tests.helpers.configs import TINY, TINY_YACS, YACS_YAML

from dinov2od.d2.evaluation import confusion, curves, examples, per_class, plots

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
NAMES = ["cat", "dog", "bird"]


def _image_files(root, ids, size=(200, 200)):
    from PIL import Image

    images = []
    for i in ids:
        Image.new("RGB", size, (40 * (i % 6), 120, 200)).save(root / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": size[0], "height": size[1]})
    return images


def _ann(n, image_id, cat, box, crowd=0):
    return {"id": n, "image_id": image_id, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": crowd}


# ---------------------------------------------------------------------------- confusion matrix
# (image, category, xywh box) of the ground truth; cat 3, dog 7, bird 11
CONFUSION_GT = [
    (1, 3, [10, 10, 40, 40]), (1, 7, [100, 100, 50, 50]),
    (2, 11, [20, 20, 60, 60]), (2, 3, [120, 120, 40, 40]),
    (3, 7, [50, 50, 40, 40]),
    (4, 3, [0, 0, 100, 100]), (4, 7, [10, 0, 100, 100]),  # overlapping (IoU 0.82)
]
CONFUSION_CROWD = [(5, 3, [0, 0, 100, 100])]
CONFUSION_DETS = [
    (1, 3, [10, 10, 40, 40], 0.9),    # cat on the cat: correct
    (1, 7, [102, 102, 50, 50], 0.8),  # dog on the dog (IoU 0.85): correct
    (1, 3, [150, 10, 30, 30], 0.7),   # on nothing: a background false positive
    (1, 3, [11, 11, 40, 40], 0.6),    # the cat again, already taken: a false positive (duplicate)
    (1, 7, [100, 100, 50, 50], 0.2),  # below the score threshold: not counted
    (2, 7, [20, 20, 60, 60], 0.9),    # dog on the bird: the wrong class
    (2, 3, [120, 120, 40, 40], 0.1),  # below the threshold: that cat is missed
    (3, 11, [70, 50, 40, 40], 0.5),   # IoU 0.33 with the dog: a false positive, and the dog is missed
    (4, 3, [10, 0, 100, 100], 0.9),   # IoU 1 with the dog, 0.82 with the cat: takes the cat (own class); dog missed
    (5, 3, [10, 10, 50, 50], 0.9),    # inside a crowd region: not counted
    (5, 7, [150, 150, 40, 40], 0.9),  # on nothing: a false positive
]
# rows: ground truth cat, dog, bird, background; columns: predicted cat, dog, bird, missed
CONFUSION_EXPECTED = np.array([
    [2, 0, 0, 1],
    [0, 1, 0, 2],
    [0, 1, 0, 0],
    [2, 1, 1, 0],
])


def _xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def test_confusion_matrix_counts_each_kind_of_cell():
    index = {c["id"]: i for i, c in enumerate(CATEGORIES)}
    images = []
    for image_id in range(1, 7):  # image 6: nothing at all
        gt = [(index[c], _xyxy(b)) for i, c, b in CONFUSION_GT if i == image_id]
        dets = [(index[c], _xyxy(b), s) for i, c, b, s in CONFUSION_DETS if i == image_id]
        images.append({
            "gt_boxes": np.array([b for _, b in gt]).reshape(-1, 4), "gt_classes": np.array([c for c, _ in gt]),
            "crowd_boxes": np.array([_xyxy(b) for i, _, b in CONFUSION_CROWD if i == image_id]).reshape(-1, 4),
            "pred_boxes": np.array([b for _, b, _ in dets]).reshape(-1, 4),
            "pred_classes": np.array([c for c, _, _ in dets]), "pred_scores": np.array([s for _, _, s in dets]),
        })
    matrix = confusion.confusion_matrix(images, 3, iou_threshold=0.5, score_threshold=0.25)
    np.testing.assert_array_equal(matrix, CONFUSION_EXPECTED)
    # every non-crowd ground truth box is in its row once; every counted prediction in its column once
    assert matrix[:3].sum() == len(CONFUSION_GT)
    assert matrix[:, :3].sum() == sum(s >= 0.25 for *_, s in CONFUSION_DETS) - 1  # one under the crowd
    # the thresholds are the ones given: at 0.05 the cat of image 2 is found; at IoU 0.3 the bird box takes the dog
    assert confusion.confusion_matrix(images, 3, 0.5, 0.05)[0, 0] == 3
    assert confusion.confusion_matrix(images, 3, 0.3, 0.25)[1, 2] == 1


@pytest.fixture
def confusion_run(tmp_path):
    """An output folder whose inference/ holds CONFUSION_DETS as COCO results, and the dataset's json."""
    data = tmp_path / "data"
    data.mkdir()
    n = iter(range(1, 100))
    gt = {"images": _image_files(data, range(1, 7)), "categories": CATEGORIES,
          "annotations": [_ann(next(n), i, c, b) for i, c, b in CONFUSION_GT]
          + [_ann(next(n), i, c, b, crowd=1) for i, c, b in CONFUSION_CROWD]}
    (data / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "run"
    (out / "inference").mkdir(parents=True)
    (out / "inference" / "coco_instances_results.json").write_text(json.dumps(
        [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in CONFUSION_DETS]))
    return out, data


def _read_csv(path):
    with open(path) as f:
        return list(csv.reader(f))


def test_entry_writes_the_confusion_matrix_of_the_coco_jsons(confusion_run):
    out, data = confusion_run
    written = plots.write_result_plots(str(out), gt_json=str(data / "gt.json"), image_root=str(data), strict=True)
    assert set(written) == {"pr_curves.png", "per_class_ap.csv", "confusion_matrix.png", "confusion_matrix.csv",
                            "val_examples.jpg"}  # no metrics.json: no results.png
    rows = _read_csv(out / "confusion_matrix.csv")
    assert rows[0] == ["ground truth \\ prediction", *NAMES, "missed"]
    assert [r[0] for r in rows[1:]] == [*NAMES, "background"]
    np.testing.assert_array_equal(np.array([[int(v) for v in r[1:]] for r in rows[1:]]), CONFUSION_EXPECTED)
    from PIL import Image

    for name in ("confusion_matrix.png", "pr_curves.png", "val_examples.jpg"):
        with Image.open(out / name) as im:
            assert min(im.size) > 200, name


def test_val_examples_draw_ground_truth_and_predictions_above_the_threshold(tmp_path, monkeypatch):
    """The drawing gets each image's own boxes: ground truth, and the predictions scoring >= the threshold."""
    from detectron2.utils.visualizer import Visualizer

    drawn = []
    original = Visualizer.overlay_instances

    def record(self, *, boxes=None, labels=None, **kwargs):
        drawn.append((np.asarray(boxes).tolist(), labels))
        return original(self, boxes=boxes, labels=labels, **kwargs)

    monkeypatch.setattr(Visualizer, "overlay_instances", record)
    image = np.zeros((100, 120, 3), np.uint8)
    sample = dict(image=image, gt_boxes=np.array([[1, 2, 30, 40]]), gt_classes=np.array([1]),
                  pred_boxes=np.array([[0, 0, 10, 10], [5, 5, 50, 50]]), pred_classes=np.array([0, 2]),
                  pred_scores=np.array([0.2, 0.7]))
    examples.draw_examples([sample], NAMES, str(tmp_path / "ex.jpg"), score_threshold=0.25)
    assert drawn == [([[1.0, 2.0, 30.0, 40.0]], ["dog"]), ([[5.0, 5.0, 50.0, 50.0]], ["bird 70%"])]
    assert (tmp_path / "ex.jpg").stat().st_size > 0


# ---------------------------------------------------------------------------- PR curves and per-class AP
def _random_coco(tmp_path, seed=0):
    """Ground truth of cat and dog (bird has none) in every size, and jittered / wrong-class / stray
    detections, many per image (so maxDets matters)."""
    rng = np.random.default_rng(seed)
    images = _image_files(tmp_path, range(1, 9), size=(320, 320))
    anns, dets, n = [], [], 0
    for im in images:
        for _ in range(int(rng.integers(0, 7))):
            side = float(rng.choice([12, 24, 50, 80, 130]))
            x, y = rng.uniform(0, 320 - side, 2)
            cat = int(rng.choice([3, 7]))
            n += 1
            anns.append(_ann(n, im["id"], cat, [float(x), float(y), side, side * 0.9]))
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections of this object
                j = rng.normal(0, side * 0.12, 4)
                wrong = rng.random() < 0.2
                dets.append({"image_id": im["id"], "category_id": (10 - cat) if wrong else cat,
                             "bbox": [float(x + j[0]), float(y + j[1]), side + float(j[2]), side * 0.9 + float(j[3])],
                             "score": float(rng.random())})
        for _ in range(int(rng.integers(1, 5))):  # strays, some of them "bird"
            x, y, s = *rng.uniform(0, 250, 2), float(rng.uniform(10, 70))
            dets.append({"image_id": im["id"], "category_id": int(rng.choice([3, 7, 11])),
                         "bbox": [float(x), float(y), s, s], "score": float(rng.random() * 0.6)})
    if anns:
        anns[0]["iscrowd"] = 1
    return {"images": images, "categories": CATEGORIES, "annotations": anns}, dets


def _pycocotools(gt, dets, cat_ids=None):
    """pycocotools' own evaluation (the official Python COCOeval), optionally of some classes only."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = json.loads(json.dumps(gt))
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(json.loads(json.dumps(dets))), "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


@pytest.mark.parametrize("seed", [0, 1])
def test_pr_curve_areas_are_cocos_ap_and_per_class_rows_are_pycocotools(tmp_path, seed):
    gt, dets = _random_coco(tmp_path, seed)
    reference = _pycocotools(gt, dets)
    ours = per_class.coco_evaluate(gt, dets)  # Detectron2's C++ COCOeval (what COCOEvaluator logs)
    recall, at50, averaged = per_class.pr_curves(ours.eval["precision"], ours.params.iouThrs)
    assert recall.shape == (101,) and at50.shape == averaged.shape == (3, 101)
    assert np.isnan(at50[2]).all() and np.isnan(averaged[2]).all()  # bird: no ground truth
    # COCO's AP is the mean of the 101-point precision (its -1 entries excluded): the curves' areas
    assert at50[:2].mean(axis=1).mean() == pytest.approx(reference.stats[1], abs=1e-9)
    assert averaged[:2].mean(axis=1).mean() == pytest.approx(reference.stats[0], abs=1e-9)
    assert 0.05 < reference.stats[0] < 0.95  # a case with something to get right

    num_gt = {c: sum(1 for a in gt["annotations"] if a["category_id"] == c and not a["iscrowd"]) for c in (3, 7, 11)}
    rows = per_class.per_class_ap(ours.eval["precision"], ours.params.iouThrs, [3, 7, 11], NAMES, num_gt)
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "coco_instances_results.json").write_text(json.dumps(dets))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    plots.write_result_plots(str(tmp_path), gt_json=str(tmp_path / "gt.json"), image_root=str(tmp_path),
                             num_examples=2, strict=True)
    written = _read_csv(tmp_path / "per_class_ap.csv")
    assert written[0] == ["class", "category_id", "AP", "AP50", "AP75", "APs", "APm", "APl", "gt_boxes"]
    assert len(written) == 4
    for row, line, cat, name in zip(rows, written[1:], [3, 7, 11], NAMES):
        alone = _pycocotools(gt, dets, cat_ids=[cat]).stats[:6]  # this class only
        expected = [s * 100 if s >= 0 else math.nan for s in alone]
        assert (row["class"], row["category_id"], row["gt_boxes"]) == (name, cat, num_gt[cat])
        got = [row[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        np.testing.assert_allclose(got, expected, atol=1e-9, equal_nan=True)
        assert line[:2] == [name, str(cat)] and int(line[8]) == num_gt[cat]
        np.testing.assert_allclose([float(v) for v in line[2:8]], expected, atol=5e-4, equal_nan=True)
    assert num_gt[11] == 0 and all(math.isnan(v) for v in got)


# ---------------------------------------------------------------------------- results.png
def test_results_series_from_a_resumed_run_with_evaluation_lines(tmp_path):
    def train(it, total, cls, aux0, aux1):
        return {"iteration": it, "total_loss": total, "loss_class": cls, "loss_bbox": 1.0, "loss_class_0": aux0,
                "loss_class_1": aux1, "loss_class_dn": 0.5, "loss_class_dn_0": 0.25, "lr": 0.1, "time": 0.3}

    lines = [
        train(1, 9.0, 3.0, 2.0, 1.0), train(3, 8.0, 2.5, 1.5, 1.0),
        {"iteration": 4, "bbox/AP": 10.0, "bbox/AP50": 20.0, "bbox/AP-cat": 5.0},  # evaluation, own line
        train(5, 7.0, 2.0, 1.0, 1.0), train(7, 6.0, 1.5, 1.0, 0.5),
        train(7, 6.0, 1.5, 1.0, 0.5),  # the writers' last flush repeats an iteration
        {"iteration": 8, "bbox/AP": 30.0, "bbox/AP50": 40.0},
        # resumed from the checkpoint of iteration 4: iterations 5.. again, other numbers
        train(5, 6.5, 1.9, 0.9, 0.9), train(7, 5.5, 1.4, 0.8, 0.4), train(9, 5.1, 1.3, 0.7, 0.3),
        train(9, 5.0, 1.2, 0.7, 0.3),  # the same iteration again, other values: the last one counts
        {"iteration": 9, "bbox/AP": 35.0},  # evaluation on the iteration of a training line
    ]
    text = "\n".join(json.dumps(r) for r in lines).replace(
        json.dumps(lines[3]), json.dumps(lines[3]) + "\n{\"iteration\": 6, \"total_lo")  # a line cut by a kill
    (tmp_path / "metrics.json").write_text(text + "\n\n")
    metrics = curves.read_metrics(str(tmp_path / "metrics.json"))
    losses, aps = curves.loss_series(metrics), curves.ap_series(metrics)

    def series(d, key):
        x, y = d[key]
        return x.tolist(), y.tolist()

    assert set(losses) == {"total_loss", "loss_class", "loss_bbox", "loss_class_dn", "loss_class_aux",
                           "loss_class_dn_aux"}
    assert series(losses, "total_loss") == ([1, 3, 5, 7, 9], [9.0, 8.0, 6.5, 5.5, 5.0])
    assert series(losses, "loss_class") == ([1, 3, 5, 7, 9], [3.0, 2.5, 1.9, 1.4, 1.2])
    x, y = series(losses, "loss_class_aux")  # the aux layers summed
    assert x == [1, 3, 5, 7, 9] and y == pytest.approx([2.0 + 1.0, 1.5 + 1.0, 0.9 + 0.9, 0.8 + 0.4, 0.7 + 0.3])
    assert series(losses, "loss_class_dn_aux") == ([1, 3, 5, 7, 9], [0.25] * 5)
    # the first run's evaluation at 8 was abandoned with its iterations 5-8; the per-class AP is not plotted
    assert set(aps) == {"bbox/AP", "bbox/AP50"}
    assert series(aps, "bbox/AP") == ([4, 9], [10.0, 35.0])
    assert series(aps, "bbox/AP50") == ([4], [20.0])
    curves.plot_results(metrics, str(tmp_path / "results.png"))
    assert (tmp_path / "results.png").stat().st_size > 10000


def test_results_without_evaluation(tmp_path):
    (tmp_path / "metrics.json").write_text("\n".join(
        json.dumps({"iteration": i, "total_loss": 5.0 - i, "loss_giou": 1.0}) for i in range(3)))
    metrics = curves.read_metrics(str(tmp_path / "metrics.json"))
    assert curves.ap_series(metrics) == {}
    assert curves.loss_series(metrics)["total_loss"][1].tolist() == [5.0, 4.0, 3.0]
    written = plots.write_result_plots(str(tmp_path), strict=True)  # no inference/: only results.png
    assert list(written) == ["results.png"] and (tmp_path / "results.png").is_file()


# ---------------------------------------------------------------------------- through tools/train_net.py
RESULT_FILES = {name for name, _ in plots.RESULT_FILES}


def test_training_and_eval_only_leave_the_pictures(tiny_config, train_net, tmp_path, monkeypatch):
    out = tmp_path / "run"
    results = train_net.run(tiny_config, *TINY, f"train.output_dir={out}", "train.max_iter=4")
    assert RESULT_FILES <= set(os.listdir(out))
    assert {"circle", "square", "triangle"} == {r[0] for r in _read_csv(out / "per_class_ap.csv")[1:]}
    # the recomputed per-class AP is the evaluator's own
    for row in _read_csv(out / "per_class_ap.csv")[1:]:
        assert float(row[2]) == pytest.approx(results["bbox"][f"AP-{row[0]}"], abs=5e-4)
    confusion = np.array([[int(v) for v in r[1:]] for r in _read_csv(out / "confusion_matrix.csv")[1:]])
    gt = json.load(open(os.path.join(os.path.dirname(tiny_config), "shapes", "val", "annotations.json")))
    assert confusion[:3].sum() == len(gt["annotations"])  # each ground-truth box once
    from dinov2od.d2.evaluation.report import outputs_listing

    assert any("results.png" in line for line in outputs_listing(str(out)))

    # yacs --eval-only of those weights into a new folder: the evaluation's pictures, no results.png;
    # a picture that fails to draw is a warning and the run finishes
    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(plots, "plot_confusion_matrix", broken)
    ev = tmp_path / "ev"
    train_net.run(YACS_YAML, *TINY_YACS, "OUTPUT_DIR", str(ev), "MODEL.WEIGHTS", str(out / "model_final.pth"),
                  flags=["--eval-only"])
    assert set(os.listdir(ev)) & RESULT_FILES == {"pr_curves.png", "per_class_ap.csv", "confusion_matrix.csv",
                                                  "val_examples.jpg"}
    log = (ev / "log.txt").read_text()
    assert "Could not write confusion_matrix.png / .csv" in log and "RuntimeError: drawing failed" in log


def test_plot_inputs_name_the_evaluated_dataset_in_both_config_styles():
    """The evaluator's dataset and folder; the test loader's own images only for a subset evaluator
    (configs/debug_overfit.py: SubsetCOCOEvaluator scores only the images it saw)."""
    from detectron2.config import LazyConfig, get_cfg

    from tests.helpers import ROOT
    from dinov2od.d2 import add_dinov2od_config

    stock = plots.plot_inputs_from_config(LazyConfig.load(os.path.join(ROOT, "configs/shapes.py")))
    assert stock == dict(output_dir="./output/shapes", dataset_name="shapes_val", dataset_dicts=None,
                         inference_dir="./output/shapes/inference")
    subset = plots.plot_inputs_from_config(LazyConfig.load(os.path.join(ROOT, "configs/debug_overfit.py")))
    assert subset["dataset_name"] == "shapes_train" and callable(subset["dataset_dicts"])
    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(YACS_YAML)
    cfg.merge_from_list(["DATASETS.TEST", "('shapes_train', 'shapes_val')", "OUTPUT_DIR", "/x"])
    assert plots.plot_inputs_from_config(cfg) == dict(output_dir="/x", dataset_name="shapes_val", dataset_dicts=None,
                                                      inference_dir="/x/inference")
