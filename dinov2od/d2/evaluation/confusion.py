"""``confusion_matrix.png`` and ``confusion_matrix.csv``: ground-truth class against predicted class, with a
"background" row (false positives) and a "missed" column (:func:`confusion_matrix`)."""
from __future__ import annotations

import csv
from typing import Iterable, Sequence

import numpy as np

from .figures import _figure, _save_figure

__all__ = ["box_iou", "confusion_matrix", "plot_confusion_matrix", "write_confusion_csv"]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of XYXY boxes (torchvision's, in float64; 0 where both boxes have no area)."""
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    a, b = (torch.from_numpy(np.asarray(x, np.float64).reshape(-1, 4)) for x in (a, b))
    return tv_box_iou(a, b).nan_to_num(0.0).numpy()


def confusion_matrix(images: Iterable[dict], num_classes: int, iou_threshold: float = 0.5,
                     score_threshold: float = 0.25) -> np.ndarray:
    """Ground-truth class against predicted class, counted over ``images``.

    Each image is a dict of ``gt_boxes`` (N, 4) XYXY, ``gt_classes`` (N,), ``pred_boxes``
    (M, 4) XYXY, ``pred_scores`` (M,), ``pred_classes`` (M,) (class indices 0..K-1), and
    optionally ``crowd_boxes`` (C, 4): COCO's crowd regions.

    The rule, within each image: the predictions scoring at least ``score_threshold``, highest
    score first, each take one still unmatched ground-truth box whose IoU with it is at least
    ``iou_threshold``: the one of its own class with the highest IoU if there is one, else the
    one of any class with the highest IoU. A match counts in [gt class, predicted class] (the
    diagonal: correct; off it: the wrong class). A prediction that takes no box is a false
    positive, counted in [background, predicted class], unless a crowd region covers it (its
    intersection is at least ``iou_threshold`` of the prediction's area, COCO's crowd rule):
    then it is not counted. A ground-truth box left unmatched is missed: [gt class, missed].
    Crowd regions are never missed. [background, missed] stays 0.

    Returns:
        (K + 1, K + 1) int64: rows the ground-truth classes then "background", columns the
        predicted classes then "missed".
    """
    k = num_classes
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    for image in images:
        gt_boxes = np.asarray(image["gt_boxes"], np.float64).reshape(-1, 4)
        gt_classes = np.asarray(image["gt_classes"], np.int64).reshape(-1)
        scores = np.asarray(image["pred_scores"], np.float64).reshape(-1)
        keep = np.flatnonzero(scores >= score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        pred_boxes = np.asarray(image["pred_boxes"], np.float64).reshape(-1, 4)[keep]
        pred_classes = np.asarray(image["pred_classes"], np.int64).reshape(-1)[keep]
        iou = box_iou(pred_boxes, gt_boxes)
        crowd = np.asarray(image.get("crowd_boxes", np.zeros((0, 4))), np.float64).reshape(-1, 4)
        matched = np.zeros(len(gt_boxes), dtype=bool)
        for i, cls in enumerate(pred_classes):
            candidates = (iou[i] >= iou_threshold) & ~matched
            same = candidates & (gt_classes == cls)
            pool = same if same.any() else candidates
            if pool.any():
                j = int(np.argmax(np.where(pool, iou[i], -1.0)))
                matched[j] = True
                matrix[gt_classes[j], cls] += 1
            elif not (len(crowd) and _crowd_covers(pred_boxes[i], crowd, iou_threshold)):
                matrix[k, cls] += 1
        np.add.at(matrix[:, k], gt_classes[~matched], 1)
    return matrix


def _crowd_covers(box: np.ndarray, crowd: np.ndarray, threshold: float) -> bool:
    lt, rb = np.maximum(box[:2], crowd[:, :2]), np.minimum(box[2:], crowd[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = max(float(np.prod(np.clip(box[2:] - box[:2], 0, None))), 1e-12)
    return bool((inter / area >= threshold).any())


def write_confusion_csv(matrix: np.ndarray, names: Sequence[str], path: str) -> None:
    """The counts with a header row of predicted classes + "missed" and a first column of
    ground-truth classes + "background"."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ground truth \\ prediction", *names, "missed"])
        for name, row in zip([*names, "background"], matrix.tolist()):
            writer.writerow([name, *row])


def plot_confusion_matrix(matrix: np.ndarray, names: Sequence[str], path: str, iou_threshold: float,
                          score_threshold: float) -> None:
    """``confusion_matrix.png``: counts, coloured by their share of the row (the ground-truth
    class; the background row by its share of all false positives)."""
    k = len(names)
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    size = min(max(6.0, 0.45 * (k + 1) + 3), 30.0)
    fig, (ax,) = _figure(1, 1, (size + 1.5, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    ticks = list(range(k + 1))
    ax.set_xticks(ticks, [*names, "missed"], rotation=90 if k > 6 else 45, ha="center" if k > 6 else "right",
                  fontsize=8)
    ax.set_yticks(ticks, [*names, "background"], fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"Confusion matrix: IoU >= {iou_threshold:g}, score >= {score_threshold:g}\n"
                 "(background row: false positives; missed column: ground truth not found)", fontsize=10)
    if k <= 30:
        for (r, c), count in np.ndenumerate(matrix):
            if count or (r == c and r < k):
                ax.text(c, r, str(count), ha="center", va="center", fontsize=10 if k <= 10 else 7,
                        color="white" if share[r, c] > 0.6 else "black")
    _save_figure(fig, path)
