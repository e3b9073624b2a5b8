"""The DINOv2 family: architecture table, config, backbone, checkpoint conversion and loader.

The ViT itself is ``transformers.Dinov2Model`` or ``Dinov2WithRegistersModel``;
:class:`DINOv2Backbone` runs its blocks in :class:`~.base.ViTBackbone`'s loop and adds what is
DINOv2's own: learned position embeddings, interpolated to *each image's* valid patch grid as
Meta's ``dinov2`` code does (``pos_interpolation``), and a sine-cosine start for a random-init ViT
(``pos_embed_init``). It reads the module names of both ``transformers`` 4.x
(``attention.attention.query``, ``attention.output.dense``) and 5.x (``attention.q_proj``,
``attention.o_proj``).

Architectures are known in code (:data:`ARCHS`), so constructing never downloads. Weights load
only when ``pretrained`` is given (sources: :mod:`.loading`):

* a Hugging Face hub id (``facebook/dinov2-small|base|large|giant``,
  ``facebook/dinov2-with-registers-*``, :data:`HUB_IDS`) or a ``save_pretrained`` folder;
* an official DINOv2 checkpoint (``dinov2_vitb14_pretrain.pth`` ...), whose keys are
  remapped to the Hugging Face layout (:func:`official_to_hf_state_dict`): ``blocks.N.attn.qkv``
  (fused) -> query/key/value, ``blocks.N.attn.proj`` -> attention output, ``blocks.N.ls1.gamma`` ->
  ``layer_scale1.lambda1``, ``mlp.w12``/``mlp.w3`` (SwiGLU) -> the SwiGLU projections,
  ``pos_embed`` -> ``embeddings.position_embeddings``, ``norm`` -> ``layernorm``.

A checkpoint of another architecture (or family) is refused with a message saying which it is.
``drop_path_rate`` applies to every source (:data:`.loading.RUNTIME_FIELDS`).
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2od.layers.fused_linear import _compiling
from dinov2od.layers.resize import bicubic_resize_matrix

from .base import ViTBackbone
from .loading import (
    hf_folder,
    is_official_checkpoint,
    is_random_init,
    load_converted,
    load_hf_model,
    official_depth,
    read_hf_config,
    read_official_state_dict,
    resolve_pretrained,
)
from .options import BackboneOptions
from .registry import register_backbone

logger = logging.getLogger("dinov2od")

__all__ = ["ARCHS", "DINOv2Backbone", "HUB_IDS", "PATCH_SIZE", "build_dinov2_config", "hf_to_official_state_dict",
           "load_official_checkpoint", "load_vit", "official_to_hf_state_dict", "sincos_pos_embed_2d"]

PATCH_SIZE = 14

# Architecture hyper-parameters of the released DINOv2 ViTs (and a "tiny" preset for CPU
# tests/demos, which has no released weights).
ARCHS: Dict[str, Dict] = {
    "tiny": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=2,
                 image_size=224),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4),
    "giant": dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4,
                  use_swiglu_ffn=True),
}
_COMMON = dict(patch_size=PATCH_SIZE, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6,
               hidden_act="gelu", qkv_bias=True)

# LoRA target names (base.LORA_TARGETS) -> module path inside a block, per transformers layout.
_TARGETS_V4 = {"query": "attention.attention.query", "key": "attention.attention.key",
               "value": "attention.attention.value", "output": "attention.output.dense",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
_TARGETS_V5 = {"query": "attention.q_proj", "key": "attention.k_proj",
               "value": "attention.v_proj", "output": "attention.o_proj",
               "fc1": "mlp.fc1", "fc2": "mlp.fc2"}

HUB_IDS = {
    **{f"facebook/dinov2-{a}": (a, False) for a in ("small", "base", "large", "giant")},
    **{f"facebook/dinov2-with-registers-{a}": (a, True) for a in ("small", "base", "large", "giant")},
}


def sincos_pos_embed_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """2-D sine-cosine position embeddings of an (h, w) grid -> (h * w, dim), row-major.

    The first half of the channels encodes the column (x), the second the row (y); each half is
    ``sin`` then ``cos`` at ``dim // 4`` geometric frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, 1).float()


