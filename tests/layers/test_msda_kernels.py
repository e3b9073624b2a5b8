"""Compiled multi-scale deformable attention kernels (dinov2od._C) against the PyTorch path.

The compiled-kernel tests FAIL when ``dinov2od._C`` is not built or does not load: CI always
builds it (``pip install -e . --no-build-isolation``). Set ``DINOV2OD_NO_EXT=1`` (the variable
that also makes setup.py skip the build) to skip them instead. CUDA tests skip when no GPU is
visible; with a GPU they fail if the build has no CUDA kernels. With
``DINOV2OD_EXPECT_CUDA_EXT=1`` (a FORCE_CUDA=1 build, e.g. on a machine without a GPU) the
build must contain CUDA kernels.
"""
import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

from dinov2od.layers import _ext, level_start_index_from_shapes, ms_deform_attn, ms_deform_attn_pytorch

from tests.helpers import ROOT

msda_module = importlib.import_module("dinov2od.layers.ms_deform_attn")

NO_EXT = os.environ.get("DINOV2OD_NO_EXT", "0") == "1"
HAS_GPU = torch.cuda.is_available()


@pytest.fixture
def fresh_loader():
    """Forget the loader's state before and after a test that fakes a broken build."""
    _ext._reset()
    yield
    _ext._reset()


def require_ext():
    """The built extension, failing (not skipping) when it is missing, unless DINOV2OD_NO_EXT=1."""
    if NO_EXT:
        pytest.skip("DINOV2OD_NO_EXT=1: the compiled op is deliberately not built")
    module = _ext.load_extension()
    if module is None:
        pytest.fail(
            f"dinov2od._C is not built or does not load ({_ext.load_error()!r}); build it with "
            "`pip install -e . --no-build-isolation`, or set DINOV2OD_NO_EXT=1 to skip these tests"
        )
    return module


# (device, cpu inner loops): every compiled path
PATHS = [
    pytest.param(("cpu", "default"), id="cpu-default"),
    pytest.param(("cpu", "avx2"), id="cpu-avx2"),
    pytest.param(
        ("cuda", None),
        id="cuda",
        marks=pytest.mark.skipif(not HAS_GPU, reason="no GPU visible to torch: CUDA kernel not run"),
    ),
]


@pytest.fixture(params=PATHS)
def path(request):
    """Selects one compiled path; yields its device."""
    device, isa = request.param
    module = require_ext()
    if device == "cuda":
        assert module.with_cuda(), "a GPU is visible but dinov2od._C has no CUDA kernels (FORCE_CUDA=1)"
        yield device
        return
    previous = module.cpu_capability()
    try:
        module.set_cpu_capability(isa)
    except RuntimeError:
        pytest.skip(f"this CPU (or compiler) has no '{isa}' inner loops")
    yield device
    module.set_cpu_capability(previous)


