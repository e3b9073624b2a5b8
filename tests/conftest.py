"""Shared test set-up: where Detectron2 must be importable, and the tiny training fixtures.

``tests/test_d2_*.py`` need Detectron2. Where it is *expected* (the reference environment), a
failed ``import detectron2`` makes each of those files a collection error, so a broken
environment fails ``make test`` instead of turning half the suite into skips. Elsewhere (the
modern stack and the GPU machine have no Detectron2) the files are skipped, with the import
error as the reason. Expected means ``DINOV2OD_EXPECT_DETECTRON2=1``, or, when that variable is
unset, Python 3.10: the reference stack's Python, the only one Detectron2's wheels exist for
(``requirements/reference.txt``). The Makefile and ``tools/gpu_check.sh`` set it explicitly.

This file imports neither torch nor Detectron2 at the top: the core tests run without them.
"""
import os
import sys
import tempfile

import pytest

# OpenMP's idle threads sleep instead of spinning, as `make demo` runs (the user's own setting wins). Set
# before torch is imported (libgomp reads it once, at load); subprocesses inherit it. On a shared 2-core
# machine a spinning thread pool starves the test's other processes (DDP ranks, loader workers, a
# benchmark next door): measured under load, a resume test with a loader worker took 36-43 s spinning,
# 3-4 s passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Nothing in a test downloads: a hub id (configs/custom.py's facebook/dinov2-small) that a test forgot
# to replace with a local folder stops at once with the project's offline message instead of asking the
# network. Tests of the look-up itself (test_d2_custom_dinov2.py) clear it and stand in for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Training runs in tests cache their parsed datasets (dinov2od.d2.data.data_cache) in a folder of this run,
# not in the user's ~/.cache; subprocesses (DDP, torchrun) inherit it.
os.environ["DINOV2OD_CACHE"] = _CACHE = tempfile.mkdtemp(prefix="dinov2od-test-cache-")