def build_dinov2_config(arch: str = "small", registers: bool = False, **overrides):
    """Build a ``Dinov2Config`` (or ``Dinov2WithRegistersConfig``) without any download.

    Args:
        arch: one of :data:`ARCHS` (``tiny``, ``small``, ``base``, ``large``, ``giant``).
        registers: the "with registers" variant (4 register tokens).
        **overrides: config fields to change, e.g. ``hidden_size``; ``intermediate_size`` is
            accepted and turned into ``mlp_ratio``.
    """
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown DINOv2 arch {arch!r}; choose one of {sorted(ARCHS)}")
    fields = {**_COMMON, **ARCHS[arch], **overrides}
    if "intermediate_size" in fields:
        fields["mlp_ratio"] = fields.pop("intermediate_size") / fields["hidden_size"]
    if float(fields["mlp_ratio"]).is_integer():  # transformers 5 validates mlp_ratio as int
        fields["mlp_ratio"] = int(fields["mlp_ratio"])
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError(
            f"hidden_size={fields['hidden_size']} must be divisible by "
            f"num_attention_heads={fields['num_attention_heads']} (arch={arch!r}, overrides={overrides})"
        )
    if registers:
        fields.setdefault("num_register_tokens", 4)
        return Dinov2WithRegistersConfig(**fields)
    return Dinov2Config(**fields)


