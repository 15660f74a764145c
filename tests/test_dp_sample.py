"""Sample-level DP: DP-SGD inside LocalSGD.train, with each client's accountant in its state."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import Rows, assert_resume_bit_identical, small_config
from fedlab import privacy
from fedlab.client import ClientContext, Fit
from fedlab.clients.sgd import LocalSGD, poisson_batches
from fedlab.config import ConfigError
from fedlab.data import ClientData
from fedlab.run import build_engine
from fedlab.types import Task

CTX = ClientContext(client_id=3, seed=5)


def toy(n: int = 40) -> tuple[nn.Module, ClientData]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    data = ClientData(x=torch.randn(n, 5), y=torch.randint(0, 3, (n,)))
    return model, data


def fit(model: nn.Module, data: ClientData, state: Any = None, version: int = 0, **cfg: Any) -> Fit:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: Fit = LocalSGD().fit(model, data, Task(version, params, cfg), state, CTX)
    model.load_state_dict(params)  # leave the model as it was, for the next call
    return out


def test_no_noise_no_clipping_fixed_batches_is_plain_sgd() -> None:
    # (a) σ = 0 and C = ∞ with the same (fixed-size) batches: the DP-SGD step is the SGD step.
    model, data = toy()
    cfg = dict(lr=0.1, local_steps=6, batch_size=8, momentum=0.9, weight_decay=1e-3)
    plain = fit(model, data, **cfg)
    private = fit(
        model,
        data,
        **cfg,
        dp=True,
        noise_multiplier=0.0,
        max_grad_norm=math.inf,
        poisson=False,
    )
    for k in plain.payload:
        assert torch.allclose(private.payload[k], plain.payload[k], atol=1e-6), k
    assert private.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=1e-5)


def test_a_weight_under_two_names_gets_the_gradient_of_both_uses_under_dp_sgd() -> None:
    # The per-record gradients differentiate the forward with tensors other than the model's
    # own: a tied weight must be replaced under both of its names, or the second use's
    # gradient would be missing.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))
    model[2].weight = model[0].weight
    data = ClientData(x=torch.randn(40, 5), y=torch.randint(0, 5, (40,)))
    cfg = dict(lr=0.1, local_steps=6, batch_size=8)
    plain = fit(model, data, **cfg)
    private = fit(
        model, data, **cfg, dp=True, noise_multiplier=0.0, max_grad_norm=math.inf, poisson=False
    )
    for k in plain.payload:
        assert torch.allclose(private.payload[k], plain.payload[k], atol=1e-6), k


def test_per_record_gradients_match_autograd_and_clip_to_the_bound() -> None:
    # (b) Every per-record gradient equals the single-record autograd gradient, and after
    # clipping each record's norm is at most C.
    model, data = toy(12)
    params = list(model.parameters())
    names = [k for k, _ in model.named_parameters()]

    def forward(ts: Any, x: torch.Tensor) -> torch.Tensor:
        p = dict(zip(names, ts, strict=True))
        out: torch.Tensor = torch.func.functional_call(model, p, (x,))
        return out

    grads, losses, _ = privacy.per_record_grads(forward, params, data.x, data.y)
    for j in range(12):
        loss = F.cross_entropy(model(data.x[j : j + 1]), data.y[j : j + 1])
        ref = torch.autograd.grad(loss, params)
        for g, r in zip(grads, ref, strict=True):
            assert torch.allclose(g[j], r, atol=1e-6)
        assert losses[j] == pytest.approx(float(loss.detach()), rel=1e-5)
    clipped, norms = privacy.clip_per_record(grads, 0.05)
    after = torch.cat([g.reshape(12, -1) for g in clipped], 1).norm(dim=1)
    assert bool((norms > 0.05).any())
    assert bool((after <= 0.05 * (1 + 1e-5)).all())


def test_poisson_batches_sample_each_record_at_the_rate() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in poisson_batches(200, 0.1, 400, gen)]
    assert sum(sizes) / len(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # the size varies, as Poisson sampling does


def test_noise_std_is_sigma_times_clip_over_the_expected_batch() -> None:
    # C tiny and σ large: the step is almost pure noise of std σC/L per coordinate, times lr.
    model, data = toy(400)
    out = fit(
        model,
        data,
        lr=1.0,
        local_steps=1,
        batch_size=20,
        dp=True,
        noise_multiplier=50.0,
        max_grad_norm=1e-4,
    )
    step = torch.cat([v.reshape(-1) for v in out.payload.values()])
    assert float(step.std()) == pytest.approx(50.0 * 1e-4 / 20, rel=0.15)


def test_epsilon_matches_opacus_accountant_over_versions() -> None:
    # (c) Two tasks of 5 Poisson steps at q = 8/40 and σ = 1.1: the ε the client reports is
    # the one Opacus's RDP accountant gives when stepped 10 times, at the default δ = 1/(10n).
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant

    model, data = toy(40)
    cfg = dict(local_steps=5, batch_size=8, dp=True, noise_multiplier=1.1, max_grad_norm=1.0)
    first = fit(model, data, **cfg)
    second = fit(model, data, state=first.state, version=1, **cfg)
    acc = RDPAccountant()
    for _ in range(10):
        acc.step(noise_multiplier=1.1, sample_rate=8 / 40)
    assert second.metrics["epsilon"] == pytest.approx(acc.get_epsilon(1 / 400), rel=1e-9)
    assert first.metrics["epsilon"] < second.metrics["epsilon"]
    assert second.state is not None and second.state["dp"]["delta"] == 1 / 400


def test_target_epsilon_solves_sigma_once_and_stays_under_budget() -> None:
    pytest.importorskip("opacus")
    model, data = toy(40)
    cfg = dict(local_steps=4, batch_size=8, dp=True, target_epsilon=3.0, dp_versions=5)
    state: Any = None
    sigmas = []
    for v in range(5):
        out = fit(model, data, state=state, version=v, **cfg)
        state = out.state
        sigmas.append(out.metrics["noise_multiplier"])
    assert len(set(sigmas)) == 1 and sigmas[0] > 0
    assert 2.9 <= out.metrics["epsilon"] <= 3.0


def test_accounting_survives_versions_and_resume(tmp_path: Path) -> None:
    pytest.importorskip("opacus")
    config = small_config(dp="sample", noise_multiplier=1.0, max_grad_norm=0.5, batch_size=4)
    resumed, straight = assert_resume_bit_identical(config, tmp_path / "run", stop=2, end=4)
    store = resumed.transport.store  # type: ignore[attr-defined]
    for cid in range(config.clients):
        a, b = store.get(cid), straight.transport.store.get(cid)  # type: ignore[attr-defined]
        assert (a is None) == (b is None)
        if a is not None:
            assert a["client"]["dp"] == b["client"]["dp"]
    # Somebody was picked twice: its history holds both tasks' steps.
    steps = [int(store.get(c)["client"]["dp"]["history"][0][2]) for c in range(30) if store.get(c)]
    assert set(steps) <= {3, 6, 9, 12} and max(steps) >= 6


def test_engine_logs_max_and_mean_client_epsilon() -> None:
    pytest.importorskip("opacus")
    engine = build_engine(
        small_config(clients=10, fraction=0.3, dp="sample", target_epsilon=5.0, batch_size=4)
    )
    keep = Rows()
    engine.callbacks.append(keep)
    engine.run(2)
    rows = keep.rows
    assert all(r["client_epsilon_max"] >= r["client_epsilon_mean"] > 0 for r in rows)
    assert all(r["client_epsilon_max"] <= 5.0 for r in rows)


def test_bad_dp_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        small_config(dp="sample")
    with pytest.raises(ConfigError, match="exactly one"):
        small_config(dp="sample", noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(ConfigError, match="dp must be"):
        small_config(dp="record")
    with pytest.raises(ValueError, match="does not train with it"):
        build_engine(small_config(dp="sample", noise_multiplier=1.0, strategy="dp-brem"))


@pytest.mark.parametrize("strategy", ["frl", "fed-sb"])
def test_every_client_half_on_the_loop_gets_dp_sgd(strategy: str) -> None:
    # FRL's scores and Fed-SB's R train through LocalSGD.train, so they are DP-SGD'd as well.
    pytest.importorskip("opacus")
    config = small_config(
        clients=10,
        fraction=0.3,
        strategy=strategy,
        workload="digits",
        model="mlp",
        dp="sample",
        noise_multiplier=1.0,
        batch_size=4,
    )
    engine = build_engine(config)
    keep = Rows()
    engine.callbacks.append(keep)
    engine.run(1)
    rows = keep.rows
    assert rows[0]["client_epsilon_max"] > 0 and rows[0]["train_noise_multiplier"] == 1.0
