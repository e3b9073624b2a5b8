"""Pictures of a finished run, written into its output folder: what a user looks at first.

:func:`write_result_plots` (called by ``tools/train_net.py`` at the end of training and of
``--eval-only``, main process only) writes

- ``results.png``: the total loss, each ``loss_*`` term and the evaluation's AP / AP50 over the
  iterations of ``metrics.json`` (:func:`read_metrics`, :func:`loss_series`, :func:`ap_series`);
- ``pr_curves.png`` and ``per_class_ap.csv``: precision-recall per class at IoU 0.5 and averaged
  over IoU 0.5:0.95, and each class's COCO APs, from the precision array of a COCO evaluation of
  ``inference/coco_instances_results.json`` against the dataset's json (:func:`coco_evaluate`,
  :func:`pr_curves`, :func:`per_class_ap`);
- ``confusion_matrix.png`` and ``confusion_matrix.csv``: ground-truth class against predicted
  class, with a "background" row (false positives) and a "missed" column (:func:`confusion_matrix`);
- ``val_examples.jpg``: a few evaluation images, ground truth | prediction, drawn with
  Detectron2's ``Visualizer`` (:func:`draw_examples`).

The evaluation's own numbers are recomputed here from the two json files the evaluator leaves
(Detectron2's ``COCOEvaluator`` keeps its ``COCOeval`` to itself): any evaluator that writes COCO
results serves, in either config style, and no model is needed. Classes are indexed everywhere
as COCOeval indexes them: the dataset json's category ids in ascending order (Detectron2's
contiguous ids for a COCO-format dataset).

Each picture has its module (:mod:`~dinov2od.d2.evaluation.curves`,
:mod:`~dinov2od.d2.evaluation.per_class`, :mod:`~dinov2od.d2.evaluation.confusion`,
:mod:`~dinov2od.d2.evaluation.examples`), whose functions take plain data (arrays, dicts, paths);
figures are drawn with matplotlib's Agg canvas, never through ``pyplot``'s global state
(:mod:`~dinov2od.d2.evaluation.figures`). This module is the entry that reads the files and calls them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import numpy as np

from .confusion import confusion_matrix, plot_confusion_matrix, write_confusion_csv
from .curves import plot_results, read_metrics
from .examples import draw_examples
from .per_class import coco_evaluate, per_class_ap, plot_pr_curves, pr_curves, write_per_class_csv

__all__ = ["RESULT_FILES", "evaluation_data", "plot_inputs_from_config", "write_result_plots"]

logger = logging.getLogger("dinov2od")

# what write_result_plots writes into the output folder, with what each shows
RESULT_FILES = (
    ("results.png", "losses and AP / AP50 over the iterations"),
    ("pr_curves.png", "precision-recall per class (IoU 0.5, and 0.5:0.95)"),
    ("per_class_ap.csv", "each class's COCO APs and ground-truth count"),
    ("confusion_matrix.png", "ground truth vs prediction, background and missed"),
    ("confusion_matrix.csv", "the confusion matrix's counts"),
    ("val_examples.jpg", "evaluation images, ground truth | prediction"),
)


# ---------------------------------------------------------------------------- the entry
def _load_json(path: str):
    with open(path) as f:
        return json.load(f)


def evaluation_data(gt: dict, results: Sequence[dict], image_ids: Optional[Iterable[int]] = None) -> dict:
    """The ground truth and results of the scored images, per image, as :func:`confusion_matrix`
    and :func:`draw_examples` take them (classes indexed by the dataset's sorted category ids).

    Returns:
        dict of ``cat_ids``, ``names``, ``image_ids`` (sorted), ``images`` ({image id: per-image
        dict}), ``num_gt`` ({category id: non-crowd boxes}).
    """
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    cat_ids = [c["id"] for c in cats]
    index = {c: i for i, c in enumerate(cat_ids)}
    known = {im["id"] for im in gt["images"]}
    ids = sorted(known if image_ids is None else known & set(image_ids))
    wanted = set(ids)

    def xyxy(b):
        return [b[0], b[1], b[0] + b[2], b[1] + b[3]]

    per = {i: {"gt_boxes": [], "gt_classes": [], "crowd_boxes": [], "pred_boxes": [], "pred_scores": [],
               "pred_classes": []} for i in ids}
    num_gt: Dict[int, int] = defaultdict(int)
    for a in gt.get("annotations", []):
        if a["image_id"] not in wanted or a["category_id"] not in index:
            continue
        if a.get("iscrowd", 0):
            per[a["image_id"]]["crowd_boxes"].append(xyxy(a["bbox"]))
        else:
            per[a["image_id"]]["gt_boxes"].append(xyxy(a["bbox"]))
            per[a["image_id"]]["gt_classes"].append(index[a["category_id"]])
            num_gt[a["category_id"]] += 1
    for r in results:
        if r["image_id"] in wanted and r["category_id"] in index:
            d = per[r["image_id"]]
            d["pred_boxes"].append(xyxy(r["bbox"]))
            d["pred_scores"].append(r["score"])
            d["pred_classes"].append(index[r["category_id"]])
    for d in per.values():
        for key in ("gt_boxes", "crowd_boxes", "pred_boxes"):
            d[key] = np.asarray(d[key], np.float64).reshape(-1, 4)
        for key in ("gt_classes", "pred_classes"):
            d[key] = np.asarray(d[key], np.int64)
        d["pred_scores"] = np.asarray(d["pred_scores"], np.float64)
    return dict(cat_ids=cat_ids, names=[c["name"] for c in cats], image_ids=ids, images=per, num_gt=dict(num_gt))


def plot_inputs_from_config(cfg) -> dict:
    """What :func:`write_result_plots` needs from a lazy or yacs config: ``output_dir``,
    ``dataset_name``, ``inference_dir`` and ``dataset_dicts``.

    The evaluated dataset is the lazy evaluator's ``dataset_name`` (else the test loader's), or
    the last of the yacs ``DATASETS.TEST`` (whose results the shared ``inference/`` folder keeps).
    Its images are all of its json's, as Detectron2's ``COCOEvaluator`` scores them; for a
    :class:`~dinov2od.d2.evaluation.SubsetCOCOEvaluator` they are the test loader's own
    (``dataset_dicts``, a callable, loaded only then).
    """
    from ..config import is_lazy

    if is_lazy(cfg):
        output_dir = cfg.train.output_dir
        evaluator = cfg.dataloader.get("evaluator", None)
        inference_dir = evaluator.get("output_dir", None) if evaluator is not None else None
        test = cfg.dataloader.get("test", None)
        dataset = test.get("dataset", None) if test is not None else None
        name = evaluator.get("dataset_name", None) if evaluator is not None else None
        if name is None and dataset is not None:
            name = dataset.get("names", None)
        dicts = None
        if evaluator is not None and dataset is not None and _evaluates_a_subset(evaluator):
            from detectron2.config import instantiate

            dicts = lambda: instantiate(dataset)  # noqa: E731
    else:
        output_dir = cfg.OUTPUT_DIR
        inference_dir = None
        name = cfg.DATASETS.TEST[-1] if len(cfg.DATASETS.TEST) else None
        dicts = None
    if name is not None and not isinstance(name, str):  # a list of datasets: one if it holds one
        name = name[0] if len(name) == 1 else None
    return dict(output_dir=output_dir, dataset_name=name, dataset_dicts=dicts,
                inference_dir=inference_dir or os.path.join(output_dir, "inference"))


def _evaluates_a_subset(evaluator) -> bool:
    from detectron2.utils.registry import locate

    from .evaluator import SubsetCOCOEvaluator

    target = evaluator.get("_target_", None)
    target = locate(target) if isinstance(target, str) else target
    return isinstance(target, type) and issubclass(target, SubsetCOCOEvaluator)


def write_result_plots(
    output_dir: str,
    dataset_name: Optional[str] = None,
    dataset_dicts: Union[None, Sequence[dict], Callable[[], Sequence[dict]]] = None,
    inference_dir: Optional[str] = None,
    gt_json: Optional[str] = None,
    image_root: Optional[str] = None,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.5,
    num_examples: int = 6,
    since: Optional[float] = None,
    strict: bool = False,
) -> Dict[str, str]:
    """Write the run's pictures into ``output_dir`` (see the module doc); returns {file: path} of
    those written.

    ``results.png`` needs ``output_dir/metrics.json`` (a training's; ``--eval-only`` writes none);
    the others need the evaluation's ``inference_dir/coco_instances_results.json`` (default
    ``output_dir/inference``) and the dataset's json (``gt_json``, else the metadata's
    ``json_file`` of ``dataset_name``, else the evaluator's converted copy in ``inference_dir``).

    Args:
        dataset_dicts: the evaluated dataset's dicts (or a callable returning them): their image
            ids are the images scored (default: all of the json's) and their ``file_name`` the
            images drawn (else the json's ``file_name`` under ``image_root`` / the metadata's).
        score_threshold: the confusion matrix's and the drawings' minimum score.
        iou_threshold: the confusion matrix's matching IoU.
        num_examples: images in ``val_examples.jpg`` (evenly spaced over the scored images).
        since: a ``time.time()``: results older than this (by 2 s) belong to an earlier run and
            are not plotted.
        strict: raise on a failure instead of logging a warning (tests); a training never fails
            for a picture.
    """
    written: Dict[str, str] = {}

    def attempt(what: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001  (a picture never fails a training)
            if strict:
                raise
            logger.warning("Could not write %s in %s: %s: %s (the run itself is unaffected)", what, output_dir,
                           type(e).__name__, e, exc_info=True)
            return False

    def out(name: str) -> str:  # a file that then fails to be written is not left from an earlier call
        written[name] = os.path.join(output_dir, name)
        with contextlib.suppress(FileNotFoundError):
            os.remove(written[name])
        return written[name]

    started = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    metrics_file = os.path.join(output_dir, "metrics.json")
    if os.path.isfile(metrics_file):
        attempt("results.png", lambda: plot_results(read_metrics(metrics_file), out("results.png")))

    inference_dir = inference_dir or os.path.join(output_dir, "inference")
    results_file = os.path.join(inference_dir, "coco_instances_results.json")
    state: dict = {}

    def load() -> None:
        if not os.path.isfile(results_file):
            return
        if since is not None and os.path.getmtime(results_file) < since - 2:
            logger.warning("%s is from an earlier run (no evaluation in this one): no evaluation plots.",
                           results_file)
            return
        metadata = None
        if dataset_name:
            from detectron2.data import MetadataCatalog

            metadata = MetadataCatalog.get(dataset_name)
        gt_file = gt_json or (metadata.get("json_file", None) if metadata is not None else None)
        if not gt_file and dataset_name:
            converted = os.path.join(inference_dir, f"{dataset_name}_coco_format.json")
            gt_file = converted if os.path.isfile(converted) else None
        if not gt_file:
            raise FileNotFoundError(f"no COCO json for dataset {dataset_name!r} (its metadata has no json_file)")
        dicts = dataset_dicts() if callable(dataset_dicts) else dataset_dicts
        gt, results = _load_json(gt_file), _load_json(results_file)
        data = evaluation_data(gt, results, [d["image_id"] for d in dicts] if dicts is not None else None)
        files = {d["image_id"]: d["file_name"] for d in dicts or ()}
        root = image_root or (metadata.get("image_root", None) if metadata is not None else None) or ""
        for im in gt["images"]:
            files.setdefault(im["id"], os.path.join(root, im["file_name"]))
        state.update(gt=gt, results=results, data=data, files=files)

    if not attempt("the evaluation plots (reading the results)", load) or not state:
        _log_written(written, started)
        return written
    gt, results, data, files = state["gt"], state["results"], state["data"], state["files"]
    names = data["names"]

    def precision_plots() -> None:
        ev = coco_evaluate(gt, results, data["image_ids"])
        if ev is None:
            logger.warning("%s holds no detections: no pr_curves.png / per_class_ap.csv.", results_file)
            return
        precision, thrs = ev.eval["precision"], ev.params.iouThrs
        plot_pr_curves(*pr_curves(precision, thrs), names, out("pr_curves.png"))
        write_per_class_csv(per_class_ap(precision, thrs, data["cat_ids"], names, data["num_gt"]),
                            out("per_class_ap.csv"))

    def confusion() -> None:
        matrix = confusion_matrix((data["images"][i] for i in data["image_ids"]), len(names), iou_threshold,
                                  score_threshold)
        write_confusion_csv(matrix, names, out("confusion_matrix.csv"))
        plot_confusion_matrix(matrix, names, out("confusion_matrix.png"), iou_threshold, score_threshold)

    def examples() -> None:
        from ..data.dataset_mapper import read_image

        ids = data["image_ids"]
        if not ids:
            return
        picks = sorted({ids[round(i * (len(ids) - 1) / max(num_examples - 1, 1))] for i in range(num_examples)})
        samples = [dict(data["images"][i], image=read_image(files[i], format="RGB"), title=os.path.basename(files[i]))
                   for i in picks]
        draw_examples(samples, names, out("val_examples.jpg"), score_threshold)

    attempt("pr_curves.png / per_class_ap.csv", precision_plots)
    attempt("confusion_matrix.png / .csv", confusion)
    if num_examples > 0:
        attempt("val_examples.jpg", examples)
    _log_written(written, started)
    return written


def _log_written(written: Dict[str, str], started: float) -> None:
    for name in [n for n, p in written.items() if not os.path.exists(p)]:
        del written[name]
    if written:
        logger.info("Result plots (%.1f s): %s", time.perf_counter() - started, ", ".join(written.values()))