@register_backbone("dinov2")
class DINOv2Backbone(ViTBackbone):
    """DINOv2 ViT with LoRA adapters, returning feature maps tapped from several blocks.

    Args:
        arch: ``"tiny"``, ``"small"``, ``"base"``, ``"large"`` or ``"giant"``; None infers it
            from ``pretrained`` (and defaults to ``"small"`` without it).
        registers: use the "with registers" ViT (``Dinov2WithRegistersModel``).
        arch_overrides, pretrained (here also Meta's official DINOv2 ``.pth``), out_indices, num_taps,
        lora_rank, lora_alpha, lora_dropout, lora_targets, lora_blocks, freeze, drop_path_rate,
        apply_layernorm, window_size, window_blocks: the options both families share, with their
            defaults, in :class:`~dinov2od.modeling.backbones.options.BackboneOptions`.
        pos_embed_init: how a *random-init* ViT's position embeddings start: ``"sincos"``
            (fixed-frequency 2-D sine-cosine values, as MAE/ViTDet, still trained), which gives a
            from-scratch ViT a usable notion of where each patch is from the first step, or
            ``"random"`` (transformers' truncated normal). Ignored when weights are loaded.
        pos_interpolation: how the position embeddings are resized to a patch grid other than
            the stored one. ``"meta"`` (default) reproduces Meta's ``dinov2`` code, which the
            released weights were trained with: the models without registers interpolate with
            ``scale_factor=((h + 0.1) / M, (w + 0.1) / M)`` (``interpolate_offset=0.1``, bicubic,
            no antialias), the register models with ``size=(h, w)`` and antialias.
            ``"transformers"`` reproduces ``transformers``' ``Dinov2Model``, which uses
            ``size=(h, w)`` for both (antialias for the register models only); the two agree for
            the register models and whenever the grid is the stored ``M x M``.
    """

    display_name, archs, default_patch_size = "DINOv2", ARCHS, PATCH_SIZE

    def __init__(
        self,
        arch: Optional[str] = BackboneOptions.arch,
        registers: bool = False,
        arch_overrides: Optional[dict] = BackboneOptions.arch_overrides,
        pretrained: Optional[str] = BackboneOptions.pretrained,
        out_indices: Optional[Sequence[int]] = BackboneOptions.out_indices,
        num_taps: int = BackboneOptions.num_taps,
        lora_rank: int = BackboneOptions.lora_rank,
        lora_alpha: float = BackboneOptions.lora_alpha,
        lora_dropout: float = BackboneOptions.lora_dropout,
        lora_targets: Sequence[str] = BackboneOptions.lora_targets,
        lora_blocks: Optional[Sequence[int]] = BackboneOptions.lora_blocks,
        freeze: bool = BackboneOptions.freeze,
        drop_path_rate: float = BackboneOptions.drop_path_rate,
        apply_layernorm: bool = BackboneOptions.apply_layernorm,
        window_size: Optional[int] = BackboneOptions.window_size,
        window_blocks: Optional[Sequence[int]] = BackboneOptions.window_blocks,
        pos_embed_init: str = "sincos",
        pos_interpolation: str = "meta",
    ):
        super().__init__()
        if pos_embed_init not in ("sincos", "random"):
            raise ValueError(f"pos_embed_init={pos_embed_init!r} must be 'sincos' or 'random'")
        if pos_interpolation not in ("meta", "transformers"):
            raise ValueError(f"pos_interpolation={pos_interpolation!r} must be 'meta' or 'transformers'")
        self.pos_interpolation = pos_interpolation
        overrides = dict(arch_overrides or {})
        if drop_path_rate:
            overrides["drop_path_rate"] = drop_path_rate
        self.vit = load_vit(arch, registers, overrides, pretrained)
        if pos_embed_init == "sincos" and is_random_init(pretrained):
            with torch.no_grad():
                pe = self.vit.embeddings.position_embeddings  # (1, 1 + N, D)
                n = int(math.isqrt(pe.shape[1] - 1))
                pe[0, 0].zero_()
                pe[0, 1:].copy_(sincos_pos_embed_2d(n, n, pe.shape[-1]).to(pe.dtype))
        self._finish_init(
            out_indices=out_indices, num_taps=num_taps, apply_layernorm=apply_layernorm,
            window_size=window_size, window_blocks=window_blocks, lora_targets=lora_targets,
            lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_blocks=lora_blocks,
            freeze=freeze)

    @property
    def _layers(self) -> nn.ModuleList:
        return self.vit.encoder.layer

    @property
    def _final_norm(self) -> nn.Module:
        return self.vit.layernorm

    def _lora_layout(self) -> Dict[str, Tuple[str, ...]]:
        layout = _TARGETS_V5 if hasattr(self._layers[0].attention, "q_proj") else _TARGETS_V4
        if "fc1" in self.lora_targets or "fc2" in self.lora_targets:
            if not hasattr(self._layers[0].mlp, "fc1"):
                raise ValueError("lora_targets fc1/fc2 need the plain MLP; the giant arch uses SwiGLU")
        return {k: (v,) for k, v in layout.items()}

    @staticmethod
    def _attention_parts(att: nn.Module):
        """(q, k, v, output) projections and attention dropout of a block, in either layout."""
        if hasattr(att, "q_proj"):  # transformers >= 5
            return att.q_proj, att.k_proj, att.v_proj, att.o_proj, att.attention_dropout
        sa = att.attention  # transformers 4.x
        p_drop = sa.dropout_prob if hasattr(sa, "dropout_prob") else sa.dropout.p
        return sa.query, sa.key, sa.value, att.output.dense, p_drop

    # ------------------------------------------------------------------ forward pieces
    def _pos_embed_grid(self, h: int, w: int, dtype) -> Tensor:
        """Position embeddings of the patches interpolated to an (h, w) grid -> (h, w, D).

        Follows Meta's ``DinoVisionTransformer.interpolate_pos_encoding`` (or transformers', see
        ``pos_interpolation``): bicubic in float32, no resize when the grid is the stored one.

        Without autograd (inference, evaluation; not tracing or compiling) the resized grid is
        kept for the next call of the same (h, w, dtype), until the position-embedding parameter
        changes (its storage or version counter: an optimizer step, ``load_state_dict``, an
        in-place edit) or the interpolation setting does (what the bicubic resize costs at each
        call: docs/speed.md).
        """
        param = self.vit.embeddings.position_embeddings
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.jit.is_scripting() or _compiling():
            return self._pos_embed_resized(h, w, dtype)
        key = (h, w, dtype, param.device, param.data_ptr(), param._version, self.pos_interpolation,
               self.num_register_tokens, torch.is_inference_mode_enabled())
        cached = self.__dict__.get("_pos_embed_cache")
        if cached is None or cached[0] != key:
            cached = (key, self._pos_embed_resized(h, w, dtype))
            self.__dict__["_pos_embed_cache"] = cached
        return cached[1]

    def _pos_embed_resized(self, h: int, w: int, dtype) -> Tensor:
        """:meth:`_pos_embed_grid`, computed."""
        pos = self.vit.embeddings.position_embeddings[0, 1:]  # (M * M, D)
        m = int(math.isqrt(pos.shape[0]))
        grid = pos.reshape(m, m, -1)
        if (h, w) == (m, m):
            return grid.to(dtype)
        registers = self.num_register_tokens > 0
        if registers or self.pos_interpolation == "transformers":
            resize = dict(size=(h, w))
        else:  # Meta's interpolate_offset=0.1: the scale, not only the size, sets the sampling grid
            resize = dict(scale_factor=((h + 0.1) / m, (w + 0.1) / m))
        grid = F.interpolate(grid.permute(2, 0, 1)[None].float(), mode="bicubic", align_corners=False,
                             antialias=registers, **resize)
        if grid.shape[-2:] != (h, w):  # pragma: no cover - floor((h + 0.1) / m * m) is h
            raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(h, w)}")
        return grid[0].permute(1, 2, 0).to(dtype)

    def _pos_embed_traced(self, patch_valid_hw: Tensor, hp, wp, dtype) -> Tensor:
        """:meth:`_pos_embed_grid` of each image's valid grid, zero-padded to (Hp, Wp), as matrix
        products whose sizes are graph values (for tracing/ONNX; see :mod:`dinov2od.layers.resize`).

        Returns:
            (B, Hp, Wp, D).
        """
        pos = self.vit.embeddings.position_embeddings[0, 1:]  # (M * M, D)
        m = int(math.isqrt(pos.shape[0]))
        sizes = patch_valid_hw.to(torch.float64)  # (B, 2)
        registers = self.num_register_tokens > 0
        if registers or self.pos_interpolation == "transformers":
            scales = m / sizes
        else:  # Meta: scale_factor (h + 0.1) / M, except that the stored M x M grid is kept as is
            stored = (patch_valid_hw == m).all(1, keepdim=True)
            scales = torch.where(stored, torch.ones_like(sizes), m / (sizes + 0.1))
        a_h = bicubic_resize_matrix(patch_valid_hw[:, 0], hp, m, scales[:, 0], antialias=registers)  # (B, Hp, M)
        a_w = bicubic_resize_matrix(patch_valid_hw[:, 1], wp, m, scales[:, 1], antialias=registers)  # (B, Wp, M)
        grid = pos.reshape(m, m, -1).to(torch.float64)
        out = torch.einsum("bim,mnd->bind", a_h, grid)
        return torch.einsum("bind,bjn->bijd", out, a_w).to(dtype)

    def _embed(self, images: Tensor, patch_valid_hw: Optional[Tensor]) -> Tensor:
        """(B, 3, H, W) padded images -> (B, 1 + R + Hp*Wp, D) tokens with position embeddings.

        Args:
            patch_valid_hw: (B, 2) valid patch grid of each image, or None: every image fills it.
        """
        emb = self.vit.embeddings
        x = emb.patch_embeddings.projection(images)  # (B, D, Hp, Wp)
        b, d, hp, wp = x.shape
        x = x.permute(0, 2, 3, 1)  # (B, Hp, Wp, D)
        if torch.jit.is_tracing():  # sizes are graph values: resize with matrix products
            if patch_valid_hw is None:
                patch_valid_hw = torch.stack([torch.as_tensor(hp), torch.as_tensor(wp)])[None].expand(b, 2)
            pos = self._pos_embed_traced(patch_valid_hw, hp, wp, x.dtype)
        elif patch_valid_hw is None:  # one grid for the whole batch
            pos = self._pos_embed_grid(hp, wp, x.dtype)
        else:  # one interpolation per distinct valid grid, zero-padded to (Hp, Wp), gathered per image
            sizes, inverse = torch.unique(patch_valid_hw, dim=0, return_inverse=True)
            grids = [F.pad(self._pos_embed_grid(h, w, x.dtype), (0, 0, 0, wp - w, 0, hp - h))
                     for h, w in sizes.tolist()]
            pos = torch.stack(grids)[inverse]
        x = (x + pos).flatten(1, 2)  # (B, Hp*Wp, D)
        cls = (emb.cls_token + emb.position_embeddings[:, :1]).to(x.dtype).expand(b, -1, -1)
        tokens = [cls]
        if self.num_register_tokens:
            tokens.append(emb.register_tokens.to(x.dtype).expand(b, -1, -1))
        return emb.dropout(torch.cat(tokens + [x], 1))