def make_inputs(shapes, n=2, lq=5, m=2, d=8, p=3, dtype=torch.float64, device="cpu", seed=0, spread=0.25):
    """Random op inputs; locations in [-spread, 1 + spread] so some points fall outside the map."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.as_tensor(shapes, dtype=torch.long)
    starts = level_start_index_from_shapes(shapes)
    s = int((shapes[:, 0] * shapes[:, 1]).sum())
    num_levels = shapes.shape[0]
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.rand(n, lq, m, num_levels, p, 2, generator=g, dtype=torch.float64)
    loc = loc * (1 + 2 * spread) - spread
    weights = torch.rand(n, lq, m, num_levels, p, generator=g, dtype=torch.float64)
    to = dict(device=device, dtype=dtype)
    return value.to(**to), shapes.to(device), starts.to(device), loc.to(**to), weights.to(**to)


def random_shapes(seed, num_levels=3):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.randint(1, 8, (num_levels, 2), generator=g)
    shapes[0] = torch.tensor([1, 5])  # a one-row level: no point has all four corners inside
    return shapes


def run_both(inputs):
    """Forward + backward of the compiled op and of the PyTorch path with the same output grad."""
    results = []
    grad = None
    for fn in (_ext.ms_deform_attn_compiled, ms_deform_attn_pytorch):
        value, shapes, starts, loc, weights = [t.detach().clone() for t in inputs]
        leaves = [value.requires_grad_(), loc.requires_grad_(), weights.requires_grad_()]
        out = fn(value, shapes, starts, loc, weights)
        if grad is None:  # quarters in [-2, 2]: exact in every dtype, the same for both paths
            g = torch.Generator().manual_seed(1)
            grad = torch.randint(-8, 9, out.shape, generator=g).to(out) / 4
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])
    return results


def assert_close(actual, expected, tol, name):
    # float32: relative to the tensor's largest magnitude (location gradients scale with W, D)
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


NAMES = ("output", "grad_value", "grad_sampling_locations", "grad_attention_weights")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("d", [8, 32, 71])
def test_matches_pytorch_path(path, dtype, tol, d):
    inputs = make_inputs(random_shapes(d), n=3, lq=7, d=d, dtype=dtype, device=path, seed=d)
    compiled, reference = run_both(inputs)
    for name, a, b in zip(NAMES, compiled, reference):
        assert a.dtype == b.dtype == dtype
        assert_close(a, b, tol, name)


@pytest.mark.parametrize("d", [30, 32, 64, 71, 1025, 2048])
def test_gradcheck_channel_counts(path, d):
    """Channel counts hitting each channel-reduction branch of the CUDA backward (warp groups,
    one block with shared memory, several blocks with global atomics)."""
    value, shapes, starts, loc, weights = make_inputs([(3, 2), (2, 3)], n=1, lq=2, m=2, d=d, p=2, device=path, seed=d)
    value.requires_grad_()
    loc.requires_grad_()
    weights.requires_grad_()
    fn = lambda v, sl, aw: _ext.ms_deform_attn_compiled(v, shapes, starts, sl, aw)  # noqa: E731
    # CUDA sums with atomics in any order: allow float64 round-off between two backward runs
    assert torch.autograd.gradcheck(
        fn, (value, loc, weights), eps=1e-6, atol=1e-5, nondet_tol=1e-12, fast_mode=d > 100
    )


def test_large_batch(path):
    inputs = make_inputs([(5, 3), (2, 4)], n=33, lq=4, m=3, d=16, p=2, device=path, seed=33)
    for name, a, b in zip(NAMES, *run_both(inputs)):
        assert_close(a, b, 1e-10, name)


@pytest.mark.parametrize("p", [16, 17])
def test_points_per_item_either_side_of_the_prefetch_limit(path, p):
    """The CPU forward finds the corners of a work item (its L * P points) one item ahead and
    prefetches their rows while it accumulates the item before, for L * P <= 64; above that it
    finds them as it goes. Both, over several threads' chunks, against the PyTorch path."""
    inputs = make_inputs([(6, 5), (3, 4), (2, 2), (1, 3)], n=2, lq=9, m=3, d=8, p=p, device=path, seed=p)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = run_both(inputs)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, *results):
        assert_close(a, b, 1e-10, name)


def test_points_outside_the_map(path):
    value, shapes, starts, loc, weights = make_inputs([(4, 6), (3, 2)], lq=6, d=8, device=path, seed=5)
    # far outside, on the outer edge of the zero padding, and straddling the border
    far = loc.clone()
    far[..., 0] = torch.where(far[..., 0] > 0.5, far[..., 0] + 2.0, far[..., 0] - 2.0)
    out = _ext.ms_deform_attn_compiled(value, shapes, starts, far, weights)
    assert out.abs().max() == 0
    edge = loc.clone()
    edge[:, :, :, :, 0, 0] = -0.02  # just left of the first column's centre: partly padding
    edge[:, :, :, :, 1, 1] = 1.07
    for name, a, b in zip(NAMES, *run_both((value, shapes, starts, edge, weights))):
        assert_close(a, b, 1e-10, name)


