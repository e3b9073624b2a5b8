"""COCO evaluation restricted to the images actually evaluated (for dataset subsets)."""
from __future__ import annotations

import itertools

from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

__all__ = ["SubsetCOCOEvaluator"]


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
