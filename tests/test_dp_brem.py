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
from fedlab.attacks import alie_z
from fedlab.client import ClientContext, Fit
from fedlab.clients.dp_brem import DPBREMClient
from fedlab.data import ClientData
from fedlab.privacy import clip_per_record
from fedlab.run import build_engine
from fedlab.strategies.dp_brem import DPBREM
from fedlab.strategies.robust import coordinate_median
from fedlab.types import Metrics, Params, Round, State, Task, Update

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


def test_direct_clip_averages_momenta_clipped_around_zero() -> None:
    # Clipped to τ around 0 (not around the previous aggregate), then averaged: inside the ball
    # the plain mean, and v never leaves the τ-ball whatever the momenta.
    strategy = quiet(aggregator="direct-clip", tau=1.0)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = strategy.init(params)
    state["center"] = {"w": torch.full((3,), 50.0, dtype=torch.float64)}
    rows = [[0.1, 0.2, 0.3], [0.2, -0.1, 0.4], [0.3, 0.3, -0.2]]
    _, new, metrics = strategy.aggregate(state, params, updates(rows), ROUND)
    assert torch.allclose(new["center"]["w"], torch.tensor(rows, dtype=torch.float64).mean(0))
    assert metrics["clipped"] == 0.0
    huge = [[1e6, 0.0, 0.0], [0.0, -3e3, 0.0], [0.6, 0.8, 0.0]]
    _, new, metrics = strategy.aggregate(state, params, updates(huge), ROUND)
    want = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.6, 0.8, 0.0]]).mean(0)
    assert torch.allclose(new["center"]["w"], want.double())
    assert metrics["clipped"] == pytest.approx(2 / 3)


def test_median_of_identical_momenta_is_that_momentum_and_ignores_a_minority() -> None:
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    strategy = quiet(aggregator="median", tau=1e-3)  # τ plays no part in the median
    same = [[0.3, -0.2, 0.5]] * 4
    assert torch.allclose(center_after(strategy, same, params), torch.tensor(same[0]).double())
    honest = [[0.1, 0.2, 0.3], [0.2, 0.1, 0.3], [0.3, 0.3, 0.1]]
    attacked = center_after(strategy, [*honest, [1e9, -1e9, 1e9], [-5.0, 5.0, 1e3]], params)
    rows = torch.tensor(honest, dtype=torch.float64)
    assert bool((attacked >= rows.min(0).values).all() and (attacked <= rows.max(0).values).all())


def test_coordinate_median_moves_at_most_as_far_as_the_changed_row() -> None:
    # The median baseline's privacy argument: its L2 sensitivity is that of one momentum.
    gen = torch.Generator().manual_seed(5)
    for n in (4, 5):
        for _ in range(50):
            rows = [{"a": torch.randn(7, generator=gen)} for _ in range(n)]
            i = int(torch.randint(n, (1,), generator=gen))
            changed = list(rows)
            changed[i] = {"a": rows[i]["a"] + torch.randn(7, generator=gen) * 3}
            move = coordinate_median(changed)["a"] - coordinate_median(rows)["a"]
            assert bool((move.abs() <= (changed[i]["a"] - rows[i]["a"]).abs() + 1e-6).all())


@pytest.mark.parametrize(("aggregator", "over"), [("direct-clip", 4), ("median", 1)])
def test_baselines_get_the_same_noise_std_and_epsilon(aggregator: str, over: int) -> None:
    # Same σ·D_t on the sum (direct-clip: the mean's std is σD/|S|) or on the median itself,
    # since both have sensitivity D_t; so the same ε as DP-BREM.
    pytest.importorskip("opacus")
    kw: dict[str, Any] = dict(noise_multiplier=2.0, record_clip=1.0, batch_size=4, momentum=0.0)
    zero = [[0.0] * 40_000] * 4
    params = {"w": torch.zeros(40_000, dtype=torch.float64)}
    got: list[Metrics] = []
    for agg in ("centered", aggregator):
        strategy = DPBREM(aggregator=agg, server_lr=1.0, **kw)
        _, state, metrics = strategy.aggregate(strategy.init(params), params, updates(zero), ROUND)
        got.append(metrics)
    assert got[1]["noise_std"] == got[0]["noise_std"] == pytest.approx(1.0)
    assert got[1]["epsilon"] == got[0]["epsilon"]
    assert float(state["center"]["w"].std()) == pytest.approx(1.0 / over, rel=0.03)


def test_unknown_aggregator_fails_clearly() -> None:
    with pytest.raises(ValueError, match="aggregator must be one of centered, direct-clip"):
        DPBREM(aggregator="krum")


class Spy:
    """Wraps a strategy and keeps the updates each aggregation receives."""

    def __init__(self, inner: DPBREM) -> None:
        self.inner = inner
        self.seen: list[list[Update]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def aggregate(
        self, state: State, params: Params, up: list[Update], rnd: Round
    ) -> tuple[Params, State, Metrics]:
        self.seen.append(list(up))
        return self.inner.aggregate(state, params, up, rnd)


@pytest.mark.parametrize("attack", ["alie", "ipm"])
def test_omniscient_attacks_craft_from_the_honest_momenta(attack: str) -> None:
    # As the reference's byzantine_attacks.py: the attackers' momentum is built from the honest
    # clients' ones (here exactly those aggregated this version), the honest momenta and the
    # honest clients' stored state are untouched.
    cfg = config(byzantine=0.25, attack=attack, strategy_options={"noise_multiplier": 0.0})
    engine = build_engine(cfg)
    spy = Spy(engine.strategy)  # type: ignore[arg-type]
    engine.strategy = spy  # type: ignore[assignment]
    engine.run(2)
    assert engine.adversary is not None
    bad_ids = engine.adversary.malicious

    def flat(u: Update) -> torch.Tensor:
        return torch.cat([u.payload[k].double().reshape(-1) for k in sorted(u.payload)])

    for seen in spy.seen:
        good = torch.stack([flat(u) for u in seen if u.client_id not in bad_ids])
        bad = [flat(u) for u in seen if u.client_id in bad_ids]
        assert len(bad) == 2 and len(good) == 6
        if attack == "alie":
            want = good.mean(0) - alie_z(8, 2) * good.std(0, unbiased=False)
        else:
            want = -good.mean(0)
        for b in bad:
            assert torch.allclose(b, want, atol=1e-6)
    honest = next(u for u in spy.seen[-1] if u.client_id not in bad_ids)
    stored = engine.transport.store.get(honest.client_id)  # type: ignore[attr-defined]
    for k, v in stored["client"]["momentum"].items():
        assert torch.equal(v, honest.payload[k])


@pytest.mark.parametrize("aggregator", ["direct-clip", "median"])
def test_baselines_run_under_attack_and_resume_bit_identically(
    aggregator: str, tmp_path: Path
) -> None:
    cfg = config(
        byzantine=0.25,
        attack="alie",
        strategy_options={"aggregator": aggregator, "momentum": 0.0, "schedule_versions": 6},
    )
    resumed, _ = assert_resume_bit_identical(cfg, tmp_path / "run")
    assert all(bool(torch.isfinite(v).all()) for v in resumed.params.values())


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
