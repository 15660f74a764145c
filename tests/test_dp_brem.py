"""DP-BREM: per-record clipping, client momentum, centered clipping, noise and accounting."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import Rows, assert_resume_bit_identical, small_config
from fedlab.client import ClientContext, Fit
from fedlab.clients.dp_brem import DPBREMClient
from fedlab.data import ClientData
from fedlab.privacy import clip_per_record
from fedlab.sim import build_engine
from fedlab.strategies.dp_brem import DPBREM
from fedlab.types import Params, Round, Task, Update

ROUND = Round(version=0, time=0.0, num_clients=10)
CTX = ClientContext(client_id=0, seed=3)


def quiet(**changes: Any) -> DPBREM:
    """A DP-BREM without noise or schedules, server step ``x - v``."""
    base: dict[str, Any] = dict(noise_multiplier=0.0, server_lr=1.0)
    return DPBREM(**{**base, **changes})


def updates(rows: list[list[float]]) -> list[Update]:
    return [
        Update(client_id=i, version=0, payload={"w": torch.tensor(r, dtype=torch.float64)},
               num_examples=1)
        for i, r in enumerate(rows)
    ]  # fmt: skip


def center_after(strategy: DPBREM, rows: list[list[float]], params: Params) -> torch.Tensor:
    _, state, _ = strategy.aggregate(strategy.init(params), params, updates(rows), ROUND)
    v: torch.Tensor = state["center"]["w"]
    return v


def toy() -> tuple[nn.Module, ClientData]:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    data = ClientData(x=torch.randn(8, 5), y=torch.randint(0, 3, (8,)))
    return model, data


def fit(model: nn.Module, data: ClientData, state: Any = None, version: int = 0, **cfg: Any) -> Fit:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: Fit = DPBREMClient().fit(model, data, Task(version, params, cfg), state, CTX)
    return out


def test_per_record_clipped_norms_are_at_most_the_clip() -> None:
    torch.manual_seed(1)
    grads = [torch.randn(50, 4, 3) * 5, torch.randn(50, 7)]
    clipped, norms = clip_per_record(grads, 1.5)
    after = torch.cat([g.reshape(50, -1) for g in clipped], 1).norm(dim=1)
    assert bool((after <= 1.5 + 1e-5).all())
    small = norms <= 1.5  # records already inside the ball are left as they are
    assert torch.allclose(clipped[1][small], grads[1][small])


def test_unclipped_noise_free_client_sends_the_batch_gradient() -> None:
    # (a) σ = 0, β = 0, R = ∞: the payload is the plain minibatch gradient, and one server step
    # with τ = ∞ and q = 1 is synchronous minibatch SGD.
    model, data = toy()
    out = fit(model, data, record_clip=math.inf, momentum=0.0, batch_size=8)
    loss = F.cross_entropy(model(data.x), data.y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), grads, strict=True):
        assert torch.allclose(out.payload[name], g, atol=1e-6)
    params = {k: v.detach() for k, v in model.state_dict().items()}
    up = [Update(client_id=0, version=0, payload=out.payload, num_examples=8)] * 2
    strategy = quiet(tau=math.inf, momentum=0.0)
    new, _, _ = strategy.aggregate(strategy.init(params), params, up, ROUND)
    for name, g in zip(["weight", "bias"], grads, strict=True):
        assert torch.allclose(new[name], params[name] - g, atol=1e-6)


def test_momentum_recursion_and_persistence() -> None:
    # (d) after k versions with the same gradient g, m = (1 - β^k) g; the state carries m.
    model, data = toy()
    beta = 0.7
    g = fit(model, data, momentum=0.0, batch_size=8, record_clip=1.0).payload
    state = None
    for k in range(1, 5):
        out = fit(model, data, state, version=k, momentum=beta, batch_size=8, record_clip=1.0)
        state = out.state
        assert state is not None and set(state["momentum"]) == set(g)
        for name in g:
            assert torch.allclose(out.payload[name], (1 - beta**k) * g[name], atol=1e-6)
            assert torch.equal(state["momentum"][name], out.payload[name])


def test_centered_clipping_inside_the_radius_is_the_mean() -> None:
    # (b) every ‖m_i − v‖ ≤ τ: v becomes the plain mean of the momenta.
    rows = [[0.1, 0.2, 0.3], [0.2, -0.1, 0.4], [0.3, 0.3, -0.2]]
    v = center_after(quiet(tau=10.0), rows, {"w": torch.zeros(3, dtype=torch.float64)})
    assert torch.allclose(v, torch.tensor(rows, dtype=torch.float64).mean(0))


def test_one_huge_momentum_moves_the_center_by_at_most_tau_over_n() -> None:
    # (c) before noise, one Byzantine momentum shifts v by at most τ / |S|.
    honest = [[0.1, 0.0, 0.0]] * 4
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    strategy = quiet(tau=0.5)
    base = center_after(strategy, [*honest, [0.1, 0.0, 0.0]], params)
    attacked = center_after(strategy, [*honest, [1e9, -1e9, 1e9]], params)
    assert float((attacked - base).norm()) <= 0.5 / 5 + 1e-9


def test_noise_std_matches_multiplier_times_sensitivity() -> None:
    # (e) with β = 0 the sensitivity is 2R/B: z = 2, R = 1, B = 4 gives std 1.
    strategy = DPBREM(noise_multiplier=2.0, record_clip=1.0, batch_size=4, momentum=0.0,
                      server_lr=1.0)  # fmt: skip
    params = {"w": torch.zeros(40_000, dtype=torch.float64)}
    up = [Update(client_id=0, version=0, payload={"w": torch.zeros(40_000, dtype=torch.float64)},
                 num_examples=4)]  # fmt: skip
    new, _, metrics = strategy.aggregate(strategy.init(params), params, up, ROUND)
    assert metrics["noise_std"] == pytest.approx(1.0)
    assert float(new["w"].std()) == pytest.approx(1.0, rel=0.03)
    assert abs(float(new["w"].mean())) < 0.03


def test_schedules_decay_lr_and_clips_linearly() -> None:
    s = DPBREM(schedule_versions=10, server_lr=0.1, record_clip=10.0, tau=5.0)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(10) == pytest.approx(0.01)
    assert s.record_clip_at(5) == pytest.approx(10.0 * 0.65)
    assert s.tau_at(10) == pytest.approx(5.0 * 0.3)


def test_epsilon_grows_and_matches_an_independent_rdp_accountant() -> None:
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant

    strategy = DPBREM(noise_multiplier=1.3, delta=1e-5)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = strategy.init(params)
    eps = []
    for version in range(4):
        rnd = Round(version=version, time=0.0, num_clients=3, seed=version)
        params, state, metrics = strategy.aggregate(state, params, updates([[0.1] * 3] * 3), rnd)
        eps.append(metrics["epsilon"])
        acc = RDPAccountant()
        for _ in range(version + 1):
            acc.step(noise_multiplier=1.3, sample_rate=1.0)
        assert metrics["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert eps == sorted(eps) and eps[0] < eps[-1]


def config(**changes: Any) -> Any:
    base: dict[str, Any] = dict(strategy="dp-brem", clients=8, fraction=1.0, rounds=4)
    return small_config(**{**base, **changes})


def test_every_client_trains_every_version_and_keeps_momentum() -> None:
    rows = Rows()
    engine = build_engine(config(strategy_options={"client_rate": 0.5}), callbacks=[rows])
    engine.run(2)
    assert [r["updates"] for r in rows.rows] == [8, 8]
    assert [r["strategy_aggregated"] for r in rows.rows] == [4.0, 4.0]
    for cid in range(8):
        state = engine.transport.store.get(cid)  # type: ignore[attr-defined]
        assert state is not None and state["client"]["momentum"]


def test_ipm_attack_runs_and_stays_finite() -> None:
    rows = Rows()
    engine = build_engine(config(byzantine=0.25, attack="ipm"), callbacks=[rows])
    engine.run(3)
    assert all(bool(torch.isfinite(v).all()) for v in engine.params.values())
    assert rows.rows[-1]["byzantine"] == 2


def test_resume_bit_identical(tmp_path: Path) -> None:
    cfg = config(strategy_options={"client_rate": 0.5, "schedule_versions": 6})
    assert_resume_bit_identical(cfg, tmp_path / "run")


def test_cli_exits_zero(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "fedlab", "simulate", "--strategy", "dp-brem", "--workload",
        "digits", "--model", "mlp", "--clients", "10", "--fraction", "1.0", "--rounds", "2",
        "--no-progress", "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("\n") == 2
