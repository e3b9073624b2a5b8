"""Training state that survives a crash: crash-safe checkpoint files (what an exact resume needs besides
them, the random states and the data stream's position, is in :mod:`dinov2od.d2.checkpoint.resume`).

* :func:`atomic_save` / :class:`CrashSafeCheckpointer`: a checkpoint is written to a temporary
  file beside its final name, flushed to disk (``fsync``), renamed into place (``os.replace`` is
  atomic), and only then named in ``last_checkpoint``, which is written the same way. A process
  killed at any point leaves every ``.pth`` either complete or untouched, and the tag names a
  complete checkpoint. (fvcore writes straight to the final name, then the tag, with no fsync.)
  It refuses to write non-finite weights, removes the temporary files of a killed save when
  training starts, names the last complete checkpoint when a file cannot be read, and refuses a
  checkpoint of another architecture with one error (:func:`check_fit`); fine-tuning to another
  class count is the one mismatch it allows. :func:`load_inference_weights` loads weights for
  prediction and export with the same checks.
* Files are data, never code: every checkpoint is read by
  :func:`~dinov2od.d2.checkpoint.reading.load_checkpoint_file` (:mod:`dinov2od.d2.checkpoint.reading`,
  also installed in Detectron2's own ``DetectionCheckpointer`` for dinov2od models), and the project's
  checkpoints are saved so that ``weights_only=True`` reads them (SECURITY.md).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fvcore.common.checkpoint import _filter_reused_missing_keys, _IncompatibleKeys

from detectron2.checkpoint import DetectionCheckpointer

from dinov2od.modeling.checkpoint_io import (
    UnsafeCheckpointError,
    atomic_write,
    not_weights_only,
    plain_state,
)

from .reading import load_checkpoint_file
from .run_folder import checkpoint_to_resume

__all__ = [
    "CrashSafeCheckpointer",
    "UnsafeCheckpointError",
    "atomic_save",
    "atomic_write",
    "check_fit",
    "load_inference_weights",
    "non_finite_entries",
]

logger = logging.getLogger(__name__)

# what atomic_write leaves when killed: <name>.pth.tmp.<pid> / last_checkpoint.tmp.<pid> (".tmp" alone: earlier versions)
_TEMPORARY = re.compile(r"^(.+\.pth|last_checkpoint)\.tmp(\.\d+)?$")


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a truncated file under ``path``."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def non_finite_entries(state: Dict[str, torch.Tensor]) -> List[str]:
    """The names of the floating tensors in ``state`` (a ``state_dict``) that hold a NaN or an inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _listed(items: Sequence[str], limit: int = 5, sep: str = ", ") -> str:
    more = f"{sep}... ({len(items) - limit} more)" if len(items) > limit else ""
    return sep.join(items[:limit]) + more


# Keys a checkpoint may lack: buffers added after files were saved, which keep the model's value.
OPTIONAL_KEYS = ("class_metadata",)


def _class_layers(incorrect_shapes, num_classes: Optional[int]) -> Tuple[List[str], set]:
    """The class-specific layers among fvcore's ``incorrect_shapes`` and the checkpoint's class counts.

    A class-specific layer is a classifier or label embedding (its name holds "class" or "label")
    whose first dimension is the model's ``num_classes`` and whose other dimensions fit."""
    names, counts = [], set()
    if not num_classes:
        return names, counts
    for key, shape_ckpt, shape_model in incorrect_shapes:
        leaf = key.lower()
        if (("class" in leaf or "label" in leaf) and len(shape_ckpt) == len(shape_model) >= 1
                and shape_model[0] == num_classes and tuple(shape_ckpt[1:]) == tuple(shape_model[1:])):
            names.append(key)
            counts.add(int(shape_ckpt[0]))
    return names, counts


