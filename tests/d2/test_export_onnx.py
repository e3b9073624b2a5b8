"""ONNX export through Detectron2: tools/export_onnx.py's two formats from a yacs checkpoint, the
Detectron2 graph against the meta-architecture, and predict.py --onnx against PyTorch (onnxruntime,
CPU). The plain detector's graph: export/test_onnx.py."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from tests.helpers import ROOT
from tests.helpers.configs import TINY_YACS, build_tiny_yacs_model, save_d2_checkpoint
from tests.helpers.detector import perturb

sys.path.insert(0, os.path.join(ROOT, "tools"))

ATOL = 1e-4  # logits and normalized boxes
NUM_DETS = 10 * 3  # top-k = queries x classes


YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")
OPTS = [str(v) for v in TINY_YACS] + ["INPUT.MIN_SIZE_TEST", "112", "INPUT.MAX_SIZE_TEST", "400"]


@pytest.fixture(scope="module")
def yacs_exports(tiny_yacs_checkpoint, tiny_yacs_exports, tmp_path_factory):
    """A tiny yacs model's checkpoint, exported in both formats by tools/export_onnx.py --check
    (conftest's tiny_yacs_exports, shared with tools/test_predict.py), and a folder for this module."""
    return (tiny_yacs_checkpoint["model"], tiny_yacs_checkpoint["weights"], tiny_yacs_exports,
            tmp_path_factory.mktemp("d2"))


def test_detectron2_graph_matches_the_meta_architecture(yacs_exports):
    import onnxruntime as ort

    model, _, paths, _ = yacs_exports
    session = ort.InferenceSession(paths["detectron2"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for h, w in [(112, 149), (140, 98), (126, 200)]:
        image = torch.randint(0, 256, (3, h, w), generator=torch.Generator().manual_seed(h)).float()
        boxes, classes, scores, size = session.run(None, {"image": image.numpy()})
        with torch.no_grad():
            ref = model([{"image": image}])[0]["instances"]
        assert tuple(size) == (h, w) and len(scores) == len(ref) == NUM_DETS
        np.testing.assert_array_equal(classes, ref.pred_classes.numpy())
        np.testing.assert_allclose(scores, ref.scores.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(boxes, ref.pred_boxes.tensor.numpy(), rtol=0, atol=ATOL * max(h, w))


def _predict(root, name, *args):
    import predict

    out = str(root / name)
    predict.main(["--config-file", YAML, "--input", str(root / "images"), "--output", out,
                  "--score-threshold", "0.3", *args, *OPTS])
    with open(os.path.join(out, "predictions.json")) as f:
        return json.load(f), out


def _by_image(results):
    per = {}
    for r in results:
        per.setdefault(r["file_name"], []).append(r)
    return {k: sorted(v, key=lambda r: -r["score"]) for k, v in per.items()}


def test_predict_onnx_draws_the_same_boxes_as_pytorch(yacs_exports):
    from PIL import Image

    _, weights, paths, root = yacs_exports
    os.makedirs(root / "images", exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(90, 130), (160, 120)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    torch_results, torch_dir = _predict(root, "pt", "--weights", weights)
    for fmt, path in paths.items():
        onnx_results, onnx_dir = _predict(root, fmt, "--onnx", path)
        ours, ref = _by_image(onnx_results), _by_image(torch_results)
        assert sorted(ours) == sorted(ref) and all(len(ours[k]) == len(ref[k]) == NUM_DETS for k in ref)
        for k in ref:
            scores = np.array([r["score"] for r in ref[k]])
            np.testing.assert_allclose([r["score"] for r in ours[k]], scores, rtol=0, atol=1e-5)
            gaps = np.minimum(np.diff(scores, prepend=2)[:], np.diff(scores, append=-1)[:])  # to both neighbours
            for a, b, gap in zip(ours[k], ref[k], np.abs(gaps)):
                if gap > 1e-4:  # a clear rank: the same detection
                    assert a["category_id"] == b["category_id"], (fmt, k)
                    np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=0, atol=0.05)
        for name in ("0.png.jpg", "1.png.jpg"):  # the drawings (boxes scoring >= 0.3 and their labels)
            a = np.asarray(Image.open(os.path.join(onnx_dir, name)), np.int16)
            b = np.asarray(Image.open(os.path.join(torch_dir, name)), np.int16)
            assert a.shape == b.shape and (np.abs(a - b) > 8).mean() < 0.002, (fmt, name)
    # negative control: other weights through PyTorch give other detections
    torch.manual_seed(1)
    model = build_tiny_yacs_model()
    perturb(model.detector)
    other = save_d2_checkpoint(model, str(root / "other.pth"))
    other_results, _ = _predict(root, "other", "--weights", other)
    first = lambda res: _by_image(res)[sorted(_by_image(res))[0]][0]  # noqa: E731
    assert abs(first(other_results)["score"] - first(torch_results)["score"]) > 1e-3 or \
        np.abs(np.subtract(first(other_results)["bbox"], first(torch_results)["bbox"])).max() > 0.5
