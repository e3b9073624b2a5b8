"""The backbone's pretrained weights, checked before anything else: a hub id that cannot be had
here stops the run at once with the ways on."""
from __future__ import annotations

from typing import Optional

from .style import is_lazy

__all__ = ["WeightsUnavailableError", "backbone_option", "check_backbone_weights"]


class WeightsUnavailableError(OSError):
    """The backbone's pretrained weights name a hub id that cannot be had here (offline, not cached)."""


def _official_dinov2_file(repo_id: str) -> str:
    """Meta's file name of a DINOv2 hub id's weights (``dinov2_vits14_pretrain.pth``), else ``""``."""
    from dinov2od.modeling.backbones.dinov2 import HUB_IDS

    if repo_id not in HUB_IDS:
        return ""
    arch, registers = HUB_IDS[repo_id]
    return f"dinov2_vit{arch[0]}14{'_reg4' if registers else ''}_pretrain.pth"


def backbone_option(cfg, name: str):
    """The backbone's option ``name`` (e.g. ``"pretrained"``, ``"arch"``) in a lazy config
    (``model.detector.backbone.<name>``, None when unset) or a yacs one (``MODEL.DINOV2OD.BACKBONE.<NAME>``)."""
    if is_lazy(cfg):
        from omegaconf import OmegaConf

        return OmegaConf.select(cfg, f"model.detector.backbone.{name}", default=None)
    return cfg.MODEL.DINOV2OD.BACKBONE.get(name.upper(), None)


def check_backbone_weights(cfg, path: str = "the config", timeout: Optional[float] = None) -> None:
    """Stop at once when the backbone's ``pretrained`` is a Hugging Face hub id that cannot be loaded
    here: not in the local cache, and ``HF_HUB_OFFLINE=1`` or the hub does not answer within
    ``timeout`` seconds (:func:`dinov2od.modeling.backbones.loading.hub_weights_problem`). Local
    folders and files, cached ids and no weights pass without a look-up.

    Raises:
        WeightsUnavailableError: naming the id, the reason, and the three ways on: a
            ``save_pretrained`` folder or Meta's ``.pth`` for the config key, or the offline config
            ``configs/custom_tiny.py`` (yacs: ``configs/yaml/custom_tiny.yaml``).
    """
    from dinov2od.modeling.backbones.loading import HUB_PROBE_TIMEOUT, hub_id, hub_weights_problem

    lazy = is_lazy(cfg)
    repo_id = hub_id(backbone_option(cfg, "pretrained"))
    if repo_id is None:
        return
    problem = hub_weights_problem(repo_id, HUB_PROBE_TIMEOUT if timeout is None else timeout)
    if problem is None:
        return
    key = "model.detector.backbone.pretrained" if lazy else "MODEL.DINOV2OD.BACKBONE.PRETRAINED"
    sep = "=" if lazy else " "
    tiny, other = ("configs/custom_tiny.py", "configs/yaml/custom_tiny.yaml") if lazy else (
        "configs/yaml/custom_tiny.yaml", "configs/custom_tiny.py")
    folder = repo_id.rsplit("/", 1)[-1]
    official = _official_dinov2_file(repo_id)
    pth = f"/path/to/{official}" if official else "/path/to/meta_checkpoint.pth"
    raise WeightsUnavailableError(
        f"The backbone's weights {repo_id!r} ({key} in {path}) cannot be loaded here: {problem}. "
        "Stopped before reading the data or training. Either\n"
        f"  - fetch them once where the hub is reachable, `huggingface-cli download {repo_id} --local-dir "
        f"{folder}` (or `hf download`; a folder as transformers' save_pretrained writes it: config.json + "
        f"model.safetensors), bring the folder here and add {key}{sep}/path/to/{folder};\n"
        f"  - or use Meta's official checkpoint of the same ViT: {key}{sep}{pth};\n"
        f"  - or train offline with the project's own tiny backbone (nothing to download; made for the CPU "
        f"demo, pretrained on generated glyphs, not photographs): --config-file {tiny} (the other config "
        f"style: {other})."
    )
