"""The training-loop extras (accumulation, full-model clipping, non-finite stop, EMA) on a toy model."""
import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

from detectron2.utils.events import EventStorage  # noqa: E402

from dinov2od.d2.engine import DetrTrainerLoop, ModelEMA  # noqa: E402


class Toy(nn.Module):
    """loss_a = mean((w * x - y)^2), loss_b = |w|.sum(); data items are (x, y) pairs."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, batch):
        x = torch.stack([b[0] for b in batch])
        y = torch.stack([b[1] for b in batch])
        return {"loss_a": ((self.w * x - y) ** 2).mean(), "loss_b": self.w.abs().sum() * 0.1}


def _data(n=4):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(2, generator=g), torch.randn(2, generator=g))] for _ in range(n)]


def _run(data, accumulate, clip=0.0, lr=0.1, iters=1):
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loop = DetrTrainerLoop(model, iter(data), opt, accumulate_steps=accumulate, clip_max_norm=clip)
    with EventStorage(0) as loop.storage:
        for loop.iter in range(iters):
            loop.run_step()
    return model.w.detach().clone()


def test_gradient_accumulation_equals_mean_of_micro_batch_gradients():
    data = _data(2)
    model = Toy()
    grads = []
    for batch in data:
        model.zero_grad()
        sum(model(batch).values()).backward()
        grads.append(model.w.grad.clone())
    expected = Toy().w.detach() - 0.1 * (grads[0] + grads[1]) / 2
    assert torch.allclose(_run(data, accumulate=2), expected, atol=1e-6)


def test_full_model_gradient_clipping():
    data = _data(1)
    model = Toy()
    sum(model(data[0]).values()).backward()
    g = model.w.grad
    clipped = g * (0.01 / g.norm())
    assert g.norm() > 0.01
    assert torch.allclose(_run(data, accumulate=1, clip=0.01), Toy().w.detach() - 0.1 * clipped, atol=1e-6)


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


def test_ema_tracks_and_swaps_weights():
    model = Toy()
    ema = ModelEMA(model, decay=0.5)
    with torch.no_grad():
        model.w.add_(2.0)
    for _ in range(50):
        ema.update()
    assert torch.allclose(ema.shadow["w"], model.w.detach(), atol=1e-4)
    with torch.no_grad():
        model.w.add_(10.0)
    live = model.w.detach().clone()
    with ema.apply_to_model():
        assert torch.allclose(model.w.detach(), live - 10.0, atol=1e-4)
    assert torch.equal(model.w.detach(), live)
    state = ema.state_dict()
    other = ModelEMA(Toy(), decay=0.5)
    other.load_state_dict(state)
    assert torch.equal(other.shadow["w"], ema.shadow["w"]) and other.num_updates == 50


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
