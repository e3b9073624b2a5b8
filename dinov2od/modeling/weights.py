"""Building the DINOv2 and DINOv3 ViTs and loading their weights.

Three sources per family, only when asked for (``pretrained=``):

* a Hugging Face hub id (``facebook/dinov2-small|base|large|giant``,
  ``facebook/dinov2-with-registers-*``) — from the local cache, or downloaded by
  ``transformers`` when the hub is reachable;
* a local folder written by ``save_pretrained`` (``config.json`` + weights);
* an official DINOv2 checkpoint (``dinov2_vitb14_pretrain.pth`` ...), whose keys are
  remapped to the Hugging Face layout: ``blocks.N.attn.qkv`` (fused) -> query/key/value,
  ``blocks.N.attn.proj`` -> attention output, ``blocks.N.ls1.gamma`` ->
  ``layer_scale1.lambda1``, ``mlp.w12``/``mlp.w3`` (SwiGLU) -> the SwiGLU projections,
  ``pos_embed`` -> ``embeddings.position_embeddings``, ``norm`` -> ``layernorm``.

DINOv3 (``load_dinov3_vit``): the hub ids of :data:`DINOV3_HUB_IDS`, ``save_pretrained`` folders of
``DINOv3ViTModel``, and Meta's official ``.pth`` files (``dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth``
...), remapped: ``storage_tokens`` -> ``embeddings.register_tokens``, ``blocks.N.attn.qkv`` (fused,
its bias multiplied by ``bias_mask``, which zeroes the key bias: Meta's ``mask_k_bias``) ->
``q_proj``/``k_proj``/``v_proj``, ``attn.proj`` -> ``o_proj``, ``ls1.gamma`` -> ``layer_scale1.lambda1``,
``mlp.fc1``/``fc2`` -> ``up_proj``/``down_proj``, SwiGLU ``mlp.w1``/``w2``/``w3`` ->
``gate_proj``/``up_proj``/``down_proj``. ``rope_embed.periods`` is checked against the config's RoPE
base, and ``cls_norm``/``local_cls_norm`` (they normalize only the class and storage tokens) are
dropped.

A checkpoint of another architecture (or family) is refused with a message saying which it is.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .backbone import ARCHS, build_dinov2_config
from .dinov3 import DINOV3_ARCHS, build_dinov3_config, rope_periods

logger = logging.getLogger("dinov2od")

__all__ = [
    "DINOV3_HUB_IDS",
    "HUB_IDS",
    "PretrainedWeightsUnavailable",
    "load_vit",
    "official_to_hf_state_dict",
    "hf_to_official_state_dict",
    "load_official_checkpoint",
    "load_dinov3_vit",
    "dinov3_official_to_hf_state_dict",
]

HUB_IDS = {
    **{f"facebook/dinov2-{a}": (a, False) for a in ("small", "base", "large", "giant")},
    **{f"facebook/dinov2-with-registers-{a}": (a, True) for a in ("small", "base", "large", "giant")},
}

# The released DINOv3 ViTs on the Hugging Face hub (LVD-1689M web images; SAT-493M satellite images).
DINOV3_HUB_IDS = {
    "facebook/dinov3-vits16-pretrain-lvd1689m": "small",
    "facebook/dinov3-vits16plus-pretrain-lvd1689m": "small_plus",
    "facebook/dinov3-vitb16-pretrain-lvd1689m": "base",
    "facebook/dinov3-vitl16-pretrain-lvd1689m": "large",
    "facebook/dinov3-vith16plus-pretrain-lvd1689m": "huge_plus",
    "facebook/dinov3-vit7b16-pretrain-lvd1689m": "7b",
    "facebook/dinov3-vitl16-pretrain-sat493m": "large",
    "facebook/dinov3-vit7b16-pretrain-sat493m": "7b",
}

_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "use_swiglu_ffn")


class PretrainedWeightsUnavailable(OSError):
    """Raised when ``pretrained`` names weights that cannot be read here."""


def _model_class(registers: bool):
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    return Dinov2WithRegistersModel if registers else Dinov2Model


def _is_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    if env.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


_NO_WEIGHTS = ("", "None", "none", "null")


def is_random_init(pretrained: Optional[str]) -> bool:
    """True when ``pretrained`` names no weights (None, ``""``, ``"None"``, ``"null"``)."""
    return pretrained is None or (isinstance(pretrained, str) and pretrained.strip() in _NO_WEIGHTS)


#: the repository (or source tree) holding the ``dinov2od`` package and the project's ``weights/``
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def resolve_local_path(path: str) -> str:
    """``path`` as given when it exists (or is absolute, or a hub id); a relative path that does not
    exist from the working directory but does from the project's root (e.g.
    ``weights/dinov2od_tiny_glyphs.pth``) is taken from there, so configs run from any directory."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(PROJECT_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def load_vit(arch: Optional[str], registers: bool, overrides: dict, pretrained: Optional[str]) -> nn.Module:
    """Build the ViT (random init) or load it from ``pretrained`` (see the module docstring).

    ``""``, ``"None"`` and ``"null"`` mean no weights too: command-line overrides such as
    Detectron2's ``model.detector.backbone.pretrained=None`` arrive as strings.
    """
    if is_random_init(pretrained):
        config = build_dinov2_config(arch or "small", registers, **overrides)
        return _model_class(registers)(config)
    pretrained = resolve_local_path(os.fspath(pretrained))
    if pretrained.endswith((".pth", ".pt", ".bin")) and not os.path.isdir(pretrained):
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


