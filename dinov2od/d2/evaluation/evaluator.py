"""Evaluation helpers: EMA weights during evaluation, a logged ``inference_on_dataset``, a COCO
evaluator for dataset subsets, and detections as COCO result dicts."""
from __future__ import annotations

import contextlib
import itertools
import logging
from typing import List, Optional

from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm

__all__ = ["SubsetCOCOEvaluator", "detections_to_coco_results", "eval_context", "run_evaluation"]

logger = logging.getLogger("dinov2od")


@contextlib.contextmanager
def eval_context(ema=None):
    """Evaluate with the EMA weights when an EMA (a ``ModelEMA``) is given, else with the model's own."""
    if ema is None:
        yield
    else:
        with ema.apply_to_model():
            yield


def run_evaluation(model, data_loader, evaluator, dataset_name: str) -> dict:
    """``inference_on_dataset`` plus the results table in the log (main process)."""
    results = inference_on_dataset(model, data_loader, evaluator)
    if comm.is_main_process():
        logger.info("Evaluation results for %s:", dataset_name)
        print_csv_format(results)
    return results


class SubsetCOCOEvaluator(COCOEvaluator):
    """:class:`COCOEvaluator` that scores only the images it saw.

    The stock evaluator scores every image of the dataset's json, so evaluating a subset
    (``subset_dataset_dicts``) would count the unseen images' objects as misses.
    """

    def evaluate(self, img_ids=None):
        if img_ids is None:
            seen = comm.gather([p["image_id"] for p in self._predictions], dst=0)
            img_ids = sorted(set(itertools.chain(*seen))) if comm.is_main_process() else None
        return super().evaluate(img_ids)


def detections_to_coco_results(instances, image_id, metadata=None) -> List[dict]:
    """Detections of one image as COCO result dicts, with the dataset's own category ids.

    (Detectron2's ``instances_to_coco_json(instances, img_id)`` writes contiguous class indices;
    this one maps them back through the metadata and adds class names.)

    Args:
        instances: Instances with pred_boxes (XYXY_ABS), scores, pred_classes.
        image_id: the ``image_id`` written into each result.
        metadata: optional Detectron2 metadata; with ``thing_dataset_id_to_contiguous_id`` the
            dataset's own category ids are written, with ``thing_classes`` a ``category_name``.

    Returns:
        list of dicts with ``image_id``, ``category_id``, ``bbox`` (XYWH pixels), ``score``
        (and ``category_name``).
    """
    instances = instances.to("cpu")
    boxes = instances.pred_boxes.tensor.numpy().copy()  # (n, 4) XYXY
    boxes[:, 2:] -= boxes[:, :2]
    id_map: Optional[dict] = metadata.get("thing_dataset_id_to_contiguous_id", None) if metadata is not None else None
    reverse = {v: k for k, v in id_map.items()} if id_map else {}
    names = metadata.get("thing_classes", None) if metadata is not None else None
    out = []
    for box, score, cls in zip(boxes.tolist(), instances.scores.tolist(), instances.pred_classes.tolist()):
        r = {"image_id": image_id, "category_id": int(reverse.get(cls, cls)), "bbox": box, "score": float(score)}
        if names:
            r["category_name"] = names[cls]
        out.append(r)
    return out