# ---------------------------------------------------------------------- loading
_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "use_swiglu_ffn")


def _model_class(registers: bool):
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel if registers else Dinov2Model


def load_vit(arch: Optional[str], registers: bool, overrides: dict, pretrained: Optional[str]) -> nn.Module:
    """Build the ViT (random init) or load it from ``pretrained`` (see the module docstring).

    ``""``, ``"None"`` and ``"null"`` mean no weights too: command-line overrides such as
    Detectron2's ``model.detector.backbone.pretrained=None`` arrive as strings.
    """
    pretrained = resolve_pretrained(pretrained)
    if pretrained is None:
        config = build_dinov2_config(arch or "small", registers, **overrides)
        return _model_class(registers)(config)
    if is_official_checkpoint(pretrained):
        return load_official_checkpoint(pretrained, arch, registers, overrides)
    return _load_hf(pretrained, arch, registers, overrides)


def _config_mismatch(config, expected) -> Dict[str, Tuple]:
    diff = {}
    for f in _ARCH_FIELDS + ("num_register_tokens",):
        a, b = getattr(config, f, None) or 0, getattr(expected, f, None) or 0
        if a != b:
            diff[f] = (a, b)
    if abs(float(config.mlp_ratio) - float(expected.mlp_ratio)) > 1e-6:
        diff["mlp_ratio"] = (config.mlp_ratio, expected.mlp_ratio)
    return diff


