"""AdamW over the trainable parameters (the frozen ViT's own weights are excluded).

Parameter groups are Detectron2's ``get_default_optimizer_params`` (the same as the yacs route's).
``optimizer.params.lr_factor_func.decay=0.8``: layer-wise LR decay of a fine-tuned ViT backbone
(``dinov2od.modeling.backbone_lr_decay``; 1.0 = off; LoRA adapters keep factor 1).
"""
import torch

from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from dinov2od.modeling import backbone_lr_decay

AdamW = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(
        model=None,  # set to the model object by the trainer
        base_lr="${..lr}",
        weight_decay_norm=0.0,
        bias_lr_factor=1.0,
        weight_decay_bias=None,  # None: weight_decay
        # name -> LR factor; the ViT's depth is read from the model (params.model)
        lr_factor_func=L(backbone_lr_decay)(decay=1.0, model="${..model}"),
    ),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=1e-4,
)
