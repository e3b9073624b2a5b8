"""fp16 mixed precision with a GradScaler (CUDA only): what the training loop's AMP does.

Runs in ``tools/gpu_check.sh`` on the GPU machine, which has no Detectron2: the AMP code lives in
``dinov2od/d2/engine/amp.py``, which imports only torch, so this test loads that file directly when the
``dinov2od.d2`` package (which registers Detectron2 components) cannot be imported.
On a machine without CUDA it is collected and skipped with the reason.
"""
import ast
import importlib.util
import os

import pytest
import torch
from torch import nn

from tests.helpers import ROOT

AMP_FILE = os.path.join(ROOT, "dinov2od", "d2", "engine", "amp.py")


def load_amp():
    try:
        from dinov2od.d2.engine import amp
    except ImportError:  # no Detectron2 here: load the torch-only module by path
        spec = importlib.util.spec_from_file_location("dinov2od_d2_amp", AMP_FILE)
        amp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(amp)
    return amp


def test_amp_module_imports_only_torch_and_the_standard_library():
    """What lets the GPU check run it without Detectron2 (runs everywhere, no CUDA needed)."""
    with open(AMP_FILE) as f:
        tree = ast.parse(f.read())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert roots <= {"torch", "contextlib", "typing", "__future__", "logging"}, roots
    assert not any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(tree))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP with a GradScaler runs only on CUDA")
def test_fp16_inf_gradients_skip_the_step_lower_the_scale_and_the_state_reloads():
    amp = load_amp()
    torch.manual_seed(0)
    model = nn.Linear(4, 4).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mp = amp.MixedPrecision(enabled=True, precision="float16", device_type="cuda")
    assert mp.scaler.is_enabled()
    # small inputs: at the initial scale (65536) the gradients of a plain step stay within fp16's range
    x = torch.randn(8, 4, device="cuda") * 0.1

    def step(loss_factor, max_norm=1.0):
        optimizer.zero_grad(set_to_none=True)
        with mp.autocast():
            y = model(x)
            assert y.dtype == torch.float16
            loss = y.float().pow(2).mean() * loss_factor
        assert torch.isfinite(loss)
        mp.backward(loss)
        return mp.step(optimizer, list(model.parameters()), max_norm=max_norm)

    # the gradient norm is measured (and clipped) after unscaling: compare with fp32 gradients
    ref = nn.Linear(4, 4).cuda()
    ref.load_state_dict(model.state_dict())
    ref(x).pow(2).mean().backward()
    true_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
    w0 = model.weight.detach().clone()
    scale0 = mp.scaler.get_scale()
    norm = step(1.0, max_norm=1e-3)
    assert norm == pytest.approx(float(true_norm), rel=1e-2)
    assert not torch.equal(model.weight, w0)
    w1 = model.weight.detach().clone()
    # a finite loss whose scaled gradient overflows fp16: the step is skipped, the scale halves
    step(1e4)
    assert torch.equal(model.weight, w1)
    assert mp.scaler.get_scale() == scale0 / 2
    # the scaler state is saved and reloads into a fresh instance
    fresh = amp.MixedPrecision(enabled=True, precision="float16", device_type="cuda")
    fresh.load_state_dict(mp.state_dict())
    assert fresh.scaler.get_scale() == scale0 / 2
    # and training goes on with finite gradients
    step(1.0)
    assert not torch.equal(model.weight, w1) and torch.isfinite(model.weight).all()
