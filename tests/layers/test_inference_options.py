"""dinov2od.layers.inference_options: one structure for the fast-path switches.

Each option turns its path on and off (observed by the ops or functions the path calls, not by
the options' own state), its environment variable does the same with the meaning it always had,
the variables are read in that module only and listed in its table, and the precedence holds
(defaults < environment < set_inference_options < blocks). Negative control: a path whose reader
ignores the option shows the same calls with the option on and off, which the A/B check rejects."""
import ast
import contextlib
import importlib
import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dinov2od.layers import _ext
from dinov2od.layers import cpu_attention as ca
from dinov2od.layers import fused_linear
from dinov2od.layers import inference_options as io
from dinov2od.layers.inference_options import InferenceOptions, current_options, inference_options
from dinov2od.modeling import DINOv2Backbone, ViTBackbone
from dinov2od.layers import kernels

from tests.helpers import ROOT

msda = importlib.import_module("dinov2od.layers.ms_deform_attn")  # (the package's ms_deform_attn is the function)
TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=56)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No variable of the table set, no process-wide setting left behind."""
    for var in io.ENV_VARIABLES.values():
        monkeypatch.delenv(var, raising=False)
    yield
    io.set_inference_options(**{name: None for name in io._FIELDS})


class OpNames(TorchDispatchMode):
    """The names of the ops run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def onednn_linears() -> int:
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    with torch.no_grad(), OpNames() as ops:
        kernels.linear(x, w, b, "gelu")
    return sum("mkldnn._linear_pointwise" in n for n in ops.names)


@contextlib.contextmanager
def counting(owner, name: str):
    """Yields a list that gets one entry per call of ``owner.name`` inside the block (which still runs)."""
    original, calls = getattr(owner, name), []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(owner, name, counted)
    try:
        yield calls
    finally:
        setattr(owner, name, original)


def fused_blocks() -> int:
    torch.manual_seed(0)
    bb = DINOv2Backbone(arch="tiny", arch_overrides=TINY, num_taps=2, lora_rank=2).eval()
    with torch.no_grad(), counting(ViTBackbone, "_block_inference") as calls:
        bb(torch.randn(1, 3, 56, 56))
    return len(calls)


def attention_kernels() -> int:
    if not ca.cpu_attention_available():
        pytest.skip("dinov2od._C's attention kernel is not available here (tests/layers/test_cpu_attention.py "
                    "says whether it must be)")
    q, k, v = torch.randn(3, 1, 2, 9, 64).unbind(0)
    with torch.no_grad(), counting(ca, "cpu_attention") as calls:
        kernels.attention(q, k, v, None, 0.0)
    return len(calls)


def compiled_msda() -> int:
    value = torch.randn(1, 5, 2, 4)
    if not _ext.available_for(value):
        pytest.skip(f"dinov2od._C is not built here ({_ext.load_error()})")
    shapes, starts = torch.tensor([[1, 5]]), torch.tensor([0])
    with counting(_ext, "ms_deform_attn_compiled") as calls:
        msda.ms_deform_attn(value, shapes, starts, torch.rand(1, 3, 2, 1, 2, 2), torch.rand(1, 3, 2, 1, 2))
    return len(calls)


# option -> (the count of its path's calls in one run, the variable's value that turns it off)
PATHS = {
    "fused_linear": (onednn_linears, "0"),
    "fused_blocks": (fused_blocks, "off"),
    "cpu_attention": (attention_kernels, "false"),
    "compiled_msda": (compiled_msda, "0"),
}


def ab(option: str):
    """(calls of ``option``'s path with the option on, with it off)."""
    count = PATHS[option][0]
    with inference_options(**{option: True}):
        on = count()
    with inference_options(**{option: False}):
        off = count()
    return on, off


def test_every_option_has_a_path_checked_here():
    assert set(PATHS) == set(io._FIELDS) and InferenceOptions() == InferenceOptions(*[True] * len(io._FIELDS))


@pytest.mark.parametrize("option", sorted(PATHS))
def test_each_option_turns_its_path_on_and_off(option):
    on, off = ab(option)
    assert on > 0 and off == 0, (on, off)
    assert PATHS[option][0]() == on  # outside any block: the default, on


@pytest.mark.parametrize("option", sorted(o for o, (_, value) in PATHS.items() if value is not None))
def test_each_variable_turns_its_path_off(option, monkeypatch):
    count, value = PATHS[option]
    monkeypatch.setenv(io.ENV_VARIABLES[option], value)
    assert getattr(current_options(), option) is False
    assert count() == 0
    with inference_options(**{option: True}):  # a block wins over the environment
        assert count() > 0


@pytest.mark.parametrize("option", sorted(PATHS))
def test_negative_control_an_ignored_option_gives_an_identical_ab(option, monkeypatch):
    """Where the path's reader ignores the options (always the defaults), the A/B above sees the
    same calls on and off: the check of test_each_option_turns_its_path_on_and_off would fail."""
    defaults = InferenceOptions()
    reader = {"fused_linear": fused_linear, "cpu_attention": ca, "fused_blocks": kernels,
              "compiled_msda": msda}[option]
    monkeypatch.setattr(reader, "current_options", lambda: defaults)
    on, off = ab(option)
    assert on == off > 0


