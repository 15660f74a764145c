"""Virtual time: how long each client takes, so asynchronous triggers see realistic timing.

A client's speed is a property of the client (drawn once from ``(seed, client_id)``); each
task's duration is that per-unit time multiplied by the task's work (local steps), so a slow
device stays slow from version to version. Upload latency, when modelled, is drawn afresh for
every task (from ``(seed, client_id, version)``) and added to the compute time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlab import seeding
from fedlab.types import ClientId

DISTRIBUTIONS = ("constant", "uniform", "lognormal", "halfnormal", "exponential", "fx")
LATENCY_DISTRIBUTIONS = ("constant", "uniform", "lognormal", "halfnormal", "exponential")

# Latency streams share seeding.CLOCK with the speed draws; the extra key keeps them apart
# (speed streams are keyed (seed, CLOCK, client) and never carry a version).
_LATENCY_STREAM = 1


def _check(kind: str, distribution: str, choices: tuple[str, ...], spread: float) -> None:
    if distribution not in choices:
        raise ValueError(f"unknown {kind} distribution {distribution!r}; choose from {choices}")
    if not (spread >= 0 and math.isfinite(spread)):
        raise ValueError(f"{kind} spread must be >= 0 and finite, got {spread}")
    if distribution in ("uniform", "fx") and spread >= 1:
        raise ValueError(f"{distribution} {kind} spread must be < 1 so durations stay positive")


def _draw(distribution: str, mean: float, spread: float, rng: np.random.Generator) -> float:
    """One positive draw with expectation ``mean`` (before the floors against zero)."""
    if distribution == "uniform":
        return mean * (1 + spread * (2 * float(rng.random()) - 1))
    if distribution == "lognormal":
        # mu chosen so the mean of the lognormal is `mean`.
        s = spread
        return float(rng.lognormal(math.log(mean) - s * s / 2, s))
    if distribution == "halfnormal":
        # The half-normal with this scale has mean `mean`; floor avoids zero durations.
        scale = mean * math.sqrt(math.pi / 2)
        return max(abs(float(rng.normal(0.0, scale))), 1e-3 * mean)
    return max(float(rng.exponential(mean)), 1e-3 * mean)


@dataclass(frozen=True, kw_only=True)
class SpeedModel:
    """Per-client seconds per unit of work.

    Args:
        distribution: one of ``DISTRIBUTIONS``. ``"fx"`` is the deterministic scenario "F-X" of
            Fraboni et al. (JMLR 2023): client ``i`` takes ``mean * (1 - i * X / 100 / (M - 1))``
            with ``X = 100 * spread``, so the fastest client is X% faster than the slowest
            (client 0, which takes ``mean``); here ``mean`` is the slowest time, not the average
            (that is ``mean * (1 - spread / 2)``).
        mean: mean seconds per unit of work (the scale of every distribution).
        spread: ``uniform``: half-width relative to ``mean``; ``lognormal``: sigma of the log;
            ``fx``: ``X / 100`` in ``[0, 1)``.
        seed: the run seed.
        num_clients: the population size ``M`` (only ``fx`` uses it).
    """

    distribution: str = "lognormal"
    mean: float = 1.0
    spread: float = 0.5
    seed: int = 0
    num_clients: int = 1

    def __post_init__(self) -> None:
        _check("speed", self.distribution, DISTRIBUTIONS, self.spread)
        if not (self.mean > 0 and math.isfinite(self.mean)):
            raise ValueError(f"speed mean must be positive and finite, got {self.mean}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients must be at least 1, got {self.num_clients}")

    def unit_time(self, client_id: ClientId) -> float:
        """Seconds per unit of work for ``client_id``."""
        if self.distribution == "constant":
            return self.mean
        if self.distribution == "fx":
            if not 0 <= client_id < self.num_clients:
                raise ValueError(f"client {client_id} is outside 0..{self.num_clients - 1}")
            if self.num_clients == 1:
                return self.mean
            return self.mean * (1 - client_id * self.spread / (self.num_clients - 1))
        rng = seeding.numpy_rng(self.seed, seeding.CLOCK, client_id)
        return _draw(self.distribution, self.mean, self.spread, rng)

    def duration(self, client_id: ClientId, work: float) -> float:
        """Seconds ``client_id`` needs for ``work`` units."""
        return self.unit_time(client_id) * max(work, 1e-9)


@dataclass(frozen=True, kw_only=True)
class LatencyModel:
    """Upload latency in seconds, drawn per task and added to its compute time.

    Args:
        distribution: one of ``LATENCY_DISTRIBUTIONS`` (same meaning as for
            :class:`SpeedModel`).
        mean: mean latency in seconds; 0 means no latency.
        spread: as for :class:`SpeedModel`.
        seed: the run seed.
    """

    distribution: str = "constant"
    mean: float = 0.0
    spread: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _check("latency", self.distribution, LATENCY_DISTRIBUTIONS, self.spread)
        if not (self.mean >= 0 and math.isfinite(self.mean)):
            raise ValueError(f"latency mean must be >= 0 and finite, got {self.mean}")

    def delay(self, client_id: ClientId, version: int) -> float:
        """Seconds the upload of ``client_id``'s task for ``version`` takes."""
        if self.mean == 0:
            return 0.0
        if self.distribution == "constant":
            return self.mean
        rng = seeding.numpy_rng(self.seed, seeding.CLOCK, client_id, version, _LATENCY_STREAM)
        return _draw(self.distribution, self.mean, self.spread, rng)