def _download_hub(repo_id: str, family: str = "DINOv2", known=HUB_IDS) -> str:
    """Local folder of a hub repo (cache, or download when the hub is reachable)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"],
                                 local_files_only=_is_offline())
    except Exception as e:  # offline, unreachable, unknown repo, auth ...
        first = str(e).splitlines()[0] if str(e) else ""
        raise PretrainedWeightsUnavailable(
            f"could not load {family} weights {repo_id!r} from the Hugging Face hub or its local "
            f"cache ({type(e).__name__}: {first}). The hub is unreachable (or HF_HUB_OFFLINE=1) "
            "or the id is wrong, and the weights are not cached. Fix: on a machine with internet run "
            f"`huggingface-cli download {repo_id} --local-dir <folder>` (or `hf download`), copy the "
            f"folder here and pass pretrained='<folder>'; or pass an official {family} .pth checkpoint "
            f"path; or pretrained=None for random init. Known ids: {sorted(known)}."
        ) from e


def _load_hf(pretrained: str, arch: Optional[str], registers: bool, overrides: dict) -> nn.Module:
    """Load a Hugging Face id or ``save_pretrained`` folder; refuse another architecture."""
    from transformers import AutoConfig

    is_dir = os.path.isdir(pretrained)
    if os.path.isfile(pretrained) or (not is_dir and pretrained.startswith((".", os.sep))):
        raise PretrainedWeightsUnavailable(
            f"pretrained={pretrained!r} is neither a save_pretrained folder, an official .pth file, "
            "nor a Hugging Face id (like 'facebook/dinov2-base')"
        )
    if not is_dir and arch is None and pretrained in HUB_IDS:
        arch, registers = HUB_IDS[pretrained]
    folder = pretrained if is_dir else _download_hub(pretrained)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PretrainedWeightsUnavailable(
            f"could not load DINOv2 weights from the folder {folder!r}: it has no config.json. The "
            "folder must hold a Dinov2Model saved with save_pretrained (config.json + model.safetensors)."
        )
    try:
        config = AutoConfig.from_pretrained(folder)
        if config.model_type not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(
                f"pretrained={pretrained!r} holds a {config.model_type!r} model, not a DINOv2 ViT "
                "(model_type 'dinov2' or 'dinov2_with_registers')"
                + ("; load DINOv3 weights with family='dinov3'" if config.model_type == "dinov3_vit" else "")
            )
        model = _model_class(config.model_type == "dinov2_with_registers").from_pretrained(folder)
    except OSError as e:
        raise PretrainedWeightsUnavailable(
            f"could not load DINOv2 weights from the folder {folder!r}: {e}. The folder must "
            "hold a Dinov2Model saved with save_pretrained (config.json + model.safetensors)."
        ) from e
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
    if overrides.get("drop_path_rate"):
        logger.warning("drop_path_rate is ignored when loading a Hugging Face DINOv2 checkpoint")
    logger.info("Loaded DINOv2 weights from %s", pretrained)
    return model


# ---------------------------------------------------------------------- official checkpoints
def _unwrap_official(obj) -> Dict[str, Tensor]:
    """Find the ViT's state dict in an official / training checkpoint object."""
    if isinstance(obj, dict):
        for key in ("teacher", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("the .pth file does not hold a state dict of tensors")
    out = {}
    for k, v in obj.items():
        k = re.sub(r"^(module\.|backbone\.)+", "", k)
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # block chunks (giant)
        out[k] = v
    return out


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
    depth = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
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
    if not os.path.isfile(path):
        raise PretrainedWeightsUnavailable(f"official DINOv2 checkpoint {path!r} does not exist")
    sd = _unwrap_official(torch.load(path, map_location="cpu", weights_only=True))
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
    _load_converted(model, hf_sd, path, "DINOv2")
    logger.info("Loaded official DINOv2 checkpoint %s (arch=%s, registers=%s)", path, arch, registers)
    return model


def _load_converted(model: nn.Module, hf_sd: Dict[str, Tensor], path: str, family: str) -> None:
    """Load an official checkpoint converted to ``model``'s keys: wrong shapes and missing weights
    (other than the unused mask token) are errors naming ``path``; extra keys are logged."""
    own = model.state_dict()
    shape_bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in hf_sd.items()
                 if k in own and v.shape != own[k].shape}
    if shape_bad:
        raise ValueError(f"{path}: tensors of the wrong shape (checkpoint, model): {shape_bad}")
    result = model.load_state_dict(hf_sd, strict=False)
    missing = [k for k in result.missing_keys if k != "embeddings.mask_token"]
    if missing:
        raise ValueError(
            f"{path} lacks {len(missing)} weight(s) the {family} model needs: {missing[:10]}"
            + (" ..." if len(missing) > 10 else "")
        )
    if result.unexpected_keys:
        logger.warning("%s: %d unexpected key(s) ignored: %s", path, len(result.unexpected_keys),
                       result.unexpected_keys[:10])


