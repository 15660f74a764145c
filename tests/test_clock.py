"""The virtual clock: speed distributions, Fraboni's F-X schedule, upload latency."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from conftest import small_config
from fedlab.engine import Engine
from fedlab.run import build_runtime, build_workload
from fedlab.sim.clock import LATENCY_DISTRIBUTIONS, LatencyModel, SpeedModel
from fedlab.sim.inprocess import InProcessExecutor
from fedlab.sim.transport import SimTransport
from fedlab.strategies import FedAvg


@pytest.mark.parametrize(
    ("distribution", "spread"),
    [
        ("constant", 0.5),
        ("uniform", 0.5),
        ("lognormal", 0.5),
        ("halfnormal", 0.5),
        ("exponential", 0.5),
        ("lognormal", 1.0),
    ],
)
def test_empirical_mean_is_mean(distribution: str, spread: float) -> None:
    m = SpeedModel(distribution=distribution, mean=2.0, spread=spread, seed=3)
    times = [m.unit_time(c) for c in range(20000)]
    assert statistics.fmean(times) == pytest.approx(2.0, rel=0.04)
    assert min(times) > 0


@pytest.mark.parametrize("distribution", LATENCY_DISTRIBUTIONS)
def test_latency_empirical_mean_is_mean(distribution: str) -> None:
    m = LatencyModel(distribution=distribution, mean=0.5, spread=0.5, seed=3)
    draws = [m.delay(c % 100, c // 100) for c in range(20000)]
    assert statistics.fmean(draws) == pytest.approx(0.5, rel=0.04)


def test_fx_is_fraboni_linear_schedule() -> None:
    """tau_i = mean (1 - i X / 100 / (M - 1)); F-80 with M = 3 is (1, 0.6, 0.2)."""
    m = SpeedModel(distribution="fx", mean=1.0, spread=0.8, num_clients=3)
    assert [m.unit_time(i) for i in range(3)] == [1.0, 1 - 0.4, 1 - 0.8]
    big = SpeedModel(distribution="fx", mean=2.0, spread=0.5, num_clients=11)
    assert [big.unit_time(i) for i in range(11)] == pytest.approx(
        [2.0 * (1 - i * 0.5 / 10) for i in range(11)]
    )
    assert big.duration(10, 3) == pytest.approx(3.0)
    assert SpeedModel(distribution="fx", mean=1.5, num_clients=1).unit_time(0) == 1.5
    assert SpeedModel(distribution="fx", spread=0.0, num_clients=4).unit_time(3) == 1.0
    with pytest.raises(ValueError, match="outside"):
        m.unit_time(3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"distribution": "fx", "spread": 1.0},
        {"distribution": "pareto"},
        {"num_clients": 0},
        {"mean": 0.0},
        {"spread": -1.0},
    ],
)
def test_bad_speed_models_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SpeedModel(**kwargs)  # type: ignore[arg-type]


def test_bad_latency_models_are_refused() -> None:
    for kwargs in ({"distribution": "fx"}, {"mean": -1.0}, {"mean": math.nan}):
        with pytest.raises(ValueError):
            LatencyModel(**kwargs)  # type: ignore[arg-type]


def test_latency_is_per_task_and_deterministic() -> None:
    assert LatencyModel().delay(3, 4) == 0.0  # mean 0: none
    assert LatencyModel(mean=0.25).delay(3, 4) == 0.25
    m = LatencyModel(distribution="lognormal", mean=1.0, seed=5)
    again = LatencyModel(distribution="lognormal", mean=1.0, seed=5)
    assert m.delay(3, 4) == again.delay(3, 4)
    assert m.delay(3, 4) != m.delay(3, 5)  # a fresh draw per task
    assert m.delay(3, 4) != m.delay(2, 4)
    assert m.delay(3, 4) != LatencyModel(distribution="lognormal", mean=1.0, seed=6).delay(3, 4)
    # The speed draws do not move when latency is added.
    speeds = SpeedModel(seed=5)
    assert speeds.unit_time(3) == SpeedModel(seed=5).unit_time(3)


def _engine(latency: LatencyModel | None, **cfg: object) -> Engine:
    config = small_config(clients=4, fraction=1.0, local_steps=3, **cfg)
    workload = build_workload(config)
    transport = SimTransport(
        executor=InProcessExecutor(build_runtime(config, workload)),
        num_clients=4,
        speeds=SpeedModel(distribution="constant", mean=1.0),
        latency=latency,
    )
    params = {k: v.detach().clone() for k, v in workload.make_model().state_dict().items()}
    return Engine(
        strategy=FedAvg(),
        transport=transport,
        params=params,
        seed=config.seed,
        fraction=1.0,
        task_config=config.task_config,
    )


def test_transport_adds_latency_to_compute_time() -> None:
    plain = _engine(None)
    plain.run(2)
    assert plain.transport.now() == pytest.approx(6.0)
    const = _engine(LatencyModel(mean=0.5))
    const.run(2)
    assert const.transport.now() == pytest.approx(7.0)  # (3 + 0.5) per version
    model = LatencyModel(distribution="exponential", mean=0.5, seed=11)
    rand = _engine(model)
    rand.run(2)
    # Synchronous: each version waits for its slowest upload.
    want = sum(3.0 + max(model.delay(c, v) for c in range(4)) for v in range(2))
    assert rand.transport.now() == pytest.approx(want)
    # Latency changes timing only, never the synchronous model.
    for k in plain.params:
        assert torch.equal(plain.params[k], rand.params[k])
