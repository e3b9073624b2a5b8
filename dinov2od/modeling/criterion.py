"""Set-prediction loss: sigmoid focal classification, L1 and GIoU box losses.

``criterion(outputs, targets)`` returns the *unweighted* losses; ``criterion.weight_dict``
maps every key it returns to its weight (the caller multiplies and sums). Keys:
``loss_class``, ``loss_bbox``, ``loss_giou`` for the last decoder layer, the same with
``_{i}`` for auxiliary layer i, and with ``_enc`` for the two-stage proposals.

Every loss is a sum over the batch divided by ``num_boxes``, the number of target boxes
(times the Group-DETR groups) averaged over processes when ``torch.distributed`` is
initialized, clamped to >= 1.

Options from later DETRs (off by default, which is the Deformable-DETR recipe; on the CPU demo
only the first one measurably helped, see docs/demo.md):

- ``class_loss="quality_focal"``: IoU-aware classification (GFL's quality focal loss): a
  matched query's target is the IoU of its box with its target box instead of 1, so the
  score ranks detections by localization quality, which is what AP measures.
- ``enc_loss="dense"``: the two-stage proposals are trained one-to-many over *every* pyramid
  token (``enc_dense``) with a task-aligned assignment (TOOD): for each target, the
  ``dense_topk`` tokens whose centres lie inside its box with the highest
  ``score^alpha * IoU^beta`` are positives (the nearest token if none lies inside; a token
  claimed by several targets keeps the one it overlaps most). Losses are divided by the
  number of positives. With ``"hungarian"`` only the selected top-k proposals are matched
  one-to-one.

Training-only query sets of the decoder (see :mod:`.train_queries`), each with the same three
losses on its last layer and, with ``_{i}``, on each auxiliary layer:

- ``dn_outputs`` (contrastive denoising): ``loss_class_dn``, ``loss_bbox_dn``, ``loss_giou_dn``.
  No matching: a positive query's target is the box it was noised from, a negative's is "no
  object" (class target 0, no box loss); padding slots are ignored. The losses are divided by
  ``num_boxes`` times the denoising groups and weighted like the main losses. With
  ``class_loss="quality_focal"`` a positive's class target is the IoU of its predicted box with
  its target box, as for a matched query: the class head is shared, and a target of 1 for
  denoising queries would teach it to score badly placed boxes high, against the IoU ranking the
  matching loss teaches it.
- ``o2m_outputs`` (H-DETR's one-to-many set): ``loss_class_o2m``, ``loss_bbox_o2m``,
  ``loss_giou_o2m``: the Hungarian loss against the targets repeated ``o2m_repeats`` times,
  divided by ``num_boxes * o2m_repeats`` and weighted ``o2m_weight`` times the main losses.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from dinov2od.layers import box_cxcywh_to_xyxy, generalized_box_iou

from .matcher import HungarianMatcher, MatcherOptions
from .train_queries import check_targets

logger = logging.getLogger("dinov2od")

__all__ = ["CriterionOptions", "SetCriterion"]

BASE_LOSSES = ("loss_class", "loss_bbox", "loss_giou")
# the loss keys a weight may be given for: a base loss, then the proposals' _enc, or an optional
# _dn/_o2m part and an optional auxiliary layer _{i}
_LOSS_KEY = re.compile(r"loss_(class|bbox|giou)(_enc|(_dn|_o2m)?(_[0-9]+)?)")


@dataclasses.dataclass(frozen=True)
class CriterionOptions:
    """The options of :class:`SetCriterion`, with their defaults: the one place they are written
    (the signature, the lazy config and the yacs keys read them; the focal parameters are the
    matcher's, :class:`~dinov2od.modeling.matcher.MatcherOptions`).

    Attributes:
        loss_class, loss_bbox, loss_giou: the base weights of the three losses (``weight_dict``).
        focal_alpha, focal_gamma, class_loss, enc_loss, dense_topk, dense_alpha, dense_beta,
        o2m_repeats, o2m_weight: as :class:`SetCriterion`'s arguments.
    """

    loss_class: float = 2.0
    loss_bbox: float = 5.0
    loss_giou: float = 2.0
    focal_alpha: float = MatcherOptions.focal_alpha
    focal_gamma: float = MatcherOptions.focal_gamma
    class_loss: str = "focal"
    enc_loss: str = "hungarian"
    dense_topk: int = 9
    dense_alpha: float = 1.0
    dense_beta: float = 6.0
    o2m_repeats: int = 6
    o2m_weight: float = 1.0

    @classmethod
    def base_weights(cls) -> Dict[str, float]:
        """The default ``weight_dict``: ``{"loss_class": ..., "loss_bbox": ..., "loss_giou": ...}`` above."""
        return {k: getattr(cls, k) for k in BASE_LOSSES}


def _check_weight_keys(weights: Dict[str, float]) -> None:
    """A ``weight_dict`` key no loss has would be ignored without a word (a misspelt ``loss_bbx``
    leaves the box loss at its default weight): refuse it, naming the nearest loss keys."""
    bad = [k for k in weights if not (isinstance(k, str) and _LOSS_KEY.fullmatch(k))]
    if bad:
        known = [k + s for k in BASE_LOSSES for s in ("", "_enc", "_dn", "_o2m", "_0")]
        hints = "; ".join(f"{k!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)"
                                      if (close := difflib.get_close_matches(str(k), known, n=2, cutoff=0.6)) else "")
                          for k in bad)
        raise ValueError(f"weight_dict: no loss has the key(s) {hints}. Keys are loss_class, loss_bbox or "
                         "loss_giou, optionally followed by _enc (two-stage proposals), _dn or _o2m, and _<i> "
                         "(auxiliary decoder layer i), e.g. loss_giou_enc, loss_bbox_dn_2.")


class SetCriterion(nn.Module):
    """Hungarian set loss for sigmoid-logit DETRs.

    Args:
        num_classes: K, the width of ``pred_logits``.
        matcher: a :class:`HungarianMatcher` (default one if None).
        weight_dict: weights of ``loss_class``/``loss_bbox``/``loss_giou`` (:meth:`CriterionOptions.base_weights`);
            keys with an ``_{i}``/``_enc`` suffix set those outputs' weights, the others get
            the base weights.
        focal_alpha, focal_gamma: focal loss parameters.
        num_aux_layers: auxiliary decoder layers whose keys ``weight_dict`` lists up front
            (decoder layers - 1); more found at run time are added with the base weights. None:
            not known yet; ``DINOv2DETR`` sets it from its detector (:meth:`list_weights`).
        two_stage: list the ``_enc`` keys in ``weight_dict``.
        class_loss: ``"focal"`` (target 1 for a matched query) or ``"quality_focal"`` (target =
            IoU with the matched box).
        enc_loss: ``"hungarian"`` (top-k proposals, one-to-one) or ``"dense"`` (every token,
            task-aligned one-to-many; needs ``enc_dense`` in the outputs).
        dense_topk, dense_alpha, dense_beta: the task-aligned assignment's positives per target
            and the exponents of score and IoU in its metric.
        o2m_repeats: K, how many times the targets are repeated for the one-to-many queries.
        o2m_weight: factor on the base weights for the ``_o2m`` losses (H-DETR: 1).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: Optional[HungarianMatcher] = None,
        weight_dict: Optional[Dict[str, float]] = None,
        focal_alpha: float = CriterionOptions.focal_alpha,
        focal_gamma: float = CriterionOptions.focal_gamma,
        num_aux_layers: Optional[int] = 5,
        two_stage: bool = True,
        class_loss: str = CriterionOptions.class_loss,
        enc_loss: str = CriterionOptions.enc_loss,
        dense_topk: int = CriterionOptions.dense_topk,
        dense_alpha: float = CriterionOptions.dense_alpha,
        dense_beta: float = CriterionOptions.dense_beta,
        o2m_repeats: int = CriterionOptions.o2m_repeats,
        o2m_weight: float = CriterionOptions.o2m_weight,
    ):
        super().__init__()
        if class_loss not in ("focal", "quality_focal"):
            raise ValueError(f"class_loss={class_loss!r} must be 'focal' or 'quality_focal'")
        if enc_loss not in ("hungarian", "dense"):
            raise ValueError(f"enc_loss={enc_loss!r} must be 'hungarian' or 'dense'")
        if dense_topk < 1 or o2m_repeats < 1:
            raise ValueError(f"dense_topk={dense_topk} and o2m_repeats={o2m_repeats} must be >= 1")
        self.o2m_repeats, self.o2m_weight = int(o2m_repeats), float(o2m_weight)
        self.class_loss, self.enc_loss = class_loss, enc_loss
        self.dense_topk, self.dense_alpha, self.dense_beta = int(dense_topk), float(dense_alpha), float(dense_beta)
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.base_weights = CriterionOptions.base_weights()
        user = dict(weight_dict or {})
        _check_weight_keys(user)
        self.base_weights.update({k: float(v) for k, v in user.items() if k in BASE_LOSSES})
        self._user_weights = {k: float(v) for k, v in user.items()}
        self.list_weights(num_aux_layers, two_stage)

    def list_weights(self, num_aux_layers: Optional[int], two_stage: bool) -> None:
        """(Re)build ``weight_dict`` up front: the keys of the last layer, of ``num_aux_layers``
        auxiliary layers (None: none yet) and, if ``two_stage``, of the proposals; then the
        user's weights."""
        self.num_aux_layers, self.two_stage = num_aux_layers, bool(two_stage)
        suffixes = [""] + [f"_{i}" for i in range(num_aux_layers or 0)] + (["_enc"] if two_stage else [])
        self.weight_dict = {k + s: self.base_weights[k] for s in suffixes for k in BASE_LOSSES}
        self.weight_dict.update(self._user_weights)

    def weight_of(self, key: str) -> float:
        """Weight of a loss key, the one place loss weights are resolved: ``weight_dict[key]`` if
        set, else (for ``_dn``/``_o2m`` keys) the weight given for the key without its layer
        suffix, else the base weight (times ``o2m_weight`` for ``_o2m`` keys).

        Raises:
            KeyError: a key that is none of ``loss_class``/``loss_bbox``/``loss_giou`` + suffixes.
        """
        if key in self.weight_dict:
            return self.weight_dict[key]
        base = "_".join(key.split("_")[:2])  # loss_class_dn_3 -> loss_class
        if base not in self.base_weights:
            raise KeyError(f"No weight for loss {key!r}: criterion.weight_dict has {sorted(self.weight_dict)}.")
        part = next((p for p in ("_dn", "_o2m") if key[len(base):].startswith(p)), "")
        if part and base + part in self._user_weights:
            return self._user_weights[base + part]
        return self.base_weights[base] * (self.o2m_weight if part == "_o2m" else 1.0)

    # ------------------------------------------------------------------ checks
    def _check_targets(self, targets: List[Dict[str, Tensor]], batch: int) -> None:
        check_targets(targets, self.num_classes, batch)

    def _num_boxes(self, targets, groups: int, device) -> float:
        return self._global_mean(float(sum(len(t["labels"]) for t in targets) * groups), device)

    @staticmethod
    def _global_mean(count: float, device) -> float:
        """``count`` averaged over processes (when distributed), clamped to >= 1."""
        n = torch.tensor([count], device=device)
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

        matched = boxes[batch_idx, src_idx]  # (M, 4)
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(matched), box_cxcywh_to_xyxy(tgt_boxes)))
        loss_class = self._class_loss(logits, (batch_idx, src_idx, tgt_labels), matched, tgt_boxes)
        loss_bbox = F.l1_loss(matched, tgt_boxes, reduction="sum")
        loss_giou = (1 - giou).sum()
        return {"loss_class": loss_class / num_boxes, "loss_bbox": loss_bbox / num_boxes,
                "loss_giou": loss_giou / num_boxes}

    def _class_loss(self, logits: Tensor, positives: Tuple[Tensor, ...], matched: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Summed classification loss; ``positives`` indexes ``logits`` at the matched entries."""
        target = torch.zeros_like(logits)
        if self.class_loss == "focal":
            target[positives] = 1.0
            return sigmoid_focal_loss(logits, target, self.focal_alpha, self.focal_gamma, reduction="sum")
        with torch.no_grad():
            iou = box_iou(box_cxcywh_to_xyxy(matched.float()), box_cxcywh_to_xyxy(tgt_boxes.float())).diagonal()
        target[positives] = iou.clamp(min=0).to(logits.dtype)
        # quality focal loss: BCE towards the IoU target, scaled by |sigmoid(x) - target|^gamma
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (bce * (logits.sigmoid() - target).abs().pow(self.focal_gamma)).sum()

    # ------------------------------------------------------------------ dense proposals
    @torch.no_grad()
    def _task_aligned_assign(self, logits: Tensor, boxes: Tensor, centers: Tensor, valid: Tensor,
                             labels: Tensor, tgt_boxes: Tensor) -> Tuple[Tensor, Tensor]:
        """One image: (S, K) logits, (S, 4) boxes, (S, 2) centres, (S,) valid vs n targets.

        Returns:
            (token indices, target indices) of the positives, each token at most once.
        """
        n = len(labels)
        if n == 0 or not bool(valid.any()):
            empty = torch.empty(0, dtype=torch.int64, device=logits.device)
            return empty, empty
        tgt_xyxy = box_cxcywh_to_xyxy(tgt_boxes.float())
        iou = box_iou(box_cxcywh_to_xyxy(boxes.float()), tgt_xyxy)  # (S, n)
        score = logits.float().sigmoid()[:, labels]  # (S, n)
        metric = score.pow(self.dense_alpha) * iou.pow(self.dense_beta)
        x, y = centers[:, None, 0].float(), centers[:, None, 1].float()
        inside = ((x > tgt_xyxy[:, 0]) & (x < tgt_xyxy[:, 2]) & (y > tgt_xyxy[:, 1]) & (y < tgt_xyxy[:, 3])
                  & valid[:, None])
        # a target smaller than the token spacing may contain no centre: take the nearest token
        dist2 = (centers.float()[:, None] - tgt_boxes.float()[None, :, :2]).pow(2).sum(-1)
        nearest = dist2.masked_fill(~valid[:, None], float("inf")).argmin(0)  # (n,)
        inside[nearest, torch.arange(n, device=inside.device)] = True
        k = min(self.dense_topk, len(valid))
        top_val, top_idx = metric.masked_fill(~inside, -1.0).topk(k, dim=0)  # (k, n)
        chosen = torch.zeros_like(inside)
        chosen.scatter_(0, top_idx, top_val >= 0)
        # a token chosen by several targets keeps the one it overlaps most
        best = iou.masked_fill(~chosen, -1.0).argmax(1)  # (S,)
        tokens = chosen.any(1).nonzero().flatten()
        return tokens, best[tokens]

    def _dense_losses(self, dense: Dict[str, Tensor], targets) -> Dict[str, Tensor]:
        logits, boxes = dense["pred_logits"], dense["pred_boxes"]
        device = logits.device
        assigned = [self._task_aligned_assign(logits[i], boxes[i], dense["centers"][i], dense["valid"][i],
                                              t["labels"].to(device), t["boxes"].to(device))
                    for i, t in enumerate(targets)]
        batch_idx = torch.cat([torch.full_like(tok, i) for i, (tok, _) in enumerate(assigned)])
        tok_idx = torch.cat([tok for tok, _ in assigned])
        tgt_labels = torch.cat([t["labels"].to(device)[j] for t, (_, j) in zip(targets, assigned)])
        tgt_boxes = torch.cat([t["boxes"].to(device, boxes.dtype)[j] for t, (_, j) in zip(targets, assigned)])
        num_pos = self._global_mean(float(len(tok_idx)), device)
        matched = boxes[batch_idx, tok_idx]
        valid = dense["valid"]
        target_logits = logits.masked_fill(~valid[..., None], -1e4)  # invalid tokens: confident background
        loss_class = self._class_loss(target_logits, (batch_idx, tok_idx, tgt_labels), matched, tgt_boxes)
        loss_bbox = F.l1_loss(matched, tgt_boxes, reduction="sum")
        loss_giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(matched), box_cxcywh_to_xyxy(tgt_boxes),
                                             reduction="sum")
        return {"loss_class": loss_class / num_pos, "loss_bbox": loss_bbox / num_pos,
                "loss_giou": loss_giou / num_pos}

    # ------------------------------------------------------------------ training-only queries
    def _dn_losses(self, out: Dict[str, Tensor], dn: Dict, targets, num_boxes: float) -> Dict[str, Tensor]:
        """Denoising losses of one layer; ``dn`` holds ``valid``/``positive``/``target_index`` (B, D)."""
        logits, boxes = out["pred_logits"], out["pred_boxes"]
        device = logits.device
        bi, qi = dn["valid"].nonzero(as_tuple=True)  # (N,) image and slot of every non-padding query
        rows = dn["positive"][bi, qi].nonzero().flatten()  # the positives among them
        pb, pq = bi[rows], qi[rows]
        ti = dn["target_index"][pb, pq]
        labels = pad_sequence([t["labels"].to(device) for t in targets], batch_first=True)  # (B, n)
        tgt_boxes_all = pad_sequence([t["boxes"].to(device, boxes.dtype) for t in targets], batch_first=True)
        tgt_labels, tgt_boxes = labels[pb, ti], tgt_boxes_all[pb, ti]
        matched = boxes[pb, pq]  # (P, 4)
        loss_class = self._class_loss(logits[bi, qi], (rows, tgt_labels), matched, tgt_boxes)
        loss_bbox = F.l1_loss(matched, tgt_boxes, reduction="sum")
        loss_giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(matched), box_cxcywh_to_xyxy(tgt_boxes),
                                             reduction="sum")
        return {"loss_class": loss_class / num_boxes, "loss_bbox": loss_bbox / num_boxes,
                "loss_giou": loss_giou / num_boxes}

    def _o2m_losses(self, out: Dict[str, Tensor], repeated, num_boxes: float) -> Dict[str, Tensor]:
        """One-to-many losses of one layer against the repeated targets."""
        return self._losses(out, repeated, self._match(out, repeated, 1), num_boxes)

    @staticmethod
    def _per_layer(outputs: Dict, suffix: str, layer_losses) -> Dict[str, Tensor]:
        """``layer_losses(out)`` for the last layer (keys + ``suffix``) and every auxiliary layer
        (keys + ``suffix`` + ``_{i}``)."""
        losses = {f"{k}{suffix}": v for k, v in layer_losses(outputs).items()}
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}{suffix}_{i}": v for k, v in layer_losses(aux).items()})
        return losses

    def forward(self, outputs: Dict, targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """
        Args:
            outputs: the detector's dict (``pred_logits``, ``pred_boxes``, optional
                ``aux_outputs``, ``enc_outputs``, ``num_groups``, ``dn_outputs``, ``o2m_outputs``).
            targets: B dicts with ``labels`` (n,) int64 in [0, K) and ``boxes`` (n, 4)
                normalized cxcywh relative to the unpadded image; an optional ``name`` (str,
                e.g. the image file) is used in error messages.

        Returns:
            unweighted losses (see the module docstring); ``weight_dict`` holds every key's weight.
        """
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"pred_logits has {logits.shape[-1]} classes but the criterion was built with "
                f"num_classes={self.num_classes}")
        self._check_targets(targets, logits.shape[0])
        groups = int(outputs.get("num_groups", 1))
        num_boxes = self._num_boxes(targets, groups, logits.device)

        losses = self._per_layer(
            outputs, "", lambda out: self._losses(out, targets, self._match(out, targets, groups), num_boxes))
        if self.enc_loss == "dense" and "enc_dense" in outputs:
            losses.update({f"{k}_enc": v for k, v in self._dense_losses(outputs["enc_dense"], targets).items()})
        elif "enc_outputs" in outputs:
            enc = outputs["enc_outputs"]
            n_enc = self._num_boxes(targets, 1, logits.device)
            enc_losses = self._losses(enc, targets, self._match(enc, targets, 1), n_enc)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        if "o2m_outputs" in outputs:
            k = self.o2m_repeats
            repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
            n_o2m = self._num_boxes(targets, k, logits.device)
            losses.update(self._per_layer(outputs["o2m_outputs"], "_o2m",
                                          lambda out: self._o2m_losses(out, repeated, n_o2m)))
        if "dn_outputs" in outputs:
            dn = outputs["dn_outputs"]
            n_dn = self._num_boxes(targets, int(dn["num_groups"]), logits.device)
            losses.update(self._per_layer(dn, "_dn", lambda out: self._dn_losses(out, dn, targets, n_dn)))
        for key in losses:
            self.weight_dict.setdefault(key, self.weight_of(key))
        return losses
