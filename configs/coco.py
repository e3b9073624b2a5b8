"""COCO 2017 recipe: DINOv2 ViT-B/14 (frozen) + LoRA, deformable DETR decoder, 50 epochs.

    python tools/train_net.py --config-file configs/coco.py --num-gpus 8
    torchrun --nproc_per_node=8 tools/train_net.py --config-file configs/coco.py   # or srun, docs/distributed.md
    python tools/train_net.py --config-file configs/coco.py --eval-only train.init_checkpoint=output/coco/model_final.pth

Data: Detectron2's built-in ``coco_2017_train`` / ``coco_2017_val`` under
``$DETECTRON2_DATASETS`` (default ``./datasets``: ``coco/train2017``, ``coco/val2017``,
``coco/annotations/instances_{train,val}2017.json``).
"""
from .common.data import dataloader, dataset
from .common.models.dinov2_detr import model
from .common.optim import AdamW as optimizer
from .common.schedule import step_schedule
from .common.train import train

# --- the model: configs/common/models/dinov2_detr.py as it is (ViT-B/14 facebook/dinov2-base, frozen,
# LoRA on query/value; 80 classes; the defaults of dinov2od.modeling). Another ViT:
# model.detector.backbone.update(arch="large", pretrained="facebook/dinov2-large") ("small" | "base" |
# "large" | "giant"; registers=True with "facebook/dinov2-with-registers-<arch>")

# --- data: 8 images per GPU, 64 per optimizer step on any GPU count --------------------------------
# 8 GPUs: 8 x 8 x 1 accumulation; 4 GPUs: 8 x 4 x 2; 1 GPU: 8 x 1 x 8 (dinov2od.d2.config.resolve_batch
# sets dataloader.train.total_batch_size and train.accumulate_steps at start-up and logs the arithmetic)
dataloader.train.dataset.names = "coco_2017_train"
dataloader.test.dataset.names = "coco_2017_val"
train.images_per_gpu = 8
train.effective_batch = 64
BATCH = train.effective_batch

# --- schedule: 50 epochs (118287 images // 64 = 1848 it/epoch), LR x0.1 after epoch 40 -------------
ITERS_PER_EPOCH = 118287 // BATCH  # 1848
train.max_iter = 50 * ITERS_PER_EPOCH  # 92400
# the drop at 40 / 50 of training: iteration 40 x 1848 = 73920, as STEPS in configs/yaml/coco.yaml
lr_multiplier = step_schedule(drop_at=40 / 50, warmup=1000 / train.max_iter)
optimizer.lr = 1e-4
optimizer.weight_decay = 1e-4
train.clip_grad.max_norm = 0.1
train.amp.enabled = True
train.amp.precision = "bfloat16"
train.ema.enabled = True
train.eval_period = 5 * ITERS_PER_EPOCH
train.checkpointer.period = ITERS_PER_EPOCH
train.output_dir = "./output/coco"
train.device = "cuda"
