"""One output folder, one run: ``tools/train_net.py``'s claim on its output folder, and the checkpoint
``--resume`` continues from.

* :class:`FolderLock`: an exclusive ``fcntl.flock`` on ``<output folder>/train_net.lock``, which also
  names its holder (pid, host, command, start time) for the message another run gets. The kernel drops
  the lock when the holding process ends, however it ends (a crash, ``kill -9``, a lost node on a local
  disk), so a lock never outlives its run and never needs removing by hand. The file itself stays.
  Processes forked by the holder (data loader workers) do not keep it: their copy of the descriptor is
  closed when they start.
* :func:`claim_output_folder`: take the lock, and refuse a new training (no ``--resume``) into a folder
  that holds an earlier one (``last_checkpoint``, ``model_*.pth`` or ``metrics.json``), naming what
  it holds and the choices: ``--resume``, another folder, or ``--overwrite``, which removes the earlier
  run's files (:data:`RUN_OUTPUTS`) and nothing else. A refused run writes nothing in the folder.
* :func:`checkpoint_to_resume`: the file ``last_checkpoint`` names, or, when that file is gone, the
  newest complete ``model_*.pth`` beside it (with a warning naming the missing one).

Only the standard library is imported here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import glob
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import time
import zipfile
from typing import List, Optional, Sequence

try:
    import fcntl
except ImportError:  # Windows: no flock; the folder is not locked (a warning says so)
    fcntl = None

__all__ = [
    "LOCK_FILE",
    "RUN_OUTPUTS",
    "FolderLock",
    "FolderClaim",
    "RunFolderError",
    "checkpoint_to_resume",
    "claim_output_folder",
    "complete_archive",
    "describe_training",
    "training_signs",
]

logger = logging.getLogger("dinov2od")

LOCK_FILE = "train_net.lock"
TAG = "last_checkpoint"
EMA_WEIGHTS = "model_final_ema.pth"  # weights only (dinov2od.d2.engine.ema): never a checkpoint to resume
# What shows that a folder holds a training.
SIGNS = (TAG, "model_*.pth", "metrics.json")
# What --overwrite removes: the earlier run's checkpoints and EMA export (model_final_ema.pth, and its
# .safetensors / .json where written), its tag, its metrics and TensorBoard events, its evaluation
# (inference/), the drawings and pictures train_net makes (predictions/, dinov2od.d2.evaluation.plots' files) and
# the temporary files of an interrupted save. log.txt (appended to) and config.yaml (rewritten) stay.
RUN_OUTPUTS = (TAG, "model_*.pth", "model_*.safetensors", "model_final_ema.json", "metrics.json",
               "events.out.tfevents.*", "inference", "predictions", "results.png", "pr_curves.png",
               "per_class_ap.csv", "confusion_matrix.png", "confusion_matrix.csv", "val_examples.jpg",
               "*.pth.tmp*", "last_checkpoint.tmp*")


class RunFolderError(SystemExit):
    """The output folder cannot be used as asked; the message names why and the choices.

    A ``SystemExit``: the command line prints the message (no traceback) and exits with status 1."""

    def __str__(self) -> str:
        return str(self.code)


def _names(folder: str, patterns: Sequence[str]) -> List[str]:
    try:
        entries = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in entries if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def training_signs(folder: str) -> List[str]:
    """The entries of ``folder`` that show it holds a training (``last_checkpoint``, ``model_*.pth``,
    ``metrics.json``), sorted; empty for a new, empty or missing folder."""
    return _names(folder, SIGNS)


def _iteration_of(name: str) -> Optional[int]:
    m = re.fullmatch(r"model_(\d+)\.pth", name)
    return int(m.group(1)) if m else None


def _last_logged_iteration(path: str) -> Optional[int]:
    """The ``iteration`` of metrics.json's last line, or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return int(json.loads(lines[-1])["iteration"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tag(folder: str) -> Optional[str]:
    try:
        with open(os.path.join(folder, TAG)) as f:
            return f.read().strip()
    except OSError:
        return None


