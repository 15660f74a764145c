"""Coordinate-wise trimmed mean: a Byzantine-robust aggregation strategy for fedlab.

Yin, Chen, Kannan, Bartlett. "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates." ICML 2018.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlab import Buffer, Metrics, Params, Round, State, Strategy, Trigger, Update


@dataclass(frozen=True, kw_only=True)
class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean of client deltas (Yin et al., ICML 2018).

    For every coordinate, the clients' values are sorted, the ``floor(trim * n)`` largest and
    smallest are dropped and the rest are averaged. As long as no more than that many updates
    are bad, no coordinate can leave the range of the honest values.

    Args:
        trim: fraction of the updates cut from each end, per coordinate, in ``[0, 0.5)``.
            0 gives the plain unweighted mean.
    """

    trim: float = 0.1

    def __post_init__(self) -> None:
        t = self.trim
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise ValueError(f"trim must be a number, got {type(t).__name__} {t!r}")
        if not (math.isfinite(t) and 0 <= t < 0.5):
            raise ValueError(f"trim must be in [0, 0.5), got {t!r}")

    def init(self, params: Params) -> State:
        # Explicit, serializable state: the engine checkpoints it and hands it back.
        return {"aggregations": 0, "empty_versions": 0}

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            # Nothing to aggregate (all rejected or failed, or an empty Period window).
            return params, {**state, "empty_versions": state["empty_versions"] + 1}, {}
        n = len(updates)
        # The epsilon keeps 0.29 * 100 == 28.999... from cutting 28; one value always stays.
        cut = min(math.floor(self.trim * n + 1e-9), (n - 1) // 2)
        new = dict(params)
        squares = 0.0
        for name in updates[0].payload:
            stacked = torch.stack([u.payload[name] for u in updates])  # (n, *shape)
            step = stacked.sort(0).values[cut : n - cut].mean(0)
            new[name] = params[name] + step
            squares += float(step.double().pow(2).sum())
        state = {**state, "aggregations": state["aggregations"] + 1}
        return new, state, {"trimmed_per_end": float(cut), "step_norm": math.sqrt(squares)}


@dataclass(frozen=True, kw_only=True)
class BufferedTrimmedMean(TrimmedMean):
    """Trimmed mean every ``k`` updates (asynchronous, FedBuff-style); drops stale updates.

    Args:
        k: updates buffered per aggregation.
        max_staleness: an update that started more than this many versions before the
            current one is ignored.
    """

    k: int = 10
    max_staleness: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")

    @property
    def trigger(self) -> Trigger:
        return Buffer(self.k)

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        fresh = [u for u in updates if round.version - u.version <= self.max_staleness]
        params, state, metrics = super().aggregate(state, params, fresh, round)
        return params, state, {**metrics, "dropped_stale": float(len(updates) - len(fresh))}
