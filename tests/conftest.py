"""Shared fixtures: small, fast configurations and helper strategies for the engine tests."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlab.config import RunConfig
from fedlab.engine import Engine
from fedlab.strategies import FedAvg
from fedlab.strategy import Buffer, Period, Trigger

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Subprocesses started by tests must import the test helpers by dotted path.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]
)
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def small_config(**changes: Any) -> RunConfig:
    """A config that runs a version in a few milliseconds."""
    base: dict[str, Any] = dict(clients=30, fraction=0.2, rounds=4, seed=11, local_steps=3)
    return RunConfig(**{**base, **changes})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BufferedFedAvg(FedAvg):
    """FedAvg aggregated every ``k`` updates (a FedBuff-shaped trigger for engine tests)."""

    k: int = 3

    @property
    def trigger(self) -> Trigger:
        return Buffer(self.k)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeriodicFedAvg(FedAvg):
    """FedAvg aggregated every ``seconds`` of simulated time (a FedFix-shaped trigger)."""

    seconds: float = 15.0

    @property
    def trigger(self) -> Trigger:
        return Period(self.seconds)


class Rows:
    """A callback that keeps every metrics row."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))


def assert_resume_bit_identical(
    config: RunConfig, run_dir: Path, *, stop: int = 3, end: int = 6
) -> tuple[Engine, Engine]:
    """Run ``config`` to ``stop`` in ``run_dir``, resume it in a new engine, run it to ``end``,
    and check it ends bit-identical (params and clock) to a run that was never interrupted.

    Returns ``(resumed, straight)`` for further checks on strategy state.
    """
    from fedlab.run import build_engine

    straight = build_engine(config)
    straight.run(end)
    first = build_engine(config, run_dir=run_dir)
    first.run(stop)
    first.transport.close()
    resumed = build_engine(config, run_dir=run_dir)
    resumed.resume()
    assert resumed.version == stop
    resumed.run(end)
    assert_params_equal(resumed.params, straight.params)
    assert resumed.transport.now() == straight.transport.now()
    return resumed, straight


def assert_params_equal(a: Any, b: Any) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def tmp_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path
