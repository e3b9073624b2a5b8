"""dinov2od.layers.kernels: weights cast once under CPU bf16 autocast at inference (neck, decoder),
and kept only as long as the parameters they copy."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dinov2od.layers import kernels
from dinov2od.layers.precision import native_cpu_bf16

needs_bf16 = pytest.mark.skipif(not native_cpu_bf16(), reason="this CPU has no native bfloat16: the path is not taken")


class Casts(TorchDispatchMode):
    """The shapes of the tensors cast by ``aten._to_copy`` inside the block."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_cast_once_keeps_the_copy_until_the_parameter_changes():
    lin = torch.nn.Linear(8, 4)
    w1, b1 = kernels.cast_once(lin, torch.bfloat16)
    assert w1.dtype == b1.dtype == torch.bfloat16
    assert kernels.cast_once(lin, torch.bfloat16)[0] is w1  # kept
    with torch.no_grad():
        lin.weight.mul_(2)  # an in-place edit (an optimizer step, load_state_dict) bumps the version
    w2, _ = kernels.cast_once(lin, torch.bfloat16)
    assert w2 is not w1 and torch.equal(w2, (lin.weight.detach() * 1).bfloat16())
    # negative control: a key blind to the version counter would serve the stale copy
    assert not torch.equal(w1, w2)


@needs_bf16
@pytest.mark.parametrize("activation", [None, "relu"])
def test_linear_module_casts_no_weight_and_keeps_bf16_precision(activation):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48).eval()
    x = torch.randn(2, 30, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.linear_module(lin, x, activation)  # the first call makes the copy
        with Casts() as casts:
            out = kernels.linear_module(lin, x, activation)
        autocast = lin(x)
    assert (48, 64) not in casts.shapes  # no per-call weight cast (autocast's would be one)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    autocast = autocast.double()
    if activation == "relu":
        ref, autocast = ref.relu(), autocast.relu()
    err, autocast_err = (out.double() - ref).abs().max().item(), (autocast - ref).abs().max().item()
    assert err <= 2 * autocast_err + 1e-6  # the precision of bf16 products, as autocast's
    assert err < 2 ** -6 * ref.abs().max().item()
    # outside autocast, or with gradients: the module itself, bit for bit
    torch.testing.assert_close(kernels.linear_module(lin, x, activation),
                               lin(x).relu() if activation else lin(x), rtol=0, atol=0)


@needs_bf16
@pytest.mark.parametrize("conv", [torch.nn.Conv2d(16, 8, 3, padding=1), torch.nn.ConvTranspose2d(16, 8, 2, stride=2)])
def test_conv_module_casts_no_weight(conv):
    x = torch.randn(1, 16, 9, 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        kernels.conv_module(conv, x)
        with Casts() as casts:
            out = kernels.conv_module(conv, x)
        autocast = conv(x)
    assert tuple(conv.weight.shape) not in casts.shapes
    torch.testing.assert_close(out.float(), autocast.float(), rtol=2e-2, atol=2e-2)