def _guess_arch(config) -> str:
    for name, fields in ARCHS.items():
        if all(getattr(config, k) == v for k, v in fields.items() if k in _ARCH_FIELDS):
            return name
    return "unknown"


def _load_hf(pretrained: str, arch: Optional[str], registers: bool, overrides: dict) -> nn.Module:
    """Load a Hugging Face id or ``save_pretrained`` folder; refuse another architecture."""
    folder = hf_folder(pretrained, "DINOv2", "Dinov2Model", HUB_IDS, "facebook/dinov2-base")
    if not os.path.isdir(pretrained) and arch is None and pretrained in HUB_IDS:
        arch, registers = HUB_IDS[pretrained]
    config = read_hf_config(folder, "DINOv2", "Dinov2Model")
    if config.model_type not in ("dinov2", "dinov2_with_registers"):
        raise ValueError(
            f"pretrained={pretrained!r} holds a {config.model_type!r} model, not a DINOv2 ViT "
            "(model_type 'dinov2' or 'dinov2_with_registers')"
            + ("; load DINOv3 weights with family='dinov3'" if config.model_type == "dinov3_vit" else "")
        )
    model = load_hf_model(_model_class(config.model_type == "dinov2_with_registers"), folder, "DINOv2", overrides)
    loaded_registers = type(model).__name__ == "Dinov2WithRegistersModel"
    if arch is not None:
        expected = build_dinov2_config(arch, registers, **overrides)
        diff = _config_mismatch(model.config, expected)
        if diff:
            raise ValueError(
                f"pretrained={pretrained!r} is a DINOv2 {_guess_arch(model.config)!r} "
                f"(registers={loaded_registers}) but the backbone asks for arch={arch!r} "
                f"(registers={registers}); differing fields (checkpoint, requested): {diff}. "
                "Pass the matching arch/registers, or arch=None to take the checkpoint's."
            )
    logger.info("Loaded DINOv2 weights from %s", pretrained)
    return model


