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

Every function but the entry takes plain data (arrays, dicts, paths); figures are drawn with
matplotlib's Agg canvas, never through ``pyplot``'s global state.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import time
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "RESULT_FILES",
    "ap_series",
    "box_iou",
    "coco_evaluate",
    "confusion_matrix",
    "draw_examples",
    "evaluation_data",
    "loss_series",
    "per_class_ap",
    "plot_confusion_matrix",
    "plot_inputs_from_config",
    "plot_pr_curves",
    "plot_results",
    "pr_curves",
    "read_metrics",
    "write_confusion_csv",
    "write_per_class_csv",
    "write_result_plots",
]

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

PER_CLASS_FIELDS = ("class", "category_id", "AP", "AP50", "AP75", "APs", "APm", "APl", "gt_boxes")


# ---------------------------------------------------------------------------- results.png
def read_metrics(path: str) -> Dict[str, Dict[int, float]]:
    """The numbers of Detectron2's ``metrics.json`` (JSONWriter: one json object per line), by key
    and iteration: ``{"total_loss": {19: 1.2, 39: 1.1, ...}, "bbox/AP": {...}, ...}``.

    Lines of one iteration are merged (an evaluation comes on its own line), the later value
    winning. A file holding several runs (``--resume`` appends) keeps the last run's history from
    where it restarted: a line whose iteration is lower than the line before it starts a new run,
    and every value logged at that iteration or later before it is dropped. Lines that are not
    json objects with an ``iteration`` (a line cut short by a kill) are skipped.
    """
    series: Dict[str, Dict[int, float]] = defaultdict(dict)
    previous = None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                iteration = int(record["iteration"])
            except (ValueError, TypeError, KeyError):
                logger.debug("%s line %d: not a metrics record, skipped", path, number)
                continue
            if previous is not None and iteration < previous:  # a resumed run restarts here
                for values in series.values():
                    for it in [it for it in values if it >= iteration]:
                        del values[it]
            previous = iteration
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    series[key][iteration] = float(value)
    return {k: v for k, v in series.items() if v}


_AUX = re.compile(r"(loss_.+)_(\d+)")


def loss_series(metrics: Dict[str, Dict[int, float]]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{name: (iterations, values)}`` of ``total_loss`` and each ``loss_*`` term, iterations ascending.

    The auxiliary decoder layers' terms (``loss_class_0``, ``loss_class_dn_1``, ...) are summed
    per term into one series, ``"<term>_aux"`` (``loss_class_aux``: the sum of ``loss_class_{i}``
    over the layers ``i`` logged at that iteration); the other terms (the last layer's, and
    ``_enc`` / ``_dn`` / ``_o2m``) are their own series.
    """
    out = {}
    aux: Dict[str, Dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for key, values in metrics.items():
        match = _AUX.fullmatch(key)
        if match:
            for it, v in values.items():
                aux[match.group(1) + "_aux"][it] += v
        elif key == "total_loss" or key.startswith("loss_"):
            out[key] = values
    out.update(aux)
    return {k: _arrays(v) for k, v in sorted(out.items())}


def ap_series(metrics: Dict[str, Dict[int, float]]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """``{key: (iterations, values)}`` of the evaluation's AP and AP50 (keys such as ``bbox/AP``,
    ``bbox/AP50``; the per-class ``bbox/AP-<name>`` are left out); empty when nothing was evaluated."""
    keys = [k for k in metrics if k.rsplit("/", 1)[-1] in ("AP", "AP50") and "/" in k]
    return {k: _arrays(metrics[k]) for k in sorted(keys)}


def _arrays(values: Dict[int, float]) -> Tuple[np.ndarray, np.ndarray]:
    its = sorted(values)
    return np.array(its, dtype=np.int64), np.array([values[i] for i in its], dtype=np.float64)


AUX_PANEL = "auxiliary layers (summed per term)"


def _family(name: str) -> str:
    """``loss_class_dn_aux`` -> ``class``: the panel a loss series goes to."""
    return name[len("loss_"):].split("_")[0] if name.startswith("loss_") else name


def plot_results(metrics: Dict[str, Dict[int, float]], path: str) -> None:
    """``results.png``: the total loss, one panel per loss term (the last layer's, with its ``_enc``
    / ``_dn`` / ``_o2m`` variants beside it), one of the auxiliary layers' sums (``*_aux``, see
    :func:`loss_series`) and one of AP / AP50 (COCO's 0-100), all over the same iterations."""
    losses, aps = loss_series(metrics), ap_series(metrics)
    panels: Dict[str, List[str]] = {}
    for name in losses:
        title = "total loss" if name == "total_loss" else f"loss_{_family(name)}"
        panels.setdefault(AUX_PANEL if name.endswith("_aux") else title, []).append(name)
    titles = sorted(panels, key=lambda t: (t != "total loss", t == AUX_PANEL, t)) + ["AP"]
    spans = [x for x, _ in [*losses.values(), *aps.values()] if len(x)]
    xlim = (min(int(x[0]) for x in spans), max(int(x[-1]) for x in spans)) if spans else None
    cols = min(3, len(titles))
    rows = math.ceil(len(titles) / cols)
    fig, axes = _figure(rows, cols, (5.0 * cols, 3.4 * rows))
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if xlim and xlim[1] > xlim[0]:
            ax.set_xlim(*xlim)
        if title == "AP":
            for key, (x, y) in aps.items():
                ax.plot(x, y, marker="o", markersize=3, label=key)
            if aps:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "no evaluation in metrics.json", ha="center", va="center", transform=ax.transAxes)
            continue
        for name in panels[title]:
            x, y = losses[name]
            ax.plot(x, y, linewidth=1.2, label=name)
        ax.legend(fontsize=8)
    for ax in axes[len(titles):]:
        ax.set_visible(False)
    _save_figure(fig, path)


