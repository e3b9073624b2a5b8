"""Train on your own data (COCO, YOLO or Pascal VOC) offline, on the CPU, with the project's own tiny backbone:

    python tools/train_net.py --config-file configs/custom_tiny.py dataset.root=/path/to/my_dataset

Needs nothing from outside this repository (no model hub): configs/custom.py, the default for
your data, trains Meta's DINOv2 ViT-S/14 instead, which it downloads once (or reads from a folder).

``dataset.*`` (configs/common/data.py) reads the folder as COCO (Roboflow / RF-DETR export or
COCO's layout), YOLO or Pascal VOC; docs/your_data.md has the layouts, the start-up check, the
classes and ids, and how ``train.epochs`` becomes iterations.

The model is the demo's (configs/shapes.py): the project's own pretrained tiny DINOv2-architecture
ViT (``weights/dinov2od_tiny_glyphs.pth``, pretrained on generated glyphs by this project, NOT
Meta's weights), frozen with LoRA, and a small deformable decoder, at 192-256 px: a starting point
that trains in minutes on a CPU. For photographs use configs/custom.py (Meta's DINOv2 ViT-S/14) or
configs/coco.py (ViT-B/14, GPUs), which take the same ``dataset.*`` keys.
"""
from .shapes import dataloader, dataset, lr_multiplier, model, optimizer, train

# dataset (configs/common/data.py): root=None (the folder, see above), name="custom" (registered as
# custom_train, custom_val), train_json / train_images / val_json / val_images, check=True

model.num_classes = None  # from the data
dataloader.train.dataset.names = None  # custom_train, once dataset.root is read
dataloader.test.dataset.names = None
train.epochs = 50
train.output_dir = "./output/custom_tiny"
train.checkpointer.period = 500
train.visualize.num_images = 4
