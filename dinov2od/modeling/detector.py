"""``DINOv2ObjectDetector``: backbone -> neck -> deformable decoder, in plain PyTorch."""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .backbone import DINOv2Backbone, pad_to_multiple, valid_sizes_from_mask
from .decoder import DeformableDecoder
from .neck import ConvSpatialPrior, SimpleFeaturePyramid

logger = logging.getLogger("dinov2od")

__all__ = ["DINOv2ObjectDetector"]


class DINOv2ObjectDetector(nn.Module):
    """DETR-style detector on a (LoRA-adapted) DINOv2 ViT.

    Every argument is a plain value or a module, so lazy configs can build it.

    Args:
        num_classes: number of object classes K.
        backbone: a :class:`DINOv2Backbone`, or a dict of its keyword arguments, or None for
            ``DINOv2Backbone()`` (ViT-S/14 architecture, random init, LoRA on query/value).
        neck: a :class:`SimpleFeaturePyramid` (None: built from ``hidden_dim``/``scale_factors``).
        decoder: a :class:`DeformableDecoder` (None: built from the arguments below).
        hidden_dim: decoder width C.
        scale_factors: pyramid levels relative to the 14-px patch grid; the default gives strides
            7/14/28/56 px; ``(1.0,)`` is single-level.
        num_queries, num_decoder_layers, num_heads, num_points, dim_feedforward, dropout,
        cross_attn, box_refine, two_stage, group_detr, num_encoder_layers, two_stage_nms: see
            :class:`DeformableDecoder`.
        spatial_prior: width of a :class:`ConvSpatialPrior` (a small conv stem on the image whose
            features are added to every pyramid level); 0 (default) = none.
    """

    def __init__(
        self,
        num_classes: int = 80,
        backbone: Union[nn.Module, dict, None] = None,
        neck: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None,
        hidden_dim: int = 256,
        scale_factors: Sequence[float] = (2.0, 1.0, 0.5, 0.25),
        num_queries: int = 300,
        num_decoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        cross_attn: str = "deformable",
        box_refine: bool = True,
        two_stage: bool = False,
        group_detr: int = 1,
        num_encoder_layers: int = 0,
        two_stage_nms: float = 0.0,
        spatial_prior: int = 0,
    ):
        super().__init__()
        if backbone is None or isinstance(backbone, dict):
            backbone = DINOv2Backbone(**(backbone or {}))
        self.backbone = backbone
        if neck is None:
            neck = SimpleFeaturePyramid(backbone.embed_dim, backbone.num_taps, hidden_dim, scale_factors,
                                        backbone.patch_size)
        self.neck = neck
        self.spatial_prior = None
        if spatial_prior:
            self.spatial_prior = ConvSpatialPrior(neck.out_channels, neck.scale_factors, backbone.patch_size,
                                                  spatial_prior)
        if decoder is None:
            decoder = DeformableDecoder(
                num_classes, hidden_dim, neck.num_levels, num_queries, num_decoder_layers, num_heads,
                num_points, dim_feedforward, dropout, cross_attn, box_refine, two_stage, group_detr,
                num_encoder_layers, two_stage_nms=two_stage_nms)
        self.decoder = decoder
        if decoder.num_levels != neck.num_levels or decoder.hidden_dim != neck.out_channels:
            raise ValueError(
                f"neck gives {neck.num_levels} levels of width {neck.out_channels}, decoder expects "
                f"{decoder.num_levels} levels of width {decoder.hidden_dim}")
        self.num_classes = decoder.num_classes
        self.num_queries = decoder.num_queries
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("DINOv2ObjectDetector: %s parameters, %s trainable", f"{total:,}", f"{trainable:,}")

    @property
    def num_aux_outputs(self) -> int:
        """Number of entries of ``aux_outputs`` (decoder layers - 1)."""
        return self.decoder.num_layers - 1

    def _check_inputs(self, images: Tensor, masks: Optional[Tensor]) -> None:
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                "images must be a float (B, 3, H, W) tensor of ImageNet-normalized RGB, got "
                f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
        if masks is not None and (masks.dtype != torch.bool or masks.shape != (images.shape[0], *images.shape[2:])):
            raise ValueError(
                f"masks must be a bool (B, H, W) = {(images.shape[0], *images.shape[2:])} tensor (True at "
                f"padded pixels), got {masks.dtype} {tuple(masks.shape)}")

    def valid_ratios(self, maps, valid_hw: Tensor) -> Tensor:
        """(B, L, 2) ``(x, y)``: image size over the pixel extent of each padded level."""
        ratios = []
        for m, stride in zip(maps, self.neck.strides):
            h_l, w_l = m.shape[-2:]
            ratios.append(torch.stack([valid_hw[:, 1] / (stride * w_l), valid_hw[:, 0] / (stride * h_l)], -1))
        return torch.stack(ratios, 1).to(maps[0].dtype)

    def forward(self, images: Tensor, masks: Optional[Tensor] = None) -> Dict:
        """
        Args:
            images: (B, 3, H, W) float, ImageNet-normalized RGB, any H, W.
            masks: (B, H, W) bool, True at padded pixels (bottom/right); None = no padding.

        Returns:
            ``pred_logits`` (B, Q, K) sigmoid logits, ``pred_boxes`` (B, Q, 4) normalized
            ``(cx, cy, w, h)`` relative to each image's unpadded size, ``aux_outputs`` (list of
            the same per earlier decoder layer), ``enc_outputs`` if two-stage, ``num_groups`` when
            training with Group-DETR (then Q = groups * num_queries).
        """
        self._check_inputs(images, masks)
        images, masks = pad_to_multiple(images, masks, self.backbone.patch_size)
        valid_hw = valid_sizes_from_mask(masks).to(images.dtype)
        features, patch_mask = self.backbone(images, masks)
        prior = self.spatial_prior(images, masks) if self.spatial_prior is not None else None
        maps, level_masks = self.neck(features, patch_mask, prior)
        return self.decoder(maps, level_masks, self.valid_ratios(maps, valid_hw))
