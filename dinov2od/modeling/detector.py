"""``DINOv2ObjectDetector``: backbone -> neck -> deformable decoder, in plain PyTorch."""
from __future__ import annotations

import json
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from dinov2od.layers import IMAGENET_MEAN, IMAGENET_STD, box_cxcywh_to_xyxy
from dinov2od.layers.precision import autocast_context

from .backbones import build_backbone, pad_to_multiple, valid_sizes_from_mask
from .checkpoint_io import exported_info, load_state, plain_state
from .classes import CLASS_METADATA_BYTES, decode_class_metadata, encode_class_metadata
from .decoder import DecoderOptions, DeformableDecoder
from .neck import ConvSpatialPrior, SimpleFeaturePyramid

logger = logging.getLogger("dinov2od")

__all__ = ["DINOv2ObjectDetector", "topk_detections"]

ImagesLike = Union[Tensor, Sequence[Tensor]]


def topk_detections(logits: Tensor, boxes: Tensor, image_sizes: Tensor, k: int = 100) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-k (query, class) pairs of each image, boxes in pixels.

    Args:
        logits: (B, Q, K) sigmoid logits; boxes: (B, Q, 4) normalized ``(cx, cy, w, h)``.
        image_sizes: (B, 2) ``(height, width)`` the boxes are scaled to.
        k: detections per image (at most Q * K).

    Returns:
        boxes (B, k, 4) absolute ``(x0, y0, x1, y1)`` clipped to the image, scores (B, k), labels
        (B, k) int64.
    """
    b, q, c = logits.shape
    k = min(k, q * c)
    scores, idx = logits.float().sigmoid().flatten(1).topk(k, dim=1)  # (B, k)
    query, labels = idx // c, idx % c
    xyxy = box_cxcywh_to_xyxy(boxes.float()).gather(1, query[..., None].expand(-1, -1, 4))  # (B, k, 4)
    hw = image_sizes.to(xyxy)
    scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None]  # (B, 1, 4)
    xyxy = torch.minimum((xyxy * scale).clamp(min=0), scale)  # inside the image,
    return xyxy, scores, labels  # as Detectron2's detector_postprocess and torchvision's detectors clip


def _json_arguments(args: Optional[dict]) -> Optional[dict]:
    """``args`` as plain JSON values (tuples as lists), or None if any of them is not plain data."""
    if args is None or args.get("backbone") is None:
        return None
    try:
        return json.loads(json.dumps(plain_state(args)))
    except (TypeError, ValueError):
        return None


class DINOv2ObjectDetector(nn.Module):
    """DETR-style detector on a (LoRA-adapted) DINOv2 ViT.

    Every argument is a plain value or a module, so lazy configs can build it.

    Args:
        num_classes: number of object classes K.
        backbone: a backbone (:class:`~dinov2od.modeling.backbones.ViTBackbone`: ``DINOv2Backbone``
            or ``DINOv3Backbone``), or a dict of :func:`~dinov2od.modeling.backbones.build_backbone`
            keyword arguments (``family="dinov2"`` by default, ``"dinov3"`` for DINOv3), or None for
            the DINOv2 ViT-S/14 architecture (random init, LoRA on query/value).
        neck: a :class:`SimpleFeaturePyramid` (None: built from ``hidden_dim``/``scale_factors``).
        decoder: a :class:`DeformableDecoder` (None: built from the arguments below).
        hidden_dim: decoder width C.
        scale_factors: pyramid levels relative to the patch grid; the default gives strides
            7/14/28/56 px with DINOv2's 14-px patches (8/16/32/64 with DINOv3's 16-px ones);
            ``(1.0,)`` is single-level.
        num_decoder_layers: decoder layers (:class:`DecoderOptions`' ``num_layers``).
        spatial_prior: width of a :class:`ConvSpatialPrior` (a small conv stem on the image whose
            features are added to every pyramid level); 0 (default) = none.
        pixel_mean, pixel_std: RGB statistics in [0, 1] that :meth:`forward` normalizes its input
            with (ImageNet's, as DINOv2 was trained; torchvision's detection convention).
        **decoder_options: the other fields of :class:`DecoderOptions` (``num_queries``,
            ``num_heads``, ``num_points``, ``dim_feedforward``, ``dropout``, ``cross_attn``,
            ``box_refine``, ``two_stage``, ``group_detr``, ``num_encoder_layers``, ``prior_prob``,
            ``two_stage_nms``, ``dn_groups``, ``dn_queries``, ``dn_label_noise``, ``dn_box_noise``,
            ``o2m_queries``), with its defaults (denoising and one-to-many queries exist only in
            training); ``num_levels`` comes from the neck.
    """

    def __init__(
        self,
        num_classes: int = 80,
        backbone: Union[nn.Module, dict, None] = None,
        neck: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None,
        hidden_dim: int = DecoderOptions.hidden_dim,
        scale_factors: Sequence[float] = (2.0, 1.0, 0.5, 0.25),
        *,
        num_decoder_layers: int = DecoderOptions.num_layers,
        spatial_prior: int = 0,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        **decoder_options,
    ):
        super().__init__()
        taken = {"num_levels": "the neck's levels (scale_factors)", "num_layers": "num_decoder_layers"}
        clash = sorted(taken.keys() & decoder_options.keys())
        if clash:
            raise TypeError(f"DINOv2ObjectDetector sets the decoder's {clash[0]} from {taken[clash[0]]}; "
                            f"do not pass {clash[0]}=")
        own_parts = neck is None and decoder is None  # else constructor_args cannot describe them
        options = DecoderOptions.from_kwargs("DINOv2ObjectDetector", hidden_dim=hidden_dim,
                                             num_layers=num_decoder_layers, **decoder_options)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)
        if backbone is None or isinstance(backbone, dict):
            backbone = build_backbone(**(backbone or {}))
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
            decoder = DeformableDecoder(num_classes, options, num_levels=neck.num_levels)
        self.decoder = decoder
        if decoder.num_levels != neck.num_levels or decoder.hidden_dim != neck.out_channels:
            raise ValueError(
                f"neck gives {neck.num_levels} levels of width {neck.out_channels}, decoder expects "
                f"{decoder.num_levels} levels of width {decoder.hidden_dim}")
        self.num_classes = decoder.num_classes
        self.num_queries = decoder.num_queries
        #: the keyword arguments that build this detector again, as plain JSON values (the backbone as
        #: :func:`build_backbone` arguments), or None when a neck, decoder or backbone was given as a
        #: module not built by :func:`build_backbone`. Written beside exported weights
        #: (:func:`~dinov2od.modeling.checkpoint_io.export_for_inference`).
        self.constructor_args = _json_arguments(
            None if not own_parts else dict(
                num_classes=self.num_classes, backbone=getattr(backbone, "build_kwargs", None),
                hidden_dim=hidden_dim, scale_factors=scale_factors, num_decoder_layers=num_decoder_layers,
                spatial_prior=spatial_prior, pixel_mean=pixel_mean, pixel_std=pixel_std, **decoder_options))
        # class names and the dataset's category ids, saved with the weights (dinov2od.modeling.classes)
        self.register_buffer("class_metadata", torch.zeros(CLASS_METADATA_BYTES, dtype=torch.uint8))
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("DINOv2ObjectDetector: %s parameters, %s trainable", f"{total:,}", f"{trainable:,}")

    @property
    def num_aux_outputs(self) -> int:
        """Number of entries of ``aux_outputs`` (decoder layers - 1)."""
        return self.decoder.num_layers - 1

    def _batch(self, images: ImagesLike, masks: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Accept (B, 3, H, W), one (3, H, W) image, or a list of (3, H_i, W_i) images (padded here)."""
        if isinstance(images, (list, tuple)):
            if masks is not None:
                raise ValueError("masks are built from the image sizes when images is a list; pass masks=None")
            if not images or any(not torch.is_tensor(im) or im.dim() != 3 for im in images):
                raise ValueError("images given as a list must be a non-empty list of (3, H, W) tensors")
            h = max(im.shape[1] for im in images)
            w = max(im.shape[2] for im in images)
            batch = images[0].new_zeros(len(images), images[0].shape[0], h, w)
            masks = torch.ones(len(images), h, w, dtype=torch.bool, device=batch.device)
            for i, im in enumerate(images):
                batch[i, :, : im.shape[1], : im.shape[2]] = im
                masks[i, : im.shape[1], : im.shape[2]] = False
            images = batch
        elif torch.is_tensor(images) and images.dim() == 3:
            images = images[None]
            masks = masks[None] if masks is not None and masks.dim() == 2 else masks
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                "images must be float RGB: a (B, 3, H, W) tensor, one (3, H, W) image or a list of them, "
                f"got {type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
        if masks is not None and (masks.dtype != torch.bool or masks.shape != (images.shape[0], *images.shape[2:])):
            raise ValueError(
                f"masks must be a bool (B, H, W) = {(images.shape[0], *images.shape[2:])} tensor (True at "
                f"padded pixels), got {masks.dtype} {tuple(masks.shape)}")
        return images, masks

    def normalize(self, images: Tensor) -> Tensor:
        """RGB in [0, 1] -> normalized with ``pixel_mean``/``pixel_std``.

        Raises:
            ValueError: values far outside [0, 1] (0-255 pixels, or input normalized already).
        """
        tracing = torch.jit.is_tracing() or torch.jit.is_scripting()
        if not tracing and images.numel():
            lo, hi = images.detach().aminmax()
            if lo < -0.5 or hi > 1.5:
                raise ValueError(
                    f"images must be RGB in [0, 1] (as torchvision's ToTensor() gives), got values in "
                    f"[{lo.item():.3g}, {hi.item():.3g}]. Divide 0-255 pixels by 255, or pass "
                    "normalized=True if the images are ImageNet-normalized already.")
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def valid_ratios(self, maps, valid_hw: Tensor) -> Tensor:
        """(B, L, 2) ``(x, y)``: image size over the pixel extent of each padded level."""
        ratios = []
        for m, stride in zip(maps, self.neck.strides):
            h_l, w_l = m.shape[-2:]
            ratios.append(torch.stack([valid_hw[:, 1] / (stride * w_l), valid_hw[:, 0] / (stride * h_l)], -1))
        return torch.stack(ratios, 1).to(maps[0].dtype)

    def forward(self, images: ImagesLike, masks: Optional[Tensor] = None, *, normalized: bool = False,
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Dict:
        """
        Args:
            images: RGB in [0, 1], any H, W: a (B, 3, H, W) float tensor, one (3, H, W) image, or a
                list of (3, H_i, W_i) images (padded to a batch here).
            masks: (B, H, W) bool, True at padded pixels (bottom/right); None = no padding.
            normalized: the images are normalized already (``(x - pixel_mean) / pixel_std``, as
                Detectron2's meta-architecture does); skip normalizing them here.
            targets: the criterion's targets (B dicts of ``labels`` (n_i,), ``boxes`` (n_i, 4)
                cxcywh of the unpadded image); needed in training with denoising queries.

        Returns:
            ``pred_logits`` (B, Q, K) sigmoid logits, ``pred_boxes`` (B, Q, 4) normalized
            ``(cx, cy, w, h)`` relative to each image's unpadded size, ``aux_outputs`` (list of
            the same per earlier decoder layer), ``enc_outputs`` if two-stage, ``num_groups`` when
            training with Group-DETR (then Q = groups * num_queries); in training also
            ``dn_outputs``/``o2m_outputs`` when those queries are on (see :class:`DeformableDecoder`).
        """
        images, masks = self._batch(images, masks)
        if not normalized:
            images = self.normalize(images)
        images, masks, valid_hw = self.pad(images, masks)
        return self.forward_padded(images, masks, valid_hw, targets=targets)

    def pad(self, images: Tensor, masks: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Pad a batch once, to a multiple of the patch size (the backbone, neck and decoder then
        carry the mask and never pad the images again).

        Args:
            images: (B, 3, H, W); masks: (B, H, W) bool, True at padded pixels, or None.

        Returns:
            images (B, 3, H', W') zero at padded pixels; masks (B, H', W') and valid_hw (B, 2) int64
            ``(height, width)`` of each image, or (None, None) when nothing is padded (an all-False
            mask counts as none): then no masking work is done anywhere.
        """
        p = self.backbone.patch_size
        tracing = torch.jit.is_tracing()
        if masks is not None and not tracing and not masks.any():
            masks = None
        if masks is None and not tracing and images.shape[-2] % p == 0 and images.shape[-1] % p == 0:
            return images, None, None
        images, masks = pad_to_multiple(images, masks, p)
        return images, masks, valid_sizes_from_mask(masks)

    def forward_padded(self, images: Tensor, masks: Optional[Tensor] = None, valid_hw: Optional[Tensor] = None,
                       targets: Optional[List[Dict[str, Tensor]]] = None) -> Dict:
        """:meth:`forward` on a batch that :meth:`pad` padded (normalized already).

        Args:
            images: (B, 3, H, W), H and W multiples of the patch size, zero at padded pixels.
            masks: (B, H, W) bool, True at padded pixels, or None (nothing padded).
            valid_hw: (B, 2) ``(height, width)`` of each image, or None (every image is H x W).
            targets: as in :meth:`forward`.
        """
        features, patch_mask = self.backbone.forward_padded(images, valid_hw)
        prior = self.spatial_prior(images, masks) if self.spatial_prior is not None else None
        maps, level_masks = self.neck(features, patch_mask, prior)
        if valid_hw is None:
            valid_hw = torch.tensor(images.shape[-2:], device=images.device).expand(images.shape[0], 2)
        return self.decoder(maps, level_masks, self.valid_ratios(maps, valid_hw.to(images.dtype)),
                            targets=targets)

    def set_classes(self, names: Sequence[str], ids: Optional[Sequence[int]] = None) -> None:
        """Store the class names (``names[i]`` for label ``i``) and the dataset's category ids
        (None: ``0..K-1``) in the model; they are saved with its weights."""
        self.class_metadata.copy_(encode_class_metadata(names, ids, self.num_classes))

    @property
    def class_names(self) -> Optional[List[str]]:
        """The stored class names (label ``i`` is ``class_names[i]``), or None if none were stored."""
        meta = decode_class_metadata(self.class_metadata)
        return None if meta is None else meta[0]

    @property
    def class_ids(self) -> Optional[List[int]]:
        """The dataset's category id of each label (e.g. COCO's 1..90), or None if none were stored."""
        meta = decode_class_metadata(self.class_metadata)
        return None if meta is None else meta[1]

    def load_checkpoint(self, path: str, strict: bool = True, trusted: bool = False) -> "DINOv2ObjectDetector":
        """Load weights saved by this project: a plain ``state_dict`` of this module, or a
        Detectron2 checkpoint of the meta-architecture (``{"model": ...}``, keys ``detector.*``,
        e.g. ``output/shapes/model_final_ema.pth``), as ``.pth`` or ``.safetensors``
        (``model_final_ema.safetensors``).

        The file is read without running code from it (:func:`~dinov2od.modeling.checkpoint_io.load_state`):
        a ``.pth`` that needs full unpickling is refused unless ``trusted`` or named in
        ``DINOV2OD_TRUSTED_CHECKPOINTS``.

        Raises:
            ValueError: the checkpoint does not fit this architecture (lists the first differing keys).
            UnsafeCheckpointError: (a ``ValueError``) the file needs full unpickling and is not trusted.
        """
        obj = load_state(path, trusted=trusted)
        sd = obj.get("model", obj) if isinstance(obj, dict) else obj
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds no state dict (found {type(sd).__name__})")
        if any(k.startswith("detector.") for k in sd):
            sd = {k[len("detector."):]: v for k, v in sd.items() if k.startswith("detector.")}
        sd = {k: torch.as_tensor(v) for k, v in sd.items()}  # Detectron2 may store numpy arrays
        fix = "Build the model with the config it was trained with."
        try:
            result = self.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # tensors of another shape
            raise ValueError(f"{path} does not fit this detector: {str(e).splitlines()[-1].strip()} {fix}") from e
        missing = [k for k in result.missing_keys if k != "class_metadata"]  # files saved before it existed
        if strict and (missing or result.unexpected_keys):
            raise ValueError(
                f"{path} does not fit this detector: missing {missing[:5]}, unexpected "
                f"{result.unexpected_keys[:5]}. {fix}")
        return self

    @classmethod
    def from_exported(cls, path: str) -> "DINOv2ObjectDetector":
        """Build the detector of an exported weights file and load it, in eval mode.

        ``path`` is a ``.safetensors`` file written at the end of training
        (``model_final_ema.safetensors``) or by ``tools/convert_checkpoint.py``; the detector's
        constructor arguments come from the JSON beside it (or the copy in the file's header),
        ``detector_kwargs``: plain values, so reading them runs no code, and nothing is downloaded
        (the file holds every weight).

        Raises:
            ValueError: the file carries no constructor arguments (e.g. converted without the model,
                or a detector built from custom modules): build it with its config and use
                :meth:`load_checkpoint`.
        """
        info, where = exported_info(path)
        kwargs = (info or {}).get("detector_kwargs")
        if not kwargs:
            raise ValueError(
                f"{path} carries no detector constructor arguments ({where or 'no JSON beside it'}"
                f"{': ' + info['detector_kwargs_note'] if info and info.get('detector_kwargs_note') else ''}). "
                "Build DINOv2ObjectDetector with the config it was trained with, then call load_checkpoint(path).")
        return cls(**kwargs).load_checkpoint(path).eval()

    @torch.no_grad()
    def predict(self, images: ImagesLike, topk: int = 100, threshold: float = 0.0,
                normalized: bool = False, precision: str = "float32") -> List[Dict[str, Tensor]]:
        """Detections per image, like torchvision's detection models at inference.

        Args:
            images: as in :meth:`forward` (RGB in [0, 1] unless ``normalized``).
            topk: detections kept per image (top-k over queries x classes).
            threshold: drop detections scoring below it.
            precision: ``"float32"``, or ``"bfloat16"`` / ``"float16"`` to run under autocast
                (bfloat16 on a CPU without native bf16 is refused, see
                :func:`dinov2od.layers.precision.check_cpu_autocast`).

        Returns:
            one dict per image: ``boxes`` (n, 4) ``(x0, y0, x1, y1)`` in pixels of the input image,
            ``scores`` (n,), ``labels`` (n,) int64 (contiguous ``0..K-1``) and, when the model
            holds its classes (:meth:`set_classes`; a trained checkpoint does), ``category_ids``
            (n,) int64, the dataset's own ids, and ``names``, a list of n class names.
        """
        self._warn_if_large(images)
        images, masks = self._batch(images, None)
        with autocast_context(images.device.type, precision):
            out = self(images, masks, normalized=normalized)
        if masks is None:
            sizes = torch.tensor([images.shape[-2:]] * images.shape[0], device=images.device)
        else:
            sizes = valid_sizes_from_mask(masks)
        boxes, scores, labels = topk_detections(out["pred_logits"], out["pred_boxes"], sizes, topk)
        keep = scores >= threshold
        results = [dict(boxes=b[k], scores=s[k], labels=lab[k]) for b, s, lab, k in zip(boxes, scores, labels, keep)]
        meta = decode_class_metadata(self.class_metadata)
        if meta is not None:
            names, ids = meta
            id_table = torch.tensor(ids, dtype=torch.int64, device=labels.device)
            for r in results:
                r["category_ids"] = id_table[r["labels"]]
                r["names"] = [names[i] for i in r["labels"].tolist()]
        return results

    #: :meth:`predict` warns above this many pixels on the longer side (Detectron2's test resize
    #: caps it at 1333); the ViT's cost grows with the square of the pixel count.
    LARGE_IMAGE_SIDE = 2048

    def _warn_if_large(self, images: ImagesLike) -> None:
        sides = [max(im.shape[-2:]) for im in (images if isinstance(images, (list, tuple)) else [images])]
        if sides and max(sides) > self.LARGE_IMAGE_SIDE:
            logger.warning(
                "predict() got an image of %d px on its longer side; the model runs at the size it is given "
                "(attention cost grows with the square of the pixel count: minutes on a CPU). Resize it first, "
                "e.g. to 1333 px on the longer side as Detectron2's DefaultPredictor does "
                "(torch.nn.functional.interpolate), and scale the boxes back.", max(sides))
