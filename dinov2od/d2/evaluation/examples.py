"""``val_examples.jpg``: a few evaluation images, ground truth | prediction, drawn with Detectron2's
``Visualizer`` (:func:`draw_examples`)."""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np

from .figures import _figure, _save_figure

__all__ = ["draw_examples"]


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
