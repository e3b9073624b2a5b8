"""Reading and writing weights files without running code from them.

A ``.pth`` file is a pickle, and unpickling can call any Python function the file names: a
checkpoint from elsewhere is code unless it is read with a restricted unpickler. Every reader of
dinov2od (the Detectron2 checkpointer, ``DefaultPredictor``, ``tools/*``, the plain
:meth:`DINOv2ObjectDetector.load_checkpoint`) goes through :func:`load_state`:

* ``.safetensors``: read with ``safetensors`` (tensors and a string header only: nothing to run).
* any other file: ``torch.load(..., weights_only=True)`` (tensors, dicts, lists, tuples, numbers,
  strings); a plain pickle such as Detectron2's ``.pkl`` model-zoo files: an unpickler that
  imports nothing.
* a file that needs more (any other class or function) is refused with
  :class:`UnsafeCheckpointError`, naming the file, what the unpickler refused and the opt-in:
  list the file in the environment variable ``DINOV2OD_TRUSTED_CHECKPOINTS`` (paths separated by
  ``os.pathsep``, compared after resolving links), or pass ``trusted=True`` in Python. A trusted
  file is unpickled in full, with a warning.

The project's own checkpoints are saved so that the restricted reader loads them
(:func:`plain_state`), and :func:`save_safetensors` writes the recommended exchange format.
This module imports neither Detectron2 nor anything outside torch + safetensors.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = [
    "TRUSTED_ENV",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "atomic_write",
    "detector_arguments",
    "export_for_inference",
    "exported_info",
    "is_trusted",
    "load_state",
    "not_weights_only",
    "plain_state",
    "read_safetensors_metadata",
    "save_safetensors",
    "trusted_paths",
]

logger = logging.getLogger("dinov2od")

#: The environment variable naming the files that may be unpickled in full (``os.pathsep``-separated).
TRUSTED_ENV = "DINOV2OD_TRUSTED_CHECKPOINTS"

# what the restricted unpicklers report for a class or function they will not import / call
_REFUSED = re.compile(
    r"unsupported (class|global)|not an allowed global|unrecognized function|can only (build|create)"
    r"|instantiate unsupported|refuses to import", re.IGNORECASE)


class UnsafeCheckpointError(ValueError):
    """A weights file that only full unpickling (which can run code) would read.

    Attributes:
        path: the file. reason: what the restricted unpickler refused (e.g. the global it names).
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        real = os.path.realpath(path)
        old = (" Training checkpoints of earlier dinov2od versions hold numpy's random state this way."
               if "numpy" in reason else "")
        super().__init__(
            f"Refusing to load {path}: it needs full unpickling, which can run code ({reason}).{old} If you "
            f"trust this file, opt in by name: {TRUSTED_ENV}={real} (or trusted=True in Python), and "
            "convert it once to .safetensors with tools/convert_checkpoint.py. See SECURITY.md.")


class UnreadableCheckpointError(ValueError):
    """A weights file that is truncated or corrupt (or not a weights file at all).

    Attributes:
        path: the file. reason: the reader's error. error: the exception it raised.
    """

    def __init__(self, path: str, error: BaseException):
        self.path, self.error = path, error
        self.reason = _first_line(error)
        super().__init__(f"Cannot read {path}: it is truncated or corrupt ({type(error).__name__}: {self.reason}).")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file that replaces ``path`` only once it is completely written.

    On leaving the block the file is flushed and fsynced, renamed to ``path`` and the folder is
    fsynced (so the rename itself survives a power cut). If the block raises, ``path`` is left
    as it was and the temporary file is removed. The temporary file, ``<path>.tmp.<pid>``, is
    the writer's own: processes writing the same name at once never share one.

    Args:
        path: the final file name.
        mode: "wb" or "w".
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            # fsync cannot be observed by a test: its effect shows only after a power cut or kernel
            # crash. Without it, os.replace can give the final name to a file whose bytes are still
            # only in the page cache, and such a crash leaves an empty or truncated checkpoint under
            # that name. Keep it, and the folder fsync below (it makes the rename durable).
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _fsync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def trusted_paths() -> List[str]:
    """The resolved paths listed in ``DINOV2OD_TRUSTED_CHECKPOINTS``."""
    return [os.path.realpath(p) for p in os.environ.get(TRUSTED_ENV, "").split(os.pathsep) if p.strip()]


