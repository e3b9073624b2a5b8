"""tools/predict.py on a tiny yacs model whose checkpoint holds classes of its own (names ring, box,
wedge; dataset ids 7, 11, 42: registered nowhere, so they can only come from the checkpoint):
outputs never land among the inputs, drawings named by relative path, sub-folders searched,
results written as they go, the checkpoint's ids and names (PyTorch and ONNX), the score hint,
16-bit PNGs. A lazy run's saved config.yaml: tools/test_predict_lazy.py."""
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.configs import TINY_CLASSES, TINY_YACS

sys.path.insert(0, os.path.join(ROOT, "tools"))

YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")
OPTS = [str(v) for v in TINY_YACS] + ["INPUT.MAX_SIZE_TEST", "200"]
NAMES, IDS = ["ring", "box", "wedge"], [7, 11, 42]
NUM_DETS = 10 * 3  # top-k = queries x classes


def _image(seed, h=90, w=120):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path, array):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def ckpt(tiny_yacs_checkpoint):
    """(model with classes, its checkpoint, the same weights saved without classes, folder):
    conftest's tiny yacs model, whose classes are NAMES / IDS."""
    assert TINY_CLASSES == (NAMES, IDS)
    c = tiny_yacs_checkpoint
    return c["model"], c["weights"], c["old"], c["root"]


def _run(*argv):
    import predict

    return predict.main(["--config-file", YAML, *argv, *OPTS])


def _read(path):
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------- problem 1: the user's files
def test_output_in_an_input_folder_is_refused_and_nothing_is_overwritten(ckpt, tmp_path):
    import predict

    _, weights, _, _ = ckpt
    folder = tmp_path / "images"
    _write(str(folder / "x.jpg"), _image(0))
    _write(str(folder / "sub" / "y.png"), _image(1))
    before = {p: _read(folder / p) for p in ("x.jpg", "sub/y.png")}
    for output in (folder, folder / "sub", folder / "drawings"):
        with pytest.raises(SystemExit, match="input folder"):
            _run("--weights", weights, "--input", str(folder), "--output", str(output))
    # a drawing that would replace an input file: x.jpg's drawing is x.jpg.jpg, itself an input here
    _write(str(tmp_path / "flat" / "x.jpg"), _image(2))
    _write(str(tmp_path / "flat" / "x.jpg.jpg"), _image(3))
    flat = {p: _read(tmp_path / "flat" / p) for p in ("x.jpg", "x.jpg.jpg")}
    with pytest.raises(SystemExit, match="would overwrite the input file"):
        _run("--weights", weights, "--input", str(tmp_path / "flat" / "x.jpg"), str(tmp_path / "flat" / "x.jpg.jpg"),
             "--output", str(tmp_path / "flat"))
    assert {p: _read(tmp_path / "flat" / p) for p in flat} == flat
    assert sorted(os.listdir(folder)) == ["sub", "x.jpg"]
    assert {p: _read(folder / p) for p in before} == before
    # negative control: an output beside the inputs is written, and the inputs stay as they were
    _run("--weights", weights, "--input", str(folder), "--output", str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == [predict.MARKER, predict.LOCK, "predictions.json", "predictions.jsonl", "sub",
                                                    "x.jpg.jpg"]
    assert {p: _read(folder / p) for p in before} == before


def test_list_images_names_by_relative_path_and_searches_sub_folders(tmp_path):
    import predict

    for rel in ("a/x.jpg", "b/x.jpg", "x.jpg", "x.png", "b/deep/z.JPEG"):
        _write(str(tmp_path / "in" / rel), _image(len(rel)))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    root = str(tmp_path / "in")
    names = [n for _, n in predict.list_images([root])]
    assert names == sorted(["a/x.jpg", "b/x.jpg", "b/deep/z.JPEG", "x.jpg", "x.png"])
    assert [n for _, n in predict.list_images([root], recursive=False)] == ["x.jpg", "x.png"]
    # several inputs: named from the folder holding them all
    both = predict.list_images([os.path.join(root, "a"), os.path.join(root, "b")])
    assert [n for _, n in both] == ["a/x.jpg", "b/deep/z.JPEG", "b/x.jpg"]
    files = predict.list_images([os.path.join(root, "a", "x.jpg"), os.path.join(root, "b", "x.jpg")])
    assert [n for _, n in files] == ["a/x.jpg", "b/x.jpg"]
    assert [n for _, n in predict.list_images([os.path.join(root, "x.png")])] == ["x.png"]
    drawings = [predict.drawing_name(n) for _, n in predict.list_images([root])]
    assert len(set(drawings)) == len(drawings) and "x.png.jpg" in drawings and "x.jpg.jpg" in drawings
    # an output holding the input folders (not inside one) is fine unless a drawing lands in one
    a, b = os.path.join(root, "a"), os.path.join(root, "b")
    predict.check_output(str(tmp_path / "elsewhere"), [a, b], predict.list_images([a, b]))
    with pytest.raises(SystemExit, match="would be written into the input folder"):
        predict.check_output(root, [a, b], predict.list_images([a, b]))  # root/a/x.jpg.jpg
    predict.check_output(root, [a], predict.list_images([a]))  # root/x.jpg.jpg: beside the input folder


def test_drawings_of_same_named_images_do_not_overwrite_each_other(ckpt, tmp_path):
    from PIL import Image

    _, weights, _, _ = ckpt
    rels = ("a/x.jpg", "b/x.jpg", "x.jpg", "x.png")
    arrays = {rel: np.full((64, 80, 3), 40 + 50 * i, np.uint8) for i, rel in enumerate(rels)}  # told apart by gray
    for rel, a in arrays.items():
        _write(str(tmp_path / "in" / rel), a)
    out = tmp_path / "out"
    results = _run("--weights", weights, "--input", str(tmp_path / "in"), "--output", str(out),
                   "--score-threshold", "1.01")  # nothing drawn: the drawing is the image
    assert {r["file_name"] for r in results} == {str(tmp_path / "in" / rel) for rel in rels}
    for rel, a in arrays.items():
        drawing = np.asarray(Image.open(out / (rel + ".jpg")), np.float64)
        assert drawing.shape == a.shape and np.abs(drawing - a).mean() < 3, rel
    # --no-recursive: the folder's own files only
    results = _run("--weights", weights, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "flat"),
                   "--no-recursive")
    assert {os.path.basename(r["file_name"]) for r in results} == {"x.jpg", "x.png"}
    assert not (tmp_path / "flat" / "a").exists()


