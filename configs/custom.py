"""Train on your own data (COCO, YOLO or Pascal VOC) with Meta's DINOv2 ViT-S/14, in one command:

    python tools/train_net.py --config-file configs/custom.py dataset.root=/path/to/my_dataset

``dataset.*`` (configs/common/data.py) reads the folder as COCO (Roboflow / RF-DETR export or
COCO's layout), YOLO or Pascal VOC; docs/your_data.md has the layouts, the start-up check, the
classes and ids, and how ``train.epochs`` becomes iterations.

The backbone is Meta's DINOv2 ViT-S/14 (``facebook/dinov2-small``), frozen, with LoRA on its
attention's query/value as in configs/coco.py; a 3-layer deformable decoder (256 wide, 300 queries,
with denoising and one-to-many queries in training) on a 3-level pyramid; images of 224-256 px
(short side). Sized so that one iteration of 8 images takes a few seconds on a 2-core CPU (5.6 s
measured; docs/your_data.md, "The model, and training offline"); ``train.device=cuda`` trains on a GPU.

The weights come from the Hugging Face hub the first time (then from its cache). Without the hub,
``tools/train_net.py`` stops before anything else and says what to do: point
``model.detector.backbone.pretrained`` at a folder written by transformers' ``save_pretrained``
(``huggingface-cli download facebook/dinov2-small --local-dir <folder>`` on a machine with
internet) or at Meta's ``dinov2_vits14_pretrain.pth``; or train configs/custom_tiny.py, which
needs nothing from outside (the project's own tiny backbone).
"""
from .common.data import dataloader, dataset
from .common.models.dinov2_detr import model
from .common.optim import AdamW as optimizer
from .common.schedule import step_schedule
from .common.train import train

# dataset (configs/common/data.py): root=None (the folder, see above), name="custom" (registered as
# custom_train, custom_val), train_json / train_images / val_json / val_images, check=True

# --- model: DINOv2 ViT-S/14, frozen, with LoRA; a small deformable decoder -----------------------
model.num_classes = None  # from the data
# (taps at blocks 3, 6, 9, 12, LoRA on query/value, 256 wide, 300 queries: the defaults, as COCO's)
model.detector.backbone.update(
    arch="small",
    pretrained="facebook/dinov2-small",  # hub id, a save_pretrained folder, or dinov2_vits14_pretrain.pth
)
det = model.detector
det.scale_factors = (2.0, 1.0, 0.5)  # strides 7, 14, 28 px
det.num_decoder_layers = 3
det.dn_groups = 5  # denoising queries (training only)
det.o2m_queries = 150  # one-to-many queries (training only)
model.criterion.class_loss = "quality_focal"  # a score estimates its box's IoU
del det  # an alias only; keep it out of the saved config

# --- data: short side 224-256 px (DETR's random crop on half of the batches) ---------------------
dataloader.train.dataset.names = None  # custom_train, once dataset.root is read
dataloader.test.dataset.names = None
dataloader.train.mapper.augmentations.update(
    min_size_train=(224, 240, 256),
    max_size_train=400,
    crop_resize=(160, 208, 256),  # COCO's 400-600 / 384-600 scaled as its sizes are
    crop_size=(144, 240),
)
dataloader.test.mapper.augmentations.update(min_size_test=256, max_size_test=400)
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.train.aspect_ratio_grouping = False
dataloader.test.num_workers = 1
dataloader.test.batch_size = 8

# --- optimization: AdamW at the COCO recipe's LR, 50 epochs, LR x0.1 after 80% ---------------------
optimizer.lr = 1e-4
optimizer.weight_decay = 1e-4
train.epochs = 50
train.max_iter = 400  # used only with train.epochs=None
lr_multiplier = step_schedule(drop_at=0.8, warmup=0.05)
train.clip_grad.max_norm = 0.1
train.ema.update(enabled=True, decay=0.999)
train.device = "cpu"  # train.device=cuda on a GPU
train.output_dir = "./output/custom"
train.eval_period = 0  # evaluate once, after training
train.log_period = 20
train.checkpointer.period = 500
train.visualize.num_images = 4
train.visualize.score_threshold = 0.3  # scores estimate IoU (quality focal loss)
