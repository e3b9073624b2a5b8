"""MODEL_CARD.md's plain-PyTorch snippet, run verbatim, finds the boxes DefaultPredictor finds.

The snippet reads ``configs/shapes.py``, ``output/shapes/model_final_ema.pth`` and
``datasets/shapes/val/000000.jpg`` from the working directory. The test lays those out in a
temporary folder: the repository's configs and pretrained backbone, a square 224 x 224 shapes
image (so the snippet's ``Resize((224, 224))`` and DefaultPredictor's shortest-edge resize to 224
see the same pixels), and a checkpoint in the layout ``train_net.py`` writes. That checkpoint is
``$DINOV2OD_MODEL_CARD_CHECKPOINT`` when set (``make demo`` sets it to the demo's trained
weights), else the demo model with the project's pretrained backbone and a seeded decoder.

Negative control: the same snippet with ``normalized=True`` (the statistics the model card once
fed the backbone by mistake) must *not* find DefaultPredictor's boxes.
"""
import os
import re

import pytest
import torch

from tests.helpers import ROOT

CARD = os.path.join(ROOT, "MODEL_CARD.md")


def card_snippet() -> str:
    with open(CARD) as f:
        text = f.read()
    section = text.split("## Usage (plain PyTorch)", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def square_shapes_image(path: str) -> None:
    """A shapes image (the demo's own generator), centre-cropped to a square and resized to 224."""
    from PIL import Image

    from dinov2od.d2.data.datasets.shapes import generate_shapes_image

    array, _ = generate_shapes_image(seed=10_007)
    h, w = array.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    image = Image.fromarray(array[y0:y0 + side, x0:x0 + side]).resize((224, 224), Image.BILINEAR)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, quality=95)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    work = tmp_path_factory.mktemp("card")
    os.symlink(os.path.join(ROOT, "configs"), work / "configs")
    os.symlink(os.path.join(ROOT, "weights"), work / "weights")
    square_shapes_image(str(work / "datasets/shapes/val/000000.jpg"))
    ckpt = work / "output/shapes/model_final_ema.pth"
    os.makedirs(ckpt.parent)
    given = os.environ.get("DINOV2OD_MODEL_CARD_CHECKPOINT")
    if given:
        os.symlink(os.path.abspath(given), ckpt)
    else:
        torch.manual_seed(0)
        model = instantiate(LazyConfig.load(os.path.join(ROOT, "configs/shapes.py")).model)
        DetectionCheckpointer(model, save_dir=str(ckpt.parent)).save("model_final_ema")
    return work


def run_snippet(workdir, code: str) -> dict:
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        scope: dict = {}
        exec(compile(code, CARD, "exec"), scope)  # noqa: S102  (the model card's own code)
        return scope
    finally:
        os.chdir(cwd)


def predictor_detections(workdir) -> dict:
    """DefaultPredictor on the image, as the snippet's ``boxes``/``scores``/``labels`` dict."""
    from detectron2.config import get_cfg
    from detectron2.data.detection_utils import read_image
    from detectron2.engine import DefaultPredictor

    from dinov2od.d2 import add_dinov2od_config

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/yaml/shapes.yaml"))
    cfg.MODEL.DINOV2OD.BACKBONE.PRETRAINED = ""  # every weight comes from MODEL.WEIGHTS
    cfg.MODEL.WEIGHTS = str(workdir / "output/shapes/model_final_ema.pth")
    bgr = read_image(str(workdir / "datasets/shapes/val/000000.jpg"), format="BGR")
    inst = DefaultPredictor(cfg)(bgr)["instances"].to("cpu")
    return dict(boxes=inst.pred_boxes.tensor, scores=inst.scores, labels=inst.pred_classes)


def unmatched(detections: dict, reference: dict, score_tol=2e-3, box_tol=0.5) -> list:
    """Detections with no reference detection of the same class, score and box."""
    missing = []
    for box, score, label in zip(detections["boxes"], detections["scores"], detections["labels"]):
        same = ((reference["labels"] == label) & ((reference["scores"] - score).abs() < score_tol)
                & ((reference["boxes"] - box).abs().max(dim=1).values < box_tol))
        if not bool(same.any()):
            missing.append((label.item(), round(score.item(), 4), [round(v, 1) for v in box.tolist()]))
    return missing


def test_model_card_snippet_finds_the_boxes_of_default_predictor(workdir):
    code = card_snippet()
    assert "transforms.Resize((224, 224))" in code and "model(input_tensor)" in code
    scope = run_snippet(workdir, code)
    outputs, detections = scope["outputs"], scope["detections"]
    assert outputs["pred_logits"].shape[-1] == 3 and outputs["pred_boxes"].shape[-1] == 4
    assert len(detections["boxes"]) == 10
    predicted = predictor_detections(workdir)
    assert len(predicted["scores"]) >= 10
    assert unmatched(detections, predicted) == []
    # and the other way: DefaultPredictor's top 10 are the snippet's
    top = predicted["scores"].argsort(descending=True)[:10]
    assert unmatched({k: v[top] for k, v in predicted.items()}, detections) == []


def test_negative_control_normalized_input_finds_other_boxes(workdir):
    code = card_snippet().replace("model.predict(transform(image), topk=10)",
                                  "model.predict(transform(image), topk=10, normalized=True)")
    assert "normalized=True" in code
    detections = run_snippet(workdir, code)["detections"]
    missing = unmatched(detections, predictor_detections(workdir))
    assert len(missing) >= 5, f"normalized=True should change the detections, only {len(missing)} differ"