def describe_training(folder: str) -> str:
    """What the training in ``folder`` left, in one line: e.g. ``last_checkpoint -> model_0000999.pth
    (iteration 999); checkpoints model_0000499.pth, model_0000999.pth; metrics.json (to iteration 999)``."""
    parts = []
    tag = _tag(folder)
    if tag is not None:
        it = _iteration_of(tag)
        notes = ([f"iteration {it}"] if it is not None else []) + \
            ([] if tag and os.path.isfile(os.path.join(folder, tag)) else ["missing"])
        parts.append(f"{TAG} -> {tag or '(empty)'}" + (f" ({', '.join(notes)})" if notes else ""))
    ckpts = _names(folder, ("model_*.pth",))
    if ckpts:
        shown = ", ".join(ckpts[-4:]) if len(ckpts) <= 4 else f"... {', '.join(ckpts[-3:])} ({len(ckpts)} in all)"
        parts.append(f"checkpoints {shown}")
    if os.path.isfile(os.path.join(folder, "metrics.json")):
        it = _last_logged_iteration(os.path.join(folder, "metrics.json"))
        parts.append("metrics.json" + (f" (to iteration {it})" if it is not None else ""))
    return "; ".join(parts)


# ---------------------------------------------------------------------------- the lock
_HELD_FDS: set = set()


def _drop_locks_in_child() -> None:
    # a forked child (a data loader worker) shares the holder's lock: close its copy of the descriptor
    # (never LOCK_UN, which would release the holder's lock too), so the lock ends with the holder
    for fd in list(_HELD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_locks_in_child)


def _command() -> str:
    return shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "python"


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/<name>`` (``train_net.lock``; predict.py
    uses its own name) that names its holder."""

    def __init__(self, folder: str, name: str = LOCK_FILE):
        self.folder = folder
        self.path = os.path.join(folder, name)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, create: bool = True) -> bool:
        """Take the lock if no other process holds it (nothing is written yet: :meth:`write_holder`).

        Args:
            create: create the lock file when it does not exist (else a missing file is not locked:
                returns True without holding anything).

        Returns:
            False when another process holds it.
        """
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if create:
                raise
            return True
        if fcntl is None:
            os.close(fd)
            logger.warning("This system has no fcntl.flock: %s is not locked against another run.", self.folder)
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:  # a file system without locks (some network mounts)
            os.close(fd)
            logger.warning("Cannot lock %s (%s): the folder is not protected against a second run.", self.path, e)
            return True
        self._fd = fd
        _HELD_FDS.add(fd)
        return True

    def write_holder(self, command: Optional[str] = None) -> None:
        """Write this process's pid, host, command and start time into the lock file."""
        if self._fd is None:
            return
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or _command(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(info) + "\n").encode(), 0)

    def holder(self) -> str:
        """Who holds the lock, from the file: ``pid 123 on host h since <time>: <command>``."""
        try:
            with open(self.path) as f:
                info = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info.get("pid"):
            return "another process (it has just started and not yet written its name)"
        return (f"pid {info['pid']} on host {info.get('host', '?')} since {info.get('started', '?')}: "
                f"{info.get('command', '?')}")

    def release(self) -> None:
        """Release the lock (the file stays; it is rewritten by the next holder)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD_FDS.discard(fd)
        with contextlib.suppress(OSError):
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclasses.dataclass
class FolderClaim:
    """A run's hold on its output folder: the lock (release it when the run ends; the kernel does
    when the process ends) and what ``--overwrite`` removed."""

    folder: str
    lock: Optional[FolderLock]
    removed: List[str] = dataclasses.field(default_factory=list)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def _in_use_message(folder: str, holder: str, eval_only: bool) -> str:
    what = "evaluation" if eval_only else "training"
    return (
        f"The output folder {folder} is in use by another run: {holder}. One folder takes one run at a time "
        f"(another {what} would mix its checkpoints, metrics and logs with that run's). Choices: wait for it "
        "to end (its lock is released when its process exits, even if it crashes or is killed), stop it, "
        f"or give this {what} another folder (train.output_dir=... for lazy configs, OUTPUT_DIR ... for yacs).")


def _used_message(folder: str) -> str:
    return (
        f"The output folder {folder} already holds a training ({describe_training(folder)}). A new run "
        "would replace its checkpoints and mix its metrics with the new ones. Choices: --resume to continue "
        "that training; another folder (train.output_dir=... for lazy configs, OUTPUT_DIR ... for yacs); or "
        "--overwrite to remove that run's checkpoints, last_checkpoint, metrics.json, events, inference/, "
        "predictions/ and result plots (nothing else in the folder) and train from the start.")


def remove_run_outputs(folder: str) -> List[str]:
    """Remove the earlier run's files (:data:`RUN_OUTPUTS`) from ``folder``; returns their names."""
    removed = []
    for name in _names(folder, RUN_OUTPUTS):
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            name += "/"
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        removed.append(name)
    return removed


