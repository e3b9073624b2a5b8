"""COCO 2017 recipe with a DINOv3 ViT-B/16 backbone (frozen) + LoRA: ``configs/coco.py`` with the
backbone family switched.

    python tools/train_net.py --config-file configs/coco_dinov3.py --num-gpus 8
    python tools/train_net.py --config-file configs/coco_dinov3.py --eval-only \
        train.init_checkpoint=output/coco_dinov3/model_final.pth

The DINOv3 weights come under Meta's DINOv3 License (accept it on the Hugging Face model page or
Meta's download page); this recipe does not change their terms. Other sizes: ``VIT`` below and
its hub id (``facebook/dinov3-vits16-pretrain-lvd1689m``, ``-vits16plus-``, ``-vitl16-``,
``-vith16plus-``, ``-vit7b16-``), a ``save_pretrained`` folder, or Meta's ``.pth`` file. The
SAT-493M (satellite) models expect their own pixel statistics: set ``model.pixel_mean`` and
``model.pixel_std`` to Meta's (0.430, 0.411, 0.296) / (0.213, 0.156, 0.143), times 255.
"""
from .coco import dataloader, dataset, lr_multiplier, model, optimizer, train

# --- the backbone: DINOv3 ViT-B/16 (arch "base", as configs/coco.py); another ViT sets arch too:
# "small" | "small_plus" | "base" | "large" | "huge_plus" | "7b"
model.detector.backbone.update(family="dinov3", pretrained="facebook/dinov3-vitb16-pretrain-lvd1689m")
model.size_divisibility = 16  # DINOv3's patch: strides 8 / 16 / 32 / 64 px
train.output_dir = "./output/coco_dinov3"