# ---------------------------------------------------------------------------- problem 2: results as they go
def test_results_written_before_a_crash_are_kept(ckpt, tmp_path, monkeypatch):
    import predict

    _, weights, _, _ = ckpt
    for i in range(4):
        _write(str(tmp_path / "in" / f"{i}.png"), _image(10 + i))
    (tmp_path / "in" / "1b.png").write_bytes(b"broken")  # skipped, recorded as such
    complete = _run("--weights", weights, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "full"))
    with open(tmp_path / "full" / "predictions.json") as f:
        assert json.load(f) == complete

    build = predict.build_predictor

    def crashing_on_the_fourth_image(args):
        predictor, fmt, metadata = build(args)
        calls = []

        def run(image):
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("out of memory (simulated)")
            return predictor(image)
        return run, fmt, metadata

    monkeypatch.setattr(predict, "build_predictor", crashing_on_the_fourth_image)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated"):
        _run("--weights", weights, "--input", str(tmp_path / "in"), "--output", str(out))
    assert not (out / "predictions.json").exists()  # written only when complete
    with open(out / "predictions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [os.path.basename(r["file_name"]) for r in lines] == ["0.png", "1.png", "1b.png", "2.png"]
    assert "skipped" in lines[2] and "detections" not in lines[2]
    done = [r for line in lines for r in line.get("detections", [])]
    assert len(done) == 3 * NUM_DETS
    assert done == [r for r in complete if os.path.basename(r["file_name"]) in ("0.png", "1.png", "2.png")]
    assert (out / "2.png.jpg").is_file() and not (out / "3.png.jpg").exists()


# ---------------------------------------------------------------------------- problem 3: ids and names
def _expected_ids(model, path, min_size=112, max_size=200):
    """The checkpoint's ids of the model's detections on ``path`` (score order), computed here."""
    from PIL import Image

    import detectron2.data.transforms as T

    image = np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]  # BGR, as DefaultPredictor takes it
    h, w = image.shape[:2]
    resized = T.ResizeShortestEdge([min_size] * 2, max_size).get_transform(image).apply_image(image)
    rgb = resized[:, :, ::-1] if model.input_format == "RGB" else resized
    with torch.no_grad():
        inst = model([{"image": torch.as_tensor(np.ascontiguousarray(rgb.transpose(2, 0, 1))), "height": h,
                       "width": w}])[0]["instances"]
    order = torch.argsort(inst.scores, descending=True)
    return [IDS[c] for c in inst.pred_classes[order].tolist()], inst.scores[order].numpy()


