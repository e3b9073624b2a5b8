"""Debug / overfit mode: a small subset, a higher LR and many epochs, to check convergence.

    python tools/train_net.py --config-file configs/debug_overfit.py

Trains and evaluates on the same first 64 images of ``shapes_train`` (CPU); the training loss
should fall steadily and the AP on those images should climb well above the demo's. Point it
at another dataset with ``dataloader.train.dataset.names=... dataloader.test.dataset.names=...
model.num_classes=N``.
"""
from detectron2.config import LazyCall as L

from dinov2od.d2.datasets import subset_dataset_dicts
from dinov2od.d2.evaluation import SubsetCOCOEvaluator

from .shapes import dataloader, lr_multiplier, model, optimizer, train  # noqa: F401

dataloader.train.dataset = L(subset_dataset_dicts)(names="shapes_train", num_images=64, filter_empty=True)
dataloader.test.dataset = L(subset_dataset_dicts)(
    names="${...train.dataset.names}", num_images="${...train.dataset.num_images}", filter_empty=False
)
dataloader.evaluator = L(SubsetCOCOEvaluator)(dataset_name="${..test.dataset.names}", output_dir=None)
optimizer.lr = 5e-4
train.max_iter = 1500  # ~190 epochs of 64 images at batch 8
train.output_dir = "./output/debug_overfit"