# ---------------------------------------------------------------------- DINOv3
_DINOV3_ARCH_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                       "intermediate_size", "use_gated_mlp", "num_register_tokens")


def _dinov3_model_class():
    from transformers import DINOv3ViTModel

    return DINOv3ViTModel


def load_dinov3_vit(arch: Optional[str], overrides: dict, pretrained: Optional[str]) -> nn.Module:
    """Build a ``DINOv3ViTModel`` (random init) or load it from ``pretrained`` (module docstring)."""
    if is_random_init(pretrained):
        return _dinov3_model_class()(build_dinov3_config(arch or "small", **overrides))
    pretrained = resolve_local_path(os.fspath(pretrained))
    if pretrained.endswith((".pth", ".pt", ".bin")) and not os.path.isdir(pretrained):
        return load_official_dinov3_checkpoint(pretrained, arch, overrides)
    return _load_hf_dinov3(pretrained, arch, overrides)


def _dinov3_mismatch(config, expected) -> Dict[str, Tuple]:
    return {f: (getattr(config, f), getattr(expected, f)) for f in _DINOV3_ARCH_FIELDS
            if getattr(config, f) != getattr(expected, f)}


def _guess_dinov3_arch(fields: dict) -> Optional[str]:
    gated = bool(fields.get("use_gated_mlp"))
    for name, preset in DINOV3_ARCHS.items():
        if name != "tiny" and (preset["hidden_size"], preset["num_hidden_layers"], bool(preset.get("use_gated_mlp"))) \
                == (fields["hidden_size"], fields["num_hidden_layers"], gated):
            return name
    return None


