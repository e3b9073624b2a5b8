"""``results.png``: the total loss, each ``loss_*`` term and the evaluation's AP / AP50 over the iterations
of ``metrics.json`` (:func:`read_metrics`, :func:`loss_series`, :func:`ap_series`, :func:`plot_results`)."""
from __future__ import annotations

import json
import logging
import math
import re
from collections import defaultdict
from typing import Dict, List, Tuple

import numpy as np

from .figures import _figure, _save_figure

__all__ = ["ap_series", "loss_series", "plot_results", "read_metrics"]

logger = logging.getLogger("dinov2od")


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
