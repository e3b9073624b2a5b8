"""Shared test set-up: the environment of a test run, which tests need Detectron2, and the fixtures.

Tests mirror the package (tests/layers/, modeling/, pretraining/, export/, d2/, tools/, benchmark/);
what they share lives in :mod:`tests.helpers`, never in another test file.

**Detectron2.** Every test module under the folders in ``DETECTRON2_FOLDERS`` (tests/d2/, tests/tools/)
needs Detectron2 and carries the ``detectron2`` marker (so ``-m "not detectron2"`` leaves them out),
except the modules listed in ``DETECTRON2_FREE``. Where Detectron2 is *expected* (the reference
environment), a failed ``import detectron2`` makes each of those modules a collection error, so a
broken environment fails ``make test`` instead of turning half the suite into skips. Elsewhere (the
modern stack and the GPU machine have no Detectron2) the modules are skipped, with the import error
as the reason. Expected means ``DINOV2OD_EXPECT_DETECTRON2=1``, or, when that variable is unset,
Python 3.10: the reference stack's Python, the only one Detectron2's wheels exist for
(``requirements/reference.txt``). The Makefile and ``tools/gpu_check.sh`` set it explicitly.

This file imports neither torch nor Detectron2 at the top: the core tests run without them.
"""
import os
import sys
import tempfile

import pytest

from tests.helpers import ROOT, detectron2_expected, detectron2_import_error
from tests.helpers.configs import TINY_CLASSES, TINY_YACS, YACS_YAML, build_tiny_yacs_model, save_d2_checkpoint

