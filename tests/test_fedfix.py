"""FedFix and FedAsync (Fraboni et al.): ALGORITHMS.md §4.1/§4.2 properties, schedule, resume."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_params_equal, assert_resume_bit_identical, small_config
from fedlab import registry
from fedlab.config import RunConfig
from fedlab.engine import Engine
from fedlab.run import build_engine, build_runtime, build_workload
from fedlab.sim.clock import SpeedModel
from fedlab.sim.inprocess import InProcessExecutor
from fedlab.sim.transport import SimTransport
from fedlab.strategies import FedAsync, FedFix
from fedlab.strategy import Buffer, Period
from fedlab.types import Metrics, Params, Round, State, Update


def _update(delta: float, *, version: int, cid: int = 0, n: int = 1) -> Update:
    return Update(
        client_id=cid, version=version, payload={"w": torch.tensor([delta])}, num_examples=n
    )


def test_weights_are_windows_spanned_times_p_over_all_clients() -> None:
    """d_i = ceil(tau_i / dt) p_i = (staleness + 1) / N, summed, not normalised over S."""
    x = {"w": torch.zeros(1)}
    ups = [_update(1.0, version=4, cid=0), _update(10.0, version=2, cid=3)]
    rnd = Round(version=4, time=0.0, num_clients=5)
    s = FedFix(period=0.5)
    new, _, metrics = s.aggregate(s.init(x), x, ups, rnd)
    torch.testing.assert_close(new["w"], torch.tensor([1.0 / 5 + 3 * 10.0 / 5]))
    assert metrics["weight_sum"] == pytest.approx(4 / 5)
    half, _, _ = FedFix(server_lr=0.5).aggregate({}, x, ups, rnd)
    torch.testing.assert_close(half["w"], new["w"] / 2)


def test_example_weights_use_the_population_total_estimated_from_clients_seen() -> None:
    x = {"w": torch.zeros(1)}
    s = FedFix(weighting="examples")
    state = s.init(x)
    rnd = Round(version=0, time=0.0, num_clients=4)
    ups = [_update(1.0, version=0, cid=0, n=10), _update(1.0, version=0, cid=1, n=30)]
    new, state, _ = s.aggregate(state, x, ups, rnd)
    # Two of four clients seen, mean n = 20: sum over all N estimated as 80.
    torch.testing.assert_close(new["w"], torch.tensor([40 / 80]))
    ups = [_update(1.0, version=1, cid=1, n=30), _update(1.0, version=1, cid=2, n=20)]
    _, state, _ = s.aggregate(state, x, ups, Round(version=1, time=0.0, num_clients=4))
    assert state == {"examples": {0: 10, 1: 30, 2: 20}, "total": 60}


def test_empty_window_leaves_the_model() -> None:
    x = {"w": torch.ones(1)}
    new, _, _ = FedFix().aggregate({}, x, [], Round(version=3, time=0.0, num_clients=2))
    assert torch.equal(new["w"], x["w"])


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_equal_times_within_the_window_is_synchronous_fedavg(weighting: str) -> None:
    """(a) All tau_i = 3 <= dt = 4: every client every window with d_i = p_i, i.e. FedAvg."""
    common: dict[str, Any] = dict(clients=6, model="logreg", speed="constant", local_steps=3)
    fix = build_engine(
        small_config(
            strategy="fedfix",
            period=4.0,
            concurrency=6,
            strategy_options={"weighting": weighting},
            **common,
        )
    )
    fix.run(3)
    avg = build_engine(
        small_config(fraction=1.0, strategy_options={"weighting": weighting}, **common)
    )
    avg.run(3)
    assert fix.transport.now() == pytest.approx(12.0)
    for k in avg.params:
        torch.testing.assert_close(fix.params[k], avg.params[k], rtol=1e-5, atol=1e-6)


def test_fedasync_single_client_is_local_sgd_continued() -> None:
    """(e) N = 1: each return is one server step from the model the client just trained."""
    # One backend for both: auto would batch FedAvg (synchronous) but not FedAsync.
    common: dict[str, Any] = dict(
        clients=1, fraction=1.0, model="logreg", speed="lognormal", backend="inprocess"
    )
    fa = build_engine(small_config(strategy="fedasync", **common))
    fa.run(3)
    avg = build_engine(small_config(**common))
    avg.run(3)
    assert_params_equal(fa.params, avg.params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordingFedFix(FedFix):
    """FedFix that records, per window, which client's work on which version it aggregated."""

    log: list[dict[int, int]] = dataclasses.field(default_factory=list, compare=False)

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        self.log.append({u.client_id: u.version for u in updates})
        return super().aggregate(state, params, updates, round)


