"""Tests of the trimmed-mean strategy: run with ``pytest docs/examples/fedlab-trimmed-mean``."""

from __future__ import annotations

import pytest
import torch
from fedlab_trimmed_mean import BufferedTrimmedMean, TrimmedMean

from fedlab import Round, RunConfig, Update, tensorio
from fedlab.run import build_engine


def updates(*values: float) -> list[Update]:
    """One update per value, each a 1-element delta ``{"w": [value]}``."""
    return [
        Update(client_id=i, version=0, payload={"w": torch.tensor([float(v)])}, num_examples=1)
        for i, v in enumerate(values)
    ]


def test_trim_zero_is_the_mean() -> None:
    strategy = TrimmedMean(trim=0.0)
    params = {"w": torch.zeros(1)}
    new, _, _ = strategy.aggregate(strategy.init(params), params, updates(1, 2, 6), Round(0, 0, 3))
    assert torch.allclose(new["w"], torch.tensor([3.0]))


def test_an_outlier_is_cut() -> None:
    strategy = TrimmedMean(trim=0.2)
    params = {"w": torch.zeros(1)}
    new, _, metrics = strategy.aggregate(
        strategy.init(params), params, updates(1, 2, 3, 4, 1e9), Round(0, 0, 5)
    )
    assert torch.allclose(new["w"], torch.tensor([3.0]))  # mean of 2, 3, 4
    assert metrics["trimmed_per_end"] == 1


def test_no_updates_keeps_the_model() -> None:
    strategy = TrimmedMean()
    params = {"w": torch.ones(1)}
    new, state, _ = strategy.aggregate(strategy.init(params), params, [], Round(0, 0, 5))
    assert new is params and state["empty_versions"] == 1


@pytest.mark.parametrize("trim", [-0.1, 0.5, float("nan"), "0.1", True])
def test_bad_trim_is_refused(trim: object) -> None:
    with pytest.raises(ValueError, match="trim"):
        TrimmedMean(trim=trim)  # type: ignore[arg-type]


def test_stale_updates_are_dropped() -> None:
    strategy = BufferedTrimmedMean(trim=0.0, max_staleness=1)
    params = {"w": torch.zeros(1)}
    old = Update(client_id=9, version=0, payload={"w": torch.tensor([100.0])}, num_examples=1)
    fresh = Update(client_id=1, version=4, payload={"w": torch.tensor([2.0])}, num_examples=1)
    new, _, metrics = strategy.aggregate(
        strategy.init(params), params, [fresh, old], Round(version=5, time=0, num_clients=10)
    )
    assert torch.allclose(new["w"], torch.tensor([2.0])) and metrics["dropped_stale"] == 1


@pytest.mark.parametrize("name", ["TrimmedMean", "BufferedTrimmedMean"])
def test_runs_in_the_engine_and_checkpoints(name: str) -> None:
    config = RunConfig(
        clients=20, fraction=0.5, local_steps=2, strategy=f"fedlab_trimmed_mean:{name}",
        strategy_options={"trim": 0.2},
    )  # fmt: skip
    engine = build_engine(config)
    engine.run(3)
    assert engine.version == 3 and engine.state["aggregations"] == 3
    # The whole engine state, the strategy's included, must survive the checkpoint format.
    restored = tensorio.loads(tensorio.dumps(engine.state_dict()))
    assert restored["strategy"] == engine.state
