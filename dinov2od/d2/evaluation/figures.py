"""Figures on matplotlib's Agg canvas (never ``pyplot``'s global state), written atomically: the
helpers every picture of :mod:`dinov2od.d2.evaluation.plots` is drawn with."""
from __future__ import annotations

import os
from typing import Optional, Tuple


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