def _fx_engine(strategy: FedFix, config: RunConfig, spread: float) -> Engine:
    workload = build_workload(config)
    speeds = SpeedModel(distribution="fx", mean=1.0, spread=spread, num_clients=config.clients)
    transport = SimTransport(
        executor=InProcessExecutor(build_runtime(config, workload)),
        num_clients=config.clients,
        speeds=speeds,
    )
    params = {k: v.detach().clone() for k, v in workload.make_model().state_dict().items()}
    return Engine(
        strategy=strategy,
        transport=transport,
        params=params,
        seed=config.seed,
        concurrency=config.clients,
        task_config=config.task_config,
    )


# Fraboni's FL/clients_schedule.py::clients_time_schedule(3, "FedFix-0.5", "F-80", T=5):
# row n is window n, entry i the version client i's aggregated work started from (-1: none).
# tau = (1.0, 0.6, 0.2).
FRABONI_M3_F80_FEDFIX05 = [
    [-1, -1, 0],
    [0, 0, 1],
    [-1, -1, 2],
    [2, 2, 3],
    [-1, -1, 4],
    [4, 4, 5],
    [-1, -1, 6],
    [6, 6, 7],
    [-1, -1, 8],
    [8, 8, 9],
]


def test_schedule_reproduces_fraboni_clients_time_schedule() -> None:
    """(f) M = 3, F-80, FedFix-0.5: the same clients, on the same versions, in every window."""
    config = small_config(clients=3, local_steps=1, model="logreg")
    strategy = RecordingFedFix(period=0.5)
    engine = _fx_engine(strategy, config, spread=0.8)
    engine.run(len(FRABONI_M3_F80_FEDFIX05))
    want = [{i: v for i, v in enumerate(row) if v >= 0} for row in FRABONI_M3_F80_FEDFIX05]
    assert strategy.log == want
    assert engine.transport.now() == pytest.approx(5.0)


@pytest.mark.parametrize("strategy", ["fedfix", "fedasync"])
def test_resume_is_bit_identical(strategy: str, tmp_path: Path) -> None:
    extra: dict[str, Any] = {"period": 4.0} if strategy == "fedfix" else {}
    if strategy == "fedasync":
        extra["strategy_options"] = {"staleness": "polynomial", "server_lr": 0.6}
    config = small_config(strategy=strategy, concurrency=6, **extra)
    assert_resume_bit_identical(config, tmp_path)


def test_fedasync_staleness_and_drop() -> None:
    x = {"w": torch.zeros(1)}
    rnd = Round(version=3, time=0.0, num_clients=4)
    new, _, _ = FedAsync().aggregate({}, x, [_update(2.0, version=1)], rnd)
    torch.testing.assert_close(new["w"], torch.tensor([2.0]))  # identical weights, eta_g = 1
    poly, _, _ = FedAsync(staleness="polynomial").aggregate({}, x, [_update(2.0, version=0)], rnd)
    torch.testing.assert_close(poly["w"], torch.tensor([1.0]))  # 2 / sqrt(1 + 3)
    same, _, m = FedAsync(max_staleness=2).aggregate({}, x, [_update(2.0, version=0)], rnd)
    assert same is x and m["stale_dropped"] == 1.0


def test_registered_with_their_triggers() -> None:
    fix = registry.create("strategies", "fedfix", {"period": 0.5})
    fa = registry.create("strategies", "fedasync", {})
    assert isinstance(fix, FedFix) and fix.trigger == Period(0.5)
    assert isinstance(fa, FedAsync) and fa.trigger == Buffer(1)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (FedFix, {"period": 0.0}),
        (FedFix, {"period": float("inf")}),
        (FedFix, {"weighting": "identical"}),
        (FedFix, {"server_lr": -1.0}),
        (FedAsync, {"weighting": "uniform"}),
        (FedAsync, {"staleness": "linear"}),
        (FedAsync, {"server_lr": 0.0}),
        (FedAsync, {"max_staleness": -2}),
    ],
)
def test_bad_hyperparameters_are_refused(cls: type[Any], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        cls(**kwargs)
