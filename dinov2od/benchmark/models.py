"""The models the whole-model benchmark measures: presets, backbones, inputs, the ``--dtypes`` variants.

Presets are the lazy model configs (``configs/common/models/dinov2_detr.py``, ``..._efficient.py``
and the demo's ``configs/shapes.py``), random-initialized; without Detectron2 the default and
efficient presets are built from :data:`PLAIN_PRESETS` (``dinov2od.modeling.PRESETS``: the same
models; tests/d2/test_configs.py).
Backbones are named in :data:`BACKBONES` (one line each).
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional, Tuple

import torch

from dinov2od.layers.inference_options import inference_options
from dinov2od.modeling import BACKBONES as FAMILIES
from dinov2od.modeling import PRESETS as MODEL_PRESETS
from dinov2od.modeling import DINOv2ObjectDetector

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
PRESETS = {
    "default": "configs/common/models/dinov2_detr.py",
    "efficient": "configs/common/models/dinov2_detr_efficient.py",
    "demo": "configs/shapes.py",
    "demo-efficient": "configs/shapes_efficient.py",  # the demo with the efficient preset's changes
}
DEMO_OVERRIDES: List[str] = []  # --demo-overrides: LazyConfig overrides of the demo presets (key=value)


def is_demo(preset: str) -> bool:
    """Whether ``preset`` is a demo preset: its own tiny ViT, sized in px (``--demo-size``)."""
    return preset.startswith("demo")


def _backbone(**overrides) -> Tuple[dict, int]:
    """(keyword overrides of the preset's backbone, the patch size of their family in the registry)."""
    return overrides, FAMILIES[overrides.get("family", "dinov2")].default_patch_size


# Backbones by name: keyword overrides of the preset's backbone (any registered family), and the patch
# size (sizes given in px for 14-px patches are scaled so that every backbone sees the same token grid).
BACKBONES: Dict[str, Tuple[dict, int]] = {
    "vits14": _backbone(arch="small"),
    "vitb14": _backbone(arch="base"),
    "dinov3-s16": _backbone(family="dinov3", arch="small"),  # 512 px = DINOv2-S/14's 448 px token grid
}


# Without Detectron2 (the modern stack, the GPU machine) the lazy configs cannot be read; the presets'
# keyword overrides of DINOv2ObjectDetector's defaults (dinov2od.modeling.PRESETS, which the lazy
# preset configs apply too) give the same models (tests/d2/test_configs.py checks it).
PLAIN_PRESETS = MODEL_PRESETS


def build_model(backbone: str, preset: str, device: str) -> Tuple[DINOv2ObjectDetector, Optional[torch.nn.Module]]:
    """A random-initialized (detector, criterion) of ``preset`` with ``backbone``'s ViT (the demo
    preset keeps its own tiny ViT). Without Detectron2: the detector of :data:`PLAIN_PRESETS` and
    no criterion."""
    overrides, _ = BACKBONES[backbone]
    try:
        from detectron2.config import LazyConfig, instantiate
    except ImportError:
        if preset not in PLAIN_PRESETS:
            raise RuntimeError(f"preset {preset!r} is read from a lazy config, which needs Detectron2")
        kwargs = dict(PLAIN_PRESETS[preset])
        kwargs["backbone"] = dict(kwargs.get("backbone", {}), **overrides, pretrained=None)
        return DINOv2ObjectDetector(num_classes=80, **kwargs).to(device), None
    cfg = LazyConfig.load(os.path.join(ROOT, PRESETS[preset]))
    if is_demo(preset) and DEMO_OVERRIDES:
        from dinov2od.d2.config import check_lazy_overrides  # a misspelt key is an error, as in train_net

        check_lazy_overrides(cfg, DEMO_OVERRIDES, PRESETS[preset])
        cfg = LazyConfig.apply_overrides(cfg, DEMO_OVERRIDES)
    bb = cfg.model.detector.backbone
    bb.pretrained = None
    if not is_demo(preset):
        bb.update(overrides)
        bb.arch_overrides = {}
    meta = instantiate(cfg.model)
    return meta.detector.to(device), meta


def token_size(px: int, backbone: str) -> int:
    """``px`` (for 14-px patches) -> the size giving ``backbone`` the same token grid."""
    return round(px / 14 * BACKBONES[backbone][1])


def random_targets(batch: int, num_classes: int, device: str, n: int = 5) -> List[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        cxcy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=g).to(device),
                    "boxes": torch.cat([cxcy, wh], 1).to(device)})
    return out



def variant(model: DINOv2ObjectDetector, dtype: str, device: str, quantized: dict):
    """What a ``--dtypes`` entry runs: ``(module, autocast dtype, plain path)``, or None where it does
    not apply (``int8`` and ``fp32-plain`` are CPU paths). ``quantized`` caches the int8 copy."""
    if dtype in ("int8", "fp32-plain", "bf16-plain") and device.split(":")[0] != "cpu":
        return None
    if dtype == "int8":
        if "int8" not in quantized:
            from dinov2od.modeling.quantize import quantize_dynamic_int8

            quantized["int8"] = quantize_dynamic_int8(model)
        return quantized["int8"], "fp32", False
    plain = dtype.endswith("-plain")
    return model, (dtype[: -len("-plain")] if plain else dtype), plain



@contextlib.contextmanager
def plain_path(model: torch.nn.Module, on: bool = True):
    """The ``fp32-plain`` rows: the CPU inference path off, for an A/B in one run: the inference
    option ``fused_linear`` off (no fused ViT blocks, no oneDNN products, no AVX-512 attention;
    :mod:`dinov2od.layers.inference_options`) and one value projection per decoder layer (the
    decoder's own ``stack_value_proj``, set on ``model``'s decoder for the block, restored after)."""
    if not on:
        yield
        return
    decoder = getattr(model, "decoder", None)
    had = decoder is not None and "stack_value_proj" in vars(decoder)
    previous = vars(decoder).get("stack_value_proj") if decoder is not None else None
    try:
        if decoder is not None:
            decoder.stack_value_proj = False
        with inference_options(fused_linear=False):
            yield
    finally:
        if decoder is not None:
            if had:
                decoder.stack_value_proj = previous
            else:
                del decoder.stack_value_proj