# ---------------------------------------------------------------------- official checkpoints
def _infer_official_config(sd: Dict[str, Tensor]) -> dict:
    if "storage_tokens" in sd or "rope_embed.periods" in sd:
        raise ValueError(
            "the .pth file is an official DINOv3 checkpoint (RoPE, storage tokens), not DINOv2; load it "
            "with family='dinov3' (DINOv3Backbone)"
        )
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd:
        raise ValueError(
            "the .pth file is not an official DINOv2 ViT checkpoint (no cls_token / patch_embed.proj.weight); "
            f"first keys: {list(sd)[:8]}"
        )
    dim = sd["cls_token"].shape[-1]
    depth = official_depth(sd)
    swiglu = "blocks.0.mlp.w12.weight" in sd
    hidden = sd["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape
    npos = sd["pos_embed"].shape[1] - 1
    patch = sd["patch_embed.proj.weight"].shape[-1]
    return dict(
        hidden_size=dim, num_hidden_layers=depth, patch_size=patch, use_swiglu_ffn=swiglu,
        image_size=int(round(npos ** 0.5)) * patch,
        mlp_hidden=hidden[1] if swiglu else hidden[0],
        registers=int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0,
    )


def official_to_hf_state_dict(sd: Dict[str, Tensor], v5_layout: bool) -> Dict[str, Tensor]:
    """Rename an official DINOv2 state dict to the Hugging Face ``Dinov2Model`` layout.

    Args:
        sd: official keys (``blocks.N.attn.qkv.weight`` ...), already unwrapped.
        v5_layout: target the transformers >= 5 module names (``attention.q_proj`` ...).

    Returns:
        the renamed dict; keys it does not know are kept under their own names (and then
        reported as unexpected by the loader).
    """
    attn = ("attention.{}_proj", "attention.o_proj") if v5_layout else (
        "attention.attention.{}", "attention.output.dense")
    qkv_names = ("q", "k", "v") if v5_layout else ("query", "key", "value")
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": attn[1], "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "mlp.w3": "mlp.down_proj" if v5_layout else "mlp.weights_out"}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v.reshape(1, -1) if k == "mask_token" else v
            continue
        m = re.match(r"blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$", k)
        if not m:
            out[k] = v
            continue
        i, name, suffix = m.group(1), m.group(2), m.group(3) or ""
        prefix = f"encoder.layer.{i}."
        if name == "attn.qkv":
            for part, chunk in zip(qkv_names, v.chunk(3, dim=0)):
                out[prefix + attn[0].format(part) + suffix] = chunk
        elif name == "mlp.w12" and v5_layout:
            gate, up = v.chunk(2, dim=0)
            out[prefix + "mlp.gate_proj" + suffix] = gate
            out[prefix + "mlp.up_proj" + suffix] = up
        elif name == "mlp.w12":
            out[prefix + "mlp.weights_in" + suffix] = v
        elif name in block:
            out[prefix + block[name] + suffix] = v
        else:
            out[k] = v
    return out


