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
is taken from there (:func:`resolve_local_path`). :func:`hub_weights_problem` says, without
loading anything, whether a hub id can be had here (cached, or the hub answers within a few
seconds); ``tools/train_net.py`` asks it at start-up. Config fields that leave the weights as they are
(:data:`RUNTIME_FIELDS`: ``drop_path_rate``) are applied on top of whatever a checkpoint says, for
every source and family.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from typing import Dict, Iterable, Optional

import torch
from torch import Tensor, nn

logger = logging.getLogger("dinov2od")

__all__ = [
    "HUB_PROBE_TIMEOUT",
    "PROJECT_ROOT",
    "RUNTIME_FIELDS",
    "PretrainedWeightsUnavailable",
    "cached_hub_folder",
    "hf_folder",
    "hub_id",
    "hub_weights_problem",
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
def _truthy(value: str) -> bool:
    return value.upper() in ("1", "ON", "YES", "TRUE")


def _is_offline() -> bool:
    if _truthy(os.environ.get("HF_HUB_OFFLINE", "")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE", "")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover
        return False


#: seconds a start-up look-up waits for the hub's answer (:func:`hub_weights_problem`)
HUB_PROBE_TIMEOUT = 5.0


def hub_id(pretrained) -> Optional[str]:
    """The Hugging Face hub id that ``pretrained`` names, or None: no weights, or a local path (one that
    exists, an official checkpoint's name, or a path starting with ``.``, ``/`` or ``~``).

    The same reading as the loaders': whatever is not one of those is fetched as a hub id.
    """
    path = resolve_pretrained(pretrained)
    if path is None or os.path.exists(path) or is_official_checkpoint(path) or os.path.isabs(path):
        return None
    if path.startswith((".", os.sep, "~")):
        return None
    return path


def cached_hub_folder(repo_id: str) -> Optional[str]:
    """The folder of ``repo_id`` in the local Hugging Face cache when it holds a ``config.json`` and
    ``.safetensors`` weights (what the loaders read), else None. Never asks the hub."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"], local_files_only=True)
    except Exception:  # noqa: BLE001  (not cached, an invalid id, no huggingface_hub)
        return None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return None
    if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
        return None
    return folder


def _ask_hub(repo_id: str, timeout: float) -> Optional[str]:
    """None when the hub answers that it has ``repo_id``, else why not. The question runs in a daemon
    thread that is waited for ``timeout`` + 1 s at most, so a DNS look-up that hangs (which requests'
    timeout does not cover) cannot hold the caller longer."""
    answer: Dict[str, Optional[str]] = {}

    def ask() -> None:
        try:
            from huggingface_hub import HfApi

            HfApi().model_info(repo_id, timeout=timeout)
            answer["reason"] = None
        except Exception as e:  # noqa: BLE001
            name = type(e).__name__
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            first = first if len(first) <= 160 else first[:157] + "..."
            if name in ("RepositoryNotFoundError", "GatedRepoError"):
                answer["reason"] = (f"the Hugging Face hub has no model {repo_id!r} that it lets this machine "
                                    f"read ({name}: {first})")
            else:
                answer["reason"] = f"the Hugging Face hub did not answer ({name}: {first})"

    thread = threading.Thread(target=ask, name="dinov2od-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        return f"the Hugging Face hub did not answer within {timeout:g} s"
    return answer.get("reason", "the Hugging Face hub look-up failed")


def hub_weights_problem(pretrained, timeout: float = HUB_PROBE_TIMEOUT) -> Optional[str]:
    """Why the hub id that ``pretrained`` names cannot be loaded here, found before anything is loaded;
    None when it can (or when ``pretrained`` names no weights or a local path: those are read from disk).

    An id in the local cache (:func:`cached_hub_folder`) can. Else, with ``HF_HUB_OFFLINE=1`` (or
    ``TRANSFORMERS_OFFLINE=1``) it cannot; otherwise the hub is asked whether it has the model, once,
    waiting ``timeout`` seconds at most (an answer: the loader downloads it; no answer, an error or
    an unknown id: the reason).

    Returns:
        None, or a sentence such as ``"HF_HUB_OFFLINE=1 is set and 'facebook/dinov2-small' is not in
        the Hugging Face cache (/root/.cache/huggingface/hub)"``.
    """
    repo_id = hub_id(pretrained)
    if repo_id is None or cached_hub_folder(repo_id) is not None:
        return None
    try:
        from huggingface_hub import constants

        cache = f" ({constants.HF_HUB_CACHE})"
    except ImportError:  # pragma: no cover
        cache = ""
    not_cached = f"{repo_id!r} is not in the Hugging Face cache{cache}"
    if _is_offline():
        flag = next((k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if _truthy(os.environ.get(k, ""))),
                    "HF_HUB_OFFLINE")
        return f"{flag}=1 is set and {not_cached}"
    reason = _ask_hub(repo_id, timeout)
    return None if reason is None else f"{reason}, and {not_cached}"


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