def test_yacs_route_reports_the_checkpoints_ids_and_names(ckpt, tmp_path, monkeypatch, caplog):
    import predict

    model, weights, old, _ = ckpt
    path = str(tmp_path / "in" / "a.png")
    _write(path, _image(20))
    drawn = []
    draw = predict.draw_instances
    monkeypatch.setattr(predict, "draw_instances", lambda img, inst, meta, t: drawn.append(meta) or draw(img, inst, meta, t))
    results = _run("--weights", weights, "--input", path, "--output", str(tmp_path / "o"), "--score-threshold", "0")
    assert len(results) == NUM_DETS
    by_score = sorted(results, key=lambda r: -r["score"])
    ids, scores = _expected_ids(model, path)
    np.testing.assert_allclose([r["score"] for r in by_score], scores, atol=1e-6)
    gaps = np.abs(np.diff(scores, prepend=2)) > 1e-5
    assert [r["category_id"] for r, g in zip(by_score, gaps) if g] == [i for i, g in zip(ids, gaps) if g]
    assert {(r["category_id"], r["category_name"]) for r in results} == set(zip(IDS, NAMES))
    assert list(drawn[0].thing_classes) == NAMES  # the drawings' labels
    # NUM_CLASSES 0 (a config that takes it from the data) reads the count from the checkpoint
    zero = _run("--weights", weights, "--input", path, "--output", str(tmp_path / "z"), "--score-threshold", "0",
                "MODEL.DINOV2OD.NUM_CLASSES", "0")
    assert zero == results
    # --dataset must be registered
    with pytest.raises(SystemExit, match="not a registered dataset"):
        _run("--weights", weights, "--input", path, "--output", str(tmp_path / "d"), "--dataset", "no_such_dataset")
    # negative control: a checkpoint saved without classes reports contiguous ids, says so, and
    # cannot leave the class count to the data
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plain = _run("--weights", old, "--input", path, "--output", str(tmp_path / "p"), "--score-threshold", "0")
    assert "hold no class names" in caplog.text
    assert {r["category_id"] for r in plain} == {0, 1, 2}
    assert {r["category_name"] for r in plain} == {"class_0", "class_1", "class_2"}
    with pytest.raises(SystemExit, match="holds no class names"):
        _run("--weights", old, "--input", path, "--output", str(tmp_path / "q"), "MODEL.DINOV2OD.NUM_CLASSES", "0")


def test_dataset_override_reports_a_registered_datasets_classes(ckpt, tiny_config, tmp_path):
    from detectron2.data import MetadataCatalog

    _, weights, _, _ = ckpt
    path = str(tmp_path / "a.png")
    _write(path, _image(21))
    results = _run("--weights", weights, "--input", path, "--output", str(tmp_path / "o"), "--score-threshold", "0",
                   "--dataset", "shapes_tiny_val")
    with open(MetadataCatalog.get("shapes_tiny_val").json_file) as f:
        cats = {c["id"]: c["name"] for c in json.load(f)["categories"]}
    assert {(r["category_id"], r["category_name"]) for r in results} == set(cats.items())
    with pytest.raises(SystemExit, match="has 80 classes but the model predicts 3"):  # Detectron2's built-in COCO
        _run("--weights", weights, "--input", path, "--output", str(tmp_path / "c"), "--dataset", "coco_2017_val")


@pytest.fixture(scope="module")
def onnx_exports(request):
    """The tiny model as the plain detector graph and as the Detectron2 graph, both with its classes
    (tools/export_onnx.py: conftest's tiny_yacs_exports)."""
    pytest.importorskip("onnxruntime")
    graphs = request.getfixturevalue("tiny_yacs_exports")
    return graphs["detector"], graphs["detectron2"]


