"""What the tests share, imported as ``tests.helpers...`` (never from another test file or conftest.py).

* this package: ``ROOT`` (the repository) and whether Detectron2 is expected and importable here;
* :mod:`tests.helpers.configs`: the tiny training overrides (``TINY``, ``TINY_YACS``) and tiny yacs
  models, checkpoints of them;
* :mod:`tests.helpers.detector`: a tiny plain detector, weights moved off their init, padded batches;
* :mod:`tests.helpers.backbone`: a tiny Hugging Face DINOv2 and its weights in Meta's layout;
* :mod:`tests.helpers.cpu_attention`: where the AVX-512 attention kernel must exist, its inputs, float64
  attention;
* :mod:`tests.helpers.checkpoints`: a malicious checkpoint and the refusal every reader must give;
* :mod:`tests.helpers.user_data`: a user's own dataset (a Roboflow-style export);
* :mod:`tests.helpers.ddp_jobs`: real 2-process training jobs.

This module imports neither torch nor Detectron2: the core tests run without them.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def detectron2_expected() -> bool:
    """Whether a missing Detectron2 is an error here: ``DINOV2OD_EXPECT_DETECTRON2=1``, or, when that
    variable is unset, Python 3.10 (the reference stack's, the only one Detectron2's wheels exist for)."""
    flag = os.environ.get("DINOV2OD_EXPECT_DETECTRON2")
    if flag is not None:
        return flag == "1"
    return sys.version_info[:2] == (3, 10)


def detectron2_import_error():
    """Why Detectron2 cannot be imported here (``"Type: message"``), or None when it can."""
    try:
        import detectron2  # noqa: F401
        import detectron2.engine  # noqa: F401  (its compiled ops and dependencies load here)
    except Exception as e:  # noqa: BLE001  (ImportError, or an ABI/OSError from the compiled ops)
        return f"{type(e).__name__}: {e}"
    return None
