"""The AVX-512 attention kernel of dinov2od._C (dinov2od.layers.cpu_attention) against torch's
attention, and the ViT blocks that use it at CPU fp32 inference against the plain blocks.

Where the kernel must exist, its absence FAILS these tests, as tests/layers/test_msda_kernels.py does for
the deformable op: on x86-64 Linux with a CPU that has avx512f, avx512dq and fma (read from
/proc/cpuinfo, the flags the kernel's own ``attention_available()`` checks), a ``dinov2od._C``
that does not load, lacks the kernel (a stale build) or reports it unavailable is a failure.
They are skipped, with the reason, where it cannot run: another CPU or OS, or
``DINOV2OD_NO_EXT=1`` (the op deliberately not built); the blocks then use torch's kernel, which
the other backbone tests cover."""

import pytest
import torch
import torch.nn.functional as F

from dinov2od.layers import _ext
from dinov2od.layers import cpu_attention as ca
from dinov2od.layers import fused_linear

from tests.helpers.cpu_attention import KERNEL_FLAGS, attention_float64, kernel_expected, make, qkv_views


@pytest.fixture(autouse=True)
def kernel_here():
    """Skip where the kernel cannot run; fail where it must run but does not."""
    if ca.cpu_attention_available():
        return
    expected, why = kernel_expected()
    if not expected:
        pytest.skip(why)
    module = _ext.load_extension()
    if module is None:
        pytest.fail(f"dinov2od._C is not built or does not load ({_ext.load_error()!r}) on a CPU with "
                    f"{sorted(KERNEL_FLAGS)}; build it with `pip install -e . --no-build-isolation`, or set "
                    "DINOV2OD_NO_EXT=1 to skip these tests")
    if not hasattr(module, "attention_available"):
        pytest.fail("dinov2od._C has no attention kernel (a build older than layers/csrc/cpu/attention_cpu.cpp); "
                    "rebuild it with `pip install -e . --no-build-isolation`")
    if module.attention_available():
        pytest.fail("dinov2od._C.attention_available() is True but "
                    "dinov2od.layers.cpu_attention.cpu_attention_available() says False")
    pytest.fail(f"dinov2od._C reports its attention kernel unavailable on a CPU with {sorted(KERNEL_FLAGS)}: "
                "the build has no AVX-512 code (it needs GCC; a clang build leaves it out)")


# Blocks with the kernel against the plain blocks: the two differ by ~1e-6 (fp32 rounding) on
# features of magnitude ~4. The tolerance is absolute and tight because DINOv3's layer scales
# (~0.05 here) shrink an attention error before it reaches the features: a 1% temperature error
# moves DINOv3's features by ~1e-4 only (DINOv2's, layer scales ~1, by ~1e-3).
BLOCK_ATOL = 1e-5

@pytest.mark.parametrize("b,h,t", [(1, 6, 1025), (4, 6, 257), (2, 3, 5), (1, 2, 33), (1, 1, 1), (3, 2, 48)])
def test_kernel_matches_torch_attention(b, h, t):
    q, k, v = qkv_views(b, h, t)
    out = ca.cpu_attention(q, k, v)
    assert out.shape == (b, t, h, 64) and out.is_contiguous()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2), rtol=0, atol=2e-6)
    # contiguous inputs, other values
    q, k, v = (x.contiguous() for x in qkv_views(b, h, t, seed=1))
    torch.testing.assert_close(ca.cpu_attention(q, k, v), F.scaled_dot_product_attention(q, k, v).transpose(1, 2),
                               rtol=0, atol=2e-6)


def test_kernel_is_as_close_to_float64_as_torch_on_peaked_rows():
    """Scores spread over +-100 (near one-hot rows): the exp and the sums hold up."""
    q, k, v = qkv_views(1, 4, 300, scale=20.0)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).transpose(1, 2)
    ours = (ca.cpu_attention(q, k, v).double() - ref).abs().max().item()
    torch_err = (F.scaled_dot_product_attention(q, k, v).transpose(1, 2).double() - ref).abs().max().item()
    assert ours <= 2 * torch_err + 1e-6, (ours, torch_err)


