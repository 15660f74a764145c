"""Virtual time: how long each client takes, so asynchronous triggers see realistic timing.

A client's speed is a property of the client (drawn once from ``(seed, client_id)``); each
task's duration is that per-unit time multiplied by the task's work (local steps), so a slow
device stays slow from version to version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlab import seeding
from fedlab.types import ClientId

DISTRIBUTIONS = ("constant", "uniform", "lognormal", "halfnormal", "exponential")


@dataclass(frozen=True, kw_only=True)
class SpeedModel:
    """Per-client seconds per unit of work.

    Args:
        distribution: one of ``DISTRIBUTIONS``.
        mean: mean seconds per unit of work (the scale of every distribution).
        spread: ``uniform``: half-width relative to ``mean``; ``lognormal``: sigma of the log.
        seed: the run seed.
    """

    distribution: str = "lognormal"
    mean: float = 1.0
    spread: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown speed distribution {self.distribution!r}; choose from {DISTRIBUTIONS}"
            )
        if not (self.mean > 0 and math.isfinite(self.mean)):
            raise ValueError(f"speed mean must be positive and finite, got {self.mean}")
        if not (self.spread >= 0 and math.isfinite(self.spread)):
            raise ValueError(f"speed spread must be >= 0 and finite, got {self.spread}")
        if self.distribution == "uniform" and self.spread >= 1:
            raise ValueError("uniform speed spread must be < 1 so durations stay positive")

    def unit_time(self, client_id: ClientId) -> float:
        """Seconds per unit of work for ``client_id``."""
        if self.distribution == "constant":
            return self.mean
        rng = seeding.numpy_rng(self.seed, seeding.CLOCK, client_id)
        if self.distribution == "uniform":
            return self.mean * (1 + self.spread * (2 * float(rng.random()) - 1))
        if self.distribution == "lognormal":
            # mu chosen so the mean of the lognormal is `mean`.
            s = self.spread
            return float(rng.lognormal(math.log(self.mean) - s * s / 2, s))
        if self.distribution == "halfnormal":
            # The half-normal with this scale has mean `mean`; floor avoids zero durations.
            scale = self.mean * math.sqrt(math.pi / 2)
            return max(abs(float(rng.normal(0.0, scale))), 1e-3 * self.mean)
        return max(float(rng.exponential(self.mean)), 1e-3 * self.mean)

    def duration(self, client_id: ClientId, work: float) -> float:
        """Seconds ``client_id`` needs for ``work`` units."""
        return self.unit_time(client_id) * max(work, 1e-9)