def claim_output_folder(folder: str, *, resume: bool = False, eval_only: bool = False, overwrite: bool = False,
                        command: Optional[str] = None) -> FolderClaim:
    """Claim ``folder`` for this run, before anything is written into it.

    Takes the folder's lock (:class:`FolderLock`), and for a new training (no ``resume``, not
    ``eval_only``) into a folder that holds one (:func:`training_signs`), refuses or, with
    ``overwrite``, removes that run's files (:data:`RUN_OUTPUTS`). A refused run writes nothing: the
    folder, its lock file and their times are left as they were. Folders that are not local paths
    (``scheme://``) are neither locked nor checked.

    Args:
        folder: the run's output folder (created here when it does not exist).
        resume: the run continues the folder's training (``--resume``).
        eval_only: the run only evaluates (``--eval-only``): it may use a folder holding a training.
        overwrite: remove an earlier training's files instead of refusing (``--overwrite``).
        command: the command line written into the lock file (default: this process's).

    Returns:
        the claim: release it when the run ends (the kernel releases it when the process ends).

    Raises:
        RunFolderError: another process holds the folder, or it holds a training and neither
            ``resume`` nor ``overwrite`` was given, or ``overwrite`` was combined with ``resume`` or
            ``eval_only``; each names the folder and the choices.
    """
    if overwrite and (resume or eval_only):
        raise RunFolderError(
            f"--overwrite removes the earlier run's files from {folder} to train from the start; it cannot be "
            f"combined with {'--resume' if resume else '--eval-only'}, which use them. Drop one of the two.")
    if not folder or "://" in folder:
        return FolderClaim(folder, None)
    lock = FolderLock(folder)
    # 1. a folder held by a running process: refused without creating or writing anything
    if not lock.try_acquire(create=False):
        raise RunFolderError(_in_use_message(folder, lock.holder(), eval_only))
    try:
        signs = [] if (resume or eval_only) else training_signs(folder)
        if signs and not overwrite:
            raise RunFolderError(_used_message(folder))
        # 2. now the folder and the lock file may be written
        os.makedirs(folder, exist_ok=True)
        if not lock.try_acquire(create=True):  # a run that started meanwhile
            raise RunFolderError(_in_use_message(folder, lock.holder(), eval_only))
        lock.write_holder(command)
        removed = remove_run_outputs(folder) if signs else []
    except BaseException:
        lock.release()
        raise
    return FolderClaim(folder, lock, removed)


# ---------------------------------------------------------------------------- the checkpoint to resume
def complete_archive(path: str) -> bool:
    """Whether ``path`` is a complete checkpoint archive (torch's zip format, every member's CRC checks).
    Nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is None
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError):
        return False


def checkpoint_to_resume(folder: str, tagged: Optional[str] = None) -> Optional[str]:
    """The checkpoint ``--resume`` continues from in ``folder``.

    The file ``last_checkpoint`` names when it exists. When it does not (deleted, or the folder
    copied without it), the newest complete ``model_*.pth`` beside it (by modification time; not
    ``model_final_ema.pth``, which holds weights only), with a warning naming the missing file.

    Args:
        folder: the output folder.
        tagged: the path ``last_checkpoint`` names (read here when None).

    Returns:
        the path, or None when the folder has no ``last_checkpoint``.

    Raises:
        FileNotFoundError: ``last_checkpoint`` names a missing file and no complete checkpoint is
            beside it, naming the folder.
    """
    if tagged is None:
        name = _tag(folder)
        if name is None:
            return None
        tagged = os.path.join(folder, name)
    if os.path.isfile(tagged):
        return tagged
    candidates = [p for p in glob.glob(os.path.join(glob.escape(folder), "model_*.pth"))
                  if os.path.basename(p) != EMA_WEIGHTS and os.path.isfile(p)]
    candidates.sort(key=lambda p: (os.path.getmtime(p), _iteration_of(os.path.basename(p)) or 0), reverse=True)
    for path in candidates:
        if complete_archive(path):
            logger.warning(
                "%s names %s, which does not exist; resuming from %s, the newest complete checkpoint in %s.",
                os.path.join(folder, TAG), os.path.basename(tagged), os.path.basename(path), folder)
            return path
    bad = [os.path.basename(p) for p in candidates]
    raise FileNotFoundError(
        f"Cannot resume in {folder}: {TAG} names {os.path.basename(tagged)}, which does not exist, and no complete "
        f"checkpoint (model_*.pth) is beside it" + (f" ({', '.join(bad)} cannot be read)" if bad else "") +
        ". Start without --resume (train.init_checkpoint / MODEL.WEIGHTS to start from weights), or put the "
        "checkpoint back.")
