"""Training state that survives a crash: crash-safe checkpoint files and weights loading
(:mod:`.checkpointer`), the random states and data position of an exact resume (:mod:`.resume`), and
a run's output folder (:mod:`.run_folder`: its lock, and the checkpoint ``--resume`` continues from)."""
from .checkpointer import (
    CrashSafeCheckpointer,
    UnsafeCheckpointError,
    atomic_save,
    atomic_write,
    check_fit,
    load_inference_weights,
    non_finite_entries,
)
from .reading import load_checkpoint_file
from .resume import RNGStateHook, position_train_loader
from .run_folder import RunFolderError, checkpoint_to_resume, claim_output_folder

__all__ = [
    "CrashSafeCheckpointer",
    "RNGStateHook",
    "RunFolderError",
    "UnsafeCheckpointError",
    "atomic_save",
    "atomic_write",
    "check_fit",
    "checkpoint_to_resume",
    "claim_output_folder",
    "load_checkpoint_file",
    "load_inference_weights",
    "non_finite_entries",
    "position_train_loader",
]