def _load_hf_dinov3(pretrained: str, arch: Optional[str], overrides: dict) -> nn.Module:
    """Load a Hugging Face id or ``save_pretrained`` folder of a DINOv3 ViT; refuse anything else."""
    from transformers import AutoConfig

    is_dir = os.path.isdir(pretrained)
    if os.path.isfile(pretrained) or (not is_dir and pretrained.startswith((".", os.sep))):
        raise PretrainedWeightsUnavailable(
            f"pretrained={pretrained!r} is neither a save_pretrained folder, an official DINOv3 .pth "
            "file, nor a Hugging Face id (like 'facebook/dinov3-vitb16-pretrain-lvd1689m')"
        )
    if not is_dir and arch is None and pretrained in DINOV3_HUB_IDS:
        arch = DINOV3_HUB_IDS[pretrained]
    folder = pretrained if is_dir else _download_hub(pretrained, "DINOv3", DINOV3_HUB_IDS)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PretrainedWeightsUnavailable(
            f"could not load DINOv3 weights from the folder {folder!r}: it has no config.json. The "
            "folder must hold a DINOv3ViTModel saved with save_pretrained (config.json + model.safetensors)."
        )
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "dinov3_vit":
        hint = "; load DINOv2 weights with family='dinov2'" if config.model_type.startswith("dinov2") else ""
        raise ValueError(
            f"pretrained={pretrained!r} holds a {config.model_type!r} model, not a DINOv3 ViT "
            f"(model_type 'dinov3_vit'){hint}"
        )
    extra = {k: overrides[k] for k in ("drop_path_rate",) if overrides.get(k)}
    if arch is not None:
        diff = _dinov3_mismatch(config, build_dinov3_config(arch, **overrides))
        if diff:
            found = _guess_dinov3_arch(config.to_dict()) or "unknown"
            raise ValueError(
                f"pretrained={pretrained!r} is a DINOv3 {found!r} but the backbone asks for arch={arch!r}; "
                f"differing fields (checkpoint, requested): {diff}. Pass the matching arch, or arch=None "
                "to take the checkpoint's."
            )
    try:
        model = _dinov3_model_class().from_pretrained(folder, **extra)
    except OSError as e:
        raise PretrainedWeightsUnavailable(
            f"could not load DINOv3 weights from the folder {folder!r}: {e}. The folder must "
            "hold a DINOv3ViTModel saved with save_pretrained (config.json + model.safetensors)."
        ) from e
    logger.info("Loaded DINOv3 weights from %s", pretrained)
    return model


def _infer_official_dinov3(sd: Dict[str, Tensor]) -> dict:
    """DINOv3ViTConfig fields an official state dict determines (the head count only via its RoPE periods)."""
    if "pos_embed" in sd:
        raise ValueError(
            "the .pth file is an official DINOv2 checkpoint (learned position embeddings), not DINOv3; "
            "load it with family='dinov2' (DINOv2Backbone)"
        )
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd or "blocks.0.attn.qkv.weight" not in sd:
        raise ValueError(
            "the .pth file is not an official DINOv3 ViT checkpoint (no cls_token / patch_embed.proj.weight "
            f"/ blocks.0.attn.qkv.weight); first keys: {list(sd)[:8]}"
        )
    dim = sd["cls_token"].shape[-1]
    gated = "blocks.0.mlp.w1.weight" in sd
    has_bias = "blocks.0.attn.qkv.bias" in sd
    mask = sd.get("blocks.0.attn.qkv.bias_mask")
    fields = dict(
        hidden_size=dim,
        num_hidden_layers=1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m),
        patch_size=sd["patch_embed.proj.weight"].shape[-1],
        use_gated_mlp=gated,
        intermediate_size=sd["blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight"].shape[0],
        num_register_tokens=int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0,
        query_bias=has_bias, value_bias=has_bias,
        key_bias=has_bias and (mask is None or bool(mask[dim:2 * dim].any())),
        proj_bias="blocks.0.attn.proj.bias" in sd,
        mlp_bias=("blocks.0.mlp.w1.bias" if gated else "blocks.0.mlp.fc1.bias") in sd,
    )
    if "rope_embed.periods" in sd:
        fields["num_attention_heads"] = dim // (4 * sd["rope_embed.periods"].numel())
    return fields


