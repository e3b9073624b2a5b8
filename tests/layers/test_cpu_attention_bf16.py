"""The bfloat16 CPU inference path of the ViT blocks: dinov2od._C's bfloat16 attention kernel
(dinov2od.layers.cpu_attention) against float64 attention of the same bfloat16 inputs, and the
blocks under CPU bfloat16 autocast (oneDNN bfloat16 linears on weights cast once, kept until the
parameters change) against the blocks as autocast runs them.

As tests/layers/test_cpu_attention.py: where the kernel must exist (x86-64 Linux, a CPU with
avx512f/dq/bw/vl, fma and avx512_bf16, the op built) its absence FAILS; elsewhere these tests are
skipped with the reason (the blocks then run as autocast runs them, which the backbone tests cover)."""
import pytest
import torch
import torch.nn.functional as F

from dinov2od.layers import _ext
from dinov2od.layers import cpu_attention as ca
from dinov2od.layers.inference_options import inference_options
from dinov2od.modeling import inference as inference_mod
from dinov2od.layers import fused_linear

from tests.helpers.cpu_attention import attention_float64, cpu_flags, kernel_expected, make, qkv_views

BF16_FLAGS = {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "fma"}


@pytest.fixture(autouse=True)
def bf16_kernel_here():
    """Skip where the kernel cannot run; fail where it must run but does not."""
    if ca.cpu_attention_bf16_available():
        return
    expected, why = kernel_expected()
    flags = cpu_flags() or set()
    if expected and not BF16_FLAGS <= flags:
        expected, why = False, f"this CPU lacks {sorted(BF16_FLAGS - flags)} (the bfloat16 kernel needs avx512_bf16)"
    if not expected:
        pytest.skip(why)
    module = _ext.load_extension()
    if module is None or not hasattr(module, "attention_bf16_available"):
        pytest.fail("dinov2od._C does not load or has no bfloat16 attention kernel (a build older than "
                    "layers/csrc/cpu/attention_cpu.cpp); rebuild it with `pip install -e . --no-build-isolation`")
    pytest.fail(f"dinov2od._C reports its bfloat16 attention kernel unavailable on a CPU with {sorted(BF16_FLAGS)}")


def bf16_qkv(b, h, t, seed=0, scale=2.0):
    q, k, v = qkv_views(b, h, t, seed=seed)
    return (q * scale).bfloat16(), (k * scale).bfloat16(), v.bfloat16()


def kernel_close(out, ref):
    """The kernel's tolerance against float64 attention of its own bfloat16 inputs: the output's
    bfloat16 rounding (2^-8 relative) plus the rounding of the probabilities for P V."""
    return bool(((out.double() - ref).abs() <= 2 ** -7 * ref.abs() + 4e-3).all())


