"""The training-loop extras (accumulation, full-model clipping, non-finite stop, AMP) and the EMA,
on a toy model whose gradients are known in closed form."""
import os

import pytest
import torch
from torch import nn

from detectron2.utils.events import EventStorage

from dinov2od.d2.engine.ema import EMAHook, ModelEMA
from dinov2od.d2.engine.train_loop import DetrTrainerLoop


class Toy(nn.Module):
    """loss_a = mean((w * x - y)^2), loss_b = |w|.sum(); data items are (x, y) pairs."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))
        self.frozen = nn.Parameter(torch.tensor([5.0]), requires_grad=False)
        self.register_buffer("running", torch.tensor([0.5]))
        self.register_buffer("count", torch.tensor([3]))  # integer buffers are not averaged
        self.register_buffer("constant", torch.tensor([0.25]), persistent=False)  # nor constants

    def forward(self, batch):
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        return {"loss_a": ((self.w * x - y) ** 2).mean(), "loss_b": self.w.abs().sum() * 0.1}


def _data(n=4):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(2, generator=g), torch.randn(2, generator=g))] for _ in range(n)]


def _run(data, accumulate, lr=0.1, iters=1, **kw):
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loop = DetrTrainerLoop(model, iter(data), opt, accumulate_steps=accumulate, **kw)
    with EventStorage(0) as loop.storage:
        for loop.iter in range(iters):
            loop.run_step()
    return model.w.detach().clone()


def _grad(batch):
    model = Toy()
    sum(model(batch).values()).backward()
    return model.w.grad.clone()


def test_gradient_accumulation_equals_mean_of_micro_batch_gradients():
    data = _data(2)
    expected = Toy().w.detach() - 0.1 * (_grad(data[0]) + _grad(data[1])) / 2
    assert torch.allclose(_run(data, accumulate=2), expected, atol=1e-6)


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_full_model_gradient_clipping_honours_the_norm_type(norm_type):
    data = _data(1)
    g = _grad(data[0])
    norm = g.norm(p=norm_type)
    assert norm > 0.01
    expected = Toy().w.detach() - 0.1 * g * (0.01 / norm)
    got = _run(data, accumulate=1, clip_max_norm=0.01, clip_norm_type=norm_type)
    assert torch.allclose(got, expected, atol=1e-6)
    if norm_type == 1.0:  # the L1 and L2 norms differ here, so the norm type is really used
        assert not torch.allclose(got, Toy().w.detach() - 0.1 * g * (0.01 / g.norm()), atol=1e-6)


def test_non_finite_loss_names_iteration_and_term_before_updating():
    data = _data(3)
    data[2] = [(torch.tensor([float("nan"), 0.0]), torch.zeros(2))]
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = DetrTrainerLoop(model, iter(data), opt)
    with EventStorage(0) as loop.storage:
        loop.iter = 0
        loop.run_step()
        loop.iter = 1
        loop.run_step()
        before = model.w.detach().clone()
        loop.iter = 2
        with pytest.raises(FloatingPointError, match=r"iteration 2: loss_a=nan"):
            loop.run_step()
    assert torch.equal(model.w.detach(), before)  # the bad step changed nothing


def test_ema_equals_its_closed_form_with_the_decay_ramp():
    """After n updates with weights v_1..v_n (v_0 at construction) and decays d_k (the ramp
    min(decay, (1 + k) / (10 + k))): shadow = prod_k d_k * v_0 + sum_k (1 - d_k) prod_{j>k} d_j * v_k."""
    model = Toy()
    decay, n = 0.9, 25
    ema = ModelEMA(model, decay=decay)
    g = torch.Generator().manual_seed(3)
    values = [model.w.detach().double().clone()]
    runnings = [model.running.double().clone()]
    hook = EMAHook(ema)
    for _ in range(n):
        with torch.no_grad():
            model.w.copy_(torch.randn(2, generator=g) * 3)
            model.running.copy_(torch.rand(1, generator=g))
        values.append(model.w.detach().double().clone())
        runnings.append(model.running.double().clone())
        hook.after_step()
    d = [min(decay, (1 + k) / (10 + k)) for k in range(1, n + 1)]

    def closed_form(vs):
        out = vs[0] * torch.tensor(d, dtype=torch.float64).prod()
        for k in range(1, n + 1):
            out = out + (1 - d[k - 1]) * torch.tensor(d[k:], dtype=torch.float64).prod() * vs[k]
        return out

    assert ema.num_updates == n
    assert torch.allclose(ema.shadow["w"].double(), closed_form(values), atol=1e-5)
    assert torch.allclose(ema.shadow["running"].double(), closed_form(runnings), atol=1e-5)
    # the closed form is far from the last weights, so "shadow = a copy of the weights" fails here
    assert (closed_form(values) - values[-1]).abs().max() > 0.1
    assert set(ema.shadow) == {"w", "running"}  # not frozen parameters, integer or unsaved buffers


def test_ema_swaps_weights_in_and_out_and_reloads():
    model = Toy()
    ema = ModelEMA(model, decay=0.5)
    for _ in range(3):
        with torch.no_grad():
            model.w.add_(1.0)
        ema.update()
    live = model.w.detach().clone()
    with ema.apply_to_model():
        assert torch.equal(model.w.detach(), ema.shadow["w"])
    assert torch.equal(model.w.detach(), live)
    other = ModelEMA(Toy(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["w"], ema.shadow["w"]) and other.num_updates == 3
    with pytest.raises(KeyError, match="EMA state lacks"):
        other.load_state_dict({"num_updates": 1, "shadow": {}})


def test_amp_bfloat16_on_cpu_steps_and_saves_scaler_state():
    data = _data(2)
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = DetrTrainerLoop(model, iter(data), opt, amp_enabled=True, amp_precision="bfloat16", clip_max_norm=1.0)
    with EventStorage(0) as loop.storage:
        loop.iter = 0
        loop.run_step()
    assert not torch.equal(model.w.detach(), Toy().w.detach())
    state = loop.state_dict()
    assert "grad_scaler" in state and "optimizer" in state
    loop.load_state_dict(state)
    with pytest.raises(ValueError, match="precision"):
        DetrTrainerLoop(Toy(), iter(data), opt, amp_enabled=True, amp_precision="int8")


# ---------------------------------------------------------------------------- non-finite gradients and weights
def _poison_gradient_at(model, iteration_box, bad_iter):
    """Make w's gradient NaN at iteration ``bad_iter`` while the loss stays finite."""
    model.w.register_hook(lambda g: g * float("nan") if iteration_box[0] == bad_iter else g)


