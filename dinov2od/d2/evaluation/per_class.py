"""``pr_curves.png`` and ``per_class_ap.csv``: precision-recall per class at IoU 0.5 and averaged over IoU
0.5:0.95, and each class's COCO APs, from the precision array of a COCO evaluation of the results json
against the dataset's json (:func:`coco_evaluate`, :func:`pr_curves`, :func:`per_class_ap`)."""
from __future__ import annotations

import contextlib
import csv
import io
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .figures import _figure, _save_figure

__all__ = ["PER_CLASS_FIELDS", "coco_evaluate", "per_class_ap", "plot_pr_curves", "pr_curves", "write_per_class_csv"]

PER_CLASS_FIELDS = ("class", "category_id", "AP", "AP50", "AP75", "APs", "APm", "APl", "gt_boxes")


def _coco(gt: Union[str, dict]):
    """A pycocotools ``COCO`` of a json file or an already loaded dict (quietly)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(gt, str):
            return COCO(gt)
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    return coco


def coco_evaluate(gt: Union[str, dict], results: Sequence[dict], image_ids: Optional[Iterable[int]] = None,
                  fast: bool = True):
    """COCO box evaluation of ``results`` (COCO result dicts) against the ground truth ``gt``
    (a json path or dict), as Detectron2's ``COCOEvaluator`` runs it: ``evaluate``,
    ``accumulate``, ``summarize`` (maxDets 1 / 10 / 100).

    Args:
        image_ids: the images scored (default: all of ``gt``'s).
        fast: Detectron2's C++ ``COCOeval_opt`` when it is built (what the evaluator uses),
            else pycocotools' ``COCOeval``.

    Returns:
        the ``COCOeval``: ``.eval["precision"]`` is [T=10 IoUs, R=101 recall points, K classes,
        A=4 areas, M=3 maxDets], ``.stats`` the 12 summary numbers (0-1); None without results.
    """
    from pycocotools.cocoeval import COCOeval

    if not results:
        return None
    evaluator = COCOeval
    if fast:
        with contextlib.suppress(ImportError):
            from detectron2.evaluation.fast_eval_api import COCOeval_opt as evaluator
    coco_gt = _coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes writes into its dicts
        ev = evaluator(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def pr_curves(precision: np.ndarray, iou_thrs: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall per class from COCOeval's precision array (area "all", the last maxDets: 100).

    Returns:
        (recall (101,), at IoU 0.5 (K, 101), averaged over the IoUs 0.5:0.95 (K, 101)); a class
        without ground truth (COCO's -1) is NaN. The mean of a row is COCO's AP50 / AP of that class.
    """
    p = np.asarray(precision, dtype=np.float64)[:, :, :, 0, -1]  # (T, R, K)
    p = np.where(p > -1, p, np.nan)
    t50 = int(np.argmin(np.abs(np.asarray(iou_thrs) - 0.5)))
    with np.errstate(invalid="ignore"), _quiet_nanmean():
        averaged = np.nanmean(p, axis=0)
    return np.linspace(0.0, 1.0, p.shape[1]), p[t50].T, averaged.T


@contextlib.contextmanager
def _quiet_nanmean():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
        yield


def _ap(p: np.ndarray) -> float:
    """COCO's AP of a precision slice: the mean of its entries > -1, x 100 (NaN when none)."""
    p = p[p > -1]
    return float(np.mean(p) * 100) if p.size else float("nan")


def per_class_ap(precision: np.ndarray, iou_thrs: Sequence[float], cat_ids: Sequence[int], names: Sequence[str],
                 num_gt: Dict[int, int]) -> List[dict]:
    """One row per class (COCOeval's order): ``class``, ``category_id`` (the dataset's), ``AP``,
    ``AP50``, ``AP75`` (IoU 0.5:0.95 / 0.5 / 0.75, area "all"), ``APs``, ``APm``, ``APl`` (areas
    small / medium / large), all at maxDets 100 and in COCO's 0-100 as Detectron2 logs them (NaN
    where the class has no ground truth of that kind), and ``gt_boxes`` (``num_gt[category_id]``)."""
    p = np.asarray(precision)
    thrs = np.asarray(iou_thrs)
    t50, t75 = (int(np.argmin(np.abs(thrs - v))) for v in (0.5, 0.75))
    rows = []
    for k, (cat, name) in enumerate(zip(cat_ids, names)):
        rows.append({
            "class": name, "category_id": int(cat),
            "AP": _ap(p[:, :, k, 0, -1]), "AP50": _ap(p[t50, :, k, 0, -1]), "AP75": _ap(p[t75, :, k, 0, -1]),
            "APs": _ap(p[:, :, k, 1, -1]), "APm": _ap(p[:, :, k, 2, -1]), "APl": _ap(p[:, :, k, 3, -1]),
            "gt_boxes": int(num_gt.get(cat, 0)),
        })
    return rows


def write_per_class_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PER_CLASS_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_pr_curves(recall: np.ndarray, at50: np.ndarray, averaged: np.ndarray, names: Sequence[str], path: str,
                   label_limit: int = 20) -> None:
    """``pr_curves.png``: one panel at IoU 0.5, one averaged over 0.5:0.95; a line per class (named
    with its AP when there are at most ``label_limit`` classes) and the mean over the classes in bold."""
    fig, axes = _figure(1, 2, (12.0, 5.2))
    for ax, curves, what in ((axes[0], at50, "IoU 0.5 (AP50)"), (axes[1], averaged, "IoU 0.5:0.95 (AP)")):
        valid = ~np.all(np.isnan(curves), axis=1)
        for k in np.flatnonzero(valid):
            label = f"{names[k]} {np.nanmean(curves[k]) * 100:.1f}" if len(names) <= label_limit else None
            ax.plot(recall, curves[k], linewidth=1.0, alpha=0.8 if label else 0.35, label=label,
                    color=None if label else "grey")
        if valid.any():
            mean = curves[valid].mean(axis=0)
            ax.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes {mean.mean() * 100:.1f}")
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"Precision-recall, {what}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    _save_figure(fig, path)
