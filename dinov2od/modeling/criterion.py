"""Set-prediction loss: sigmoid focal classification, L1 and GIoU box losses.

``criterion(outputs, targets)`` returns the *unweighted* losses; ``criterion.weight_dict``
maps every key it returns to its weight (the caller multiplies and sums). Keys:
``loss_class``, ``loss_bbox``, ``loss_giou`` for the last decoder layer, the same with
``_{i}`` for auxiliary layer i, and with ``_enc`` for the two-stage proposals.

Every loss is a sum over the batch divided by ``num_boxes``, the number of target boxes
(times the Group-DETR groups) averaged over processes when ``torch.distributed`` is
initialized, clamped to >= 1.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from dinov2od.layers import box_cxcywh_to_xyxy, generalized_box_iou

from .matcher import HungarianMatcher

logger = logging.getLogger("dinov2od")

__all__ = ["SetCriterion"]

BASE_LOSSES = ("loss_class", "loss_bbox", "loss_giou")


class SetCriterion(nn.Module):
    """Hungarian set loss for sigmoid-logit DETRs.

    Args:
        num_classes: K, the width of ``pred_logits``.
        matcher: a :class:`HungarianMatcher` (default one if None).
        weight_dict: weights of ``loss_class``/``loss_bbox``/``loss_giou`` (defaults 2, 5, 2);
            keys with an ``_{i}``/``_enc`` suffix set those outputs' weights, the others get
            the base weights.
        focal_alpha, focal_gamma: focal loss parameters.
        num_aux_layers: auxiliary decoder layers whose keys ``weight_dict`` lists up front
            (decoder layers - 1); more found at run time are added with the base weights.
        two_stage: list the ``_enc`` keys in ``weight_dict``.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        weight_dict: Optional[Dict[str, float]] = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_aux_layers: int = 5,
        two_stage: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.base_weights = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        user = dict(weight_dict or {})
        self.base_weights.update({k: float(v) for k, v in user.items() if k in BASE_LOSSES})
        suffixes = [""] + [f"_{i}" for i in range(num_aux_layers)] + (["_enc"] if two_stage else [])
        self.weight_dict = {k + s: self.base_weights[k] for s in suffixes for k in BASE_LOSSES}
        self.weight_dict.update({k: float(v) for k, v in user.items()})

    # ------------------------------------------------------------------ checks
    def _check_targets(self, targets: List[Dict[str, Tensor]], batch: int) -> None:
        if len(targets) != batch:
            raise ValueError(f"got {len(targets)} target dicts for a batch of {batch} images")
        for i, t in enumerate(targets):
            if "labels" not in t or "boxes" not in t:
                raise ValueError(f"targets[{i}] needs 'labels' and 'boxes', has {sorted(t)}")
            labels, boxes = t["labels"], t["boxes"]
            if boxes.shape != (len(labels), 4):
                raise ValueError(
                    f"targets[{i}]: boxes must be ({len(labels)}, 4) cxcywh, got {tuple(boxes.shape)}")
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if len(bad):
                raise ValueError(
                    f"targets[{i}] has class id {int(bad[0])} outside [0, num_classes={self.num_classes}); "
                    "set num_classes to the dataset's number of classes or remap the labels to 0..K-1")

    def _num_boxes(self, targets, groups: int, device) -> float:
        n = torch.tensor([float(sum(len(t["labels"]) for t in targets) * groups)], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(n)
            n = n / dist.get_world_size()
        return max(float(n.item()), 1.0)

    # ------------------------------------------------------------------ matching
    def _match(self, outputs: Dict[str, Tensor], targets, groups: int) -> List[Tuple[Tensor, Tensor]]:
        """Match each group of queries separately; indices are into the full query axis."""
        q = outputs["pred_logits"].shape[1]
        if q % groups:
            raise ValueError(f"{q} queries cannot be split into num_groups={groups} groups")
        per = q // groups
        chunks = []
        for g in range(groups):
            sl = slice(g * per, (g + 1) * per)
            out_g = {"pred_logits": outputs["pred_logits"][:, sl], "pred_boxes": outputs["pred_boxes"][:, sl]}
            chunks.append([(src + g * per, tgt) for src, tgt in self.matcher(out_g, targets)])
        return [(torch.cat([c[i][0] for c in chunks]), torch.cat([c[i][1] for c in chunks]))
                for i in range(len(targets))]

    # ------------------------------------------------------------------ losses
    def _losses(self, outputs: Dict[str, Tensor], targets, indices, num_boxes: float) -> Dict[str, Tensor]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        tgt_labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]).to(device)
        tgt_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)]).to(
            device, boxes.dtype)

        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, tgt_labels] = 1.0
        loss_class = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        matched = boxes[batch_idx, src_idx]  # (M, 4)
        loss_bbox = F.l1_loss(matched, tgt_boxes, reduction="sum")
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(matched), box_cxcywh_to_xyxy(tgt_boxes)))
        loss_giou = (1 - giou).sum()
        return {"loss_class": loss_class / num_boxes, "loss_bbox": loss_bbox / num_boxes,
                "loss_giou": loss_giou / num_boxes}

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: the detector's dict (``pred_logits``, ``pred_boxes``, optional
                ``aux_outputs``, ``enc_outputs``, ``num_groups``).
            targets: B dicts with ``labels`` (n,) int64 in [0, K) and ``boxes`` (n, 4)
                normalized cxcywh relative to the unpadded image.

        Returns:
            unweighted losses (see the module docstring).
        """
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} classes but the criterion was built with "
                f"num_classes={self.num_classes}")
        self._check_targets(targets, logits.shape[0])
        groups = int(outputs.get("num_groups", 1))
        num_boxes = self._num_boxes(targets, groups, logits.device)

        losses = self._losses(outputs, targets, self._match(outputs, targets, groups), num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._losses(aux, targets, self._match(aux, targets, groups), num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        if "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            n_enc = self._num_boxes(targets, 1, logits.device)
            enc_losses = self._losses(enc, targets, self._match(enc, targets, 1), n_enc)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        for k in losses:
            if k not in self.weight_dict:
                self.weight_dict[k] = self.base_weights[k.split("_", 2)[0] + "_" + k.split("_", 2)[1]]
        return losses
