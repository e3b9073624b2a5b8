"""A test of learning: a tiny random-init detector overfits 4 synthetic images on CPU."""
import time

import torch

from dinov2od.layers import box_cxcywh_to_xyxy, box_iou
from dinov2od.modeling import DINOv2Backbone, DINOv2ObjectDetector, HungarianMatcher, SetCriterion

COLORS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.2, 1.0]])


def shapes_images(num_images=4, size=84, seed=123):
    """Grey images with 1-3 filled rectangles; the class is the colour."""
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(num_images):
        img = torch.full((3, size, size), 0.5)
        labels, boxes = [], []
        for _ in range(1 + i % 3):
            c = int(torch.randint(0, 3, (1,), generator=gen))
            w, h = (int(v) for v in torch.randint(16, 40, (2,), generator=gen))
            x0 = int(torch.randint(0, size - w, (1,), generator=gen))
            y0 = int(torch.randint(0, size - h, (1,), generator=gen))
            img[:, y0:y0 + h, x0:x0 + w] = COLORS[c][:, None, None]
            labels.append(c)
            boxes.append([(x0 + w / 2) / size, (y0 + h / 2) / size, w / size, h / size])
        images.append(img)  # RGB in [0, 1]: the detector normalizes
        targets.append(dict(labels=torch.tensor(labels), boxes=torch.tensor(boxes)))
    return torch.stack(images), targets


def recall_at_iou50(outputs, targets, score_threshold=0.3):
    """Share of targets with a prediction of their class, score >= threshold and IoU >= 0.5."""
    hits = total = 0
    for i, t in enumerate(targets):
        scores = outputs["pred_logits"][i].sigmoid()
        iou = box_iou(box_cxcywh_to_xyxy(outputs["pred_boxes"][i]), box_cxcywh_to_xyxy(t["boxes"]))
        for j, c in enumerate(t["labels"].tolist()):
            hits += int(((scores[:, c] >= score_threshold) & (iou[:, j] >= 0.5)).any())
            total += 1
    return hits / total


def test_tiny_detector_overfits_synthetic_shapes():
    torch.manual_seed(0)
    images, targets = shapes_images()
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=dict(hidden_size=48, num_hidden_layers=2,
                              num_attention_heads=3, intermediate_size=96), num_taps=2, lora_rank=0, freeze=False)
    model = DINOv2ObjectDetector(num_classes=3, backbone=backbone, hidden_dim=64, scale_factors=(1.0, 0.5),
                                 num_queries=10, num_decoder_layers=2, num_heads=4, num_points=2,
                                 dim_feedforward=128)
    criterion = SetCriterion(3, HungarianMatcher(), num_aux_layers=model.num_aux_outputs, two_stage=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

    model.eval()
    with torch.no_grad():
        before = recall_at_iou50(model(images), targets)
    start, history = time.time(), []
    for it in range(1, 301):
        model.train()
        losses = criterion(model(images), targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if it % 10 == 0:
            model.eval()
            with torch.no_grad():
                history.append((it, round(loss.item(), 3), recall_at_iou50(model(images), targets)))
            if history[-1][2] >= 0.9:
                break
    print(f"recall before {before:.2f}; (iteration, loss, recall): {history}; {time.time() - start:.1f}s")
    assert before < 0.5
    assert history[-1][2] >= 0.9, history