def test_onnx_graph_carries_the_classes(ckpt, onnx_exports):
    from dinov2od.export.onnx import OnnxDetector, onnx_classes, onnx_metadata

    model, _, _, _ = ckpt
    det, _ = onnx_exports
    assert onnx_classes(onnx_metadata(det)) == (NAMES, IDS)
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 100, 130, generator=g), torch.rand(3, 84, 112, generator=g)]
    ours = OnnxDetector(det).predict([im.numpy() for im in images])
    ref = model.detector.predict(images, topk=NUM_DETS)
    for a, b in zip(ours, ref):
        assert len(a["labels"]) == NUM_DETS
        np.testing.assert_array_equal(a["labels"], b["labels"].numpy())
        np.testing.assert_array_equal(a["category_ids"], b["category_ids"].numpy())
        assert a["names"] == b["names"]
        assert list(a["category_ids"]) == [IDS[i] for i in a["labels"]]


def test_onnx_route_reports_the_graphs_ids_and_names(ckpt, onnx_exports, tmp_path):
    import onnx

    from dinov2od.export.d2 import OnnxPredictor
    from dinov2od.export.onnx import onnx_classes, onnx_metadata

    model, weights, _, _ = ckpt
    det, d2 = onnx_exports
    path = str(tmp_path / "a.png")
    _write(path, _image(22, 100, 130))
    reference = _run("--weights", weights, "--input", path, "--output", str(tmp_path / "pt"), "--score-threshold", "0")
    ours = _run("--onnx", det, "--input", path, "--output", str(tmp_path / "onnx"), "--score-threshold", "0")
    top = lambda rs: sorted(rs, key=lambda r: -r["score"])[:5]  # noqa: E731  (clear ranks on a perturbed model)
    assert [(r["category_id"], r["category_name"]) for r in top(ours)] == \
        [(r["category_id"], r["category_name"]) for r in top(reference)]
    assert {r["category_id"] for r in ours} == set(IDS)
    with pytest.raises(SystemExit, match="not a registered dataset"):
        _run("--onnx", det, "--input", path, "--output", str(tmp_path / "x"), "--dataset", "no_such_dataset")
    # the Detectron2 graph carries the classes too (export_meta_arch stores them)
    assert onnx_classes(onnx_metadata(d2)) == (NAMES, IDS)
    d2_results = _run("--onnx", d2, "--input", path, "--output", str(tmp_path / "d2"), "--score-threshold", "0")
    assert [(r["category_id"], r["category_name"]) for r in top(d2_results)] == \
        [(r["category_id"], r["category_name"]) for r in top(reference)]
    # negative control: the same graph without the classes reports none
    stripped = onnx.load(d2)
    kept = [p for p in stripped.metadata_props if p.key not in ("class_names", "class_ids")]
    del stripped.metadata_props[:]
    stripped.metadata_props.extend(kept)
    onnx.save(stripped, str(tmp_path / "bare.onnx"))
    assert OnnxPredictor(str(tmp_path / "bare.onnx"), []).class_names is None


# ---------------------------------------------------------------------------- problem 4: the threshold
def test_help_shows_defaults_and_a_threshold_nothing_reaches_is_explained(ckpt, tmp_path, capsys, caplog):
    import predict

    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "minimum score drawn (predictions.json keeps every detection)" in help_text
    assert "(default: 0.3)" in " ".join(help_text.split())
    assert "(default: output/predict)" in help_text

    _, weights, _, _ = ckpt
    for i in range(2):
        _write(str(tmp_path / "in" / f"{i}.png"), _image(30 + i))
    # Detectron2's setup_logger stops "dinov2od" records from reaching the root logger caplog listens to
    logging.getLogger("dinov2od").addHandler(caplog.handler)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        results = _run("--weights", weights, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "a"),
                       "--score-threshold", "0")
    assert "No detection reached" not in caplog.text  # negative control: something is drawn
    best = max(r["score"] for r in results)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _run("--weights", weights, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "b"),
             "--score-threshold", str(best + 1e-3))
    assert "No detection reached --score-threshold" in caplog.text
    assert f"highest score was {best:.4f}" in caplog.text
    suggested = float(caplog.text.split("try --score-threshold ")[1].split()[0])
    assert suggested <= best and suggested > best - 0.011
    logging.getLogger("dinov2od").removeHandler(caplog.handler)


