"""Object sizes at the input size, and the suggested size (issue 30, item 4; dinov2od.d2.data.datasets.sizes).

Every number the advice prints is recomputed here by another route: the resize by Detectron2's own
``ResizeShortestEdge`` transform applied to each box (not the module's vectorized formula), the
percentiles by sorting and interpolating in a loop (numpy's "linear" definition written out), the
shares and the token counts by counting in loops, all in float64 Python floats.

Negative controls, each run on 2026-12-07 by breaking the module and running this file (restored after):
* ``object_sizes`` ignoring the resize (the images' own size): 10 of 15 fail, among them
  test_percentiles_and_shares_match_an_independent_computation and both
  test_the_size_used_is_the_configs_test_resize (the sizes are 480/224 = 2.1x too large).
* ``resized_shapes`` without Detectron2's rounding (no ``np.floor(... + 0.5)``): the 1e-9 comparisons fail
  (test_percentiles_and_shares_match_an_independent_computation, test_the_size_used_is_the_configs_test_resize).
* the rule at ``>=`` instead of ``>`` SHARE_LIMIT: test_warning_only_above_20_percent[2-False] fails (exactly
  20% warns); SHARE_LIMIT = 0.3: its [3-True] and [21-True] fail.
* no per-class rows (``_groups`` returning the "all" row only): test_a_small_class_among_large_ones_is_named,
  test_more_than_20_classes_are_one_row and the percentile test fail.
* the suggestion rounded down from the linear estimate, without the step-up loop:
  test_the_suggestion_brings_the_10th_percentile_to_two_patches fails (p10 < 2 at the suggestion), and the cap
  and printed-overrides tests with it.
* the cap removed (``cap = 10**6``): both test_the_suggestion_is_capped fail.
* ``remember_boxes`` doing nothing: test_the_advice_reuses_the_parsed_json fails (the advice reads the json).
"""
import json
import logging
import math
import os
import shlex

import numpy as np
import pytest
from PIL import Image

from detectron2.data import transforms as T

from tests.helpers import ROOT
from tests.helpers.user_data import unique_dataset_name
from dinov2od.d2.config import check_config_datasets, load_config
from dinov2od.d2.data.datasets.boxes import boxes_from_coco
from dinov2od.d2.data.datasets.input_size import InputSize, input_sizes, patch_size_of
from dinov2od.d2.data.datasets import sizes as S

SHAPES_PY = os.path.join(ROOT, "configs/shapes.py")
SHAPES_YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")


# ---------------------------------------------------------------------------- the independent route
def _percentile(values, q):
    """numpy's default ("linear") percentile written out: rank q/100 * (n-1), interpolated."""
    v = sorted(float(x) for x in values)
    rank = q / 100.0 * (len(v) - 1)
    lo = int(math.floor(rank))
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (rank - lo)


def _resized_box_sizes(data, short, max_size):
    """sqrt(w*h) of each usable box after Detectron2's ResizeShortestEdge transform, box by box
    (clipped to its image first, as training clips it)."""
    sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
    out = []
    for a in data["annotations"]:
        if a.get("iscrowd", 0):
            continue
        w_img, h_img = sizes[a["image_id"]]
        x, y, w, h = a["bbox"]
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, w_img), min(y + h, h_img)
        if x1 <= x0 or y1 <= y0:
            continue
        aug = T.ResizeShortestEdge([short, short], max_size, sample_style="choice")
        tf = aug.get_transform(np.zeros((h_img, w_img, 1), np.uint8))
        bx = tf.apply_box(np.array([[x0, y0, x1, y1]], dtype=np.float64))[0]
        out.append((a["category_id"], math.sqrt(float(bx[2] - bx[0]) * float(bx[3] - bx[1]))))
    return out


def _tokens(data, short, max_size, patch=14):
    total = 0
    for im in data["images"]:
        h, w = T.ResizeShortestEdge.get_output_shape(im["height"], im["width"], short, max_size)
        total += math.ceil(h / patch) * math.ceil(w / patch)
    return total


