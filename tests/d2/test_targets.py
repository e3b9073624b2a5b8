"""Detectron2 ground truth reaches the criterion as the normalized (cx, cy, w, h) the model predicts.

``DINOv2DETR`` converts each image's ``gt_boxes`` (XYXY_ABS, in the pixels of the image the
mapper produced) to ``(cx, cy, w, h)`` divided by that image's own width and height (not the
padded batch's). The expected values are worked out by hand below for non-square images of
different sizes in one padded batch, and read where the criterion receives them in a training
forward.

Needs Detectron2, like every module under tests/d2/ (see tests/conftest.py: a collection error where Detectron2 is
expected, a skip elsewhere).
"""

import torch

from detectron2.structures import Boxes, Instances

from tests.helpers.configs import tiny_model

# per image: (height, width), XYXY_ABS boxes, classes, and the (cx, cy, w, h) worked out by hand
IMAGES = [
    ((42, 70),
     [[7, 14, 35, 28], [49, 0, 70, 42]],
     [1, 0],
     # (7+35)/2/70, (14+28)/2/42, 28/70, 14/42  |  (49+70)/2/70, 21/42, 21/70, 42/42
     [[0.3, 0.5, 0.4, 1 / 3], [0.85, 0.5, 0.3, 1.0]]),
    ((56, 28),
     [[0, 14, 14, 56]],
     [2],
     # 7/28, 35/56, 14/28, 42/56
     [[0.25, 0.625, 0.5, 0.75]]),
]


def test_training_targets_are_normalized_cxcywh_of_each_unpadded_image(monkeypatch):
    model = tiny_model().train()
    seen = []
    criterion_forward = type(model.criterion).forward

    def recording(self, outputs, targets):
        seen.append(targets)
        return criterion_forward(self, outputs, targets)

    monkeypatch.setattr(type(model.criterion), "forward", recording)
    g = torch.Generator().manual_seed(0)
    inputs = []
    for (h, w), boxes, classes, _ in IMAGES:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.gt_classes = torch.tensor(classes)
        inputs.append({"image": torch.randint(0, 255, (3, h, w), generator=g, dtype=torch.uint8),
                       "instances": inst, "file_name": f"{h}x{w}.png"})
    losses = model(inputs)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    (targets,) = seen
    assert len(targets) == 2
    for t, (_, _, classes, expected) in zip(targets, IMAGES):
        assert t["labels"].tolist() == classes
        torch.testing.assert_close(t["boxes"].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=1e-6)