@pytest.mark.parametrize("kw", [{}, {"clip_max_norm": 0.01}, {"amp_enabled": True, "amp_precision": "bfloat16"}],
                         ids=["no-clip", "clip", "bf16"])
def test_non_finite_gradient_stops_before_the_optimizer_step(kw):
    """A finite loss with a NaN gradient: FloatingPointError naming the iteration and the parameter,
    with the weights and the optimizer state of the last good step (SGD momentum would carry the NaN)."""
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loop = DetrTrainerLoop(model, iter(_data(3)), opt, **kw)
    box = [0]
    _poison_gradient_at(model, box, 1)
    with EventStorage(0) as loop.storage:
        loop.iter = 0
        loop.run_step()
        before = model.w.detach().clone()
        momentum = opt.state[model.w]["momentum_buffer"].clone()
        assert not torch.equal(before, Toy().w.detach())  # iteration 0 did step
        loop.iter = box[0] = 1
        with pytest.raises(FloatingPointError, match=r"gradient norm \(nan\) at iteration 1.*gradients of: w"):
            loop.run_step()
    assert torch.equal(model.w.detach(), before)
    assert torch.equal(opt.state[model.w]["momentum_buffer"], momentum)


def test_non_finite_weights_after_a_step_stop_before_the_hooks(tmp_path):
    """Finite gradients, but a step that overflows the weights (lr=inf): the error names the
    iteration and the parameter, and raises inside run_step, so the EMA hook and the checkpointer
    (period 1) never see the weights."""
    from detectron2.engine import hooks

    from dinov2od.d2.checkpoint import CrashSafeCheckpointer

    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=float("inf"))
    loop = DetrTrainerLoop(model, iter(_data(2)), opt)
    ema = ModelEMA(model, decay=0.5)
    checkpointer = CrashSafeCheckpointer(model, str(tmp_path), ema=ema)
    loop.register_hooks([EMAHook(ema), hooks.PeriodicCheckpointer(checkpointer, 1)])
    with pytest.raises(FloatingPointError, match=r"after the optimizer step of iteration 0 \(w\)"):
        loop.train(0, 2)
    assert not torch.isfinite(model.w).all()  # the step did overflow
    assert ema.num_updates == 0 and torch.isfinite(ema.shadow["w"]).all()
    assert os.listdir(tmp_path) == []


def test_finite_weights_whose_norm_overflows_are_finite():
    """The cheap check (one norm) confirms an overflowing norm element-wise before it stops training."""
    from dinov2od.d2.engine.train_loop import _all_finite, total_norm

    big = [torch.full((4,), 1e20), torch.ones(3)]
    assert not torch.isfinite(total_norm(big))  # the sum of squares overflows float32
    assert _all_finite(big)
    assert not _all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not _all_finite([torch.tensor([float("nan")])])
    g = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    assert float(total_norm(g)) == pytest.approx(13.0) and float(total_norm(g, 1.0)) == pytest.approx(19.0)
    assert float(total_norm(g, float("inf"))) == pytest.approx(12.0)
