"""Object sizes at the input size the model will see, and a suggested ``min_size`` when many objects
are smaller than two ViT patches (docs/your_data.md, "Small objects and the input size").

A ViT sees an image as patches of ``patch`` px (14 for DINOv2): every feature the decoder reads
comes from those tokens (the neck's finer level is upsampled from them). An object of less than
one patch shares its token with its surroundings; under two patches (28 px, about COCO's "small"
bound of 32 px) its extent spans at most two tokens a side. What the model sees is set by the
resize of the dataloader's mapper (``ResizeShortestEdge``: the shortest edge to ``min_size``,
capped so that the longest is at most ``max_size``), not by the image files, so the sizes are
computed after that resize.

At the start of a training (main process, once), :func:`advise_input_size` logs one block: per
class (when there are at most :data:`MAX_CLASS_ROWS` classes with boxes) and overall, the count,
the 5/25/50/75/95th percentiles of ``sqrt(w * h)`` in pixels and in patches, and the share below one
and below two patches, at the **test** resize (the one evaluation and prediction use, where AP is
measured; the header gives the training resize's range and mean and how they compare). Then, when
more than :data:`SHARE_LIMIT` of the boxes of a class (of at least :data:`MIN_CLASS_BOXES` boxes)
or of all boxes are below :data:`TARGET_PATCHES` patches, a warning with the shortest edge that
brings the 10th percentile (:data:`TARGET_PERCENTILE`) of each such group to two patches, capped at
:data:`MAX_SUGGESTED` px and at twice the images' own median shortest side, the token cost of it,
and the overrides to type.

The boxes come from the json the start-up check (and the registration) already parsed:
:func:`~dinov2od.d2.data.datasets.boxes.remember_boxes` is called by ``folder._read_json`` and keeps,
per file, the usable boxes (non-crowd, positive size after clipping to the image) as numpy arrays
(:mod:`dinov2od.d2.data.datasets.boxes`). A dataset whose json was not read that way is read here
when it is at most ``boxes.MAX_JSON_BYTES``, else skipped with a line. The resize the model sees is
read from the config by :mod:`dinov2od.d2.data.datasets.input_size`.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .boxes import BoxTable, box_table
from .input_size import InputSize, input_sizes, patch_size_of, resized_shapes

logger = logging.getLogger("dinov2od")

__all__ = ["SizeReport", "advise_input_size", "format_report", "size_report"]

PERCENTILES = (5, 25, 50, 75, 95)
TARGET_PATCHES = 2.0  # objects below this many patches (sqrt(w*h) / patch) count as small for the ViT
SHARE_LIMIT = 0.20  # warn when more than this share of a class's (or of all) boxes is below TARGET_PATCHES
TARGET_PERCENTILE = 10  # the suggested size brings this percentile of each such group to TARGET_PATCHES
MIN_CLASS_BOXES = 10  # a class with fewer boxes is shown but not judged (one box would be 100%)
MAX_CLASS_ROWS = 20  # per-class rows when there are at most this many classes with boxes
MAX_SUGGESTED = 1024  # px: the largest shortest edge suggested ...
MAX_UPSCALE = 2.0  # ... and at most this many times the images' own median shortest side
ROUND_TO = 16  # suggested sizes are multiples of this


# ---------------------------------------------------------------------------- the numbers
@dataclass
class GroupStats:
    """Sizes of one group of boxes (a class or all) at the reference input size."""

    name: str
    count: int
    px: np.ndarray  # percentiles of sqrt(w*h) in resized pixels (PERCENTILES)
    patches: np.ndarray  # the same in patches
    below1: float  # share of boxes below 1 patch
    below2: float  # ... below TARGET_PATCHES patches
    target_pct: float  # the TARGET_PERCENTILE-th percentile, in patches
    judged: bool  # enough boxes to be judged (MIN_CLASS_BOXES), always True for "all"
    category: Optional[int] = None  # the category id (None: all boxes)

    @property
    def small(self) -> bool:
        return self.judged and self.below2 > SHARE_LIMIT


@dataclass
class Suggestion:
    short: int  # the suggested shortest edge (test)
    max_size: Optional[int]
    train_choices: Tuple[int, ...]
    train_max_size: Optional[int]
    capped: bool  # the cap bound: the target is not reached
    cap: int
    token_factor: float  # ViT tokens per image, suggested / now (mean over the training images)
    after: List[Tuple[str, float, float]]  # per small group: name, TARGET_PERCENTILE-th percentile (patches), share below 2


@dataclass
class SizeReport:
    """What :func:`size_report` found: per group (classes, then "all") and the suggestion."""

    patch: int
    reference: InputSize
    train: Optional[InputSize]
    reference_from: str = "test"  # "test": the test resize; "train": the training resize's mean; "none"
    groups: List[GroupStats] = field(default_factory=list)
    suggestion: Optional[Suggestion] = None
    cap: Optional[int] = None
    note: str = ""  # why no larger size is suggested although objects are small

    @property
    def small_groups(self) -> List[GroupStats]:
        return [g for g in self.groups if g.small]


def object_sizes(table: BoxTable, size: InputSize) -> np.ndarray:
    """sqrt(w * h) of every box in pixels after the resize ``size`` (each image scaled by its own
    rounded output shape, as Detectron2's ``ResizeTransform`` scales boxes)."""
    neww, newh = resized_shapes(table.image_width, table.image_height, size.short, size.max_size)
    return np.sqrt(table.width * (neww / table.image_width) * table.height * (newh / table.image_height))


def _group_stats(name: str, px: np.ndarray, patch: int, judged: bool, category: Optional[int] = None) -> GroupStats:
    patches = px / patch
    return GroupStats(
        name=name, count=int(px.size),
        px=np.percentile(px, PERCENTILES), patches=np.percentile(patches, PERCENTILES),
        below1=float(np.mean(patches < 1.0)), below2=float(np.mean(patches < TARGET_PATCHES)),
        target_pct=float(np.percentile(patches, TARGET_PERCENTILE)), judged=judged, category=category,
    )


def _groups(table: BoxTable, px: np.ndarray, patch: int) -> List[GroupStats]:
    out = []
    ids = np.unique(table.category)
    if 1 < len(ids) <= MAX_CLASS_ROWS:
        for cid in ids:
            sel = px[table.category == cid]
            out.append(_group_stats(table.class_names.get(int(cid), str(cid)), sel, patch, sel.size >= MIN_CLASS_BOXES,
                                    int(cid)))
    out.append(_group_stats("all", px, patch, True))
    return out


def _round_up(v: float) -> int:
    return int(max(ROUND_TO, math.ceil(v / ROUND_TO - 1e-9) * ROUND_TO))


def _round(v: float) -> int:
    return int(max(ROUND_TO, round(v / ROUND_TO) * ROUND_TO))


def _scaled(size: InputSize, short: float) -> InputSize:
    """``size`` with its shortest edge set to ``short`` and its longest-edge cap scaled alike."""
    f = short / size.short
    return InputSize(short=float(short), max_size=None if size.max_size is None else float(math.ceil(size.max_size * f)))


def _tokens(sizes: np.ndarray, size: InputSize, patch: int) -> float:
    neww, newh = resized_shapes(sizes[:, 0], sizes[:, 1], size.short, size.max_size)
    return float(np.sum(np.ceil(neww / patch) * np.ceil(newh / patch)))


def size_report(table: BoxTable, reference: InputSize, patch: int, train: Optional[InputSize] = None,
                reference_from: str = "test") -> SizeReport:
    """The size statistics of ``table``'s boxes at ``reference`` and, when some group is small (more
    than SHARE_LIMIT below TARGET_PATCHES patches), the suggested shortest edge: the smallest
    multiple of ROUND_TO that brings each small group's TARGET_PERCENTILE-th percentile to
    TARGET_PATCHES (the longest-edge cap scaled alike), capped at min(MAX_SUGGESTED, MAX_UPSCALE x
    the images' median shortest side)."""
    report = SizeReport(patch=patch, reference=reference, train=train, reference_from=reference_from)
    if table.num_boxes == 0:
        return report
    px = object_sizes(table, reference)
    report.groups = _groups(table, px, patch)
    small = report.small_groups
    if not small:
        return report
    sizes = table.image_sizes if len(table.image_sizes) else np.stack([table.image_width, table.image_height], 1)
    own_short = float(np.median(np.minimum(sizes[:, 0], sizes[:, 1])))
    cap = int(max(ROUND_TO, math.floor(min(MAX_SUGGESTED, MAX_UPSCALE * own_short) / ROUND_TO) * ROUND_TO))
    report.cap = cap
    now = reference.short if reference.short is not None else own_short  # no resize: the images' own
    base = reference if reference.short is not None else InputSize(short=own_short, max_size=None)
    if cap <= now:
        report.note = (f"the input is already at or above the largest size suggested here ({cap} px: "
                       f"min({MAX_SUGGESTED}, {MAX_UPSCALE:g} x the images' median shortest side {own_short:g}))")
        return report
    # linear in the scale (up to pixel rounding): start there, then step up until every small group
    # reaches the target (rounding can leave it a hair short) or the cap
    need = max(now * TARGET_PATCHES / g.target_pct for g in small)
    short = min(_round_up(need), cap)
    masks = [(g.name, np.ones(px.shape, bool) if g.category is None else table.category == g.category) for g in small]

    def after(s: int) -> List[Tuple[str, float, float]]:
        p = object_sizes(table, _scaled(base, s)) / patch
        return [(n, float(np.percentile(p[m], TARGET_PERCENTILE)), float(np.mean(p[m] < TARGET_PATCHES)))
                for n, m in masks]

    res = after(short)
    while short < cap and min(v[1] for v in res) < TARGET_PATCHES:
        short = min(short + ROUND_TO, cap)
        res = after(short)
    new = _scaled(base, short)
    factor = short / now
    train_choices, train_max = (), None
    if train is not None and train.choices:
        train_choices = tuple(sorted({_round(c * factor) for c in train.choices}))
        train_max = None if train.max_size is None else int(math.ceil(train.max_size * factor))
    report.suggestion = Suggestion(
        short=short, max_size=None if new.max_size is None else int(new.max_size),
        train_choices=train_choices, train_max_size=train_max,
        capped=min(v[1] for v in res) < TARGET_PATCHES, cap=cap,
        token_factor=_tokens(sizes, new, patch) / _tokens(sizes, base, patch), after=res,
    )
    return report


# ---------------------------------------------------------------------------- the log block
def _table_lines(report: SizeReport) -> List[str]:
    pct = " ".join(f"{'p%d' % p:>6}" for p in PERCENTILES)
    width = max([len("class")] + [len(g.name) for g in report.groups])
    lines = [f"  {'class':<{width}} {'boxes':>7} | px: {pct} | patches: {pct} | <1 patch <{TARGET_PATCHES:g} patches"]
    for g in report.groups:
        flag = " *" if g.small else ("" if g.judged else " (few boxes: not judged)")
        lines.append(
            f"  {g.name:<{width}} {g.count:>7} |     " + " ".join(f"{v:6.1f}" for v in g.px)
            + " |          " + " ".join(f"{v:6.2f}" for v in g.patches)
            + f" | {100 * g.below1:7.1f}% {100 * g.below2:9.1f}%{flag}"
        )
    return lines


def _overrides(report: SizeReport, lazy: bool, keys_known: bool) -> str:
    s = report.suggestion
    if not keys_known:
        return (f"set the shortest edge of the ResizeShortestEdge in dataloader.test.mapper.augmentations to {s.short}"
                + (f" (longest {s.max_size})" if s.max_size else "") + " and scale the training one alike")
    if lazy:
        parts = [f"dataloader.test.mapper.augmentations.min_size_test={s.short}"]
        if s.max_size:
            parts.append(f"dataloader.test.mapper.augmentations.max_size_test={s.max_size}")
        if s.train_choices:
            parts.append("dataloader.train.mapper.augmentations.min_size_train=[%s]" % ",".join(map(str, s.train_choices)))
        if s.train_max_size:
            parts.append(f"dataloader.train.mapper.augmentations.max_size_train={s.train_max_size}")
        return " ".join(parts)
    parts = [f"INPUT.MIN_SIZE_TEST {s.short}"]
    if s.max_size:
        parts.append(f"INPUT.MAX_SIZE_TEST {s.max_size}")
    if s.train_choices:
        parts.append('INPUT.MIN_SIZE_TRAIN "(%s)"' % ",".join(map(str, s.train_choices)))
    if s.train_max_size:
        parts.append(f"INPUT.MAX_SIZE_TRAIN {s.train_max_size}")
    return " ".join(parts)


def format_report(report: SizeReport, names: Sequence[str], lazy: bool = True, keys_known: bool = True
                  ) -> Tuple[str, Optional[str]]:
    """(the info block, the warning or None)."""
    ref, train = report.reference, report.train
    where = {"test": "the test resize, %s (what evaluation and prediction see)",
             "train": "the training resize's mean, %s (the config has no test resize)",
             }.get(report.reference_from, "%s (the config resizes neither split)") % ref.describe()
    head = f"Object sizes in {', '.join(names)} at {where}"
    if train is not None and train.choices and report.reference_from == "test":
        lo, hi = min(train.choices), max(train.choices)
        span = f"{lo}" if lo == hi else f"{lo}-{hi}"
        if train.short is not None and ref.short is not None:
            head += (f"; training draws shortest edges {span} (mean {train.short:g}: objects x{train.short / ref.short:.2f}"
                     " of these sizes on average)")
    n = sum(g.count for g in report.groups if g.name == "all")
    head += f". sqrt(w*h) of {n} boxes, ViT patch {report.patch} px:"
    small = report.small_groups
    legend = [f"  (* more than {100 * SHARE_LIMIT:.0f}% of the boxes under {TARGET_PATCHES:g} patches: see the warning)"]
    block = "\n".join([head] + _table_lines(report) + (legend if small else []))
    if not small:
        return block, None
    two = TARGET_PATCHES * report.patch
    who = "; ".join(f"{'all boxes' if g.name == 'all' else repr(g.name)}: {100 * g.below2:.0f}% "
                    f"(p{TARGET_PERCENTILE} {g.target_pct:.2f} patches)" for g in small)
    msg = (f"Small objects for the input size: more than {100 * SHARE_LIMIT:.0f}% of the boxes are under "
           f"{TARGET_PATCHES:g} patches ({two:g} px) at {ref.describe()} ({who}). The ViT sees {report.patch}x{report.patch} px "
           f"patches: an object under 2 patches is less than 2 tokens wide, under one it shares its token with "
           "the background; small objects are the ones detected worst (COCO's APs).")
    s = report.suggestion
    if s is None:
        return block, msg + f" No larger size is suggested: {report.note}."
    reached = "; ".join(f"{'all boxes' if g.category is None else repr(g.name)}: p{TARGET_PERCENTILE} {p:.2f} "
                        f"patches, {100 * share:.0f}% under {TARGET_PATCHES:g}" for g, (_, p, share) in zip(small, s.after))
    how = (f"capped at {s.cap} px (min({MAX_SUGGESTED}, {MAX_UPSCALE:g} x the images' median shortest side)), "
           "short of the target: " if s.capped else "")
    train_note = (f"; the training sizes x{s.short / ref.short:.2f} alike" if s.train_choices and ref.short else "")
    msg += (f" Suggested: shortest edge {s.short} ({how}{reached}{train_note}), "
            f"at {s.token_factor:.1f}x the ViT tokens per image (the size's square; the backbone's time grows at "
            f"least as much, its global attention with the square of the tokens). Override: {_overrides(report, lazy, keys_known)}")
    return block, msg


_ADVISED: set = set()


def _keys_known(cfg) -> bool:
    """Whether the config's mappers take build_detr_augmentation's size keys (else the overrides
    to type are described, not spelled)."""
    from dinov2od.d2.config import is_lazy

    if not is_lazy(cfg):
        return True
    try:
        return all("min_size_%s" % s in cfg.dataloader[s].mapper.augmentations for s in ("train", "test"))
    except Exception:
        return False


def advise_input_size(cfg, names: Sequence[str], force: bool = False) -> Optional[SizeReport]:
    """Log the object sizes of the training datasets ``names`` at the config's input size and, when
    many are under two patches, a warning with a suggested size (module docstring). Main process,
    once per process for the same datasets and sizes (``force``: again). Returns the report (None
    when nothing could be computed); never raises (advice must not stop a training)."""
    try:
        from detectron2.utils import comm

        if not comm.is_main_process() or not names:
            return None
        return _advise(cfg, list(names), force)
    except Exception as e:
        logger.warning("Could not compute the object-size advice (%s: %s); training goes on.", type(e).__name__, e)
        return None


def _advise(cfg, names: List[str], force: bool) -> Optional[SizeReport]:
    from detectron2.data import MetadataCatalog

    from dinov2od.d2.config import is_lazy

    sizes = input_sizes(cfg)
    if sizes["test"] is not None and sizes["test"].short is not None:
        reference, reference_from = sizes["test"], "test"
    elif sizes["train"] is not None and sizes["train"].short is not None:
        reference, reference_from = InputSize(short=sizes["train"].short, max_size=sizes["train"].max_size), "train"
    else:
        reference, reference_from = InputSize(short=None, max_size=None), "none"
    patch = patch_size_of(cfg)
    key = (tuple(names), reference, sizes["train"], patch)
    if key in _ADVISED and not force:
        return None
    tables = []
    for name in names:
        meta = MetadataCatalog.get(name)
        json_file = meta.get("dinov2od_source_json", None) or meta.get("json_file", None)
        table = box_table(json_file) if json_file else None
        if table is None:
            why = ("no json_file in its metadata" if not json_file else
                   f"its json ({os.path.getsize(json_file) / 2**20:.0f} MB) was not read by the start-up check"
                   if os.path.isfile(json_file) else f"{json_file} does not exist")
            logger.info("Object-size advice skipped for %s: %s.", name, why)
            return None
        tables.append(table)
    _ADVISED.add(key)
    report = size_report(BoxTable.concat(tables), reference, patch, sizes["train"], reference_from)
    if not report.groups:
        return report
    block, warning = format_report(report, names, lazy=is_lazy(cfg), keys_known=_keys_known(cfg))
    logger.info(block)
    if warning:
        logger.warning(warning)
    return report
