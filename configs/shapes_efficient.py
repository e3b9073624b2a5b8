"""The demo (configs/shapes.py) with the efficient preset's changes, for the speed/accuracy table
in miniature (docs/speed.md, "Speed and accuracy in miniature"):

    python tools/train_net.py --config-file configs/shapes_efficient.py

* windowed attention (8 x 8 patches: four windows at the demo's 224 px) in the blocks that are not
  tapped, as ``model.detector.backbone.window_size = 16`` does at 448 px in the efficient preset;
* two pyramid levels (strides 14 and 28 px) instead of three: no stride-7 level.

The demo already has three decoder layers (the efficient preset's third change). Same data,
schedule and evaluation as the demo.
"""
from .shapes import dataloader, dataset, lr_multiplier, model, optimizer, train

model.detector.backbone.window_size = 8
model.detector.scale_factors = (1.0, 0.5)
train.output_dir = "./output/shapes_efficient"