def test_kernel_refuses_what_it_was_not_built_for():
    q, k, v = qkv_views(1, 2, 9)
    with pytest.raises(RuntimeError, match="head dim 64"):
        ca.cpu_attention(q[..., :32], k[..., :32], v[..., :32])
    with pytest.raises(RuntimeError, match="float32"):
        ca.cpu_attention(q.double(), k.double(), v.double())
    with pytest.raises(RuntimeError, match="one shape"):
        ca.cpu_attention(q, k[:, :, :5], v[:, :, :5])
    assert not ca.cpu_attention_enabled(q, k, v, mask=torch.ones(1, 1, 1, 9, dtype=torch.bool))
    assert not ca.cpu_attention_enabled(q, k, v, p_drop=0.1)
    assert not ca.cpu_attention_enabled(q[..., :32], k[..., :32], v[..., :32])


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    original = ca.cpu_attention

    def counted(q, k, v):
        calls.append(tuple(q.shape))
        return original(q, k, v)

    monkeypatch.setattr(ca, "cpu_attention", counted)
    return calls


def run(bb, images, masks, monkeypatch, on):
    monkeypatch.setenv(fused_linear.ENV, "1" if on else "0")
    with torch.no_grad():
        return bb(images, masks)[0]


@pytest.mark.parametrize("family,window_size,registers", [
    ("dinov2", None, False), ("dinov2", 2, True), ("dinov3", None, False), ("dinov3", 2, False),
])
def test_blocks_with_the_kernel_compute_the_plain_blocks(family, window_size, registers, kernel_calls, monkeypatch):
    bb = make(family, window_size, registers)
    images = torch.randn(1, 3, 112, 112)  # 8 x 8 patches (DINOv3: 7 x 7 of 16 px): whole windows of 2 for DINOv2
    plain = run(bb, images, None, monkeypatch, on=False)
    assert not kernel_calls  # DINOV2OD_FUSED_LINEAR=0: the plain path, torch's kernel
    fast = run(bb, images, None, monkeypatch, on=True)
    assert kernel_calls and all(s[-1] == 64 for s in kernel_calls)
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=BLOCK_ATOL)
    # a padded batch: the masked attention runs torch's kernel, the result is unchanged
    kernel_calls.clear()
    batch = torch.randn(2, 3, 112, 140)
    batch[0, :, :112, :112] = images[0]
    mask = torch.ones(2, 112, 140, dtype=torch.bool)
    mask[0, :112, :112] = False
    mask[1, :84, :] = False
    fast_batch = run(bb, batch, mask, monkeypatch, on=True)
    assert not kernel_calls
    for a, b in zip(fast_batch, plain):
        torch.testing.assert_close(a[:1, :, : b.shape[2], : b.shape[3]], b, rtol=0, atol=BLOCK_ATOL)
    # with gradients the kernel stays out (it has no backward)
    bb.train()
    bb(images)[0][0].sum().backward()
    assert not kernel_calls


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_a_wrong_kernel_would_be_caught(family, kernel_calls, monkeypatch):
    """Negative control: a kernel that attends with a 1% wrong temperature moves the features by
    more than the block test's tolerance, in both families."""
    bb = make(family)
    images = torch.randn(1, 3, 112, 112)
    plain = run(bb, images, None, monkeypatch, on=False)
    kernel = ca.cpu_attention
    monkeypatch.setattr(ca, "cpu_attention", lambda q, k, v: kernel(q * 1.01, k, v))
    wrong = run(bb, images, None, monkeypatch, on=True)
    assert max((a - b).abs().max().item() for a, b in zip(wrong, plain)) > 3 * BLOCK_ATOL


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_kernel_output_inside_the_blocks_equals_float64_attention(family, monkeypatch):
    """The attention the kernel computes in a real forward (DINOv3: rotary q/k, storage tokens),
    compared with float64 attention of the same q, k, v, where layer scales cannot hide an error
    (a 1% temperature error moves these outputs by ~2e-3)."""
    bb = make(family)
    seen = []
    original = ca.cpu_attention

    def recording(q, k, v):
        out = original(q, k, v)
        seen.append((q.clone(), k.clone(), v.clone(), out.clone()))
        return out

    monkeypatch.setattr(ca, "cpu_attention", recording)
    run(bb, torch.randn(1, 3, 112, 112), None, monkeypatch, on=True)
    assert len(seen) == bb.out_indices[-1] + 1  # every block that runs
    for q, k, v, out in seen:
        assert q.shape[-1] == 64 and out.shape == (q.shape[0], q.shape[2], q.shape[1], 64)
        torch.testing.assert_close(out.double(), attention_float64(q, k, v), rtol=0, atol=5e-6)


def test_env_turns_the_kernel_off(kernel_calls, monkeypatch):
    q, k, v = qkv_views(1, 2, 9)
    with torch.no_grad():
        assert ca.cpu_attention_enabled(q, k, v)
        monkeypatch.setenv(ca.ENV, "0")
        assert not ca.cpu_attention_enabled(q, k, v)
