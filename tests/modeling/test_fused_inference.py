"""The fused CPU inference path of the ViT blocks (dinov2od.layers.fused_linear,
dinov2od.modeling.inference) computes what the plain blocks compute, and runs only where it may."""
import pytest
import torch
import torch.nn.functional as F

from dinov2od.layers import fused_linear
from dinov2od.layers.kernels import linear
from dinov2od.modeling import DINOv2Backbone
from dinov2od.modeling import inference as inference_mod
from dinov2od.modeling import DINOv3Backbone

TINY2 = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96, image_size=56)
TINY3 = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96)

pytestmark = pytest.mark.skipif(not fused_linear._OP_AVAILABLE, reason="this torch build has no oneDNN linear")


class FirstTap(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)[0][0]


def make_backbone(family, lora_rank, window_size=None, registers=False):
    torch.manual_seed(0)
    if family == "dinov2":
        bb = DINOv2Backbone(arch="tiny", arch_overrides=TINY2, registers=registers, num_taps=2,
                            lora_rank=lora_rank, window_size=window_size)
    else:
        bb = DINOv3Backbone(arch="tiny", arch_overrides=TINY3, num_taps=2, lora_rank=lora_rank,
                            window_size=window_size)
    with torch.no_grad():  # non-trivial layer scales, biases and LoRA adapters (B starts at zero)
        for p in bb.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return bb.eval()


def features(bb, images, masks, monkeypatch, fused: bool):
    monkeypatch.setenv(fused_linear.ENV, "1" if fused else "0")
    with torch.no_grad():
        return bb(images, masks)[0]


@pytest.mark.parametrize("family,lora_rank,window_size,registers", [
    ("dinov2", 0, None, False),
    ("dinov2", 4, None, True),
    ("dinov2", 4, 2, False),
    ("dinov3", 4, None, False),
    ("dinov3", 0, 2, False),
])
def test_fused_blocks_compute_the_plain_blocks(family, lora_rank, window_size, registers, count_fused, monkeypatch):
    bb = make_backbone(family, lora_rank, window_size, registers)
    p = bb.patch_size
    images = torch.randn(2, 3, 5 * p, 7 * p)
    masks = torch.zeros(2, 5 * p, 7 * p, dtype=torch.bool)
    masks[1, 3 * p:, :] = True  # image 1 is 3 x 7 patches: masked keys in the fused path too
    plain = features(bb, images, masks, monkeypatch, fused=False)
    assert not count_fused
    fused = features(bb, images, masks, monkeypatch, fused=True)
    assert len(count_fused) == bb.out_indices[-1] + 1  # every block that runs took the fused path
    for a, b in zip(fused, plain):
        assert b.abs().max() > 0.1
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_lora_adapters_are_merged_into_the_fused_weights(count_fused, monkeypatch):
    """Negative control of the parity test: fused weights without the LoRA deltas differ."""
    bb = make_backbone("dinov2", 4)
    images = torch.randn(1, 3, 56, 70)
    plain = features(bb, images, None, monkeypatch, fused=False)
    original = inference_mod.effective_linear

    def without_adapters(module):
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        return original(base)

    monkeypatch.setattr(inference_mod, "effective_linear", without_adapters)
    unmerged = features(bb, images, None, monkeypatch, fused=True)
    assert count_fused
    assert max((a - b).abs().max().item() for a, b in zip(unmerged, plain)) > 1e-2


def test_fused_path_only_at_cpu_fp32_no_grad_inference(count_fused, monkeypatch):
    bb = make_backbone("dinov2", 4)
    images = torch.randn(1, 3, 56, 56)
    monkeypatch.setenv(fused_linear.ENV, "1")
    bb.train()
    with torch.no_grad():
        bb(images)
    bb.eval()
    bb(images)  # gradients enabled: LoRA weights require grad
    with torch.no_grad():
        bb.double()(images.double())
        bb.float()
        torch.jit.trace(FirstTap(bb), images, check_trace=False)
    assert not count_fused
    with torch.no_grad():
        bb(images)
    assert count_fused
    # under CPU bfloat16 autocast the same block runs with bfloat16 weights, where the CPU has native bfloat16
    from dinov2od.layers.precision import native_cpu_bf16

    count_fused.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bb(images)
    assert bool(count_fused) == native_cpu_bf16()


def test_dora_and_unknown_layers_fall_back_to_the_plain_block(count_fused, monkeypatch):
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    bb = DINOv2Backbone(arch="tiny", arch_overrides=TINY2, num_taps=2, lora_rank=0).eval()
    inject_adapter_in_model(LoraConfig(r=2, use_dora=True, target_modules=["fc1"]), bb.vit)
    assert inference_mod.inference_block_parts(bb._layers[0], bb._attention_parts(bb._layers[0].attention)).mlp is None
    images = torch.randn(1, 3, 56, 56)
    plain = features(bb, images, None, monkeypatch, fused=False)
    fused = features(bb, images, None, monkeypatch, fused=True)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", [None, "gelu", "relu"])
def test_linear_matches_f_linear(activation, monkeypatch):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 7, 16), torch.randn(24, 16), torch.randn(24)
    ref = F.linear(x, w, b)
    ref = {None: ref, "gelu": F.gelu(ref), "relu": F.relu(ref)}[activation]
    monkeypatch.setenv(fused_linear.ENV, "1")
    with torch.no_grad():
        assert fused_linear.fused_linear_enabled(x, w, b)
        torch.testing.assert_close(linear(x, w, b, activation), ref, rtol=1e-5, atol=1e-5)
        assert linear(x[:, ::2], w, None, activation).shape == (2, 4, 24)
    monkeypatch.setenv(fused_linear.ENV, "0")
    assert not fused_linear.fused_linear_enabled(x, w, b)
    torch.testing.assert_close(linear(x, w, b, activation), ref)
    with pytest.raises(ValueError, match="activation='silu'"):
        linear(x, w, b, "silu")


def test_torch_compile_traces_the_plain_blocks(count_fused, monkeypatch):
    """Under torch.compile the fused path stays out of the way (the compiler fuses on its own):
    dynamo traces the plain blocks, without failing on the path's checks, to the same features."""
    bb = make_backbone("dinov2", 4)
    images = torch.randn(1, 3, 56, 56)
    plain = features(bb, images, None, monkeypatch, fused=False)
    monkeypatch.setenv(fused_linear.ENV, "1")
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(FirstTap(bb), backend="eager")(images)
    assert not count_fused
    torch.testing.assert_close(compiled, plain[0], rtol=1e-5, atol=1e-5)
