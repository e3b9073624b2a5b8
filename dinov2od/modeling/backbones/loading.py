"""Where a backbone's weights come from, for every family: hub ids, local folders, official files.

``pretrained=`` names one of

* nothing: None, ``""``, ``"None"``, ``"null"`` (random init; command-line overrides such as
  Detectron2's ``model.detector.backbone.pretrained=None`` arrive as strings);
* an official checkpoint file (``.pth``, ``.pt``, ``.bin``): read here, its keys converted by the
  family (:mod:`.dinov2`, :mod:`.dinov3`) and loaded with :func:`load_converted`;
* a local folder written by ``save_pretrained`` (``config.json`` + weights);
* a Hugging Face hub id, from the local cache, or downloaded by ``huggingface_hub`` when the hub is
  reachable (never when ``HF_HUB_OFFLINE=1``).

A relative path that does not exist from the working directory but does from the project's root
is taken from there (:func:`resolve_local_path`). Config fields that leave the weights as they are
(:data:`RUNTIME_FIELDS`: ``drop_path_rate``) are applied on top of whatever a checkpoint says, for
every source and family.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor, nn

logger = logging.getLogger("dinov2od")

__all__ = [
    "PROJECT_ROOT",
    "RUNTIME_FIELDS",
    "PretrainedWeightsUnavailable",
    "hf_folder",
    "is_official_checkpoint",
    "is_random_init",
    "load_converted",
    "load_hf_model",
    "official_depth",
    "read_hf_config",
    "read_official_state_dict",
    "resolve_local_path",
    "resolve_pretrained",
]

#: config fields a loaded checkpoint takes from the caller's overrides (they change no weight)
RUNTIME_FIELDS = ("drop_path_rate",)
_OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")
_NO_WEIGHTS = ("", "None", "none", "null")

#: the repository (or source tree) holding the ``dinov2od`` package and the project's ``weights/``
PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class PretrainedWeightsUnavailable(OSError):
    """Raised when ``pretrained`` names weights that cannot be read here."""


def is_random_init(pretrained: Optional[str]) -> bool:
    """True when ``pretrained`` names no weights (None, ``""``, ``"None"``, ``"null"``)."""
    return pretrained is None or (isinstance(pretrained, str) and pretrained.strip() in _NO_WEIGHTS)


def resolve_local_path(path: str) -> str:
    """``path`` as given when it exists (or is absolute, or a hub id); a relative path that does not
    exist from the working directory but does from the project's root (e.g.
    ``weights/dinov2od_tiny_glyphs.pth``) is taken from there, so configs run from any directory."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(PROJECT_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def resolve_pretrained(pretrained) -> Optional[str]:
    """None when ``pretrained`` names no weights, else its path (:func:`resolve_local_path`) or hub id."""
    if is_random_init(pretrained):
        return None
    return resolve_local_path(os.fspath(pretrained))


def is_official_checkpoint(path: str) -> bool:
    """Whether a resolved ``pretrained`` is an official checkpoint file rather than a folder or hub id."""
    return path.endswith(_OFFICIAL_SUFFIXES) and not os.path.isdir(path)


def runtime_overrides(overrides: dict) -> dict:
    """The :data:`RUNTIME_FIELDS` that ``overrides`` sets (non-zero), for ``from_pretrained``."""
    return {k: overrides[k] for k in RUNTIME_FIELDS if overrides.get(k)}


# ---------------------------------------------------------------------- Hugging Face ids and folders
def _is_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    if env.upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


def _download_hub(repo_id: str, family: str, known: Iterable[str]) -> str:
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


def _folder_error(folder: str, family: str, model_name: str, reason: str) -> PretrainedWeightsUnavailable:
    return PretrainedWeightsUnavailable(
        f"could not load {family} weights from the folder {folder!r}: {reason}. The folder must "
        f"hold a {model_name} saved with save_pretrained (config.json + model.safetensors)."
    )


def hf_folder(pretrained: str, family: str, model_name: str, known: Iterable[str], example: str) -> str:
    """The ``save_pretrained`` folder of ``pretrained`` (a folder, or a hub id fetched into the cache).

    Args:
        family, model_name: for messages (``"DINOv2"``, ``"Dinov2Model"``).
        known: the family's hub ids (listed when a download fails); example: one of them.

    Raises:
        PretrainedWeightsUnavailable: a file that is no official checkpoint, a path that does not
            exist, a hub id that cannot be fetched, a folder without ``config.json``.
    """
    is_dir = os.path.isdir(pretrained)
    if os.path.isfile(pretrained) or (not is_dir and pretrained.startswith((".", os.sep))):
        raise PretrainedWeightsUnavailable(
            f"pretrained={pretrained!r} is neither a save_pretrained folder, an official {family} .pth "
            f"file, nor a Hugging Face id (like {example!r})"
        )
    folder = pretrained if is_dir else _download_hub(pretrained, family, known)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise _folder_error(folder, family, model_name, "it has no config.json")
    return folder


def read_hf_config(folder: str, family: str, model_name: str):
    """``AutoConfig`` of a ``save_pretrained`` folder; a folder it cannot read is PretrainedWeightsUnavailable."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except OSError as e:
        raise _folder_error(folder, family, model_name, str(e)) from e


def load_hf_model(model_class, folder: str, family: str, overrides: dict) -> nn.Module:
    """``model_class.from_pretrained(folder)`` with the :data:`RUNTIME_FIELDS` of ``overrides`` applied
    (so ``drop_path_rate`` means the same for a hub/folder checkpoint as for random init)."""
    try:
        return model_class.from_pretrained(folder, **runtime_overrides(overrides))
    except OSError as e:
        raise _folder_error(folder, family, model_class.__name__, str(e)) from e


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


def read_official_state_dict(path: str, family: str) -> Dict[str, Tensor]:
    """The ViT weights of an official (Meta) checkpoint file, wrappers and prefixes removed.

    Raises:
        PretrainedWeightsUnavailable: the file does not exist.
        ValueError: it holds no state dict of tensors.
    """
    if not os.path.isfile(path):
        raise PretrainedWeightsUnavailable(f"official {family} checkpoint {path!r} does not exist")
    return _unwrap_official(torch.load(path, map_location="cpu", weights_only=True))


def official_depth(sd: Dict[str, Tensor]) -> int:
    """The number of blocks (``blocks.N.``) of an official state dict."""
    return 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m)


def load_converted(model: nn.Module, hf_sd: Dict[str, Tensor], path: str, family: str) -> None:
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
