"""The bfloat16 inference path is taken on every CPU kind with native bfloat16 (issue 32, item 2):
avx512_bf16 without AMX (AMD Zen 4), AMX (Intel Xeon: amx_bf16 + amx_tile), Arm's bf16, and not on
a CPU without them. Written against public behaviour, so that it holds whichever module makes the
choice: the CPU's flags come from ``dinov2od.layers.precision.cpu_flags`` (``/proc/cpuinfo``; faked
here per CPU kind), the decision is read from the kernel door (``dinov2od.layers.kernels.block_kernel``,
or before it ``fused_linear.bf16_linear_enabled``), and on this machine's real kernels a profile of
the whole detector shows the ViT's products run in bfloat16 on weights cast once (oneDNN's bf16
kernels: AMX where the CPU has it, docs/speed.md "CPU kinds")."""
import importlib

import pytest
import torch

from dinov2od.layers import precision
from dinov2od.layers.precision import autocast_context

# CPU kinds as /proc/cpuinfo lists them (the flags that matter) -> native bf16
CPU_KINDS = {
    "zen4-avx512_bf16-no-amx": ({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}, True),
    "xeon-sapphire-rapids-amx": ({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile",
                                  "amx_int8"}, True),
    "amx_bf16-listed-alone": ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, True),
    "arm-neoverse-bf16": ({"fp", "asimd", "sve", "bf16"}, True),
    # negative controls: no native bf16
    "xeon-cascade-lake-avx512-no-bf16": ({"avx2", "fma", "avx512f", "avx512_vnni"}, False),
    "avx2-only": ({"avx2", "fma"}, False),
}
REAL_NATIVE = precision.native_cpu_bf16()  # before any faking


def fake_cpu(monkeypatch, flags):
    """This process's CPU reports ``flags`` to the project (its one flag source)."""
    for fn in (precision.cpu_flags, precision.native_cpu_bf16):  # (a cached reader would keep the real flags)
        getattr(fn, "cache_clear", lambda: None)()
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))


def bf16_blocks_chosen(x: torch.Tensor) -> bool:
    """Whether the project's kernel choice runs the ViT blocks in bfloat16 for tokens ``x`` (here and now)."""
    try:
        kernels = importlib.import_module("dinov2od.layers.kernels")
    except ImportError:
        kernels = None
    if kernels is not None and hasattr(kernels, "block_kernel"):
        return kernels.block_kernel(x, False) == torch.bfloat16
    from dinov2od.layers.fused_linear import bf16_linear_enabled

    return bf16_linear_enabled(x)


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_the_bf16_choice_follows_native_bf16_on_every_cpu_kind(kind, monkeypatch):
    flags, native = CPU_KINDS[kind]
    fake_cpu(monkeypatch, flags)
    assert precision.native_cpu_bf16() is native
    x = torch.randn(1, 5, 64)
    monkeypatch.delenv(precision.ALLOW_ENV, raising=False)
    if not native:  # refused, with the CPU's flags named ...
        with pytest.raises(RuntimeError, match="would be emulated"):
            autocast_context("cpu", "bf16")
        monkeypatch.setenv(precision.ALLOW_ENV, "1")  # ... unless the user insists: then autocast, no bf16 path
    with torch.inference_mode(), autocast_context("cpu", "bf16"):
        assert bf16_blocks_chosen(x) is native
    with torch.inference_mode():  # float32: never the bf16 path
        assert not bf16_blocks_chosen(x)
    from dinov2od.benchmark.cpu_kind import cpu_kind, cpu_tag

    reported = cpu_kind(probe_onednn=False)  # the benchmark's report says the same
    assert reported.native_bf16 is native and reported.amx is ({"amx_bf16", "amx_tile"} <= flags)
    assert f"native bf16: {'yes' if native else 'no'}" in cpu_tag(reported)


# ---------------------------------------------------------------- the real kernels, this CPU

HIDDEN, MLP = 128, 512  # head dim 64 (2 heads): dinov2od's bf16 attention kernel applies too
MLP_WEIGHTS = ([MLP, HIDDEN], [HIDDEN, MLP])  # shapes only the ViT's MLP has in this detector
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise")


def tiny_detector():
    from dinov2od.modeling import DINOv2Backbone, DINOv2ObjectDetector

    torch.manual_seed(0)
    backbone = DINOv2Backbone(arch="tiny", arch_overrides=dict(hidden_size=HIDDEN, num_hidden_layers=2,
                                                               num_attention_heads=2, intermediate_size=MLP),
                              num_taps=2, lora_rank=4)
    return DINOv2ObjectDetector(num_classes=3, backbone=backbone, hidden_dim=32, num_queries=12, num_decoder_layers=2,
                                num_heads=4, num_points=2, dim_feedforward=64).eval()


def profile_events(model, images, precision_name):
    """(name, input shapes, input dtypes) of every op of one inference (after a warm-up call)."""
    from torch.profiler import ProfilerActivity, profile

    def call():
        with torch.inference_mode(), autocast_context("cpu", precision_name):
            return model(images)

    call()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        call()
    return [(e.name(), [list(s) for s in e.shapes()], list(e.dtypes())) for e in prof.profiler.kineto_results.events()]


def mlp_products(events):
    """The ViT MLP's matrix products: [(op, their 2-D operands' dtypes)]."""
    out = []
    for name, shapes, dtypes in events:
        if name in MATMULS and any(s in MLP_WEIGHTS for s in shapes):
            out.append((name, [d for s, d in zip(shapes, dtypes) if len(s) == 2]))
    return out


def mlp_weight_casts(events):
    return sum(1 for name, shapes, _ in events if name == "aten::_to_copy" and shapes and shapes[0] in MLP_WEIGHTS)


@pytest.mark.skipif(not REAL_NATIVE, reason="this CPU has no native bf16 (the decision is tested above)")
def test_on_this_cpu_the_vit_products_run_in_bf16_on_weights_cast_once(monkeypatch):
    """Under bf16 autocast the ViT MLP's products run with bfloat16 operands (oneDNN's bf16 kernels)
    and no MLP weight is cast during the call. Negative controls: in float32 the same products have
    float32 operands (the dtype check can fail); with the CPU faked to lack native bf16 (and the
    refusal overridden) autocast casts the weights at every call (the cast check can fail)."""
    model, images = tiny_detector(), torch.rand(1, 3, 56, 56)
    events = profile_events(model, images, "bf16")
    products = mlp_products(events)
    assert len(products) >= 4  # 2 blocks x 2 products (a third block tap or a fused op may add more)
    assert all(dts and all(d == "c10::BFloat16" for d in dts) for _, dts in products), products
    assert mlp_weight_casts(events) == 0

    fp32 = mlp_products(profile_events(model, images, "fp32"))
    assert fp32 and all(d == "float" for _, dts in fp32 for d in dts), fp32

    fake_cpu(monkeypatch, CPU_KINDS["avx2-only"][0])
    monkeypatch.setenv(precision.ALLOW_ENV, "1")
    emulated = profile_events(model, images, "bf16")
    assert mlp_weight_casts(emulated) >= 4  # autocast's per-call casts: the bf16 path was not taken