def _coco(image_sizes, boxes, names=("rbc", "platelet")):
    """images of the given (w, h); boxes (image index, category id, x, y, w, h)."""
    return {
        "images": [{"id": i + 1, "file_name": f"im{i}.jpg", "width": w, "height": h}
                   for i, (w, h) in enumerate(image_sizes)],
        "annotations": [{"id": k + 1, "image_id": i + 1, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": 0} for k, (i, c, x, y, w, h) in enumerate(boxes)],
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
    }


def _random_boxes(rng, image_sizes, n, cats=(1, 2)):
    out = []
    for k in range(n):
        i = int(rng.integers(len(image_sizes)))
        w_img, h_img = image_sizes[i]
        w, h = float(rng.lognormal(3.3, 0.7)), float(rng.lognormal(3.3, 0.7))
        x, y = float(rng.uniform(-5, w_img - 5)), float(rng.uniform(-5, h_img - 5))  # some reach beyond: clipped
        out.append((i, cats[k % len(cats)], x, y, w, h))
    return out


# ---------------------------------------------------------------------------- 1. the numbers
def test_percentiles_and_shares_match_an_independent_computation():
    rng = np.random.default_rng(3)
    image_sizes = [(640, 480), (480, 640), (1200, 300), (500, 375)]  # (1200, 300): the longest-edge cap binds
    data = _coco(image_sizes, _random_boxes(rng, image_sizes, 400))
    data["annotations"][0]["iscrowd"] = 1  # not trained on: not counted
    table = boxes_from_coco(data, "x.json")
    ref = InputSize(short=224.0, max_size=400.0)
    report = S.size_report(table, ref, patch=14)
    expected = _resized_box_sizes(data, 224, 400)
    assert table.num_boxes == len(expected) == 399  # the crowd box is not counted
    groups = {g.name: g for g in report.groups}
    assert set(groups) == {"rbc", "platelet", "all"}
    for name, cat in (("rbc", 1), ("platelet", 2), ("all", None)):
        px = [s for c, s in expected if cat is None or c == cat]
        g = groups[name]
        assert g.count == len(px)
        for q, got_px, got_patches in zip(S.PERCENTILES, g.px, g.patches):
            assert got_px == pytest.approx(_percentile(px, q), rel=1e-9, abs=1e-9)
            assert got_patches == pytest.approx(_percentile([s / 14 for s in px], q), rel=1e-9, abs=1e-9)
        assert g.below1 == pytest.approx(sum(1 for s in px if s / 14 < 1) / len(px), abs=1e-12)
        assert g.below2 == pytest.approx(sum(1 for s in px if s / 14 < 2) / len(px), abs=1e-12)
        assert g.target_pct == pytest.approx(_percentile([s / 14 for s in px], 10), rel=1e-9)


def test_more_than_20_classes_are_one_row():
    image_sizes = [(100, 100)]
    boxes = [(0, 1 + k % 21, 0, 0, 10 + k, 10 + k) for k in range(42)]
    data = _coco(image_sizes, boxes, names=[f"c{k}" for k in range(21)])
    report = S.size_report(boxes_from_coco(data), InputSize(short=None, max_size=None), 14)
    assert [g.name for g in report.groups] == ["all"]
    data = _coco(image_sizes, [b for b in boxes if b[1] <= 20], names=[f"c{k}" for k in range(20)])
    report = S.size_report(boxes_from_coco(data), InputSize(short=None, max_size=None), 14)
    assert len(report.groups) == 21


# ---------------------------------------------------------------------------- 2. the size used
def _write_dataset(root, data_by_split):
    """A Roboflow-layout folder: <split>/_annotations.coco.json and plain JPEGs of the json's sizes."""
    for split, data in data_by_split.items():
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        for im in data["images"]:
            Image.new("RGB", (im["width"], im["height"]), (90, 120, 60)).save(os.path.join(folder, im["file_name"]))
        with open(os.path.join(folder, "_annotations.coco.json"), "w") as f:
            json.dump(data, f)
    return root


def _lazy_cfg(root, *overrides):
    return load_config(SHAPES_PY, [f"dataset.root={root}", f"dataset.name={unique_dataset_name('sz')}", "dataset.check_images=header",
                                   "model.num_classes=2", "train.epochs=null", *overrides])


def _yacs_cfg(root, *overrides):
    return load_config(SHAPES_YAML, ["DATASETS.ROOT", root, "DATASETS.NAME", unique_dataset_name("szy"), "DATASETS.CHECK_IMAGES",
                                     "header", "MODEL.DINOV2OD.NUM_CLASSES", "0", *overrides])


def _sizes_dataset(tmp_path, sides, image=(640, 480)):
    """Square boxes of the given sides (class 1), spread over 640x480 images; a small valid split."""
    per_image = 12  # a 4 x 3 grid of 130 px cells: boxes up to 120 px stay inside the image
    n_images = (len(sides) + per_image - 1) // per_image
    boxes = [(k // per_image, 1, 5 + (k % 4) * 130, 5 + (k % per_image // 4) * 130, s, s) for k, s in enumerate(sides)]
    train = _coco([image] * n_images, boxes)
    valid = _coco([image], [(0, 1, 10, 10, 50, 50), (0, 2, 100, 100, 30, 30)])
    return _write_dataset(str(tmp_path / "data"), {"train": train, "valid": valid}), train


@pytest.mark.parametrize("style", ["lazy", "yacs"])
def test_the_size_used_is_the_configs_test_resize(tmp_path, caplog, style):
    """A config with min_size_test 224 on 640x480 images scales every box by 224/480 (Detectron2
    rounds the long side: 640 x 224/480 = 298.7 -> 299 px, so x by 299/640)."""
    sides = [float(s) for s in np.linspace(20, 120, 60)]
    root, train = _sizes_dataset(tmp_path, sides)
    if style == "lazy":
        cfg = _lazy_cfg(root, "dataloader.test.mapper.augmentations.min_size_test=224",
                        "dataloader.test.mapper.augmentations.max_size_test=400")
    else:
        cfg = _yacs_cfg(root, "INPUT.MIN_SIZE_TEST", "224", "INPUT.MAX_SIZE_TEST", "400")
    caplog.set_level(logging.INFO, logger="dinov2od")
    names = check_config_datasets(cfg)  # the training start's check: logs the block once
    assert "Object sizes in " in caplog.text and "at the test resize, shortest edge 224, longest <= 400" in caplog.text
    report = S.advise_input_size(cfg, [names[0]], force=True)
    assert report.reference.short == 224 and report.reference_from == "test"
    g = report.groups[-1]
    sx, sy = 299 / 640, 224 / 480
    for q, got in zip(S.PERCENTILES, g.px):
        assert got == pytest.approx(_percentile([s * math.sqrt(sx * sy) for s in sides], q), rel=1e-9)
        assert got == pytest.approx(_percentile(sides, q) * 224 / 480, rel=2e-3)  # the rounding's share: 0.05%
    # the training resize is reported as a range and its mean: shapes' (192, 208, 224, 240, 256)
    assert "training draws shortest edges 192-256 (mean 224" in caplog.text
    # evaluation only: no advice
    caplog.clear()
    S._ADVISED.clear()
    check_config_datasets(cfg, ("test",))
    assert "Object sizes" not in caplog.text


def test_patch_size_comes_from_the_model_config(tmp_path):
    root, _ = _sizes_dataset(tmp_path, [40.0] * 20)
    assert patch_size_of(_lazy_cfg(root)) == 14
    assert patch_size_of(_lazy_cfg(root, "model.detector.backbone.family=dinov3")) == 16
    assert patch_size_of(_lazy_cfg(root, "+model.detector.backbone.arch_overrides.patch_size=8")) == 8
    assert patch_size_of(_yacs_cfg(root, "MODEL.DINOV2OD.BACKBONE.FAMILY", "dinov3")) == 16


# ---------------------------------------------------------------------------- 3. the warning
def _report_for(sides, image=(640, 480), short=224.0, max_size=400.0, cats=None):
    cats = cats or [1] * len(sides)
    boxes = [(0, c, 1, 1, s, s) for s, c in zip(sides, cats)]
    data = _coco([image], boxes)
    return S.size_report(boxes_from_coco(data), InputSize(short=short, max_size=max_size), 14), data


def _sides_with_share_small(n, n_small, short=224.0, height=480):
    """n box sides in the original image, n_small of them under 2 patches at ``short`` px, the others
    well above."""
    f = short / height
    small = 1.5 * 14 / f  # 1.5 patches
    large = 4 * 14 / f
    return [small] * n_small + [large] * (n - n_small)


@pytest.mark.parametrize("n_small,warns", [(3, True), (2, False), (1, False), (21, True)])
def test_warning_only_above_20_percent(n_small, warns, caplog):
    """More than 20% of the boxes under 2 patches warns; 20% (2 of 10) and 10% do not."""
    n = 10 if n_small < 10 else 100
    report, _ = _report_for(_sides_with_share_small(n, n_small))
    assert report.groups[-1].below2 == pytest.approx(n_small / n)
    block, warning = S.format_report(report, ["t"])
    assert (warning is not None) == warns
    assert ("*" in block.splitlines()[-1 if not warns else -2]) == warns
    if warns:
        assert "more than 20% of the boxes are under 2 patches (28 px)" in warning
        assert report.suggestion is not None and report.suggestion.short > 224


def test_a_small_class_among_large_ones_is_named():
    """12 platelets under 2 patches among 100 large cells: 10.7% overall (no warning by the overall
    share) but 100% of the class: the warning names it. A class of 3 small boxes is not judged."""
    sides = _sides_with_share_small(100, 0) + _sides_with_share_small(12, 12)
    report, _ = _report_for(sides, cats=[1] * 100 + [2] * 12)
    assert report.groups[-1].below2 == pytest.approx(12 / 112) and not report.groups[-1].small
    _, warning = S.format_report(report, ["t"])
    assert warning is not None and "'platelet': 100%" in warning and "all boxes:" not in warning.split("Suggested")[0]
    report, _ = _report_for(_sides_with_share_small(100, 0) + _sides_with_share_small(3, 3), cats=[1] * 100 + [2] * 3)
    block, warning = S.format_report(report, ["t"])
    assert warning is None and "(few boxes: not judged)" in block


# ---------------------------------------------------------------------------- 4. the suggestion
def test_the_suggestion_brings_the_10th_percentile_to_two_patches():
    rng = np.random.default_rng(7)
    image_sizes = [(640, 480), (500, 375), (480, 640)]
    boxes = [(int(rng.integers(3)), 1 + k % 2, 2, 2, float(rng.lognormal(3.8, 0.4)), float(rng.lognormal(3.8, 0.4)))
             for k in range(300)]
    data = _coco(image_sizes, boxes)
    report = S.size_report(boxes_from_coco(data), InputSize(short=224.0, max_size=400.0), 14,
                           train=InputSize(short=224.0, max_size=400.0, choices=(192, 224, 256)))
    assert report.small_groups
    s = report.suggestion
    assert s.short % S.ROUND_TO == 0 and not s.capped
    assert s.max_size == math.ceil(400 * s.short / 224)  # the longest-edge cap scaled alike
    assert s.train_choices == tuple(sorted({16 * round(c * s.short / 224 / 16) for c in (192, 224, 256)}))

    def p10(short, max_size, cat):
        return _percentile([v / 14 for c, v in _resized_box_sizes(data, short, max_size) if cat is None or c == cat], 10)

    small = [None if g.name == "all" else {"rbc": 1, "platelet": 2}[g.name] for g in report.small_groups]
    for cat in small:
        assert p10(s.short, s.max_size, cat) >= 2.0
    # the smallest multiple of 16 that does it: 16 px less leaves some group under 2 patches
    smaller = s.short - 16
    assert min(p10(smaller, math.ceil(400 * smaller / 224), cat) for cat in small) < 2.0
    # the cost: ViT tokens (patches after padding to the patch) of every training image
    assert s.token_factor == pytest.approx(_tokens(data, s.short, s.max_size) / _tokens(data, 224, 400), rel=1e-12)
    _, warning = S.format_report(report, ["t"])
    assert f"Suggested: shortest edge {s.short}" in warning and f"at {s.token_factor:.1f}x the ViT tokens" in warning


@pytest.mark.parametrize("image,cap", [((200, 150), 288), ((3000, 2000), 1024)])
def test_the_suggestion_is_capped(image, cap):
    """Tiny boxes would need a huge size: capped at min(1024, 2 x the images' shortest side), rounded
    down to 16 (150 px images: 2 x 150 = 300 -> 288; 2000 px images: 1024), and the warning says the target is not reached."""
    sides = [2.0] * 20
    report, _ = _report_for(sides, image=image, short=min(image) / 2, max_size=None)
    s = report.suggestion
    assert s.short == cap == s.cap and s.capped
    _, warning = S.format_report(report, ["t"])
    assert f"capped at {cap} px" in warning and "short of the target" in warning
    # already at the cap: no larger size suggested, and the warning says why
    report, _ = _report_for(sides, image=image, short=float(cap), max_size=None)
    assert report.suggestion is None and report.small_groups
    assert "No larger size is suggested" in S.format_report(report, ["t"])[1]


def test_the_printed_overrides_load_and_set_the_suggested_size(tmp_path, caplog):
    """The override line of the warning, typed as printed (shell quoting included), is accepted by
    both config styles (unknown keys are errors) and gives the suggested sizes."""
    sides = _sides_with_share_small(40, 20)
    root, _ = _sizes_dataset(tmp_path, sides)
    for style in ("lazy", "yacs"):
        cfg = _lazy_cfg(root) if style == "lazy" else _yacs_cfg(root)
        caplog.clear()
        caplog.set_level(logging.INFO, logger="dinov2od")
        report = S.advise_input_size(cfg, [S_name(cfg)], force=True)
        s = report.suggestion
        warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][-1]
        typed = shlex.split(warning.split("Override: ")[1])
        cfg2 = _lazy_cfg(root, *typed) if style == "lazy" else _yacs_cfg(root, *typed)
        got = input_sizes(cfg2)
        assert got["test"].short == s.short and got["test"].max_size == s.max_size
        assert got["train"].choices == s.train_choices and got["train"].max_size == s.train_max_size
        # at the suggested size nothing warns
        caplog.clear()
        again = S.advise_input_size(cfg2, [S_name(cfg2)], force=True)
        assert not again.small_groups and not [r for r in caplog.records if r.levelno == logging.WARNING]


def S_name(cfg):
    from dinov2od.d2.config import dataset_names

    return dataset_names(cfg)["train"][0]


# ---------------------------------------------------------------------------- 5. reuse, once
def test_the_advice_reuses_the_parsed_json(tmp_path, monkeypatch, caplog):
    """The boxes come from the json the registration and the check parsed: the advice itself calls
    json.load no more; the block is logged once per process."""
    root, _ = _sizes_dataset(tmp_path, [40.0] * 30)
    cfg = _lazy_cfg(root)
    calls = []
    real = json.load
    monkeypatch.setattr(json, "load", lambda *a, **k: calls.append(1) or real(*a, **k))
    caplog.set_level(logging.INFO, logger="dinov2od")
    report = S.advise_input_size(cfg, [S_name(cfg)])
    assert report is not None and report.groups and calls == []
    assert S.advise_input_size(cfg, [S_name(cfg)]) is None  # once
    assert caplog.text.count("Object sizes in ") == 1
