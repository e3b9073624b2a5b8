#!/usr/bin/env python
"""Pretrain the demo's tiny DINOv2-architecture ViT on generated "glyphs" images.

Meta's DINOv2 weights cannot be downloaded on the machines this project is built on, so the demo
starts from a backbone the project pretrains itself with this script (it is NOT one of Meta's
models). The objective is dense and supervised (``dinov2od/pretraining/dense.py``); the data are
12 glyph classes drawn on the fly (``dinov2od/pretraining/glyphs.py``), none of which is a demo
class, from seeds no demo image uses.

The result is written in Meta's official DINOv2 ``.pth`` layout (the keys ``vit_small(...)``'s
``state_dict()`` has: ``cls_token``, ``pos_embed``, ``blocks.N.attn.qkv.weight`` ...), so it loads
through the same code path as ``dinov2_vits14_pretrain.pth``::

    python tools/pretrain_backbone.py --out weights/dinov2od_tiny_glyphs.pth   # the committed file
    DINOv2Backbone(arch="tiny", arch_overrides=dict(hidden_size=192, num_hidden_layers=4,
                   num_attention_heads=6, intermediate_size=384),
                   pretrained="weights/dinov2od_tiny_glyphs.pth")

A JSON file next to the weights records the recipe, the seed, the time and the held-out metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dinov2od.layers import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dinov2od.modeling import DINOv2Backbone  # noqa: E402
from dinov2od.modeling import hf_to_official_state_dict  # noqa: E402
from dinov2od.pretraining.dense import (  # noqa: E402
    DenseHeads, GlyphBatches, Stage, cosine_lr, dense_loss, dense_metrics, glyph_batch)
from dinov2od.pretraining.glyphs import GLYPH_CLASSES  # noqa: E402

logger = logging.getLogger("pretrain")
EVAL_SEED0 = 1_000_000_000  # held-out images; training seeds are < EVAL_SEED0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="weights/dinov2od_tiny_glyphs.pth")
    # stage 1: small images holding 1-3 large glyphs (cheap per image: the ViT learns shapes)
    p.add_argument("--small-iters", type=int, default=3000)
    p.add_argument("--small-batch", type=int, default=64)
    p.add_argument("--small-sizes", type=int, nargs="+", default=[56, 70, 84, 98, 112])
    # stage 2: scenes like the detector's (many glyphs from 10 to 150 px, images ~180-250 px)
    p.add_argument("--iters", type=int, default=800, help="stage-2 iterations")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--taps", type=int, default=2, help="tapped blocks the heads read (the demo's num_taps)")
    p.add_argument("--sizes", type=int, nargs="+", default=[182, 196, 210, 224, 238, 252],
                   help="image sides in pixels; each batch draws its height and width from these")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-size", type=int, default=224, help="side of the held-out images")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--workers", type=int, default=1, help="data workers drawing the images (0: in process)")
    p.add_argument("--loss-weights", nargs="*", default=[], metavar="NAME=W",
                   help="weights of the dense losses (coverage, box, fine, object; default 1 each)")
    return p.parse_args(argv)


def build_backbone(args) -> DINOv2Backbone:
    overrides = dict(hidden_size=args.hidden, num_hidden_layers=args.depth, num_attention_heads=args.heads,
                     intermediate_size=args.mlp, image_size=224)
    return DINOv2Backbone(arch="tiny", arch_overrides=overrides, num_taps=args.taps, lora_rank=0, freeze=False)


@torch.no_grad()
def evaluate(backbone, heads, args) -> dict:
    backbone.eval(), heads.eval()
    totals, n = {}, 0
    for start in range(0, args.eval_images, 16):
        seeds = range(EVAL_SEED0 + start, EVAL_SEED0 + min(start + 16, args.eval_images))
        images, target = glyph_batch(seeds, args.eval_size, args.eval_size, len(GLYPH_CLASSES), backbone.patch_size)
        pred = heads(backbone(normalize(images))[0])
        for k, v in dense_metrics(pred, target).items():
            totals[k] = totals.get(k, 0.0) + v * len(seeds)
        n += len(seeds)
    backbone.train(), heads.train()
    return {k: round(v / n, 4) for k, v in totals.items()}


def normalize(images):
    """RGB in [0, 1] -> ImageNet-normalized, as the backbone sees it in the detector."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def main(argv=None) -> dict:
    args = parse_args(argv)
    weights = {k: float(v) for k, v in (w.split("=") for w in args.loss_weights)}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    backbone = build_backbone(args)
    heads = DenseHeads(backbone.embed_dim, backbone.num_taps, len(GLYPH_CLASSES))
    params = [p for p in list(backbone.parameters()) + list(heads.parameters()) if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                             dict(params=no_decay, weight_decay=0.0)], lr=args.lr)
    stages = [Stage(args.small_iters, args.small_batch, args.small_sizes, max_glyphs=3, extent=(0.3, 0.9)),
              Stage(args.iters, args.batch, args.sizes)]
    batches = GlyphBatches(args.seed, [st for st in stages if st.steps], len(GLYPH_CLASSES), backbone.patch_size)
    total = len(batches)
    # one worker draws the next batches while the main process trains on the current one
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                         prefetch_factor=2 if args.workers else None)
    start, log = time.time(), []
    for step, (images, target) in enumerate(loader):
        lr = cosine_lr(step, total, args.warmup, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        losses = dense_loss(heads(backbone(normalize(images))[0]), target)
        loss = sum(weights.get(k[len("loss_"):], 1.0) * v for k, v in losses.items())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite pretraining loss at step {step}: "
                                     + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 20 == 0 or step == total - 1:
            logger.info("step %d/%d  lr %.2e  %s  %.2f s/it", step, total, lr,
                        "  ".join(f"{k}={v.item():.4f}" for k, v in losses.items()),
                        (time.time() - start) / (step + 1))
        if (step + 1) % args.eval_every == 0 or step == total - 1:
            metrics = evaluate(backbone, heads, args)
            log.append(dict(step=step + 1, seconds=round(time.time() - start, 1), **metrics))
            logger.info("eval @ %d: %s", step + 1, metrics)
    seconds = time.time() - start
    save(backbone, args, log, seconds)
    return log[-1]


def save(backbone, args, log, seconds) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sd = hf_to_official_state_dict(backbone.vit)
    tmp = args.out + ".tmp"
    torch.save(sd, tmp)
    os.replace(tmp, args.out)
    info = dict(
        what="dinov2od's own tiny DINOv2-architecture ViT, pretrained by tools/pretrain_backbone.py on "
             "generated glyphs images. NOT Meta's DINOv2 weights.",
        command="python tools/pretrain_backbone.py " + " ".join(sys.argv[1:]),
        args=vars(args), classes=list(GLYPH_CLASSES), seconds=round(seconds, 1),
        cpu=platform.processor() or platform.machine(), torch=torch.__version__, eval=log,
        arch_overrides=dict(hidden_size=args.hidden, num_hidden_layers=args.depth,
                            num_attention_heads=args.heads, intermediate_size=args.mlp),
    )
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
    logger.info("wrote %s (%.1f MB) in %.0f s", args.out, os.path.getsize(args.out) / 2**20, seconds)


if __name__ == "__main__":
    main()