@pytest.mark.parametrize("layout", ["channels-strided", "heads-major"])
def test_non_contiguous_inputs(path, layout):
    value, shapes, starts, loc, weights = make_inputs([(4, 5), (2, 3)], n=2, lq=6, m=2, d=8, device=path, seed=9)
    if layout == "channels-strided":  # copied by the kernels
        value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    else:  # (N, M, S, D) memory, channels contiguous: the CPU kernel reads it through its strides
        value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    weights_nc = torch.stack([weights, weights], -1)[..., 0]
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or weights_nc.is_contiguous())
    compiled = _ext.ms_deform_attn_compiled(value_nc, shapes, starts, loc_nc, weights_nc)
    expected = ms_deform_attn_pytorch(value, shapes, starts, loc, weights)
    torch.testing.assert_close(compiled, expected, rtol=1e-10, atol=1e-10)
    compiled, reference = run_both((value_nc, shapes, starts, loc_nc, weights_nc))
    for name, a, b in zip(NAMES, compiled, reference):
        assert_close(a, b, 1e-10, name)


def test_value_broadcast_over_batch(path):
    """An expanded value (batch stride 0) is read in place and its gradient sums over the batch."""
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2)], n=3, lq=4, d=8, device=path, seed=4)
    grads = []
    for fn in (_ext.ms_deform_attn_compiled, ms_deform_attn_pytorch):
        leaf = value[:1].clone().requires_grad_()
        shared = leaf.expand(3, -1, -1, -1)
        assert shared.stride(0) == 0
        out = fn(shared, shapes, starts, loc, weights)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), leaf.grad))
    for name, a, b in zip(("output", "grad_value"), *grads):
        assert_close(a, b, 1e-10, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(path, dtype):
    value, shapes, starts, loc, weights = make_inputs([(6, 4), (3, 5)], lq=6, d=32, dtype=torch.float32, device=path)
    value_h = value.to(dtype)
    # float32 locations/weights with a low-precision value, as under autocast
    compiled, reference = run_both((value_h, shapes, starts, loc, weights))
    expected, _, exp_loc, exp_w = run_both((value_h.float(), shapes, starts, loc, weights))[1]
    out, grad_value, grad_loc, grad_w = compiled
    assert out.dtype == grad_value.dtype == dtype
    assert grad_loc.dtype == grad_w.dtype == torch.float32
    # the reference sees the same rounded value in float32; the only rounding left is the output's
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_close(out.float(), expected, tol, "output")
    assert_close(grad_loc, exp_loc, tol, "grad_sampling_locations")
    assert_close(grad_w, exp_w, tol, "grad_attention_weights")
    assert_close(grad_value.float(), reference[1].float(), tol, "grad_value")


def test_float32_stays_float32_under_autocast(path):
    inputs = make_inputs([(4, 4), (2, 3)], lq=5, d=16, dtype=torch.float32, device=path)
    plain = _ext.ms_deform_attn_compiled(*inputs)
    amp_dtype = torch.bfloat16
    with torch.autocast(device_type=path, dtype=amp_dtype):
        auto = ms_deform_attn(*inputs)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=0, atol=0)


# ------------------------------------------------------------------ dispatch


def spy_compiled(monkeypatch):
    calls = []
    real = _ext.ms_deform_attn_compiled

    def spy(*args):
        calls.append(args[0].device.type)
        return real(*args)

    monkeypatch.setattr(_ext, "ms_deform_attn_compiled", spy)
    return calls


def test_dispatch_uses_cpu_kernel_when_built(monkeypatch):
    require_ext()
    monkeypatch.delenv(msda_module.ENV, raising=False)
    calls = spy_compiled(monkeypatch)
    inputs = make_inputs([(3, 3)], d=4)
    torch.testing.assert_close(ms_deform_attn(*inputs), ms_deform_attn_pytorch(*inputs), rtol=1e-10, atol=1e-10)
    assert calls == ["cpu"]


def test_force_pytorch_argument_and_env(monkeypatch):
    calls = spy_compiled(monkeypatch)
    inputs = make_inputs([(3, 3)], d=4)
    monkeypatch.delenv(msda_module.ENV, raising=False)
    ms_deform_attn(*inputs, force_pytorch=True)
    monkeypatch.setenv(msda_module.ENV, "0")
    ms_deform_attn(*inputs)
    assert calls == []