# OpenMP's idle threads sleep instead of spinning, as `make demo` runs (the user's own setting wins). Set
# before torch is imported (libgomp reads it once, at load); subprocesses inherit it. On a shared 2-core
# machine a spinning thread pool starves the test's other processes (DDP ranks, loader workers, a
# benchmark next door): measured under load, a resume test with a loader worker took 36-43 s spinning,
# 3-4 s passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Nothing in a test downloads: a hub id (configs/custom.py's facebook/dinov2-small) that a test forgot
# to replace with a local folder stops at once with the project's offline message instead of asking the
# network. Tests of the look-up itself (tests/d2/test_custom_dinov2.py) clear it and stand in for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Training runs in tests cache their parsed datasets (dinov2od.d2.data.data_cache) in a folder of this run,
# not in the user's ~/.cache; subprocesses (DDP, torchrun) inherit it.
os.environ["DINOV2OD_CACHE"] = _CACHE = tempfile.mkdtemp(prefix="dinov2od-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_CACHE, ignore_errors=True)


TESTS = os.path.dirname(os.path.abspath(__file__))
# Folders of tests/ whose modules need Detectron2 (marked `detectron2`; see the module docstring).
DETECTRON2_FOLDERS = ("d2", "tools")
# Modules in those folders that run without Detectron2 (they load only torch-only modules of
# dinov2od/d2): not marked, never skipped for a missing Detectron2 (tools/gpu_check.sh runs them).
DETECTRON2_FREE = ("d2/test_amp_cuda.py",)


def pytest_configure(config):
    config.addinivalue_line("markers", "detectron2: needs Detectron2 (every module under tests/d2/ and tests/tools/ "
                                       "except DETECTRON2_FREE; set by tests/conftest.py)")


def needs_detectron2(module_path) -> bool:
    """Whether the test module at ``module_path`` needs Detectron2: by its folder under tests/."""
    rel = os.path.relpath(str(module_path), TESTS).replace(os.sep, "/")
    return rel.split("/")[0] in DETECTRON2_FOLDERS and rel not in DETECTRON2_FREE


class _WithoutDetectron2(pytest.Module):
    """A module that needs Detectron2, which cannot be imported: a collection error or a skip, with the reason."""

    reason = ""
    expected = True

    def collect(self):
        if self.expected:
            raise self.CollectError(
                f"Detectron2 cannot be imported ({self.reason}), but this environment is expected "
                "to have it (DINOV2OD_EXPECT_DETECTRON2=1, or Python 3.10: the reference stack). "
                "Run `make env` to repair .venv, or set DINOV2OD_EXPECT_DETECTRON2=0 to skip these tests."
            )
        pytest.skip(f"Detectron2 is not installed ({self.reason})", allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if not module_path.name.startswith("test_") or not needs_detectron2(module_path):
        return None
    error = detectron2_import_error()
    if error is None:
        module = pytest.Module.from_parent(parent, path=module_path)
    else:
        module = _WithoutDetectron2.from_parent(parent, path=module_path)
        module.reason, module.expected = error, detectron2_expected()
    module.add_marker(pytest.mark.detectron2)
    return module


# ---------------------------------------------------------------------------- training fixtures
@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """A lazy config file: configs/shapes.py plus a registered 16/8-image shapes copy.

    Loading it (``LazyConfig.load``, done here once) registers ``shapes_tiny_train`` /
    ``shapes_tiny_val`` in this process, so the yacs route can use the same data; the images
    are generated when a split is first loaded.
    """
    root = tmp_path_factory.mktemp("data")
    path = root / "tiny_shapes.py"
    path.write_text(
        "from detectron2.config import LazyConfig\n"
        "from dinov2od.d2 import register_shapes\n"
        f"register_shapes({str(root)!r}, prefix='shapes_tiny', num_images={{'train': 16, 'val': 8}})\n"
        f"_base = LazyConfig.load({os.path.join(ROOT, 'configs/shapes.py')!r})\n"
        "model, dataloader, optimizer, train = _base.model, _base.dataloader, _base.optimizer, _base.train\n"
        "lr_multiplier = _base.lr_multiplier\n"
    )
    from detectron2.config import LazyConfig

    LazyConfig.load(str(path))
    return str(path)


@pytest.fixture(scope="session")
def train_net():
    """``tools/train_net.py`` as a module; ``train_net.run(config, *opts, flags=())`` runs its main."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import train_net as module

    def run(config, *opts, flags=()):
        args = module.argument_parser().parse_args(["--config-file", config, *flags, *opts])
        return module.main(args)

    module.run = run
    return module


@pytest.fixture
def count_fused(monkeypatch):
    """Counts calls of the ViT's fused CPU inference block (the wrapped original still runs)."""
    from dinov2od.modeling import ViTBackbone

    calls = []
    original = ViTBackbone._block_inference

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ViTBackbone, "_block_inference", counted)
    return calls


# ---------------------------------------------------------------------------- a shared DDP job
@pytest.fixture(scope="session")
def train_wrapper(tmp_path_factory):
    """tools/train_net.py with the test hooks of tests/helpers/ddp_jobs.py, as a script file."""
    from tests.helpers.ddp_jobs import write_wrapper

    return write_wrapper(tmp_path_factory.mktemp("wrapper"))


@pytest.fixture(scope="session")
def launch_job(tiny_config, train_wrapper, tmp_path_factory):
    """One 2-process job under Detectron2's ``launch()`` (``--num-gpus 2``, ddp_jobs.JOB_OPTS), run once
    for d2/test_distributed.py (== torchrun, which runs meanwhile) and d2/test_train.py (ranks
    identical, == 1 process). Its output folder holds model_final.pth, log.txt, init.pth and
    rank0.pth / rank1.pth."""
    from tests.helpers.ddp_jobs import JOB_OPTS, finish, generate_data, job_env, launch_cmd, start

    generate_data()
    out = tmp_path_factory.mktemp("launch")
    proc = finish(start(launch_cmd(train_wrapper, ["--config-file", tiny_config, *JOB_OPTS,
                                                   f"train.output_dir={out}"]), job_env()))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out




# ---------------------------------------------------------------------------- a shared ONNX export
@pytest.fixture(scope="session")
def tiny_yacs_checkpoint(tmp_path_factory):
    """The tiny yacs model (seed 0, every weight perturbed) with TINY_CLASSES and its checkpoints:
    ``model.pth``, and ``old.pth`` saved before it had classes (as older checkpoints are)."""
    import torch

    from tests.helpers.detector import perturb

    root = tmp_path_factory.mktemp("tiny_yacs")
    torch.manual_seed(0)
    model = build_tiny_yacs_model()
    perturb(model.detector)
    old = save_d2_checkpoint(model, str(root / "old.pth"))
    model.detector.set_classes(*TINY_CLASSES)
    return dict(model=model, weights=save_d2_checkpoint(model, str(root / "model.pth")), old=old, root=root)


@pytest.fixture(scope="session")
def tiny_yacs_exports(tiny_yacs_checkpoint):
    """{format: path} of the two graphs ``tools/export_onnx.py --check`` writes from the tiny yacs
    checkpoint (detector and detectron2 formats, traced at 112 x 149), each checked by the tool.
    Shared by d2/test_export_onnx.py and tools/test_predict.py."""
    if os.path.join(ROOT, "tools") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "tools"))
    import export_onnx

    graphs = {}
    for fmt in ("detector", "detectron2"):
        graphs[fmt] = str(tiny_yacs_checkpoint["root"] / f"{fmt}.onnx")
        check = export_onnx.main(["--config-file", YACS_YAML, "--weights", tiny_yacs_checkpoint["weights"],
                                  "--output", graphs[fmt], "--format", fmt, "--size", "112", "149", "--check",
                                  *[str(v) for v in TINY_YACS]])
        assert check.get("same top-k labels", check.get("same classes")) is True, check
    return graphs