def check_fit(model: torch.nn.Module, incompatible: _IncompatibleKeys, path: str,
              allow_class_change: bool = False) -> Optional[str]:
    """Refuse a checkpoint that does not fit ``model``, from what fvcore's ``_load_model`` reports.

    fvcore only warns (one line per tensor) and keeps the model's initial values for every key it
    could not load, so a checkpoint of another architecture would run near-random weights. Here
    any missing key (other than :data:`OPTIONAL_KEYS`), unexpected key or tensor of another shape
    is one ``ValueError`` listing them. With ``allow_class_change`` (fine-tuning from a checkpoint
    of another dataset or recipe): the class-specific layers of another class count keep their
    fresh initialization (one line), and missing or unexpected keys (training-only parts such as
    denoising queries present on one side only) are one warning; other shapes are still refused.

    Args:
        model: the model loaded into (``num_classes`` is read from it when it has one).
        incompatible: ``_load_model``'s result: missing keys, unexpected keys, incorrect shapes.
        path: the checkpoint, for the message.
        allow_class_change: accept another class count (fine-tuning).

    Returns:
        a one-line note when the class count differs and that is allowed, else None.

    Raises:
        ValueError: naming the file, the keys (first few and counts) and the fix.
    """
    reshaped = {k for k, _, _ in incompatible.incorrect_shapes}  # fvcore dropped them: also "missing"
    missing = [k for k in _filter_reused_missing_keys(model, list(incompatible.missing_keys))
               if k not in reshaped and k.rsplit(".", 1)[-1] not in OPTIONAL_KEYS]
    unexpected = list(incompatible.unexpected_keys)
    num_classes = getattr(model, "num_classes", None)
    class_keys, counts = _class_layers(incompatible.incorrect_shapes, num_classes)
    theirs = next(iter(counts)) if len(counts) == 1 else None
    shapes = [f"{k}: {tuple(c)} in the file, {tuple(m)} in the model"
              for k, c, m in incompatible.incorrect_shapes if theirs is None or k not in class_keys]
    if allow_class_change and not shapes and (missing or unexpected):
        # fine-tuning from a run with other training-only parts (denoising, one-to-many queries): the
        # layers the file lacks keep their initialization, the ones the model lacks are dropped
        logger.warning(
            "Fine-tuning from %s: %d layers of the model start fresh (%s), %d of the file are not used (%s).",
            path, len(missing), _listed(sorted(missing)), len(unexpected), _listed(sorted(unexpected)))
        missing, unexpected = [], []
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys of the model missing from the file ({_listed(sorted(missing))})")
        if unexpected:
            parts.append(f"{len(unexpected)} keys of the file unknown to the model ({_listed(sorted(unexpected))})")
        if shapes:
            parts.append(f"{len(shapes)} tensors of another shape ({_listed(shapes, 3, '; ')})")
        if theirs is not None:
            parts.append(f"and it has {theirs} classes, the model {num_classes}")
        raise ValueError(
            f"{path} does not fit this model: {'; '.join(parts)}. It was saved from another architecture "
            "or config: build the model with the config it was trained with (backbone, hidden_dim, "
            "num_queries, decoder layers, num_classes, ...)."
        )
    if theirs is None:
        return None
    if not allow_class_change:
        raise ValueError(
            f"{path} was trained for {theirs} classes but the model has num_classes={num_classes} "
            f"({len(class_keys)} class-specific tensors differ: {_listed(class_keys, 3)}). Build the model "
            f"with the config it was trained with (num_classes={theirs}); only fine-tuning (training from "
            "train.init_checkpoint / MODEL.WEIGHTS) may change the class count."
        )
    return f"class head: checkpoint has {theirs} classes, model {num_classes}: the class-specific layers start fresh"


class CrashSafeCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` whose checkpoints and tag are written with :func:`atomic_write`,
    that never writes non-finite weights, and that loads only checkpoints that fit the model.

    * :meth:`save` refuses (``FloatingPointError``, nothing written, the tag untouched) when a
      floating tensor of the model or of the EMA is not finite, and skips a save requested while
      a ``FloatingPointError`` propagates (e.g. a hook's ``after_train`` at the last iteration).
    * :meth:`remove_temporary_files` deletes what a killed save left (``*.pth.tmp.<pid>``,
      ``last_checkpoint.tmp.<pid>``; ``.tmp`` alone from earlier versions); the training driver
      calls it when it starts.
    * Loading refuses a file that does not fit the model (:func:`check_fit`); with
      ``allow_class_change`` (fine-tuning) the class count may differ. A file that cannot be read
      raises an error naming the last complete checkpoint beside it. Files are read without running
      code from them (:func:`load_checkpoint_file`), ``.safetensors`` too, and saved so that
      ``torch.load(weights_only=True)`` reads them (config containers become lists and dicts).
    * :meth:`get_checkpoint_file` (``--resume``): when the file ``last_checkpoint`` names is gone,
      the newest complete ``model_*.pth`` beside it, with a warning.

    Folders that are not local (an ``iopath`` URL) fall back to Detectron2's own writing.
    """

    def __init__(self, model, save_dir: str = "", *, allow_class_change: bool = False, **kwargs):
        """
        Args:
            model, save_dir, kwargs: as :class:`DetectionCheckpointer` (``save_to_disk`` and the
                checkpointables).
            allow_class_change: loading may change the class count (fine-tuning); see :func:`check_fit`.
        """
        super().__init__(model, save_dir, **kwargs)
        self.allow_class_change = allow_class_change

    def _local(self) -> bool:
        return bool(self.save_dir) and os.path.isdir(self.save_dir)

    # ------------------------------------------------------------------------ saving
    def save(self, name: str, **kwargs) -> None:
        if not self.save_to_disk or not self.save_dir:
            return
        failure = sys.exc_info()[1]  # set while a `finally` / `except` block runs
        if isinstance(failure, FloatingPointError):
            self.logger.warning(
                "Not saving %s: training stopped on a non-finite value (%s). last_checkpoint still names "
                "the last good checkpoint.", name, str(failure).split(":")[0])
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        self._check_finite(name, data)
        if not self._local():
            return super().save(name, **kwargs)
        data.update(kwargs)
        data = plain_state(data)  # config containers (a lazy optimizer's betas) as lists: weights_only reads them
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self._warn_unless_weights_only(basename, data)
        self.logger.info("Saving checkpoint to %s", path)
        atomic_save(data, path)
        self.tag_last_checkpoint(basename)

    def _warn_unless_weights_only(self, basename: str, data: dict) -> None:
        """Warn (once) when ``data`` holds entries that ``torch.load(weights_only=True)`` refuses (a
        hook's or checkpointable's own objects): such a file loads only when trusted by name."""
        bad = not_weights_only(data)
        if bad and not getattr(self, "_warned_not_weights_only", False):
            self._warned_not_weights_only = True
            self.logger.warning(
                "%s holds entries that only full unpickling reads (%s): loading it will need "
                "DINOV2OD_TRUSTED_CHECKPOINTS (SECURITY.md). Make their state_dict() return tensors, "
                "numbers, strings, lists and dicts.", basename, ", ".join(bad))

    def _check_finite(self, name: str, data: dict) -> None:
        """Raise FloatingPointError if the model's or the EMA's weights in ``data`` are not all finite."""
        bad = non_finite_entries(data["model"])
        ema = data.get("ema")
        if isinstance(ema, dict) and isinstance(ema.get("shadow"), dict):
            bad += [f"ema:{k}" for k in non_finite_entries(ema["shadow"])]
        if bad:
            raise FloatingPointError(
                f"Refusing to save {name}: non-finite weights in {_listed(bad)}. Nothing was written and "
                "last_checkpoint still names the last good checkpoint; lower the learning rate or enable "
                "gradient clipping, then resume from it."
            )

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._local():
            return super().tag_last_checkpoint(last_filename_basename)
        with atomic_write(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def remove_temporary_files(self) -> List[str]:
        """Delete the temporary files a killed save left in the folder (``*.pth.tmp.<pid>``,
        ``last_checkpoint.tmp.<pid>``, and ``*.pth.tmp`` / ``last_checkpoint.tmp`` of earlier
        versions), with a log line naming them. Call it only where no save can be under way: when
        training starts, on the main process (a no-op elsewhere).

        Returns:
            the paths removed.
        """
        if not self.save_to_disk or not self._local():
            return []
        folder = glob.escape(self.save_dir)
        candidates = glob.glob(os.path.join(folder, "*.pth.tmp*")) + glob.glob(os.path.join(folder, "last_checkpoint.tmp*"))
        leftovers = sorted(p for p in candidates if _TEMPORARY.search(os.path.basename(p)) and os.path.isfile(p))
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        if leftovers:
            self.logger.info("Removed the temporary files of an interrupted save: %s",
                             ", ".join(os.path.basename(p) for p in leftovers))
        return leftovers

    # ------------------------------------------------------------------------ loading
    def get_checkpoint_file(self) -> str:
        """The file ``last_checkpoint`` names; when it is gone, the newest complete ``model_*.pth``
        beside it, with a warning (:func:`~dinov2od.d2.checkpoint.run_folder.checkpoint_to_resume`; no complete
        one: ``FileNotFoundError`` naming the folder)."""
        path = super().get_checkpoint_file()
        if not path or not self._local():
            return path
        return checkpoint_to_resume(self.save_dir, path)

    def load(self, path: str, *args, **kwargs):
        if not path:  # fvcore would log "Initializing model from scratch", which is not what happens
            self.logger.info(
                "No train.init_checkpoint / MODEL.WEIGHTS: the detector starts from its initialisation; "
                "the backbone loads its own pretrained weights where the config names them.")
            return {}
        self._path = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._path = None

    def _load_file(self, filename: str):
        return load_checkpoint_file(self, filename)

    def _load_model(self, checkpoint):
        keep = {k: v.clone() for k, v in self.model.state_dict().items() if k.rsplit(".", 1)[-1] in OPTIONAL_KEYS}
        incompatible = super()._load_model(checkpoint)
        note = check_fit(self.model, incompatible, getattr(self, "_path", None) or "The checkpoint",
                         self.allow_class_change)
        if note:  # fine-tuning to other classes: the file's class names are not the model's
            self.logger.info(note)
            self.model.load_state_dict(keep, strict=False)
        return _IncompatibleKeys([], [], [])  # nothing left for fvcore to warn about


def load_inference_weights(model: torch.nn.Module, path: str, use_ema: bool = True) -> None:
    """Load the weights of ``path`` into ``model`` for prediction or export.

    A training checkpoint with EMA weights gives those (with ``use_ema``), any other file its
    ``"model"`` weights (a plain ``state_dict`` works too). The file must fit the model exactly
    (:func:`check_fit`: a class count of its own is an error here too), and a file that cannot be
    read names the last complete checkpoint beside it.

    Args:
        model: the built model (the meta-architecture or a plain detector), on its device.
        path: a training checkpoint (``model_final.pth``) or a weights file (``model_final_ema.pth``,
            ``model_final_ema.safetensors``), read without running code from it (:func:`load_checkpoint_file`).
        use_ema: use the checkpoint's EMA weights when it has them.

    Raises:
        ValueError: the file does not fit the model, or cannot be read, or needs full unpickling and is
            not trusted (``UnsafeCheckpointError``).
    """
    if not path:
        raise ValueError("No weights file given: pass a checkpoint such as output/model_final.pth.")
    if "://" not in path and not os.path.isfile(path):
        raise ValueError(f"Weights file {path} does not exist.")
    extra = CrashSafeCheckpointer(model, save_to_disk=False).load(path)  # strict: raises when it does not fit
    ema = extra.get("ema") if use_ema else None
    if not isinstance(ema, dict) or int(ema.get("num_updates", 0)) == 0 or not isinstance(ema.get("shadow"), dict):
        return
    own = model.state_dict()
    shadow = ema["shadow"]
    bad = [k for k, v in shadow.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"The EMA weights in {path} do not fit this model ({_listed(sorted(bad))}); build the "
                         "model with the config it was trained with, or pass use_ema=False.")
    model.load_state_dict(shadow, strict=False)
    logging.getLogger(__name__).info("Loaded the EMA weights of %s (%d updates).", path, int(ema["num_updates"]))
