"""Server optimizers: the SGD momentum recurrence, Adam by hand and against torch, state I/O."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedlab import optim, tensorio
from fedlab.optim import ServerAdam, ServerSGD


def _deltas() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"w": torch.randn(3, generator=g), "b": torch.randn(1, generator=g)} for _ in range(4)]


def _params() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3), "b": torch.ones(1), "steps": torch.tensor(7)}


def test_sgd_without_momentum_is_lr_times_delta_and_keeps_no_state() -> None:
    opt = ServerSGD(lr=0.5)
    x, d = _params(), _deltas()[0]
    state = opt.init(x)
    assert state == {}
    new, state = opt.step(x, d, state)
    torch.testing.assert_close(new["w"], x["w"] + 0.5 * d["w"])
    assert new["steps"] is x["steps"]  # non-floating entries are left alone


def test_sgd_momentum_recurrence() -> None:
    """v <- mu v + delta; x <- x + lr v, over several steps."""
    mu, lr = 0.9, 0.7
    opt = ServerSGD(lr=lr, momentum=mu)
    x = _params()
    state = opt.init(x)
    v = {k: torch.zeros_like(t) for k, t in x.items() if t.is_floating_point()}
    want = dict(x)
    for d in _deltas():
        x, state = opt.step(x, d, state)
        v = {k: mu * v[k] + d[k] for k in v}
        want = {**want, **{k: want[k] + lr * v[k] for k in v}}
        for k in v:
            torch.testing.assert_close(x[k], want[k])
            torch.testing.assert_close(state["momentum"][k], v[k])


def test_adam_against_a_hand_computation() -> None:
    opt = ServerAdam(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    x = {"w": torch.tensor([0.0, 1.0])}
    state = opt.init(x)
    d1, d2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0])
    x1, state = opt.step(x, {"w": d1}, state)
    m1, v1 = 0.1 * d1, 0.01 * d1**2
    torch.testing.assert_close(x1["w"], x["w"] + 0.1 * m1 / (v1.sqrt() + 1e-3))
    # First coordinate by hand: m = 0.1, v = 0.01 -> 0.1 * 0.1 / 0.101.
    assert float(x1["w"][0]) == pytest.approx(0.1 * 0.1 / 0.101)
    x2, state = opt.step(x1, {"w": d2}, state)
    m2, v2 = 0.9 * m1 + 0.1 * d2, 0.99 * v1 + 0.01 * d2**2
    torch.testing.assert_close(x2["w"], x1["w"] + 0.1 * m2 / (v2.sqrt() + 1e-3))
    assert state["t"] == 2


def test_adam_with_bias_correction_is_torch_adam_on_the_pseudo_gradient() -> None:
    opt = ServerAdam(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-3, bias_correction=True)
    x = {"w": torch.zeros(3), "b": torch.ones(1)}
    ref = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    torch_opt = torch.optim.Adam(list(ref.values()), lr=0.05, betas=(0.8, 0.95), eps=1e-3)
    state = opt.init(x)
    for d in _deltas():
        x, state = opt.step(x, d, state)
        for k, p in ref.items():
            p.grad = -d[k]  # the pseudo-gradient
        torch_opt.step()
    for k in x:
        torch.testing.assert_close(x[k], ref[k].detach())


@pytest.mark.parametrize("opt", [ServerSGD(lr=0.3, momentum=0.5), ServerAdam(lr=0.01)])
def test_state_round_trips_through_tensorio(opt: Any) -> None:
    deltas = _deltas()
    x = _params()
    state = opt.init(x)
    for d in deltas[:2]:
        x, state = opt.step(x, d, state)
    loaded = tensorio.loads(tensorio.dumps(state))
    a, b = (x, state), (x, loaded)
    for d in deltas[2:]:
        a = opt.step(a[0], d, a[1])
        b = opt.step(b[0], d, b[1])
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k])


def test_build_and_validation() -> None:
    assert optim.build("sgd", lr=1.0, momentum=0.9) == ServerSGD(lr=1.0, momentum=0.9)
    assert optim.build("adam", lr=0.1, beta2=0.9) == ServerAdam(lr=0.1, beta2=0.9)
    for bad in (
        lambda: optim.build("lamb", lr=1.0),
        lambda: optim.build("adam", lr=1.0, momentum=0.9),
        lambda: ServerSGD(lr=0.0),
        lambda: ServerSGD(lr=math.inf),
        lambda: ServerSGD(lr=1.0, momentum=-0.1),
        lambda: ServerAdam(lr=1.0, beta1=1.0),
        lambda: ServerAdam(lr=1.0, eps=0.0),
    ):
        with pytest.raises(ValueError):
            bad()


def test_norm() -> None:
    assert optim.norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}) == pytest.approx(5.0)
