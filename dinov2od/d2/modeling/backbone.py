"""DINOv2 (+ LoRA) with its feature pyramid as a Detectron2 ``Backbone``.

``DINOv2DETR`` builds its own backbone inside ``DINOv2ObjectDetector``; this wrapper lets other
Detectron2 meta-architectures (RetinaNet, Mask R-CNN, ...) use the same DINOv2 pyramid::

    cfg.MODEL.BACKBONE.NAME = "build_dinov2_backbone"   # after add_dinov2od_config(cfg)
    backbone = build_backbone(cfg)  # features "p0".."p{L-1}", strides 14 / scale_factor
"""
from __future__ import annotations

from typing import Dict

from torch import Tensor

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..config import build_backbone_from_cfg, model_arguments

__all__ = ["DINOv2FeaturePyramid", "build_dinov2_backbone"]


class DINOv2FeaturePyramid(Backbone):
    """DINOv2 ViT taps -> ``SimpleFeaturePyramid``, as a Detectron2 backbone.

    Args:
        vit: a ``DINOv2Backbone``.
        neck: a ``SimpleFeaturePyramid`` built for ``vit``'s width and taps.
    """

    def __init__(self, vit, neck):
        super().__init__()
        self.vit = vit
        self.neck = neck
        self._out_features = [f"p{i}" for i in range(neck.num_levels)]
        self._strides = {f: float(s) for f, s in zip(self._out_features, neck.strides)}

    @property
    def size_divisibility(self) -> int:
        return self.vit.patch_size

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x: (B, 3, H, W) ImageNet-normalized RGB, H and W multiples of 14 (Detectron2 pads to
                ``size_divisibility``).

        Returns:
            dict ``p{i}`` -> (B, C, H_i, W_i).
        """
        features, patch_mask = self.vit(x, None)
        maps, _ = self.neck(features, patch_mask)
        return dict(zip(self._out_features, maps))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        # strides of the 0.5x / 0.25x levels are 28 / 56; of the 2x level 7 (integers for 14-px patches)
        return {
            f: ShapeSpec(channels=self.neck.out_channels, stride=int(round(self._strides[f])))
            for f in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_dinov2_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """Detectron2 backbone builder reading ``cfg.MODEL.DINOV2OD`` (see ``add_dinov2od_config``)."""
    from dinov2od.modeling import SimpleFeaturePyramid

    if input_shape.channels != 3:
        raise ValueError(f"DINOv2 takes 3-channel RGB input, got {input_shape.channels} channels.")
    vit = build_backbone_from_cfg(cfg)
    d = model_arguments(cfg)["detector"]  # MODEL.DINOV2OD.PRESET applied
    neck = SimpleFeaturePyramid(vit.embed_dim, vit.num_taps, d["hidden_dim"], tuple(d["scale_factors"]), vit.patch_size)
    return DINOv2FeaturePyramid(vit, neck)
