"""Byzantine-robust aggregation baselines: median, trimmed mean, (Multi-)Krum, centered clipping.

Each replaces FedAvg's weighted mean by a robust combination of the client deltas and then steps
with the shared server optimizer (``server_lr``, momentum, Adam), like :mod:`.fedavg`. Robust
rules treat every update alike: weighting by ``num_examples`` would let an attacker claim a
huge dataset, so none of them reads it.

* Coordinate-wise median and trimmed mean: Yin, Chen, Ramchandran, Bartlett. "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates." ICML 2018.
* Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent." NeurIPS 2017.
* Centered clipping: Karimireddy, He, Jaggi. "Learning from History for Byzantine Robust
  Optimization." ICML 2021.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab import optim
from fedlab.strategy import Strategy, weighted_sum
from fedlab.types import Metrics, Params, Round, State, Update

__all__ = ["CenteredClipping", "Krum", "Median", "MultiKrum", "TrimmedMean", "coordinate_median"]


def _stack(updates: Sequence[Update], name: str) -> torch.Tensor:
    return torch.stack([u.payload[name] for u in updates])


def coordinate_median(rows: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Coordinate-wise median of ``rows`` (the mean of the two middle values for an even count).

    Every output coordinate moves by at most as much as that coordinate of one changed row:
    sorting is 1-Lipschitz in the max norm and the two middle values are averaged.
    """
    n = len(rows)
    out: dict[str, torch.Tensor] = {}
    for name in rows[0]:
        s = torch.stack([r[name] for r in rows]).sort(dim=0).values
        # The mean of the middle two in float64: two huge finite values must not sum to Inf.
        mid = (s[n // 2 - 1].double() + s[n // 2]) / 2 if n % 2 == 0 else None
        out[name] = s[n // 2].clone() if mid is None else mid.to(s.dtype)
    return out


def _flat(updates: Sequence[Update]) -> torch.Tensor:
    """One float64 row per update, its entries concatenated in sorted-name order."""
    names = sorted(updates[0].payload)
    return torch.stack(
        [torch.cat([u.payload[k].double().reshape(-1) for k in names]) for u in updates]
    )


@dataclass(frozen=True, kw_only=True)
class _Robust(optim.ServerOptimizerOptions, Strategy):
    """A robust combination of deltas followed by the server optimizer step."""

    delta_aggregation: ClassVar[str] = "robust"

    def __post_init__(self) -> None:
        self.optimizer  # noqa: B018  (builds it, so a bad hyperparameter fails here)

    def init(self, params: Params) -> State:
        return self.optimizer.init(params)

    def combine(
        self, updates: Sequence[Update], state: State
    ) -> tuple[dict[str, torch.Tensor], State, dict[str, float]]:
        """The robust aggregate of ``updates``, the new state and metrics."""
        raise NotImplementedError

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            return params, state, {}
        delta, state, metrics = self.combine(updates, state)
        opt = self.optimizer
        direction, state = opt.direction(delta, state)
        new = optim.apply(params, direction, opt.lr)
        return new, state, {**metrics, "step_norm": optim.norm(direction)}


@dataclass(frozen=True, kw_only=True)
class Median(_Robust):
    """Coordinate-wise median of the client deltas (the mean of the two middle values for an
    even count).

    Args:
        server_lr: ``eta_g``.
        server_momentum: ``mu`` of server SGD.
        server_optimizer: ``"sgd"`` or ``"adam"``.
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps``.
    """

    def combine(
        self, updates: Sequence[Update], state: State
    ) -> tuple[dict[str, torch.Tensor], State, dict[str, float]]:
        return coordinate_median([u.payload for u in updates]), state, {}


@dataclass(frozen=True, kw_only=True)
class TrimmedMean(_Robust):
    """Coordinate-wise trimmed mean: drop the ``floor(trim * n)`` largest and smallest values of
    every coordinate and average the rest.

    Args:
        trim: ``β``, the fraction trimmed at each end, in ``[0, 0.5)``.
        server_lr: ``eta_g``.
        server_momentum: ``mu`` of server SGD.
        server_optimizer: ``"sgd"`` or ``"adam"``.
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps``.
    """

    trim: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.trim) and 0 <= self.trim < 0.5):
            raise ValueError(f"trimmed-mean trim must be in [0, 0.5), got {self.trim}")
        super().__post_init__()

    def combine(
        self, updates: Sequence[Update], state: State
    ) -> tuple[dict[str, torch.Tensor], State, dict[str, float]]:
        n = len(updates)
        k = math.floor(self.trim * n)
        # trim < 0.5 keeps n - 2k >= 1 for every n.
        out: dict[str, torch.Tensor] = {}
        for name in updates[0].payload:
            s = _stack(updates, name).sort(dim=0).values
            out[name] = s[k : n - k].double().mean(dim=0).to(s.dtype)  # float64: no overflow
        return out, state, {"trimmed_per_end": float(k)}


@dataclass(frozen=True, kw_only=True)
class Krum(_Robust):
    """Krum: the update closest to its ``n - f - 2`` nearest neighbours.

    The score of update ``i`` is the sum of squared distances to its ``n - f - 2`` nearest
    other updates; Krum keeps the lowest-scoring one. Needs ``n > 2f + 2`` updates.

    Args:
        f: the number of attackers assumed per aggregation.
        server_lr: ``eta_g``.
        server_momentum: ``mu`` of server SGD.
        server_optimizer: ``"sgd"`` or ``"adam"``.
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps``.
    """

    f: int = 0

    def __post_init__(self) -> None:
        if self.f < 0:
            raise ValueError(f"krum f must be >= 0, got {self.f}")
        super().__post_init__()

    def selected(self, n: int) -> int:
        """How many of ``n`` updates are averaged (1 for Krum)."""
        return 1

    def scores(self, updates: Sequence[Update]) -> torch.Tensor:
        """Krum scores, one per update (lower is more central)."""
        n = len(updates)
        if n <= 2 * self.f + 2:
            raise ValueError(
                f"{type(self).__name__} with f={self.f} needs more than 2f + 2 = "
                f"{2 * self.f + 2} updates per aggregation, got {n}"
            )
        rows = _flat(updates)
        dist = torch.cdist(rows, rows).pow(2)
        dist.fill_diagonal_(math.inf)  # a point is not its own neighbour
        return dist.sort(dim=1).values[:, : n - self.f - 2].sum(dim=1)

    def combine(
        self, updates: Sequence[Update], state: State
    ) -> tuple[dict[str, torch.Tensor], State, dict[str, float]]:
        scores = self.scores(updates)
        m = self.selected(len(updates))
        # Stable sort: equal scores keep client order, so results never depend on ties.
        chosen = [updates[int(i)] for i in scores.argsort(stable=True)[:m]]
        out = weighted_sum(chosen, [1.0 / m] * m)  # a float64 mean, cast back
        return out, state, {"selected": float(m)}


@dataclass(frozen=True, kw_only=True)
class MultiKrum(Krum):
    """Multi-Krum: the uniform mean of the ``m`` updates with the lowest Krum scores.

    Args:
        f: the number of attackers assumed per aggregation.
        m: updates averaged (0: ``n - f``); ``m = n`` with ``f = 0`` is the plain mean.
        server_lr: ``eta_g``.
        server_momentum: ``mu`` of server SGD.
        server_optimizer: ``"sgd"`` or ``"adam"``.
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps``.
    """

    m: int = 0

    def __post_init__(self) -> None:
        if self.m < 0:
            raise ValueError(f"multi-krum m must be >= 0, got {self.m}")
        super().__post_init__()

    def selected(self, n: int) -> int:
        if self.m > n:
            raise ValueError(f"multi-krum m={self.m} is more than the {n} updates aggregated")
        return self.m or n - self.f


@dataclass(frozen=True, kw_only=True)
class CenteredClipping(_Robust):
    """Centered clipping: ``v <- v + mean_i clip(Δ_i - v, τ)``, ``iterations`` times.

    ``v`` starts at the previous aggregate (zero at first), kept in the strategy state, so an
    attacker can only move the aggregate by ``τ`` per iteration away from the history.
    ``clip(x, τ) = x * min(1, τ / ||x||)`` with the norm over every entry of the update.

    Args:
        tau: ``τ``, the clipping radius (``inf``: no clipping, one iteration is the mean).
        iterations: ``L``, clipping iterations per aggregation.
        server_lr: ``eta_g``.
        server_momentum: ``mu`` of server SGD.
        server_optimizer: ``"sgd"`` or ``"adam"``.
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps``.
    """

    tau: float = 10.0
    iterations: int = 1

    def __post_init__(self) -> None:
        if not self.tau > 0:  # inf is allowed
            raise ValueError(f"centered-clipping tau must be positive, got {self.tau}")
        if self.iterations < 1:
            raise ValueError(f"centered-clipping iterations must be >= 1, got {self.iterations}")
        super().__post_init__()

    def init(self, params: Params) -> State:
        return {"optimizer": self.optimizer.init(params), "center": {}}

    def combine(
        self, updates: Sequence[Update], state: State
    ) -> tuple[dict[str, torch.Tensor], State, dict[str, float]]:
        names = list(updates[0].payload)
        center = state["center"]
        v = {
            k: center[k].clone() if k in center else torch.zeros_like(updates[0].payload[k])
            for k in names
        }
        clipped = 0
        for _ in range(self.iterations):
            # In float64: a difference or sum of finite float32 updates can overflow float32.
            step = {k: torch.zeros_like(v[k], dtype=torch.float64) for k in names}
            for u in updates:
                diff = {k: u.payload[k].double() - v[k] for k in names}
                norm = optim.norm(diff)
                scale = min(1.0, self.tau / norm) if norm > 0 else 1.0
                clipped += scale < 1.0
                for k in names:
                    step[k].add_(diff[k], alpha=scale / len(updates))
            v = {k: (v[k] + step[k]).to(v[k].dtype) for k in names}
        state = {**state, "center": v}
        return v, state, {"clipped": clipped / (len(updates) * self.iterations)}

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            return params, state, {}
        delta, state, metrics = self.combine(updates, state)
        opt = self.optimizer
        direction, opt_state = opt.direction(delta, state["optimizer"])
        new = optim.apply(params, direction, opt.lr)
        return (
            new,
            {**state, "optimizer": opt_state},
            {
                **metrics,
                "step_norm": optim.norm(direction),
            },
        )
