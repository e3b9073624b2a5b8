"""Files are data, never code: every checkpoint is read by :func:`load_checkpoint_file`
(``.safetensors``, or ``torch.load(weights_only=True)``; a file that needs full unpickling is
refused unless named in ``DINOV2OD_TRUSTED_CHECKPOINTS``), also by Detectron2's own
``DetectionCheckpointer`` (``DefaultPredictor``) for dinov2od models: importing this module installs
the reader there (SECURITY.md). A file that cannot be read is named with the newest complete
checkpoint beside it.
"""
from __future__ import annotations

import glob
import os
from urllib.parse import parse_qs

import torch

from detectron2.checkpoint import DetectionCheckpointer

from dinov2od.modeling.checkpoint_io import UnreadableCheckpointError, load_state

from .run_folder import complete_archive

__all__ = ["load_checkpoint_file"]


def load_checkpoint_file(checkpointer, filename: str) -> dict:
    """``DetectionCheckpointer._load_file`` without running code from the file: ``filename`` is read
    by :func:`~dinov2od.modeling.checkpoint_io.load_state` (``.safetensors``, or ``torch.load`` with
    ``weights_only=True``; a file that needs full unpickling is refused unless named in
    ``DINOV2OD_TRUSTED_CHECKPOINTS``, Detectron2's ``.pkl`` model-zoo files included).

    Returns what Detectron2's reader does: ``{"model": state_dict, ...}`` (a bare ``state_dict`` or a
    ``.safetensors`` file is wrapped; a plain ``DINOv2ObjectDetector`` ``state_dict`` loaded into the
    meta-architecture gets its ``detector.`` prefix).

    Raises:
        UnsafeCheckpointError: (a ``ValueError``) the file needs full unpickling and is not trusted.
        ValueError: the file is truncated or corrupt, naming the newest complete checkpoint beside it.
    """
    try:
        data = load_state(filename)
    except UnreadableCheckpointError as e:
        raise ValueError(_unreadable_message(filename, e.error)) from e.error
    if filename.endswith(".pkl"):  # trusted by name, or plain data
        if isinstance(data, dict) and "model" in data and "__author__" in data:  # Detectron2's model zoo
            return data
        blobs = data.get("blobs", data) if isinstance(data, dict) else {}  # Caffe2 / Detectron1
        return {"model": {k: v for k, v in blobs.items() if not k.endswith("_momentum")},
                "__author__": "Caffe2", "matching_heuristics": True}
    if not isinstance(data, dict) or "model" not in data:
        data = {"model": data}
    data["model"] = _with_detector_prefix(checkpointer.model, data["model"])
    parsed = getattr(checkpointer, "_parsed_url_during_load", None)
    if parsed is not None and parsed.query:  # Detectron2's "?matching_heuristics=True"
        queries = parse_qs(parsed.query)
        if queries.pop("matching_heuristics", None) == ["True"]:
            data["matching_heuristics"] = True
        if queries:
            raise ValueError(f"Unsupported query {sorted(queries)} in {parsed.geturl()}")
    return data


def _with_detector_prefix(model, state):
    """A plain ``DINOv2ObjectDetector`` ``state_dict`` for the meta-architecture: keys ``detector.*``."""
    detector = getattr(getattr(model, "module", model), "detector", None)
    if not isinstance(detector, torch.nn.Module) or not isinstance(state, dict) or not state:
        return state
    if any(str(k).startswith("detector.") for k in state):
        return state
    own = set(detector.state_dict())
    if 2 * len(own.intersection(state)) < len(state):
        return state
    return {f"detector.{k}": v for k, v in state.items()}


def _is_dinov2od_model(model) -> bool:
    from dinov2od.modeling import DINOv2ObjectDetector

    m = getattr(model, "module", model)
    return isinstance(m, DINOv2ObjectDetector) or isinstance(getattr(m, "detector", None), DINOv2ObjectDetector)


def _detectron2_load_file(self, filename: str):
    """``DetectionCheckpointer._load_file`` as installed by dinov2od: a dinov2od model's weights
    (``DefaultPredictor``'s ``MODEL.WEIGHTS``, ``DefaultTrainer``) are read by
    :func:`load_checkpoint_file`, without running code; other models' as Detectron2 reads them."""
    if _is_dinov2od_model(self.model):
        return load_checkpoint_file(self, filename)
    return _detectron2_load_file.original(self, filename)


if not hasattr(DetectionCheckpointer._load_file, "original"):  # once, also if this module is reloaded
    _detectron2_load_file.original = DetectionCheckpointer._load_file
    DetectionCheckpointer._load_file = _detectron2_load_file


def _unreadable_message(path: str, error: Exception) -> str:
    """The error for a checkpoint that cannot be read, naming the newest complete one beside it
    (checked without unpickling anything: :func:`~dinov2od.d2.checkpoint.run_folder.complete_archive`)."""
    folder = os.path.dirname(os.path.abspath(path))
    others = [p for p in glob.glob(os.path.join(glob.escape(folder), "model_*.pth"))
              if os.path.abspath(p) != os.path.abspath(path) and not p.endswith("_ema.pth")]  # weights only
    others.sort(key=lambda p: os.path.getmtime(p), reverse=True)
    good = next((other for other in others if complete_archive(other)), None)
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    msg = f"Cannot read the checkpoint {path}: it is truncated or corrupt ({type(error).__name__}: {detail})."
    if good is None:
        return msg + f" No other readable model_*.pth is in {folder}; train again or use another checkpoint."
    return msg + (
        f" The newest complete checkpoint beside it is {good}: to resume from it, write its name into "
        f"{os.path.join(folder, 'last_checkpoint')} (echo {os.path.basename(good)} > last_checkpoint); "
        f"to evaluate or fine-tune from it, set train.init_checkpoint / MODEL.WEIGHTS to it."
    )