def dinov3_official_to_hf_state_dict(sd: Dict[str, Tensor], v5_layout: bool, key_bias: bool) -> Dict[str, Tensor]:
    """Rename an official DINOv3 state dict to the ``DINOv3ViTModel`` layout.

    Args:
        sd: official keys (``blocks.N.attn.qkv.weight`` ...), already unwrapped.
        v5_layout: the transformers >= 5 block path (``model.layer.N``; 4.x: ``layer.N``).
        key_bias: keep the key bias (False: it is masked to zero, Meta's ``mask_k_bias``).

    Returns:
        the renamed dict; ``rope_embed.periods``, ``bias_mask`` and the class-token norms are
        dropped, other unknown keys are kept under their own names (then reported as unexpected).

    Raises:
        ValueError: a ``bias_mask`` that is not 0/1 (an uninitialized Meta model).
    """
    top = {"cls_token": "embeddings.cls_token", "storage_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
           "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "ls1.gamma": "layer_scale1.lambda1",
             "ls2.gamma": "layer_scale2.lambda1", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj",
             "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.up_proj", "mlp.w3": "mlp.down_proj"}
    layers = "model.layer" if v5_layout else "layer"
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k == "mask_token":
            out["embeddings.mask_token"] = v.reshape(1, 1, -1)
        elif k == "rope_embed.periods" or k.startswith(("cls_norm.", "local_cls_norm.")) or k.endswith(".bias_mask"):
            continue
        elif not (m := re.match(r"blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$", k)):
            out[k] = v
        elif m.group(2) == "attn.qkv":
            prefix, suffix = f"{layers}.{m.group(1)}.attention.", m.group(3)
            if suffix == ".bias":
                mask = sd.get(k + "_mask")
                if mask is not None:
                    if not torch.isin(mask, torch.tensor([0.0, 1.0], dtype=mask.dtype)).all():
                        raise ValueError(f"{k}_mask holds values other than 0 and 1: {mask.unique()[:6].tolist()}")
                    v = v * mask.to(v.dtype)
            for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                if part != "k" or suffix == ".weight" or key_bias:
                    out[f"{prefix}{part}_proj{suffix}"] = chunk
        elif m.group(2) in block:
            out[f"{layers}.{m.group(1)}.{block[m.group(2)]}{m.group(3) or ''}"] = v
        else:
            out[k] = v
    return out


def _resolve_official_dinov3_config(path: str, found: dict, arch: Optional[str], overrides: dict):
    """The config to load ``found`` (fields read off a checkpoint) into; refuse another architecture."""
    guessed = _guess_dinov3_arch(found)
    if arch is None:
        if guessed is None:
            raise ValueError(
                f"{path}: a DINOv3 of width {found['hidden_size']}, depth {found['num_hidden_layers']} "
                f"(SwiGLU={found['use_gated_mlp']}) matches no released arch; pass arch=... with "
                "arch_overrides describing it"
            )
        arch = guessed
    bias_fields = ("query_bias", "key_bias", "value_bias", "proj_bias", "mlp_bias")
    config = build_dinov3_config(arch, **{**overrides, **{f: found[f] for f in bias_fields}})
    want = {f: getattr(config, f) for f in _DINOV3_ARCH_FIELDS if f in found}
    diff = {f: (found[f], v) for f, v in want.items() if found[f] != v}
    if diff:
        raise ValueError(
            f"{path} is a DINOv3 checkpoint of another architecture ({guessed or 'unknown'!r}) than "
            f"arch={arch!r}; differing (checkpoint, requested): {diff}. Pass the arch that matches the "
            "checkpoint, or arch=None to infer it."
        )
    return arch, config


def load_official_dinov3_checkpoint(path: str, arch: Optional[str], overrides: dict) -> nn.Module:
    """Build a ``DINOv3ViTModel`` and load one of Meta's official DINOv3 ``.pth`` files into it.

    Raises:
        PretrainedWeightsUnavailable: the file does not exist.
        ValueError: the checkpoint is not a DINOv3 ViT, is another architecture than ``arch``, uses
            RoPE periods the config does not give, or lacks weights the model needs.
    """
    if not os.path.isfile(path):
        raise PretrainedWeightsUnavailable(f"official DINOv3 checkpoint {path!r} does not exist")
    sd = _unwrap_official(torch.load(path, map_location="cpu", weights_only=True))
    found = _infer_official_dinov3(sd)
    arch, config = _resolve_official_dinov3_config(path, found, arch, overrides)
    if "rope_embed.periods" in sd:
        stored = sd["rope_embed.periods"].float()
        expected = rope_periods(config.hidden_size // config.num_attention_heads, config.rope_theta)
        if not torch.allclose(stored, expected, rtol=1e-2, atol=0):
            raise ValueError(
                f"{path}: its RoPE periods {stored[:4].tolist()}... are not base**(4i/head_dim) with "
                f"base={config.rope_theta} (transformers' DINOv3ViTModel has only rope_theta); pass "
                "arch_overrides=dict(rope_theta=...) if the base differs"
            )
    model = _dinov3_model_class()(config)
    hf_sd = dinov3_official_to_hf_state_dict(sd, v5_layout=hasattr(model, "model"), key_bias=config.key_bias)
    _load_converted(model, hf_sd, path, "DINOv3")
    logger.info("Loaded official DINOv3 checkpoint %s (arch=%s)", path, arch)
    return model