# ---------------------------------------------------------------------------- problem 6: 16-bit PNG
def test_16_bit_grayscale_png_is_read_as_its_values(ckpt, tmp_path):
    from PIL import Image

    from detectron2.data import detection_utils as utils

    _, weights, _, _ = ckpt
    ramp = (np.linspace(0, 40000, 120)[None, :] + np.linspace(0, 20000, 90)[:, None]).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # mode I;16
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    gray8 = np.rint(ramp * (255.0 / 65535)).astype(np.uint8)  # what the values mean, in 8 bits
    _write(str(tmp_path / "ref" / "same.png"), np.repeat(gray8[:, :, None], 3, axis=2))
    white = utils.read_image(str(tmp_path / "deep.png"), format="BGR")
    assert (white == 255).mean() > 0.99  # what Detectron2's reader makes of it (the failure this test guards)
    _write(str(tmp_path / "ref" / "white.png"), white[:, :, ::-1].copy())

    deep = _run("--weights", weights, "--input", str(tmp_path / "deep.png"), "--output", str(tmp_path / "o"),
                "--score-threshold", "1.01")
    same = _run("--weights", weights, "--input", str(tmp_path / "ref" / "same.png"), "--output", str(tmp_path / "r"),
                "--score-threshold", "1.01")
    as_white = _run("--weights", weights, "--input", str(tmp_path / "ref" / "white.png"),
                    "--output", str(tmp_path / "w"), "--score-threshold", "1.01")
    strip = lambda rs: [(r["category_id"], r["bbox"], r["score"]) for r in rs]  # noqa: E731
    assert strip(deep) == strip(same)
    assert strip(deep) != strip(as_white)  # negative control: the white reading predicts otherwise
    drawing = np.asarray(Image.open(tmp_path / "o" / "deep.png.jpg"), np.float64)  # nothing drawn
    assert np.abs(drawing - gray8[:, :, None]).mean() < 3


def test_training_drawings_read_16_bit_pngs_keep_same_named_images_apart_and_use_the_models_classes(
        ckpt, tmp_path, monkeypatch):
    """dinov2od.d2.evaluation.visualize.draw_dataset_predictions (train.visualize): the same reading, naming and
    labels as predict.py."""
    from PIL import Image

    from detectron2.config import LazyConfig
    from detectron2.data.datasets import register_coco_instances

    import dinov2od.d2.evaluation.visualize as visualize

    model, _, _, _ = ckpt
    ramp = (np.linspace(0, 40000, 120)[None, :] + np.linspace(0, 20000, 90)[:, None]).astype(np.uint16)
    os.makedirs(tmp_path / "imgs" / "a")
    Image.fromarray(ramp).save(tmp_path / "imgs" / "a" / "x.png")  # 16-bit grayscale
    _write(str(tmp_path / "imgs" / "b" / "x.png"), np.full((90, 120, 3), 200, np.uint8))
    coco = {"images": [{"id": i + 1, "file_name": f"{d}/x.png", "height": 90, "width": 120} for i, d in enumerate("ab")],
            "annotations": [], "categories": [{"id": 1, "name": "the_datasets_own"}, {"id": 2, "name": "b"},
                                              {"id": 3, "name": "c"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    name = f"vis16_{tmp_path.name}"
    register_coco_instances(name, {}, str(tmp_path / "coco.json"), str(tmp_path / "imgs"))
    loader = LazyConfig.load(os.path.join(ROOT, "configs/common/data.py")).dataloader.test
    loader.dataset.names = name
    loader.mapper.augmentations.min_size_test = 112
    loader.mapper.image_format = model.input_format
    loader.num_workers = 0
    labels = []
    draw = visualize.draw_instances
    monkeypatch.setattr(visualize, "draw_instances", lambda img, inst, meta, t: labels.append(meta) or draw(img, inst, meta, t))
    paths = visualize.draw_dataset_predictions(model, loader, str(tmp_path / "out"), num_images=2, score_threshold=1.01)
    assert sorted(os.path.relpath(p, tmp_path / "out") for p in paths) == ["a/x.png.jpg", "b/x.png.jpg"]
    gray8 = np.rint(ramp * (255.0 / 65535))
    drawing = np.asarray(Image.open(tmp_path / "out" / "a" / "x.png.jpg"), np.float64)
    assert np.abs(drawing - gray8[:, :, None]).mean() < 3  # not white
    assert np.abs(np.asarray(Image.open(tmp_path / "out" / "b" / "x.png.jpg"), np.float64) - 200).mean() < 3
    assert [list(m.thing_classes) for m in labels] == [NAMES, NAMES]
