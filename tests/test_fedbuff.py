"""FedBuff: ALGORITHMS.md §4.2 properties, staleness weights, server optimizers and resume."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import Rows, assert_resume_bit_identical, small_config
from fedlab import registry
from fedlab.run import build_engine, build_runtime
from fedlab.strategies import FedAvg, FedBuff
from fedlab.strategies.fedbuff import staleness_weight
from fedlab.types import Metrics, Params, Round, State, Task, Update


def _update(delta: torch.Tensor, *, version: int, cid: int = 0, n: int = 1) -> Update:
    return Update(client_id=cid, version=version, payload={"w": delta}, num_examples=n)


def test_k_equals_n_with_no_staleness_is_fedavg_with_uniform_weights() -> None:
    """(b) K = N updates that all started from the current model: FedAvg's uniform mean."""
    x = {"w": torch.tensor([1.0, -1.0, 0.5])}
    deltas = [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    ups = [_update(d, version=7, cid=i, n=i + 1) for i, d in enumerate(deltas)]
    rnd = Round(version=7, time=0.0, num_clients=5)
    buff = FedBuff(buffer=5, staleness="constant")
    got, _, _ = buff.aggregate(buff.init(x), x, ups, rnd)
    avg = FedAvg(weighting="uniform")
    want, _, _ = avg.aggregate(avg.init(x), x, ups, rnd)
    torch.testing.assert_close(got["w"], want["w"])
    # Polynomial weights are 1 at staleness 0, so the paper's default agrees too.
    poly, _, _ = FedBuff(buffer=5).aggregate({}, x, ups, rnd)
    torch.testing.assert_close(poly["w"], want["w"])
    # Example weighting, normalised over the buffer, is FedAvg's example weighting.
    ex, _, _ = FedBuff(buffer=5, weighting="examples").aggregate({}, x, ups, rnd)
    fed_ex, _, _ = FedAvg().aggregate({}, x, ups, rnd)
    torch.testing.assert_close(ex["w"], fed_ex["w"])


def test_k_equals_n_engine_is_fedavg_for_every_version() -> None:
    """(b) through the engine: K = concurrency = N, equal speeds, s = 1, eta_g = 1.

    All N clients finish at the same instant; the engine takes every update that has already
    arrived before refilling, so each version aggregates N fresh updates, as FedAvg does.
    """
    common: dict[str, Any] = dict(clients=6, speed="constant", model="logreg")
    buff = build_engine(
        small_config(
            strategy="fedbuff",
            strategy_options={"staleness": "constant"},
            buffer=6,
            concurrency=6,
            **common,
        )
    )
    rows = Rows()
    buff.callbacks.append(rows)
    buff.run(4)
    avg = build_engine(
        small_config(fraction=1.0, strategy_options={"weighting": "uniform"}, **common)
    )
    avg.run(4)
    assert all(r["staleness"] == 0 and r["updates"] == 6 for r in rows.rows)
    for k in avg.params:
        torch.testing.assert_close(buff.params[k], avg.params[k], rtol=1e-6, atol=1e-7)


def test_staleness_two_gets_one_over_sqrt_three() -> None:
    """(c) Started at v = 3, returned at v = 5: tau = 2, weight 1 / sqrt(3)."""
    x = {"w": torch.zeros(2)}
    d = torch.tensor([3.0, -6.0])
    s = FedBuff(buffer=1)
    new, _, metrics = s.aggregate(
        s.init(x), x, [_update(d, version=3)], Round(version=5, time=0.0, num_clients=1)
    )
    torch.testing.assert_close(new["w"], d / math.sqrt(3))
    assert metrics["mean_weight"] == pytest.approx(1 / math.sqrt(3))
    assert staleness_weight(2, "polynomial") == pytest.approx(3**-0.5)
    assert staleness_weight(2, "polynomial", exponent=1.0) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("tau", "want"),
    [(0, 1.0), (4, 1.0), (5, 1 / 11), (7, 1 / 31)],
)
def test_hinge_weight(tau: int, want: float) -> None:
    assert staleness_weight(tau, "hinge", hinge_a=10.0, hinge_b=4) == pytest.approx(want)
    assert staleness_weight(tau, "constant") == 1.0


def test_hinge_and_constant_in_aggregate() -> None:
    x = {"w": torch.zeros(1)}
    ups = [_update(torch.ones(1), version=0, cid=0), _update(torch.ones(1), version=9, cid=1)]
    rnd = Round(version=10, time=0.0, num_clients=2)
    hinge, _, _ = FedBuff(buffer=2, staleness="hinge", hinge_a=2.0, hinge_b=3).aggregate(
        {}, x, ups, rnd
    )
    torch.testing.assert_close(hinge["w"], torch.tensor([(1 / (2 * 7 + 1) + 1) / 2]))
    const, _, _ = FedBuff(buffer=2, staleness="constant").aggregate({}, x, ups, rnd)
    torch.testing.assert_close(const["w"], torch.tensor([1.0]))