# ---------------------------------------------------------------------------- COCO evaluation
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


# ---------------------------------------------------------------------------- confusion matrix
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


# ---------------------------------------------------------------------------- val_examples.jpg
def _class_colors(num_classes: int) -> List[tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if num_classes > 10 else "tab10"]
    return [tuple(cmap(i % cmap.N)[:3]) for i in range(num_classes)]


def draw_examples(samples: Sequence[dict], names: Sequence[str], path: str, score_threshold: float = 0.25,
                  pairs_per_row: int = 2) -> None:
    """``val_examples.jpg``: each sample's image twice, its ground truth | its predictions scoring at
    least ``score_threshold``, drawn with Detectron2's ``Visualizer`` (a colour per class).

    Each sample is a dict of ``image`` ((H, W, 3) uint8 RGB), ``gt_boxes`` / ``pred_boxes``
    (XYXY pixels), ``gt_classes`` / ``pred_classes`` (indices into ``names``), ``pred_scores``,
    and an optional ``title``.
    """
    from detectron2.data.catalog import Metadata
    from detectron2.utils.visualizer import Visualizer

    metadata = Metadata(thing_classes=list(names))
    colors = _class_colors(len(names))
    cols = 2 * min(pairs_per_row, len(samples))
    rows = math.ceil(len(samples) / (cols // 2))
    fig, axes = _figure(rows, cols, (4.0 * cols, 3.6 * rows), layout=None)  # images only: no layout engine
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.5 / (3.6 * rows), wspace=0.04,
                        hspace=0.6 / 3.6)
    for n, sample in enumerate(samples):
        scores = np.asarray(sample["pred_scores"], np.float64).reshape(-1)
        keep = scores >= score_threshold
        drawn = []
        for boxes, classes, label in (
            (sample["gt_boxes"], sample["gt_classes"], lambda c, i: names[c]),
            (np.asarray(sample["pred_boxes"]).reshape(-1, 4)[keep], np.asarray(sample["pred_classes"])[keep],
             lambda c, i: f"{names[c]} {scores[keep][i]:.0%}"),
        ):
            boxes, classes = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(classes, np.int64).reshape(-1)
            vis = Visualizer(sample["image"], metadata)
            if len(boxes):
                vis.overlay_instances(boxes=boxes, labels=[label(c, i) for i, c in enumerate(classes)],
                                      assigned_colors=[colors[c] for c in classes])
            drawn.append((vis.get_output().get_image(), len(boxes)))
        title = sample.get("title", "")
        for ax, (image, count), what in zip(axes[2 * n:2 * n + 2], drawn,
                                            ("ground truth", f"prediction >= {score_threshold:g}")):
            ax.imshow(image)
            ax.set_title(f"{title}\n{what} ({count})" if title else f"{what} ({count})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    _save_figure(fig, path, pil_kwargs={"quality": 90})


# ---------------------------------------------------------------------------- figures
def _figure(rows: int, cols: int, size: Tuple[float, float], layout: Optional[str] = "constrained"):
    """A figure on matplotlib's Agg canvas (no pyplot) and its axes as a flat list."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, list(axes.ravel())


def _save_figure(fig, path: str, **kwargs) -> None:
    from dinov2od.modeling.checkpoint_io import atomic_write

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=os.path.splitext(path)[1].lstrip(".").lower(), **kwargs)


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
    from .config import is_lazy

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

    from .evaluation import SubsetCOCOEvaluator

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
        from .dataset_mapper import read_image

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