def pytest_sessionfinish(session, exitstatus):
    import shutil

    shutil.rmtree(_CACHE, ignore_errors=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# test_d2_* files that run without Detectron2 (they load only torch-only modules of dinov2od/d2)
DETECTRON2_FREE = {"test_d2_amp_cuda.py"}


def detectron2_expected() -> bool:
    """Whether a missing Detectron2 is an error here (see the module docstring)."""
    flag = os.environ.get("DINOV2OD_EXPECT_DETECTRON2")
    if flag is not None:
        return flag == "1"
    return sys.version_info[:2] == (3, 10)


def _detectron2_import_error():
    try:
        import detectron2  # noqa: F401
        import detectron2.engine  # noqa: F401  (its compiled ops and dependencies load here)
    except Exception as e:  # noqa: BLE001  (ImportError, or an ABI/OSError from the compiled ops)
        return f"{type(e).__name__}: {e}"
    return None


class _WithoutDetectron2(pytest.Module):
    """A test_d2_* module that is not imported: a collection error or a skip, with the reason."""

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
    name = module_path.name
    if not name.startswith("test_d2_") or name in DETECTRON2_FREE:
        return None
    error = _detectron2_import_error()
    if error is None:
        return None
    module = _WithoutDetectron2.from_parent(parent, path=module_path)
    module.reason, module.expected = error, detectron2_expected()
    return module


# ---------------------------------------------------------------------------- training fixtures
# Overrides of configs/shapes.py that make a model and data tiny enough for CPU tests.
# The tiny test model keeps the plain recipe (random init, trained in full, one-to-one queries
# only); the demo's pretrained + LoRA path and its denoising / one-to-many queries have their own
# tests (test_d2_configs.py, test_d2_model.py, test_d2_model_card.py).
TINY = [
    "model.detector.backbone.pretrained=None",  # the demo's pretrained file is width 192
    "model.detector.backbone.freeze=False",
    "model.detector.backbone.lora_rank=0",
    "model.detector.dn_groups=0",
    "model.detector.o2m_queries=0",
    "model.detector.backbone.arch_overrides.hidden_size=48",
    "model.detector.backbone.arch_overrides.num_hidden_layers=2",
    "model.detector.backbone.arch_overrides.num_attention_heads=2",
    "model.detector.backbone.arch_overrides.intermediate_size=96",
    "model.detector.hidden_dim=32",
    "model.detector.num_queries=10",
    "model.detector.num_decoder_layers=2",
    "model.detector.dim_feedforward=64",
    "dataloader.train.dataset.names=shapes_tiny_train",
    "dataloader.test.dataset.names=shapes_tiny_val",
    "dataloader.train.total_batch_size=2",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.train.mapper.augmentations.min_size_train=[112,126]",
    "dataloader.test.mapper.augmentations.min_size_test=112",
    "train.visualize.num_images=0",
    "train.log_period=2",
    "train.eval_period=0",
]

# The same tiny model for the yacs route (configs/yaml/shapes.yaml).
TINY_YACS = [
    "MODEL.DINOV2OD.BACKBONE.PRETRAINED", "",  # the demo's pretrained file is width 192
    "MODEL.DINOV2OD.BACKBONE.FREEZE", "False", "MODEL.DINOV2OD.BACKBONE.LORA_RANK", "0",
    "MODEL.DINOV2OD.DN.GROUPS", "0", "MODEL.DINOV2OD.O2M_QUERIES", "0",
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.hidden_size", "48",
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.num_hidden_layers", "2",
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.num_attention_heads", "2",
    "MODEL.DINOV2OD.BACKBONE.ARCH_OVERRIDES.intermediate_size", "96",
    "MODEL.DINOV2OD.HIDDEN_DIM", "32", "MODEL.DINOV2OD.NUM_QUERIES", "10",
    "MODEL.DINOV2OD.DEC_LAYERS", "2", "MODEL.DINOV2OD.DIM_FEEDFORWARD", "64",
    "DATASETS.TRAIN", "('shapes_tiny_train',)", "DATASETS.TEST", "('shapes_tiny_val',)",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
    "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(112,)", "INPUT.MIN_SIZE_TEST", "112",
]


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
    """tools/train_net.py with the test hooks of tests/ddp_jobs.py, as a script file."""
    from ddp_jobs import write_wrapper

    return write_wrapper(tmp_path_factory.mktemp("wrapper"))


@pytest.fixture(scope="session")
def launch_job(tiny_config, train_wrapper, tmp_path_factory):
    """One 2-process job under Detectron2's ``launch()`` (``--num-gpus 2``, ddp_jobs.JOB_OPTS), run once
    for test_d2_distributed.py (== torchrun, which runs meanwhile) and test_d2_train.py (ranks
    identical, == 1 process). Its output folder holds model_final.pth, log.txt, init.pth and
    rank0.pth / rank1.pth."""
    from ddp_jobs import JOB_OPTS, finish, generate_data, job_env, launch_cmd, start

    generate_data()
    out = tmp_path_factory.mktemp("launch")
    proc = finish(start(launch_cmd(train_wrapper, ["--config-file", tiny_config, *JOB_OPTS,
                                                   f"train.output_dir={out}"]), job_env()))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


# ---------------------------------------------------------------------------- a shared ONNX export
YACS_YAML = os.path.join(ROOT, "configs/yaml/shapes.yaml")
# Classes of the tiny yacs model's own, registered nowhere: they can only come from its checkpoint / graph.
TINY_CLASSES = (["ring", "box", "wedge"], [7, 11, 42])


def build_tiny_yacs_model(opts=()):
    """The tiny model of TINY_YACS (configs/yaml/shapes.yaml) through Detectron2's build_model, in eval mode."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from dinov2od.d2 import add_dinov2od_config

    cfg = get_cfg()
    add_dinov2od_config(cfg)
    cfg.merge_from_file(YACS_YAML)
    cfg.merge_from_list([*[str(v) for v in TINY_YACS], *opts])
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg).eval()


def save_d2_checkpoint(model, path):
    from detectron2.checkpoint import DetectionCheckpointer

    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.basename(path)[:-4])
    return path


@pytest.fixture(scope="session")
def tiny_yacs_checkpoint(tmp_path_factory):
    """The tiny yacs model (seed 0, every weight perturbed) with TINY_CLASSES and its checkpoints:
    ``model.pth``, and ``old.pth`` saved before it had classes (as older checkpoints are)."""
    import torch

    from test_modeling_detector import _perturb

    root = tmp_path_factory.mktemp("tiny_yacs")
    torch.manual_seed(0)
    model = build_tiny_yacs_model()
    _perturb(model.detector)
    old = save_d2_checkpoint(model, str(root / "old.pth"))
    model.detector.set_classes(*TINY_CLASSES)
    return dict(model=model, weights=save_d2_checkpoint(model, str(root / "model.pth")), old=old, root=root)


@pytest.fixture(scope="session")
def tiny_yacs_exports(tiny_yacs_checkpoint):
    """{format: path} of the two graphs ``tools/export_onnx.py --check`` writes from the tiny yacs
    checkpoint (detector and detectron2 formats, traced at 112 x 149), each checked by the tool.
    Shared by test_d2_export_onnx.py and test_tools_predict.py."""
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
