"""The demo (configs/shapes.py) with the efficient preset (dinov2od.modeling.PRESETS["efficient"]),
for the speed/accuracy table in miniature (docs/speed.md, "Speed and accuracy in miniature"):

    python tools/train_net.py --config-file configs/shapes_efficient.py

* windowed attention in the blocks that are not tapped, with 8 x 8 patches (four windows at the
  demo's 224 px) instead of the preset's 16 x 16 (for 448 px);
* two pyramid levels (strides 14 and 28 px) instead of three: no stride-7 level;
* three decoder layers, as the demo already has.

Same data, schedule and evaluation as the demo.
"""
from dinov2od.d2.config import apply_preset

from .shapes import dataloader, dataset, lr_multiplier, model, optimizer, train

apply_preset(model, "efficient")
model.detector.backbone.window_size = 8
train.output_dir = "./output/shapes_efficient"