def test_max_staleness_drops_and_counts() -> None:
    x = {"w": torch.zeros(1)}
    ups = [_update(torch.ones(1), version=1, cid=0), _update(torch.full((1,), 5.0), version=8)]
    rnd = Round(version=8, time=0.0, num_clients=2)
    s = FedBuff(buffer=2, staleness="constant", max_staleness=3)
    new, _, metrics = s.aggregate({}, x, ups, rnd)
    assert metrics["stale_dropped"] == 1.0
    torch.testing.assert_close(new["w"], torch.tensor([5.0]))  # the kept update alone
    same, state, metrics = s.aggregate({"k": 1}, x, ups[:1], rnd)
    assert same is x and state == {"k": 1} and metrics["stale_dropped"] == 1.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordingFedBuff(FedBuff):
    """FedBuff that remembers every model it was given and every buffer it aggregated."""

    log: list[tuple[int, Params, list[Update], Params]] = dataclasses.field(
        default_factory=list, compare=False, repr=False
    )

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        new, state, metrics = super().aggregate(state, params, updates, round)
        self.log.append((round.version, dict(params), list(updates), dict(new)))
        return new, state, metrics


def test_delta_is_taken_from_the_model_the_client_started_from() -> None:
    """(d) concurrency > K: stale updates are y - x_start, applied to the current model."""
    config = small_config(
        strategy="fedbuff", clients=8, concurrency=8, buffer=2, model="logreg", speed="lognormal"
    )
    engine = build_engine(config)
    rec = RecordingFedBuff(buffer=2, server_lr=0.7)
    engine.strategy = rec
    engine.run(6)
    runtime = build_runtime(config)
    history = {v: params for v, params, _, _ in rec.log}
    stale = 0
    for v, params, ups, new in rec.log:
        want = {k: t.clone() for k, t in params.items()}
        for u in ups:
            start = history[u.version]
            # The client's update, recomputed from its start model, independently of the engine.
            ref, _ = runtime.run(u.client_id, Task(u.version, start, config.task_config), None)
            for k in u.payload:
                torch.testing.assert_close(u.payload[k], ref.payload[k])
                want[k] += 0.7 * u.payload[k] / math.sqrt(1 + v - u.version) / len(ups)
            if u.version < v and not torch.equal(start["weight"], params["weight"]):
                stale += 1
        for k in want:
            torch.testing.assert_close(new[k], want[k])
    assert stale > 0, "the case must contain updates whose start model was replaced"


def test_server_momentum_and_adam_are_used() -> None:
    x = {"w": torch.zeros(1)}
    ups = [_update(torch.ones(1), version=0)]
    rnd = Round(version=0, time=0.0, num_clients=1)
    s = FedBuff(buffer=1, server_momentum=0.5)
    x1, st, _ = s.aggregate(s.init(x), x, ups, rnd)
    x2, st, _ = s.aggregate(st, x1, ups, rnd)
    torch.testing.assert_close(x2["w"], torch.tensor([2.5]))
    a = FedBuff(buffer=1, server_optimizer="adam", server_lr=0.1)
    y1, ast, _ = a.aggregate(a.init(x), x, ups, rnd)
    # m = 0.1, v = 0.01: step 0.1 * 0.1 / (0.1 + 1e-3)
    torch.testing.assert_close(y1["w"], torch.tensor([0.1 * 0.1 / 0.101]))
    assert ast["t"] == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"buffer": 0},
        {"staleness": "exponential"},
        {"staleness_exponent": -1.0},
        {"hinge_a": 0.0},
        {"hinge_b": -1},
        {"max_staleness": -1},
        {"weighting": "median"},
        {"server_optimizer": "lamb"},
        {"server_lr": 0.0},
        {"server_momentum": 1.0},
        {"server_optimizer": "adam", "server_momentum": 0.9},
        {"server_optimizer": "adam", "server_beta2": 1.0},
    ],
)
def test_bad_hyperparameters_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FedBuff(**kwargs)


def test_registered_and_trigger() -> None:
    s = registry.create("strategies", "fedbuff", {"buffer": 7})
    assert isinstance(s, FedBuff) and s.trigger.k == 7  # type: ignore[attr-defined]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_is_bit_identical(optimizer: str, tmp_path: Path) -> None:
    options: dict[str, Any] = {"server_optimizer": optimizer, "server_lr": 0.5}
    if optimizer == "sgd":
        options["server_momentum"] = 0.9
    config = small_config(strategy="fedbuff", buffer=3, concurrency=7, strategy_options=options)
    assert_resume_bit_identical(config, tmp_path)


@pytest.mark.slow
def test_cli_runs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedlab", "simulate", "--strategy", "fedbuff", "--buffer", "10"]
    cmd += ["--concurrency", "50", "--clients", "200", "--rounds", "3", "--no-progress"]
    proc = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "metrics.jsonl").exists()