def hf_to_official_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """The weights of a ``Dinov2Model`` (either transformers layout, LoRA-free) in Meta's layout.

    The inverse of :func:`official_to_hf_state_dict`: the keys of Meta's ``DinoVisionTransformer``
    (``vit_small(...)`` etc.), e.g. ``blocks.N.attn.qkv.weight`` (query, key, value fused),
    ``blocks.N.ls1.gamma``, ``pos_embed``, ``mask_token`` of shape (1, D).

    Raises:
        ValueError: the model carries LoRA adapters (merge or drop them first).
    """
    sd = model.state_dict()
    if any("lora_" in k for k in sd):
        raise ValueError("the ViT carries LoRA adapters; merge them (peft) or export the base model")
    top = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.register_tokens": "register_tokens", "embeddings.mask_token": "mask_token",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}
    out = {v: sd[k].reshape(1, -1) if v == "mask_token" else sd[k] for k, v in top.items() if k in sd}
    v5 = hasattr(model.encoder.layer[0].attention, "q_proj")
    qkv = ("attention.{}_proj", ("q", "k", "v")) if v5 else ("attention.attention.{}", ("query", "key", "value"))
    block = {"norm1": "norm1", "norm2": "norm2", "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
             "attn.proj": "attention.o_proj" if v5 else "attention.output.dense",
             "mlp.w3": "mlp.down_proj" if v5 else "mlp.weights_out"}
    for i in range(len(model.encoder.layer)):
        src = f"encoder.layer.{i}."
        for suffix in (".weight", ".bias"):
            parts = [sd.get(src + qkv[0].format(n) + suffix) for n in qkv[1]]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv{suffix}"] = torch.cat(parts, 0)
            gate_up = [sd.get(src + n + suffix) for n in ("mlp.gate_proj", "mlp.up_proj")]
            if all(p is not None for p in gate_up):
                out[f"blocks.{i}.mlp.w12{suffix}"] = torch.cat(gate_up, 0)
            elif src + "mlp.weights_in" + suffix in sd:
                out[f"blocks.{i}.mlp.w12{suffix}"] = sd[src + "mlp.weights_in" + suffix]
        for official, hf in block.items():
            for suffix in (("",) if official.endswith("gamma") else (".weight", ".bias")):
                if src + hf + suffix in sd:
                    out[f"blocks.{i}.{official}{suffix}"] = sd[src + hf + suffix]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def load_official_checkpoint(path: str, arch: Optional[str], registers: bool, overrides: dict) -> nn.Module:
    """Build the ViT and load an official DINOv2 ``.pth`` into it.

    Raises:
        PretrainedWeightsUnavailable: the file does not exist.
        ValueError: the checkpoint is not DINOv2, is another architecture than ``arch``, or lacks
            weights the model needs.
    """
    sd = read_official_state_dict(path, "DINOv2")
    found = _infer_official_config(sd)
    ckpt_registers = found["registers"] > 0
    if arch is None:
        arch = next((a for a, f in ARCHS.items() if f["hidden_size"] == found["hidden_size"]
                     and f["num_hidden_layers"] == found["num_hidden_layers"]), None)
        if arch is None:
            raise ValueError(
                f"{path}: a DINOv2 of width {found['hidden_size']} and depth {found['num_hidden_layers']} "
                "matches no released arch; pass arch=... with arch_overrides describing it"
            )
        registers = ckpt_registers
        overrides = {**overrides, "image_size": found["image_size"]}
    config = build_dinov2_config(arch, registers, **overrides)
    model = _model_class(registers)(config)
    want = dict(hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
                patch_size=config.patch_size, use_swiglu_ffn=bool(config.use_swiglu_ffn),
                registers=int(getattr(config, "num_register_tokens", 0) or 0) if registers else 0)
    diff = {k: (found[k], v) for k, v in want.items() if found[k] != v}
    if diff:
        raise ValueError(
            f"{path} is a DINOv2 checkpoint of another architecture than arch={arch!r} "
            f"(registers={registers}); differing (checkpoint, requested): {diff}. Pass the arch "
            "that matches the checkpoint, or arch=None to infer it."
        )
    v5 = hasattr(model.encoder.layer[0].attention, "q_proj")
    hf_sd = official_to_hf_state_dict(sd, v5_layout=v5)
    pos = hf_sd.get("embeddings.position_embeddings")
    if pos is not None and pos.shape != model.embeddings.position_embeddings.shape:
        model.embeddings.position_embeddings = nn.Parameter(torch.zeros_like(pos))  # the checkpoint's grid
        model.config.image_size = found["image_size"]
    load_converted(model, hf_sd, path, "DINOv2")
    logger.info("Loaded official DINOv2 checkpoint %s (arch=%s, registers=%s)", path, arch, registers)
    return model