def test_broken_build_falls_back_with_one_warning(monkeypatch, fresh_loader):
    def broken():
        raise ImportError("dinov2od/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")

    monkeypatch.setattr(_ext, "_import_C", broken)
    monkeypatch.delenv(msda_module.ENV, raising=False)
    inputs = make_inputs([(3, 4)], d=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ms_deform_attn(*inputs) for _ in range(3)]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "undefined symbol" in messages[0]
    assert "pip install -e . --no-build-isolation" in messages[0]
    assert "DINOV2OD_COMPILED_MSDA=0" in messages[0]
    for out in outs:
        torch.testing.assert_close(out, ms_deform_attn_pytorch(*inputs), rtol=0, atol=0)


def test_force_pytorch_env_silences_a_broken_build(monkeypatch, fresh_loader):
    def broken():
        raise AssertionError("the loader must not run when the PyTorch path is forced")

    monkeypatch.setattr(_ext, "_import_C", broken)
    monkeypatch.setenv(msda_module.ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*make_inputs([(3, 4)], d=4))


def test_missing_build_never_crashes_at_import():
    """A fresh interpreter where `dinov2od._C` cannot be imported: import works, one warning."""
    code = (
        "import sys, warnings; sys.modules['dinov2od._C'] = None\n"
        "import torch; import dinov2od.layers as L\n"
        "v = torch.randn(1, 6, 1, 4); s = torch.tensor([[2, 3]]); i = torch.tensor([0])\n"
        "loc = torch.rand(1, 2, 1, 1, 2, 2); w = torch.rand(1, 2, 1, 1, 2)\n"
        "with warnings.catch_warnings(record=True) as c:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2): L.ms_deform_attn(v, s, i, loc, w)\n"
        "print(len(c)); print(c[0].message)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != msda_module.ENV}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    count, message = res.stdout.split("\n", 1)
    assert count == "1" and "dinov2od._C" in message and "could not be loaded" in message and "--no-build-isolation" in message


@pytest.mark.skipif(os.environ.get("DINOV2OD_EXPECT_CUDA_EXT", "0") != "1", reason="DINOV2OD_EXPECT_CUDA_EXT=1 not set")
def test_cuda_build_contains_cuda_kernels():
    module = require_ext()
    assert module.with_cuda(), "expected a FORCE_CUDA=1 build of dinov2od._C"
    assert module.cuda_archs(), "no compute capability recorded in the CUDA build"


def test_kernel_rejects_inconsistent_level_index():
    """The kernels address value with level_start_index: a wrong one is an error, not a bad read."""
    require_ext()
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 2)], d=4)
    with pytest.raises(RuntimeError, match="level_start_index must be the offsets"):
        _ext.ms_deform_attn_compiled(value, shapes, starts + 1, loc, weights)
    with pytest.raises(RuntimeError, match="spatial_shapes sum to"):
        _ext.ms_deform_attn_compiled(value[:, :-1], shapes, starts, loc, weights)


def test_module_under_bfloat16_autocast_matches_pytorch_path(path):
    """The layer under autocast feeds the kernel a bfloat16 value with float32 locations."""
    from dinov2od.layers import MultiScaleDeformableAttention

    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(embed_dim=32, num_heads=4, num_levels=2, num_points=2).to(path)
    shapes = torch.tensor([[6, 5], [3, 4]], device=path)
    query = torch.randn(2, 7, 32, device=path)
    value = torch.randn(2, 42, 32, device=path)
    ref = torch.rand(2, 7, 2, device=path)
    outs, grads = [], []
    for force in (False, True):
        layer.zero_grad()
        layer.force_pytorch = force
        with torch.autocast(device_type=path, dtype=torch.bfloat16):
            out = layer(query, ref, value, shapes)
        out.float().square().sum().backward()
        outs.append(out.detach().float())
        grads.append(layer.value_proj.weight.grad.clone())
    assert_close(outs[0], outs[1], 2e-2, "output")
    assert_close(grads[0], grads[1], 2e-2, "value_proj.weight.grad")