@pytest.mark.parametrize("b,h,t", [(1, 6, 1025), (4, 6, 257), (2, 3, 5), (1, 2, 33), (1, 1, 1), (3, 2, 48)])
def test_bf16_kernel_matches_float64_attention(b, h, t):
    q, k, v = bf16_qkv(b, h, t)  # strided views of one (B, T, 3, H, 64) product, as in the ViT
    out = ca.cpu_attention_bf16(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (b, t, h, 64) and out.is_contiguous()
    ref = attention_float64(q, k, v)
    assert kernel_close(out, ref), (out.double() - ref).abs().max().item()
    torch_err = (F.scaled_dot_product_attention(q, k, v).transpose(1, 2).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-3
    # contiguous inputs give the same numbers
    assert torch.equal(ca.cpu_attention_bf16(*(x.contiguous() for x in (q, k, v))), out)
    if t > 1:  # negative control: the tolerance sees a 1% temperature error
        assert not kernel_close(out, attention_float64(q * 1.01, k, v))


@pytest.mark.parametrize("b,h,t", [(1, 8, 300), (2, 8, 49), (1, 3, 5), (1, 1, 1)])
def test_bf16_kernel_head_dim_32_matches_float64_attention(b, h, t):
    """Head dim 32 (the decoder's self-attention: 256 wide, 8 heads): the same tolerance, scale
    1 / sqrt(32); q and k strided views of one (B, T, 2, H, 32) product, as the decoder makes them."""
    g = torch.Generator().manual_seed(t)
    qk = (torch.randn(b, t, 2, h, 32, generator=g) * 2.0).bfloat16()
    q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)
    v = torch.randn(b, t, h, 32, generator=g).bfloat16().transpose(1, 2)
    out = ca.cpu_attention_bf16(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (b, t, h, 32) and out.is_contiguous()
    ref = attention_float64(q, k, v)
    assert kernel_close(out, ref), (out.double() - ref).abs().max().item()
    torch_err = (F.scaled_dot_product_attention(q, k, v).transpose(1, 2).double() - ref).abs().max().item()
    assert (out.double() - ref).abs().max().item() <= 2 * torch_err + 1e-3
    if t > 1:  # negative control: the tolerance sees the head-dim-64 scale (a temperature of sqrt 2)
        assert not kernel_close(out, attention_float64(q * 2 ** -0.5, k, v))


def test_decoder_self_attention_takes_the_kernel_and_computes_the_module(monkeypatch):
    """The decoder's self-attention under CPU bfloat16 autocast at inference: dinov2od's kernel in
    place of torch's, against float64 attention from the module's own weights (the tolerance of
    bfloat16 products) and no further from it than the module as autocast runs it."""
    from dinov2od.modeling import decoder as decoder_mod

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(256, 8, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.1)
        mha.out_proj.bias.normal_(0, 0.1)
    tgt, pos = torch.randn(2, 300, 256), torch.randn(2, 300, 256)
    calls = []
    kernel = ca.cpu_attention_bf16
    monkeypatch.setattr(ca, "cpu_attention_bf16", lambda q, k, v: calls.append(q.shape) or kernel(q, k, v))

    def run(**options):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), inference_options(**options):
            return decoder_mod.decoder_self_attention(mha, tgt + pos, tgt).float()

    ours = run()
    assert calls == [(2, 8, 300, 32)]
    plain = run(cpu_attention=False)
    assert len(calls) == 1  # the option turns the kernel off
    w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    q, k, v = F.linear((tgt + pos).double(), w[:256], b[:256]), F.linear((tgt + pos).double(), w[256:512], b[256:512]), \
        F.linear(tgt.double(), w[512:], b[512:])
    heads = lambda x: x.view(2, 300, 8, 32).transpose(1, 2)  # noqa: E731
    att = attention_float64(heads(q), heads(k), heads(v)).reshape(2, 300, 256)
    ref = F.linear(att, mha.out_proj.weight.double(), mha.out_proj.bias.double())
    err, plain_err = (ours.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert err <= 1.5 * plain_err + 1e-3, (err, plain_err)
    assert err < 0.05 * ref.abs().max().item()
    # with a mask, in training, or with a gradient: the module itself
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder_mod.decoder_self_attention(mha, tgt + pos, tgt, torch.zeros(300, 300, dtype=torch.bool))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder_mod.decoder_self_attention(mha, tgt + pos, tgt)
    assert len(calls) == 1
    # negative control: the head-dim-64 scale inside the path is seen by the tolerance
    monkeypatch.setattr(ca, "cpu_attention_bf16",
                        lambda q, k, v: kernel((q.float() * 2 ** -0.5).bfloat16(), k, v))
    wrong = run()
    assert (wrong.double() - ref).abs().max().item() > 1.5 * plain_err + 1e-3


def test_bf16_kernel_refuses_what_it_was_not_built_for():
    q, k, v = bf16_qkv(1, 2, 9)
    with pytest.raises(RuntimeError, match="bfloat16"):
        ca.cpu_attention_bf16(q.float(), k.float(), v.float())
    with pytest.raises(RuntimeError, match="head dim 64 and 32, got 16"):
        ca.cpu_attention_bf16(q[..., :16], k[..., :16], v[..., :16])
    with torch.no_grad():
        assert ca.cpu_attention_bf16_enabled(q, k, v)
        assert not ca.cpu_attention_bf16_enabled(q.float(), k.float(), v.float())
        assert not ca.cpu_attention_bf16_enabled(q, k, v, mask=torch.ones(1, 1, 1, 9, dtype=torch.bool))
        assert not ca.cpu_attention_bf16_enabled(q, k, v, p_drop=0.1)
        with inference_options(cpu_attention=False):
            assert not ca.cpu_attention_bf16_enabled(q, k, v)
    qg = q.detach().requires_grad_()
    assert not ca.cpu_attention_bf16_enabled(qg, k, v)  # no backward: never where a gradient is needed


@pytest.fixture
def bf16_calls(monkeypatch):
    """Calls of the bfloat16 kernel and of the bfloat16 linears from the ViT blocks."""
    calls = {"attention": 0, "linear": 0}
    attention, linear = ca.cpu_attention_bf16, fused_linear.bf16_linear

    def counted_attention(q, k, v):
        calls["attention"] += 1
        return attention(q, k, v)

    def counted_linear(*args, **kwargs):
        calls["linear"] += 1
        return linear(*args, **kwargs)

    monkeypatch.setattr(ca, "cpu_attention_bf16", counted_attention)
    monkeypatch.setattr(fused_linear, "bf16_linear", counted_linear)
    return calls


def features(bb, images, **options):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), inference_options(**options):
        return [f.float() for f in bb(images)[0]]


def as_autocast_runs_it(bb, images):
    return features(bb, images, fused_blocks=False, cpu_attention=False)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("family,window_size", [("dinov2", None), ("dinov2", 2), ("dinov3", None)])
def test_bf16_blocks_compute_what_autocast_computes(family, window_size, bf16_calls):
    bb = make(family, window_size)
    images = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        fp32 = [f for f in bb(images)[0]]
    plain = as_autocast_runs_it(bb, images)
    assert bf16_calls == {"attention": 0, "linear": 0}
    fast = features(bb, images)
    depth = bb.out_indices[-1] + 1
    assert bf16_calls["linear"] == 4 * depth and bf16_calls["attention"] >= depth
    # both are bfloat16 computations of the fp32 features: the path is no further from them than
    # autocast's own (and close to autocast's result)
    scale = max(f.abs().max().item() for f in fp32)
    assert max_diff(fast, fp32) <= 1.5 * max_diff(plain, fp32) + 1e-3 * scale
    assert max_diff(fast, plain) <= 2 ** -6 * scale
    # training mode, or a gradient: autocast's own path
    bf16_calls.update(attention=0, linear=0)
    bb.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bb(images)[0][0].float().sum().backward()
    assert bf16_calls == {"attention": 0, "linear": 0}


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_bf16_kernel_inside_the_blocks_equals_float64_attention(family, monkeypatch):
    """The attention the bfloat16 kernel computes in a real forward (DINOv3: rotary q/k), against
    float64 attention of the same q, k, v (a wrong temperature would show here, not through the
    features' bfloat16 noise)."""
    bb = make(family)
    seen = []
    original = ca.cpu_attention_bf16

    def recording(q, k, v):
        out = original(q, k, v)
        seen.append((q.clone(), k.clone(), v.clone(), out.clone()))
        return out

    monkeypatch.setattr(ca, "cpu_attention_bf16", recording)
    features(bb, torch.randn(1, 3, 112, 112))
    assert len(seen) == bb.out_indices[-1] + 1
    for q, k, v, out in seen:
        assert q.dtype == torch.bfloat16
        assert kernel_close(out, attention_float64(q, k, v))


def test_cast_weights_follow_the_parameters(monkeypatch):
    """The bfloat16 weights are cast once and kept, until a parameter or an adapter changes: an
    in-place update of a LoRA factor, of a base weight (an optimizer step, load_state_dict) or
    turning the adapters off gives what autocast gives on the new parameters."""
    bb = make("dinov2")
    images = torch.randn(1, 3, 112, 112)
    before = features(bb, images)
    assert features(bb, images)[0].equal(before[0])  # the second call: the kept weights, same result
    lora_b = next(p for n, p in bb.named_parameters() if "lora_B" in n)
    base_w = next(p for n, p in bb.named_parameters() if n.endswith("fc1.weight"))
    scale = max(f.abs().max().item() for f in before)
    tol = 2 ** -6 * scale
    with torch.no_grad():
        lora_b.add_(0.5)
        base_w.mul_(1.5)
    after = features(bb, images)
    plain_after = as_autocast_runs_it(bb, images)
    assert max_diff(after, plain_after) <= tol
    assert max_diff(after, before) > 10 * tol  # the change is visible
    for m in bb.modules():
        if hasattr(m, "lora_A") and hasattr(m, "enable_adapters"):
            m.enable_adapters(False)
    assert max_diff(features(bb, images), as_autocast_runs_it(bb, images)) <= tol
    # negative control: a cache key blind to the parameters serves the old weights
    for m in bb.modules():
        if hasattr(m, "lora_A") and hasattr(m, "enable_adapters"):
            m.enable_adapters(True)
    features(bb, images)
    monkeypatch.setattr(inference_mod, "_parts_key", lambda layer, dtype: (dtype,))
    features(bb, images)  # cached under the blind key
    with torch.no_grad():
        lora_b.add_(0.5)
        base_w.mul_(1.5)
    stale = features(bb, images)
    assert max_diff(stale, as_autocast_runs_it(bb, images)) > 10 * tol