def is_trusted(path: str) -> bool:
    """Whether ``path`` is named in ``DINOV2OD_TRUSTED_CHECKPOINTS`` (after resolving links)."""
    return os.path.realpath(path) in trusted_paths()


class _NoImportUnpickler(pickle.Unpickler):
    """A pickle reader for plain data: containers, numbers, strings (no class, no function)."""

    _ALLOWED = {("collections", "OrderedDict"): OrderedDict}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"the plain-data reader refuses to import {module}.{name}")


def _unpickler_reason(error: BaseException) -> str:
    """What torch's weights-only unpickler refused, from its message (torch 2.3: "... WeightsUnpickler
    error: Unsupported class X"; newer: "Unsupported global: GLOBAL X was not an allowed global ...")."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.rsplit("WeightsUnpickler error:", 1)[1]
    text = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    text = re.split(r"\.\s+(?=[A-Z(])", text)[0]  # the first sentence (dotted names stay whole)
    return text[:300]


def load_state(path: str, trusted: bool = False) -> Any:
    """Read a weights file (on the CPU) without running code from it.

    Args:
        path: ``.safetensors`` (a flat ``{name: tensor}``), or a ``torch.save`` file / plain
            pickle (``.pth``, ``.pt``, ``.pkl``, ...).
        trusted: unpickle in full (the caller trusts this file); also true for the files named in
            ``DINOV2OD_TRUSTED_CHECKPOINTS``. A warning names the file.

    Returns:
        what the file holds (for ``.safetensors`` a dict of tensors).

    Raises:
        UnsafeCheckpointError: the file needs full unpickling and is not trusted.
        UnreadableCheckpointError: the file is truncated or corrupt.
        FileNotFoundError: it does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Weights file {path} does not exist.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001  (safetensors' own error type: a bad header or size)
            raise UnreadableCheckpointError(path, e) from e
    plain_pickle = path.endswith(".pkl")
    if trusted or is_trusted(path):
        logger.warning("Unpickling %s in full (trusted by %s): any code it names runs.", path,
                       "trusted=True" if trusted else TRUSTED_ENV)
        try:
            if plain_pickle:
                with open(path, "rb") as f:
                    return pickle.load(f, encoding="latin1")
            return torch.load(path, map_location="cpu", weights_only=False)
        except (RuntimeError, EOFError, pickle.UnpicklingError, UnicodeDecodeError, ValueError) as e:
            raise UnreadableCheckpointError(path, e) from e
    try:
        if plain_pickle:
            with open(path, "rb") as f:
                return _NoImportUnpickler(f, encoding="latin1").load()
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _unpickler_reason(e)
        if _REFUSED.search(reason):
            raise UnsafeCheckpointError(path, reason) from None
        raise UnreadableCheckpointError(path, e) from e
    except (RuntimeError, EOFError, UnicodeDecodeError, ValueError, AttributeError, KeyError, IndexError) as e:
        raise UnreadableCheckpointError(path, e) from e


# ---------------------------------------------------------------------------- saving
# what torch.load(weights_only=True) reads back on torch 2.3 and newer (dtypes and devices as
# values are left out: torch 2.3 allows only some dtypes and no devices)
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def plain_state(obj: Any) -> Any:
    """``obj`` with config containers (omegaconf's ``ListConfig`` / ``DictConfig``, any mapping or
    sequence type) turned into dicts and lists and numpy scalars into Python numbers; tensors are
    not copied. What it cannot turn into plain data (e.g. a numpy array, an object) stays as it is:
    :func:`not_weights_only` lists it."""
    if isinstance(obj, (torch.Tensor, torch.Size)) or type(obj) in _SCALARS:  # exact: np.float64 is a float
        return obj
    if type(obj).__module__ == "numpy" and hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        return obj.item()  # np.float64(0.9) -> 0.9
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, plain_state(v)) for k, v in obj.items())
    if isinstance(obj, dict) or (isinstance(obj, Mapping) and type(obj).__module__.startswith("omegaconf")):
        return {plain_state(k): plain_state(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain_state(v) for v in obj)
    if isinstance(obj, list) or (isinstance(obj, Sequence) and type(obj).__module__.startswith("omegaconf")):
        return [plain_state(v) for v in obj]
    return obj


def not_weights_only(obj: Any, path: str = "", limit: int = 5) -> List[str]:
    """The entries of ``obj`` (e.g. ``['trainer']['hooks']['X']``) that ``torch.load(weights_only=True)``
    would refuse, with their types; at most ``limit``."""
    found: List[str] = []

    def walk(o, where):
        if len(found) >= limit:
            return
        if isinstance(o, (torch.Tensor, torch.Size)) or type(o) in _SCALARS:
            return
        if type(o) in (dict, OrderedDict):
            for k, v in o.items():
                if type(k) not in _SCALARS:
                    found.append(f"{where} (key of type {type(k).__name__})")
                walk(v, f"{where}[{k!r}]")
        elif type(o) in (list, tuple):
            for i, v in enumerate(o):
                walk(v, f"{where}[{i}]")
        else:
            found.append(f"{where or 'the object'} ({type(o).__module__}.{type(o).__qualname__})")

    walk(obj, path)
    return found


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> str:
    """Write ``tensors`` as ``path`` (``.safetensors``) through a temporary file renamed into place.

    Tensors are moved to the CPU and made contiguous; a tensor sharing storage with another one
    (tied weights) is copied, as the format requires.

    Args:
        tensors: ``{name: tensor}`` (numpy arrays are converted).
        metadata: string header entries (``safetensors`` stores only strings).

    Returns:
        the path written.
    """
    from safetensors.torch import save

    out, seen = {}, set()
    for k, v in tensors.items():
        t = torch.as_tensor(v).detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    with atomic_write(path, "wb") as f:
        f.write(save(out, metadata=metadata))
    return path


def read_safetensors_metadata(path: str) -> Dict[str, str]:
    """The string header of a ``.safetensors`` file (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001
        raise UnreadableCheckpointError(path, e) from e


def exported_info(path: str) -> Tuple[Optional[dict], str]:
    """The description of an exported ``.safetensors`` file: the JSON beside it (same name,
    ``.json``), else the copy in the file's header (key ``"dinov2od"``); ``(None, "")`` if neither.

    Returns:
        (the parsed JSON, where it was read from).
    """
    beside = os.path.splitext(path)[0] + ".json"
    if os.path.isfile(beside):
        with open(beside) as f:
            return json.load(f), beside
    text = read_safetensors_metadata(path).get("dinov2od") if path.endswith(".safetensors") else None
    return (json.loads(text), f"{path} (header)") if text else (None, "")


# ---------------------------------------------------------------------------- export for inference
#: ``format`` of the JSON beside an exported ``.safetensors`` (docs/deployment.md describes its fields)
EXPORT_FORMAT = "dinov2od-weights/1"


def _shapes(state: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def detector_arguments(detector) -> Tuple[Optional[dict], str]:
    """The keyword arguments that rebuild ``detector`` (:attr:`DINOv2ObjectDetector.constructor_args`)
    without downloading anything, and a note on how far they were checked.

    ``backbone.pretrained`` is dropped (the exported file holds every weight) when a detector built
    without it, on the meta device, has the same keys and shapes; otherwise the arguments are kept
    as configured (rebuilding then reads ``pretrained`` for the architecture).
    """
    args = getattr(detector, "constructor_args", None)
    if not args:
        return None, ("the detector was built from modules (a neck, decoder or backbone not made by "
                      "build_backbone): rebuild it with the config it was trained with")
    candidate = json.loads(json.dumps(args))
    backbone = candidate.get("backbone") or {}
    how = "checked: DINOv2ObjectDetector(**detector_kwargs) has this file's keys and shapes"
    if backbone.get("pretrained") not in (None, "", "None"):
        how += f"; backbone.pretrained ({backbone['pretrained']}) was dropped: the file holds every weight"
    backbone["pretrained"] = None
    try:
        quiet = logging.getLogger("dinov2od")
        level = quiet.level
        quiet.setLevel(logging.WARNING)
        try:
            with torch.device("meta"):
                fresh = type(detector)(**candidate)  # DINOv2ObjectDetector (not imported: it imports this module)
        finally:
            quiet.setLevel(level)
    except Exception as e:  # noqa: BLE001  (any reason the rebuild fails: keep the arguments as given)
        return args, f"as configured; not checked ({type(e).__name__}: {_first_line(e)})"
    if _shapes(fresh.state_dict()) != _shapes(detector.state_dict()):
        return args, ("as configured: without backbone.pretrained the architecture differs, so rebuilding "
                      "reads it (a Hugging Face id, folder or .pth) for the architecture")
    return candidate, how


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def export_for_inference(model, path: str, weights: Optional[Dict[str, torch.Tensor]] = None,
                         **extra: Any) -> Tuple[str, str]:
    """Write a model's weights as ``path`` (``.safetensors``) and a JSON beside it (``.json``) with
    what is needed to use them: classes, the detector's constructor arguments, the
    meta-architecture's input settings.

    Args:
        model: a ``DINOv2ObjectDetector``, or a module holding one as ``.detector`` (the Detectron2
            meta-architecture, whose ``input_format``, ``pixel_mean``/``pixel_std``,
            ``size_divisibility`` and ``test_topk`` are recorded too); None: only ``weights`` are
            known (no constructor arguments, the class count from the class metadata).
        path: the ``.safetensors`` file to write.
        weights: the ``state_dict`` to write (default: ``model.state_dict()``; e.g. EMA weights).
        **extra: more JSON fields (e.g. ``ema_updates``, ``config_file``).

    Returns:
        (the ``.safetensors`` path, the ``.json`` path). The JSON is also stored in the file's header
        (key ``"dinov2od"``), so the file alone carries it.
    """
    from dinov2od import __version__

    from .classes import decode_class_metadata

    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: the exported weights file must end with .safetensors")
    weights = dict(model.state_dict() if weights is None else weights)
    detector = getattr(model, "detector", model)
    meta_key = next((k for k in ("detector.class_metadata", "class_metadata") if k in weights), None)
    classes = decode_class_metadata(torch.as_tensor(weights[meta_key])) if meta_key else None
    if model is None:
        kwargs, note = None, ("converted without the model: build DINOv2ObjectDetector with the config it "
                              "was trained with (or convert with --config-file)")
    else:
        kwargs, note = detector_arguments(detector)
    prefixed = any(str(k).startswith("detector.") for k in weights)
    info: Dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "weights": os.path.basename(path),
        "state_dict_of": "DINOv2DETR (keys detector.*)" if prefixed else "DINOv2ObjectDetector",
        "num_classes": int(getattr(detector, "num_classes", 0) or (len(classes[0]) if classes else 0)) or None,
        "class_names": classes[0] if classes else None,
        "category_ids": classes[1] if classes else None,
        "detector_kwargs": kwargs,
        "detector_kwargs_note": note,
        "meta_architecture": None,
        "versions": {"dinov2od": __version__, "torch": torch.__version__},
    }
    if model is not None and detector is not model and hasattr(model, "input_format"):
        info["meta_architecture"] = {
            "input_format": model.input_format,
            "pixel_mean": [float(v) for v in model.pixel_mean.flatten()],  # 0-255, in input_format order
            "pixel_std": [float(v) for v in model.pixel_std.flatten()],
            "size_divisibility": int(getattr(model, "size_divisibility", 0)),
            "test_topk": int(getattr(model, "test_topk", 100)),
        }
    info.update(plain_state(extra))
    save_safetensors(weights, path, {"format": "pt", "dinov2od": json.dumps(info)})
    info["sha256"] = _sha256(path)
    json_path = os.path.splitext(path)[0] + ".json"
    with atomic_write(json_path, "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return path, json_path