def test_fused_linear_off_takes_the_blocks_and_the_attention_kernel_with_it():
    with inference_options(fused_linear=False):
        assert fused_blocks() == 0
        if ca.cpu_attention_available():
            assert attention_kernels() == 0


@pytest.mark.parametrize("option,raw,expected", [
    ("fused_linear", "0", False), ("fused_linear", "false", False), ("fused_linear", "False", False),
    ("fused_linear", "1", True), ("fused_linear", "", True), ("fused_linear", "no", True),
    ("cpu_attention", "0", False), ("cpu_attention", "1", True),
    ("fused_blocks", "off", False), ("fused_blocks", "1", True),
    ("compiled_msda", "0", False), ("compiled_msda", "false", False), ("compiled_msda", "1", True),
    ("compiled_msda", "", True), ("compiled_msda", "yes", True),
])
def test_every_variable_reads_the_same_way(option, raw, expected, monkeypatch):
    monkeypatch.setenv(io.ENV_VARIABLES[option], raw)
    assert getattr(current_options(), option) is expected
    assert all(getattr(current_options(), other) for other in io._FIELDS if other != option)


def test_precedence_and_nesting(monkeypatch):
    monkeypatch.setenv("DINOV2OD_FUSED_LINEAR", "0")
    assert current_options() == InferenceOptions(fused_linear=False)
    assert io.set_inference_options(fused_linear=True, cpu_attention=False) == InferenceOptions(cpu_attention=False)
    with inference_options(fused_linear=False) as outer:
        assert outer == InferenceOptions(fused_linear=False, cpu_attention=False)
        with inference_options(cpu_attention=True, fused_blocks=False):
            assert current_options() == InferenceOptions(fused_linear=False, fused_blocks=False)
        assert current_options() == outer
    with pytest.raises(RuntimeError), inference_options(compiled_msda=False):
        raise RuntimeError  # restored on an exception too
    assert current_options() == InferenceOptions(cpu_attention=False)
    io.set_inference_options(fused_linear=None, cpu_attention=None)  # back to the environment
    assert current_options() == InferenceOptions(fused_linear=False)
    monkeypatch.delenv("DINOV2OD_FUSED_LINEAR")
    assert current_options() == InferenceOptions()


def test_unknown_options_and_values_are_refused():
    with pytest.raises(TypeError, match="unknown inference option.*fused_linaer.*fused_linear"):
        with inference_options(fused_linaer=False):
            pass
    with pytest.raises(TypeError, match="expected True or False"):
        with inference_options(fused_linear=0):
            pass
    with pytest.raises(TypeError, match="unknown"):
        io.set_inference_options(stack_value_proj=False)


def test_the_table_lists_every_option_and_variable():
    doc = io.__doc__
    for option in io._FIELDS:
        assert f"``{option}``" in doc
    for var in io.ENV_VARIABLES.values():
        assert f"``{var}=" in doc
    # the modules' own names for the variables are the table's
    assert (fused_linear.ENV, ca.ENV, msda.ENV) == (
        "DINOV2OD_FUSED_LINEAR", "DINOV2OD_CPU_ATTENTION", "DINOV2OD_COMPILED_MSDA")


def test_the_retired_variable_is_refused_with_its_replacement(monkeypatch):
    monkeypatch.setenv("DINOV2OD_FORCE_PYTORCH_MSDA", "1")
    with pytest.raises(RuntimeError, match="DINOV2OD_COMPILED_MSDA=0"):
        current_options()
    monkeypatch.delenv("DINOV2OD_FORCE_PYTORCH_MSDA")
    assert current_options() == InferenceOptions()


def environment_reads(source: str):
    """The ``os.environ``/``os.getenv`` reads in ``source`` (one line each)."""
    reads = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                and isinstance(node.value, ast.Name) and node.value.id == "os":
            reads.append(node.lineno)
    return reads


def test_the_variables_are_read_in_one_place():
    """No module of dinov2od but inference_options reads the environment where it names one of the
    table's variables (or the modules' constants for them)."""
    names = re.compile(r"\b(%s)\b" % "|".join(sorted(set(io.ENV_VARIABLES.values())
                                                      | {"ENV", "ENV_VARIABLES"})))
    readers = []
    for folder, _, files in os.walk(os.path.join(ROOT, "dinov2od")):
        for f in files:
            path = os.path.join(folder, f)
            if not f.endswith(".py") or path.endswith(os.path.join("layers", "inference_options.py")):
                continue
            source = open(path).read()
            if environment_reads(source) and names.search(source):
                readers.append(os.path.relpath(path, ROOT))
    assert readers == []
    # negative control: the check sees the read as fused_linear.py had it
    old = 'import os\nENV = "DINOV2OD_FUSED_LINEAR"\ndef env_off(name):\n    return os.environ.get(name, "1") in ("0",)\n'
    assert environment_reads(old) and names.search(old)
