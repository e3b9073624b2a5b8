"""The built-in demo: a tiny random-init DINOv2 ViT trained on the "shapes" dataset on the CPU.

    python tools/train_net.py --config-file configs/shapes.py

Generates the dataset on first use (``$DINOV2OD_DATASETS`` or ``./datasets``), trains,
evaluates with COCOEvaluator, and draws predictions into ``output/shapes/predictions``.
"""
from .common.data import dataloader
from .common.models.dinov2_detr import model
from .common.optim import AdamW as optimizer
from .common.schedule import step_schedule
from .common.train import train

# --- model: a tiny ViT trained end to end (no pretrained weights exist for it) ---------------
model.num_classes = 3  # circle, square, triangle
bb = model.detector.backbone
bb.arch = "tiny"
bb.pretrained = None
# width mattered more than depth or patch size in 400-iteration trials (README, "What `make demo` does")
bb.arch_overrides = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6, intermediate_size=384)
bb.num_taps = 2
bb.lora_rank = 0  # LoRA adapts pretrained weights; a random-init ViT is trained in full
bb.freeze = False
det = model.detector
det.hidden_dim = 128
det.scale_factors = (2.0, 1.0, 0.5)  # strides 7, 14, 28 px
det.num_queries = 50
det.num_decoder_layers = 3
det.num_heads = 4
det.dim_feedforward = 256
model.criterion.class_loss = "quality_focal"  # IoU-aware scores: rank boxes by localization quality
del bb, det  # aliases only; keep them out of the saved config

# --- data: shapes, small images ----------------------------------------------------------------
dataloader.train.dataset.names = "shapes_train"
dataloader.test.dataset.names = "shapes_val"
dataloader.train.mapper.augmentations.update(
    min_size_train=(192, 208, 224, 240, 256),
    max_size_train=400,
    crop_resize=(),  # no random crop: small objects are part of the task
)
dataloader.test.mapper.augmentations.update(min_size_test=224, max_size_test=400)
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.train.aspect_ratio_grouping = False
dataloader.test.num_workers = 1
dataloader.test.batch_size = 8

# --- optimization: ~13.5 min on 2 idle CPU cores (more when the cores are shared) -----------------
optimizer.lr = 1e-3
optimizer.weight_decay = 1e-4
train.max_iter = 1200
lr_multiplier = step_schedule(drop_at=0.8, warmup=0.05)
train.clip_grad.max_norm = 0.5
train.ema.update(enabled=True, decay=0.99)
train.device = "cpu"
train.output_dir = "./output/shapes"
train.eval_period = 0  # evaluate once, after training
train.log_period = 20
train.checkpointer.period = 500
train.visualize.num_images = 8
train.visualize.score_threshold = 0.2  # scores estimate IoU; a briefly trained model's are low
