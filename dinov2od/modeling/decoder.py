"""Deformable DETR decoder with iterative box refinement, two-stage queries and Group-DETR.

Queries are (content ``tgt``, reference box ``ref``) pairs; boxes are normalized
``(cx, cy, w, h)`` relative to each image's *valid* (unpadded) region. Each layer:

    tgt = norm(tgt + self_attn(tgt + pos, tgt + pos, tgt))      # masked between groups
    tgt = norm(tgt + cross_attn(tgt + pos, memory))             # deformable or standard
    tgt = norm(tgt + ffn(tgt))
    ref = sigmoid(inverse_sigmoid(ref) + box_head(tgt))         # box refinement

where ``pos = MLP(sine(ref))`` depends only on the reference box (not on padding).
Deformable cross-attention samples level ``l`` at ``ref * valid_ratio_l`` (the valid
region's share of the padded map), so padding never moves a sampling point; standard
cross-attention attends all pyramid tokens with a key padding mask.

Options: ``two_stage`` picks the initial reference boxes as the top-k scoring proposals
from the pyramid tokens (one proposal per token, ``enc_outputs`` for the loss) while the
content queries stay learned (DINO's mixed query selection); ``group_detr > 1`` trains
``group_detr`` independent query groups (each matched one-to-one, self-attention blocked
between groups) and keeps only the first group at inference; ``num_encoder_layers > 0``
adds a light deformable encoder over the pyramid tokens (0 by default: the ViT is the
encoder). Two more training-only query sets, dropped at inference (see :mod:`.train_queries`):
``dn_groups``/``dn_queries`` add contrastive denoising queries built from the targets
(DN-DETR/DINO), ``o2m_queries`` a one-to-many set (H-DETR). They share the layers and heads
with the matching queries and come back as ``dn_outputs`` and ``o2m_outputs``.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from dinov2od.layers import (
    MLP,
    box_cxcywh_to_xyxy,
    MultiScaleDeformableAttention,
    PositionEmbeddingSine,
    coordinate_to_sine_embedding,
    level_shapes,
    level_start_index_from_shapes,
)
from dinov2od.layers.kernels import (attention, attention_kernel, cached, cast_once, linear, linear_module,
                                     self_attention_kernel, weight_dtype)

from .train_queries import check_targets, make_denoising_queries, self_attn_mask

__all__ = ["DecoderOptions", "DeformableDecoder", "DecoderLayer", "EncoderLayer", "decoder_self_attention",
           "inverse_sigmoid"]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of x clamped to [eps, 1 - eps]."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def decoder_self_attention(mha: nn.MultiheadAttention, query: Tensor, value: Tensor,
                           attn_mask: Optional[Tensor] = None) -> Tensor:
    """``mha(query, query, value, attn_mask=attn_mask, need_weights=False)[0]`` for a batch-first
    ``nn.MultiheadAttention``.

    Under CPU bfloat16 autocast at inference without a mask (where
    :func:`dinov2od.layers.kernels.self_attention_kernel` says dinov2od's bfloat16 attention kernel
    takes the heads), it computes what autocast makes of the module's own path (bfloat16 q/k/v
    products, a bfloat16 attention with float32 softmax, a bfloat16 output projection) with that
    kernel in place of torch's (docs/speed.md). Everywhere else: the module.
    """
    embed = mha.embed_dim
    heads = mha.num_heads
    fast = (attn_mask is None and not mha.training and mha.batch_first and mha._qkv_same_embed_dim
            and mha.in_proj_weight is not None and mha.bias_k is None and not mha.add_zero_attn
            and query.dim() == 3 and embed % heads == 0 and self_attention_kernel(query, embed // heads))
    if fast:
        b, t, _ = query.shape
        # bfloat16 copies of the projection weights, cast once (autocast casts them at every call)
        weight, bias = cast_once(mha, torch.bfloat16, ("in_proj_weight", "in_proj_bias"))
        qk = linear(query, weight[: 2 * embed], None if bias is None else bias[: 2 * embed])
        v = linear(value, weight[2 * embed:], None if bias is None else bias[2 * embed:])
        q, k = qk.view(b, t, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, Dh)
        v = v.view(b, t, heads, -1).transpose(1, 2)
        if attention_kernel(q, k, v) == "avx512-bf16":
            return linear_module(mha.out_proj, attention(q, k, v).transpose(1, 2).reshape(b, t, embed))
    return mha(query, query, value, attn_mask=attn_mask, need_weights=False)[0]


class _FFN(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.dropout(linear_module(self.linear1, x, "relu"))  # (bf16 inference: weights cast once)
        return self.norm(x + self.dropout(linear_module(self.linear2, hidden)))


class EncoderLayer(nn.Module):
    """Deformable self-attention over the pyramid tokens + FFN (post-norm)."""

    def __init__(self, d_model, num_heads, dim_feedforward, dropout, num_levels, num_points):
        super().__init__()
        self.attn = MultiScaleDeformableAttention(d_model, num_heads, num_levels, num_points, dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = _FFN(d_model, dim_feedforward, dropout)

    def forward(self, src, pos, ref, spatial_shapes, level_start, mask):
        """src, pos: (B, S, C); ref: (B, S, L, 2); mask: (B, S) True at padding."""
        src = self.norm(src + self.dropout(self.attn(src + pos, ref, src, spatial_shapes, level_start, mask)))
        return self.ffn(src)


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention (deformable or standard), FFN; post-norm.

    Args:
        d_model: width C. num_heads: heads of both attentions. dim_feedforward: FFN width.
        dropout: dropout everywhere. num_levels, num_points: deformable attention sampling.
        cross_attn: ``"deformable"`` or ``"standard"``.
    """

    def __init__(self, d_model=256, num_heads=8, dim_feedforward=1024, dropout=0.0, num_levels=4,
                 num_points=4, cross_attn="deformable"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn_type = cross_attn
        if cross_attn == "deformable":
            self.cross_attn = MultiScaleDeformableAttention(d_model, num_heads, num_levels, num_points, dropout)
        elif cross_attn == "standard":
            self.cross_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        else:
            raise ValueError(f"cross_attn={cross_attn!r} must be 'deformable' or 'standard'")
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.ffn = _FFN(d_model, dim_feedforward, dropout)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        ref_per_level: Tensor,
        memory: Tensor,
        memory_pos: Optional[Tensor],
        memory_mask: Optional[Tensor],
        spatial_shapes: Tensor,
        level_start: Tensor,
        self_attn_mask: Optional[Tensor] = None,
        projected_value: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            tgt, query_pos: (B, Q, C). ref_per_level: (B, Q, L, 4) boxes scaled per level.
            memory: (B, S, C); memory_pos: (B, S, C) or None; memory_mask: (B, S) True=pad, or None.
            spatial_shapes: (L, 2); level_start: (L,).
            self_attn_mask: (Q, Q) bool, True where attention is not allowed.
            projected_value: deformable cross-attention only: this layer's value projection of
                ``memory``, padding zeroed (see :meth:`DeformableDecoder._project_values`), or None.

        Returns:
            (B, Q, C)
        """
        tgt = self.norm1(tgt + self.dropout(decoder_self_attention(self.self_attn, tgt + query_pos, tgt,
                                                                   self_attn_mask)))
        if self.cross_attn_type == "deformable":
            out = self.cross_attn(tgt + query_pos, ref_per_level, memory, spatial_shapes, level_start, memory_mask,
                                  projected_value=projected_value)
        else:
            out = self.cross_attn(tgt + query_pos, memory + memory_pos, memory, key_padding_mask=memory_mask,
                                  need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(out))
        return self.ffn(tgt)


@dataclasses.dataclass
class DecoderOptions:
    """The options of :class:`DeformableDecoder`, with their defaults: the one place they are written.

    The decoder takes them as keyword arguments (``DeformableDecoder(num_classes, num_queries=100)``)
    and :class:`~dinov2od.modeling.DINOv2ObjectDetector` passes them on by name (``num_layers`` is
    its ``num_decoder_layers``, ``num_levels`` comes from its neck).

    Attributes:
        hidden_dim: width C (must equal the neck's output width).
        num_levels: pyramid levels L.
        num_queries: queries per group at inference.
        num_layers: decoder layers.
        num_heads: heads of the self- and cross-attention.
        num_points: deformable attention's sampling points per head and level.
        dim_feedforward: FFN width.
        dropout: dropout everywhere.
        cross_attn: ``"deformable"`` or ``"standard"``.
        box_refine: each layer refines the previous layer's boxes (own heads per layer); else
            every layer predicts relative to the initial reference boxes (shared heads).
        two_stage: initial reference boxes from the top-k pyramid-token proposals.
        group_detr: number of query groups during training (1 = off).
        num_encoder_layers: deformable encoder layers over the pyramid (0 = none).
        prior_prob: initial foreground probability of the class heads.
        two_stage_nms: if > 0, the two-stage selection skips proposals that overlap a better one
            by more than this IoU (class-agnostic NMS), so that a few large objects, covered by
            many confident tokens, cannot take all the queries.
        dn_groups: contrastive denoising groups in training (0 = off unless ``dn_queries``); each
            holds a positive and a negative noised copy of every target box.
        dn_queries: instead of a fixed ``dn_groups``, DINO's budget of denoising queries per image:
            groups = max(1, dn_queries // (2 * most targets of an image in the batch)).
        dn_label_noise: probability that a denoising query's label is replaced by a random class
            (DINO's ``label_noise_ratio=0.5`` flips with probability 0.25, the default here).
        dn_box_noise: box noise scale (corners move by up to this times half the box size for
            positives, 1-2 times that for negatives; DINO: 1.0).
        o2m_queries: one-to-many queries in training (H-DETR; 0 = off), trained against the
            targets repeated (the criterion's ``o2m_repeats``); with two-stage their reference
            boxes are the proposals ranked after the first ``num_queries``.
    """

    hidden_dim: int = 256
    num_levels: int = 4
    num_queries: int = 300
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.0
    cross_attn: str = "deformable"
    box_refine: bool = True
    two_stage: bool = False
    group_detr: int = 1
    num_encoder_layers: int = 0
    prior_prob: float = 0.01
    two_stage_nms: float = 0.0
    dn_groups: int = 0
    dn_queries: int = 0
    dn_label_noise: float = 0.25
    dn_box_noise: float = 1.0
    o2m_queries: int = 0

    @classmethod
    def from_kwargs(cls, owner: str = "DeformableDecoder", **kwargs) -> "DecoderOptions":
        """The defaults with ``kwargs`` set.

        Raises:
            TypeError: a name that is no option, naming ``owner`` and the options.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"{owner} got unknown decoder option(s) {unknown}; the options (DecoderOptions): {names}")
        return cls(**kwargs)


class DeformableDecoder(nn.Module):
    """Query decoder with class/box heads (see the module docstring).

    Args:
        num_classes: number of classes (sigmoid logits, no "no-object" column).
        options: a :class:`DecoderOptions` (None: the defaults).
        **kwargs: fields of :class:`DecoderOptions` to set (over ``options``), e.g. ``num_queries=100``.
    """

    # one value projection for all layers (see _project_values); False: each layer its own
    stack_value_proj = True

    def __init__(self, num_classes: int, options: Optional[DecoderOptions] = None, **kwargs):
        super().__init__()
        o = DecoderOptions.from_kwargs(**{**dataclasses.asdict(options or DecoderOptions()), **kwargs})
        self.options = o
        _check_train_query_args(o.dn_groups, o.dn_queries, o.dn_label_noise, o.dn_box_noise, o.o2m_queries)
        if num_classes < 1 or o.num_queries < 1 or o.num_layers < 1 or o.group_detr < 1:
            raise ValueError(
                f"num_classes={num_classes}, num_queries={o.num_queries}, num_layers={o.num_layers} and "
                f"group_detr={o.group_detr} must all be >= 1"
            )
        if o.hidden_dim % 2:
            raise ValueError(f"hidden_dim={o.hidden_dim} must be even (sine position embeddings)")
        d = o.hidden_dim
        self.num_classes, self.hidden_dim, self.num_levels = num_classes, d, o.num_levels
        self.num_queries, self.num_layers, self.group_detr = o.num_queries, o.num_layers, o.group_detr
        self.cross_attn, self.box_refine, self.two_stage = o.cross_attn, o.box_refine, o.two_stage
        self.two_stage_nms = float(o.two_stage_nms)

        layer = DecoderLayer(d, o.num_heads, o.dim_feedforward, o.dropout, o.num_levels, o.num_points, o.cross_attn)
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(o.num_layers))
        enc = EncoderLayer(d, o.num_heads, o.dim_feedforward, o.dropout, o.num_levels, o.num_points)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(enc) for _ in range(o.num_encoder_layers))
        # memory position embeddings exist only where something reads them (keeps DDP's
        # "every parameter gets a gradient" true for every option)
        self.use_memory_pos = o.cross_attn == "standard" or o.num_encoder_layers > 0
        if self.use_memory_pos:
            self.level_embed = nn.Parameter(torch.zeros(o.num_levels, d))
            nn.init.normal_(self.level_embed, std=0.02)
        self.position_embedding = PositionEmbeddingSine(d // 2, normalize=True)
        self.ref_point_head = MLP(2 * d, d, d, 2)

        total = o.num_queries * o.group_detr
        self.query_embed = nn.Embedding(total, d)
        if not o.two_stage:
            self.refpoint_embed = nn.Embedding(total, 4)
            with torch.no_grad():  # centres spread over the image, small boxes
                xy = torch.rand(total, 2)
                wh = torch.full((total, 2), 0.1)
                self.refpoint_embed.weight.copy_(inverse_sigmoid(torch.cat([xy, wh], 1)))

        bias = -math.log((1 - o.prior_prob) / o.prior_prob)
        class_head = nn.Linear(d, num_classes)
        nn.init.constant_(class_head.bias, bias)
        box_head = MLP(d, d, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        n_heads = o.num_layers if o.box_refine else 1
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(n_heads))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(n_heads))
        if o.two_stage:
            self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
            self.enc_class_head = copy.deepcopy(class_head)
            self.enc_box_head = copy.deepcopy(box_head)
        self._init_train_queries(o)

    def _init_train_queries(self, o: DecoderOptions) -> None:
        """Training-only queries, created last so that the other parameters' random init does not
        depend on them (same seed, same weights with the options on or off)."""
        self.dn_groups, self.dn_queries = int(o.dn_groups), int(o.dn_queries)
        self.dn_label_noise, self.dn_box_noise = float(o.dn_label_noise), float(o.dn_box_noise)
        self.o2m_queries = int(o.o2m_queries)
        if self.denoising:
            self.dn_label_embed = nn.Embedding(self.num_classes, self.hidden_dim)
        if self.o2m_queries:
            self.o2m_query_embed = nn.Embedding(self.o2m_queries, self.hidden_dim)
            if not self.two_stage:
                self.o2m_refpoint_embed = nn.Embedding(self.o2m_queries, 4)
                with torch.no_grad():
                    xy = torch.rand(self.o2m_queries, 2)
                    self.o2m_refpoint_embed.weight.copy_(inverse_sigmoid(torch.cat([xy, torch.full_like(xy, 0.1)], 1)))

    @property
    def denoising(self) -> bool:
        """Whether training adds contrastive denoising queries."""
        return self.dn_groups > 0 or self.dn_queries > 0

    # ------------------------------------------------------------------ helpers
    def _memory_pos(self, maps: List[Tensor], masks: List[Optional[Tensor]], dtype) -> Tensor:
        """Sine position (per image, valid region) + level embedding -> (B, S, C)."""
        pos = []
        for lvl, (x, m) in enumerate(zip(maps, masks)):
            if m is None:  # nothing padded
                m = torch.zeros_like(x[:, 0], dtype=torch.bool)
            pos.append(self.position_embedding(m).flatten(2).transpose(1, 2).to(dtype) + self.level_embed[lvl].to(dtype))
        return torch.cat(pos, 1)

    @staticmethod
    def _token_centers(spatial_shapes: Tensor, valid_ratios: Tensor, dtype) -> Tuple[Tensor, Tensor]:
        """Centres of all pyramid tokens.

        Returns:
            centers: (B, S, 2) ``(x, y)`` normalized to each image's valid region.
            level_of_token: (S,) level index.
        """
        centers, levels = [], []
        for lvl, (h, w) in enumerate(level_shapes(spatial_shapes)):
            ys, xs = torch.meshgrid(
                torch.arange(h, dtype=dtype, device=valid_ratios.device),
                torch.arange(w, dtype=dtype, device=valid_ratios.device), indexing="ij")
            xy = torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1)  # over the padded map
            centers.append(xy[None] / valid_ratios[:, None, lvl].to(dtype))
            levels.append(torch.full_like(xs.flatten(), lvl, dtype=torch.long))
        return torch.cat(centers, 1), torch.cat(levels)

    def _encode(self, memory, memory_pos, memory_mask, spatial_shapes, level_start, valid_ratios):
        if not len(self.encoder_layers):
            return memory
        centers, _ = self._token_centers(spatial_shapes, valid_ratios, memory.dtype)
        # (B, S, 1, 2) * (B, 1, L, 2): each token's centre as seen on every level
        ref = centers[:, :, None] * valid_ratios[:, None].to(memory.dtype)
        for layer in self.encoder_layers:
            memory = layer(memory, memory_pos, ref, spatial_shapes, level_start, memory_mask)
        return memory

    def _two_stage_queries(self, memory, memory_mask, spatial_shapes, valid_ratios, num_select: int):
        """Top-k proposals -> (ref boxes (B, k, 4), enc_outputs dict, enc_dense dict), k = ``num_select``.

        ``enc_outputs`` holds the first ``num_queries`` selected proposals; ``enc_dense`` every token's
        ``pred_logits`` (B, S, K), ``pred_boxes`` (B, S, 4), ``valid`` (B, S) (inside the image,
        away from its border) and ``centers`` (B, S, 2), for a dense proposal loss.
        """
        b, s, _ = memory.shape
        if not torch.jit.is_tracing() and s < num_select:
            need = f"num_queries={self.num_queries}" if num_select == self.num_queries else \
                f"num_queries + o2m_queries = {num_select}"
            raise ValueError(
                f"two-stage selection needs at least {need} pyramid tokens, the input gives {s}; use larger "
                "images or fewer queries"
            )
        centers, levels = self._token_centers(spatial_shapes, valid_ratios, memory.dtype)
        wh = (0.05 * 2.0 ** levels.to(memory.dtype))[None, :, None].expand(b, s, 2)
        proposals = torch.cat([centers, wh], -1)  # (B, S, 4)
        valid = ((centers > 0.01) & (centers < 0.99)).all(-1)
        if memory_mask is not None:
            valid = valid & ~memory_mask
        proposals_unsig = inverse_sigmoid(proposals).masked_fill(~valid[..., None], 0.0)
        out_memory = self.enc_output(memory.masked_fill(~valid[..., None], 0.0))
        logits = self.enc_class_head(out_memory)  # (B, S, K)
        boxes_unsig = self.enc_box_head(out_memory) + proposals_unsig  # (B, S, 4)
        scores = logits.max(-1)[0].masked_fill(~valid, float("-inf"))
        if self.two_stage_nms > 0:
            topk = self._nms_topk(boxes_unsig.detach(), scores.detach(), num_select)
        else:
            topk = scores.topk(num_select, dim=1)[1]  # (B, k)
        idx4 = topk[..., None].expand(-1, -1, 4)
        sel_boxes = boxes_unsig.gather(1, idx4).sigmoid()
        sel_logits = logits.gather(1, topk[:, : self.num_queries, None].expand(-1, -1, logits.shape[-1]))
        dense = {"pred_logits": logits, "pred_boxes": boxes_unsig.sigmoid(), "valid": valid, "centers": centers}
        enc = {"pred_logits": sel_logits, "pred_boxes": sel_boxes[:, : self.num_queries]}
        return sel_boxes.detach(), enc, dense

    def _nms_topk(self, boxes_unsig: Tensor, scores: Tensor, k: Optional[int] = None) -> Tensor:
        """Per image: the ``k`` (default ``num_queries``) best proposals after class-agnostic NMS
        (the best suppressed ones fill up if too few survive) -> (B, k) token indices."""
        from torchvision.ops import nms

        k = self.num_queries if k is None else k
        picks = []
        for b_boxes, b_scores in zip(boxes_unsig, scores):
            order = b_scores.argsort(descending=True)
            finite = order[torch.isfinite(b_scores[order])]
            xyxy = box_cxcywh_to_xyxy(b_boxes[finite].sigmoid().float())
            keep = finite[nms(xyxy, b_scores[finite].float(), self.two_stage_nms)]
            rest = order[~torch.isin(order, keep)]
            picks.append(torch.cat([keep, rest])[:k])
        return torch.stack(picks)

    # ------------------------------------------------------------------ forward
    def _initial_queries(self, b: int, dtype, memory, memory_mask, spatial_shapes, valid_ratios,
                         groups: int, num_o2m: int) -> Tuple[Tensor, Tensor, Dict]:
        """Content (B, Q', C) and reference boxes (B, Q', 4) of the matching groups then the
        one-to-many set (Q' = groups * Q + num_o2m), and the two-stage outputs."""
        total = groups * self.num_queries
        tgt = self.query_embed.weight[:total].to(dtype)[None].expand(b, -1, -1)
        outputs: Dict = {}
        if self.two_stage:
            ref, outputs["enc_outputs"], dense = self._two_stage_queries(
                memory, memory_mask, spatial_shapes, valid_ratios, self.num_queries + num_o2m)
            if self.training:
                outputs["enc_dense"] = dense
            ref_o2m, ref = ref[:, self.num_queries:], ref[:, : self.num_queries].repeat(1, groups, 1)
        else:
            ref = self.refpoint_embed.weight[:total].to(dtype).sigmoid()[None].expand(b, -1, -1)
            if num_o2m:
                ref_o2m = self.o2m_refpoint_embed.weight.to(dtype).sigmoid()[None].expand(b, -1, -1)
        if num_o2m:
            tgt = torch.cat([tgt, self.o2m_query_embed.weight.to(dtype)[None].expand(b, -1, -1)], 1)
            ref = torch.cat([ref, ref_o2m], 1)
        return tgt, ref, outputs

    def _denoising_queries(self, targets, b: int, dtype):
        """The denoising part: (DenoisingQueries, content (B, D, C)), or (None, None)."""
        if not (self.training and self.denoising):
            return None, None
        if targets is None:
            raise ValueError(
                "dn_groups/dn_queries > 0: training builds denoising queries from the targets; pass them "
                "(model(images, targets=targets)) or call model.eval() for inference")
        check_targets(targets, self.num_classes, b)
        dn = make_denoising_queries(targets, self.num_classes, self.dn_groups, self.dn_queries,
                                    self.dn_label_noise, self.dn_box_noise, dtype)
        return dn, self.dn_label_embed(dn.labels).to(dtype)

    def forward(self, maps: List[Tensor], masks: List[Tensor], valid_ratios: Tensor,
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Dict:
        """
        Args:
            maps: L feature maps (B, C, H_l, W_l).
            masks: L bool masks (B, H_l, W_l), True at padding; Nones when nothing is padded.
            valid_ratios: (B, L, 2) ``(x, y)`` share of each padded map covered by the image.
            targets: B dicts with ``labels`` (n_i,) and ``boxes`` (n_i, 4) cxcywh of the unpadded
                image; read only in training with denoising (required then).

        Returns:
            dict with ``pred_logits`` (B, Q', K), ``pred_boxes`` (B, Q', 4), ``aux_outputs``
            (list, one dict per earlier layer), ``enc_outputs`` (two-stage only; plus
            ``enc_dense``, every token's proposal, when training) and
            ``num_groups`` (only when > 1: training with Group-DETR, Q' = groups * Q). In training
            also ``o2m_outputs`` (``pred_logits`` (B, Q_o2m, K), ``pred_boxes``, ``aux_outputs``)
            with ``o2m_queries``, and ``dn_outputs`` (``pred_logits`` (B, D, K), ``pred_boxes``,
            ``aux_outputs``, plus ``valid``/``positive``/``target_index`` (B, D) and
            ``num_groups``, see :class:`.train_queries.DenoisingQueries`) with denoising.
        """
        if len(maps) != self.num_levels:
            raise ValueError(f"decoder built for {self.num_levels} levels, got {len(maps)} feature maps")
        b = maps[0].shape[0]
        dtype = maps[0].dtype
        if torch.jit.is_tracing():  # keep the level sizes graph values
            spatial_shapes = torch.stack([torch._shape_as_tensor(m)[-2:] for m in maps]).to(maps[0].device)
        else:
            spatial_shapes = torch.tensor([m.shape[-2:] for m in maps], dtype=torch.long, device=maps[0].device)
        level_start = level_start_index_from_shapes(spatial_shapes)
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)  # (B, S, C)
        memory_mask = None if masks[0] is None else torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
        memory_pos = self._memory_pos(maps, masks, dtype) if self.use_memory_pos else None
        memory = self._encode(memory, memory_pos, memory_mask, spatial_shapes, level_start, valid_ratios)

        groups = self.group_detr if self.training else 1
        num_o2m = self.o2m_queries if self.training else 0
        tgt, ref, outputs = self._initial_queries(b, dtype, memory, memory_mask, spatial_shapes, valid_ratios,
                                                  groups, num_o2m)
        dn, dn_tgt = self._denoising_queries(targets, b, dtype)
        if dn is not None:
            tgt, ref = torch.cat([tgt, dn_tgt], 1), torch.cat([ref, dn.boxes.to(dtype)], 1)
        attn_mask = self_attn_mask(groups, self.num_queries, num_o2m, dn, self.layers[0].self_attn.num_heads,
                                   memory.device)
        vr4 = torch.cat([valid_ratios, valid_ratios], -1).to(dtype)[:, None]  # (B, 1, L, 4)

        per_layer = []
        init_ref = ref
        values = self._project_values(memory, memory_mask)
        for i, layer in enumerate(self.layers):
            query_pos = self.ref_point_head(coordinate_to_sine_embedding(ref, self.hidden_dim // 2).to(dtype))
            tgt = layer(tgt, query_pos, ref[:, :, None] * vr4, memory, memory_pos, memory_mask,
                        spatial_shapes, level_start, attn_mask, values[i] if values is not None else None)
            h = i if self.box_refine else 0
            base = ref if self.box_refine else init_ref
            # the reference's inverse sigmoid and the refined boxes in float32 (``ref`` is the maps' dtype,
            # float32 under autocast): a bfloat16 logit of a box near 0 or 1 moves it by pixels
            boxes = (inverse_sigmoid(base) + self.box_heads[h](tgt)).sigmoid()
            per_layer.append({"pred_logits": linear_module(self.class_heads[h], tgt), "pred_boxes": boxes})
            if self.box_refine:
                ref = boxes.detach()
        n_match = groups * self.num_queries
        outputs.update(_layers_output(per_layer, 0, n_match if num_o2m or dn is not None else None))
        if num_o2m:
            outputs["o2m_outputs"] = _layers_output(per_layer, n_match, n_match + num_o2m)
        if dn is not None:
            outputs["dn_outputs"] = {**_layers_output(per_layer, n_match + num_o2m, None), **dn.as_dict()}
        if groups > 1:
            outputs["num_groups"] = groups
        return outputs

    def _project_values(self, memory: Tensor, memory_mask: Optional[Tensor]) -> Optional[List[Tensor]]:
        """Every layer's deformable value projection of the memory (the same for all layers) in one
        (B S, C) x (C, layers x C) product instead of one per layer, through
        :func:`dinov2od.layers.kernels.linear` (on the CPU at inference oneDNN adds the bias in the
        product, where ``addmm`` first copies it into the output; docs/speed.md). Returns one (B, S, C)
        view per layer (the CPU kernel reads it through its strides), or None where the layers
        project their own: standard cross-attention, a single layer, or tracing (the exported
        graph keeps one projection per layer), or layers whose projection is not an ``nn.Linear``."""
        if self.cross_attn != "deformable" or len(self.layers) < 2 or not self.stack_value_proj \
                or torch.jit.is_tracing():
            return None
        projs = [layer.cross_attn.value_proj for layer in self.layers]
        if any(type(p) is not nn.Linear for p in projs):  # e.g. int8-quantized (dinov2od.modeling.quantize)
            return None
        dtype = weight_dtype(memory)  # bfloat16 under CPU bf16 autocast at inference

        def stack():
            weight, bias = torch.cat([p.weight for p in projs]), torch.cat([p.bias for p in projs])
            if dtype is None:
                return weight, bias
            return weight.detach().to(dtype), bias.detach().to(dtype)

        if dtype is None:  # (float32, training: the parameters themselves, rebuilt at each call)
            weight, bias = stack()
        else:  # bfloat16 copies, stacked and cast once, kept until a projection's parameters change
            weight, bias = cached(self, f"value_proj:{dtype}", [t for p in projs for t in (p.weight, p.bias)], stack)
        values = linear(memory, weight, bias)
        if memory_mask is not None:
            values = values.masked_fill(memory_mask[..., None], 0.0)
        return list(values.chunk(len(projs), -1))


def _layers_output(per_layer: List[Dict[str, Tensor]], start: int, stop: Optional[int]) -> Dict:
    """Queries ``start:stop`` of every layer: the last layer's ``pred_logits``/``pred_boxes``
    and ``aux_outputs`` (the earlier layers)."""
    if start == 0 and stop is None:  # nothing to split off (inference): the layers' own tensors
        parts = per_layer
    else:
        parts = [{k: v[:, start:stop] for k, v in out.items()} for out in per_layer]
    return {**parts[-1], "aux_outputs": parts[:-1]}


def _check_train_query_args(dn_groups, dn_queries, dn_label_noise, dn_box_noise, o2m_queries) -> None:
    if dn_groups < 0 or dn_queries < 0 or o2m_queries < 0:
        raise ValueError(f"dn_groups={dn_groups}, dn_queries={dn_queries} and o2m_queries={o2m_queries} must be >= 0")
    if dn_groups > 0 and dn_queries > 0:
        raise ValueError(f"set dn_groups={dn_groups} (fixed groups) or dn_queries={dn_queries} (DINO's budget), "
                         "not both")
    if not 0.0 <= dn_label_noise <= 1.0 or dn_box_noise < 0:
        raise ValueError(f"dn_label_noise={dn_label_noise} must be in [0, 1] and dn_box_noise={dn_box_noise} >= 0")
