"""Robust aggregators: exact small cases, resistance to an outlier, reductions to the mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from conftest import assert_resume_bit_identical, small_config
from fedlab import registry
from fedlab.run import build_engine
from fedlab.strategies import CenteredClipping, Krum, Median, MultiKrum, TrimmedMean
from fedlab.strategy import Strategy
from fedlab.types import Params, Round, Update

ROUND = Round(version=0, time=0.0, num_clients=10)
PARAMS: Params = {"w": torch.zeros(3)}


def updates(values: Sequence[Sequence[float]]) -> list[Update]:
    return [
        Update(client_id=i, version=0, payload={"w": torch.tensor(v)}, num_examples=1 + 100 * i)
        for i, v in enumerate(values)
    ]


def aggregate(strategy: Strategy, values: Sequence[Sequence[float]]) -> torch.Tensor:
    state = strategy.init(PARAMS)
    new, _, _ = strategy.aggregate(state, PARAMS, updates(values), ROUND)
    return new["w"]


def test_median_exact_odd_and_even() -> None:
    odd = [[1.0, 5.0, -1.0], [2.0, 4.0, -3.0], [9.0, 0.0, 2.0]]
    assert aggregate(Median(), odd).tolist() == [2.0, 4.0, -1.0]
    even = [[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [4.0, 0.0, 0.0], [10.0, 0.0, 0.0]]
    assert aggregate(Median(), even).tolist() == [3.0, 0.0, 0.0]


def test_trimmed_mean_exact() -> None:
    values = [[1.0, 0.0, 0.0], [2.0, 1.0, 0.0], [3.0, 2.0, 0.0], [4.0, 3.0, 0.0], [100.0, 4.0, 0.0]]
    # trim 0.2 of 5: drop one value at each end of every coordinate.
    assert aggregate(TrimmedMean(trim=0.2), values).tolist() == [3.0, 2.0, 0.0]
    # trim 0 is the plain (unweighted) mean.
    assert torch.allclose(aggregate(TrimmedMean(trim=0.0), values), torch.tensor([22.0, 2.0, 0.0]))


HONEST = [[0.1, 0.2, 0.3], [0.2, 0.1, 0.4], [0.3, 0.3, 0.2], [0.15, 0.25, 0.35]]
OUTLIER = [[1e6, -1e6, 1e6]]


@pytest.mark.parametrize(
    "strategy", [Median(), TrimmedMean(trim=0.2), Krum(f=1), MultiKrum(f=1, m=3)]
)
def test_one_huge_outlier_does_not_leave_the_honest_range(strategy: Strategy) -> None:
    out = aggregate(strategy, HONEST + OUTLIER)
    honest = torch.tensor(HONEST)
    assert bool((out >= honest.min(0).values - 1e-6).all())
    assert bool((out <= honest.max(0).values + 1e-6).all())


def test_krum_picks_the_most_central_update() -> None:
    values = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.9, 0.0, 0.0], [1.1, 0.0, 0.0], [5.0, 0.0, 0.0]]
    assert aggregate(Krum(f=1), values).tolist() == [1.0, 0.0, 0.0]


def test_multi_krum_with_all_selected_and_no_attacker_is_the_mean() -> None:
    values = [*HONEST, [1.0, -2.0, 3.0]]
    mean = torch.tensor(values).mean(0)
    assert torch.allclose(aggregate(MultiKrum(f=0, m=5), values), mean)
    assert torch.allclose(aggregate(MultiKrum(f=0), values), mean)  # m = n - f


def test_centered_clipping_without_clipping_is_the_mean() -> None:
    values = HONEST + OUTLIER
    mean = torch.tensor(values, dtype=torch.float64).mean(0).float()
    out = aggregate(CenteredClipping(tau=math.inf, iterations=1), values)
    assert torch.allclose(out, mean, rtol=1e-5)


def test_centered_clipping_bounds_the_move_and_keeps_its_center() -> None:
    strategy = CenteredClipping(tau=1.0, iterations=3)
    state = strategy.init(PARAMS)
    new, state, metrics = strategy.aggregate(state, PARAMS, updates(HONEST + OUTLIER), ROUND)
    # Each of the 3 iterations moves v by at most tau.
    assert float(new["w"].norm()) <= 3.0 + 1e-6
    assert metrics["clipped"] > 0
    assert torch.equal(state["center"]["w"], new["w"])  # server_lr 1: center = aggregate


@pytest.mark.parametrize(
    ("strategy", "n", "match"),
    [
        (Krum(f=2), 6, "more than 2f \\+ 2"),
        (MultiKrum(f=0, m=7), 5, "m=7"),
    ],
)
def test_too_few_updates_fail_clearly(strategy: Strategy, n: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aggregate(strategy, [[float(i), 0.0, 0.0] for i in range(n)])


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("trimmed-mean", {"trim": 0.5}, "trim"),
        ("krum", {"f": -1}, "f must"),
        ("multi-krum", {"m": -2}, "m must"),
        ("centered-clipping", {"tau": 0.0}, "tau"),
        ("centered-clipping", {"iterations": 0}, "iterations"),
        ("median", {"server_lr": -1.0}, "server_lr"),
    ],
)
def test_bad_options_fail_clearly(name: str, options: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        registry.create("strategies", name, options)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("median", {}),
        ("trimmed-mean", {"trim": 0.2}),
        ("krum", {"f": 1}),
        ("multi-krum", {"f": 1}),
        ("centered-clipping", {"tau": 1.0, "iterations": 2}),
    ],
)
def test_registered_robust_strategies_run_under_attack(
    name: str, options: dict[str, float]
) -> None:
    config = small_config(
        strategy=name, strategy_options=options, byzantine=0.2, attack="scaling", rounds=2
    )
    engine = build_engine(config)
    engine.run(2)
    assert all(bool(torch.isfinite(v).all()) for v in engine.params.values())


def test_centered_clipping_resumes_bit_identically(tmp_path: Path) -> None:
    config = small_config(strategy="centered-clipping", strategy_options={"tau": 0.5})
    assert_resume_bit_identical(config, tmp_path, stop=2, end=4)
