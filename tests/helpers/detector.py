"""A tiny plain detector (random init, CPU) and what its tests feed it."""
import torch

from dinov2od.modeling import DINOv2Backbone, DINOv2ObjectDetector

TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_detector(num_classes=3, lora_rank=4, freeze=True, registers=False, **kw):
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=TINY_VIT, registers=registers, num_taps=2,
                              lora_rank=lora_rank, freeze=freeze)
    args = dict(hidden_dim=32, num_queries=12, num_decoder_layers=2, num_heads=4, num_points=2,
                dim_feedforward=64)
    args.update(kw)
    return DINOv2ObjectDetector(num_classes=num_classes, backbone=backbone, **args)


def perturb(model, scale=0.2):
    """Move every weight off its (often zero) init so no output ignores its input."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def padded_batch(images, garbage=True):
    """Images of different sizes in one batch (random values, or zeros, under the padding) and its mask."""
    h = max(im.shape[1] for im in images)
    w = max(im.shape[2] for im in images)
    batch = torch.rand(len(images), 3, h, w, dtype=images[0].dtype) if garbage else \
        torch.zeros(len(images), 3, h, w, dtype=images[0].dtype)
    mask = torch.ones(len(images), h, w, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return batch, mask
