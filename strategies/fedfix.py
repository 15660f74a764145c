"""FedFix and asynchronous FedAvg (FedAsync) with Fraboni's aggregation weights.

Fraboni, Vidal, Kameni, Lorenzi. "A General Theory for Federated Optimization with
Asynchronous and Heterogeneous Clients Updates." JMLR 24(110), 2023. Reference code read:
Accenture/Labs-Federated-Learning, branch ``asynchronous_FL`` @ 1c896f0 (``FL/server.py``,
``FL/clients_schedule.py``).

Both apply ``theta <- theta + eta_g * sum_{i in S} d_i * (y_i - theta_sent_i)``: every delta is
relative to the model the client started from, as local SGD returns it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab import optim

# Relative, so that it resolves both as fedlab.strategies (installed) and for mypy run on the
# strategies/ folder.
from fedlab.strategies.fedbuff import check_staleness, staleness_weight, within_staleness
from fedlab.strategy import Buffer, Period, Strategy, Trigger, weighted_sum
from fedlab.types import Metrics, Params, Round, State, Update

WEIGHTINGS = ("uniform", "examples")


def _check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"server_lr must be positive and finite, got {lr}")


def _weighted_sum(updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i * payload_i`` (in float64), not normalised: Fraboni's weights carry their
    own scale."""
    return weighted_sum(updates, weights)


@dataclass(frozen=True, kw_only=True)
class FedFix(Strategy):
    """FedFix-Δt: aggregate every ``period`` seconds whatever has arrived in the window.

    Client ``i`` in the set ``S`` of the window gets ``d_i = ceil(tau_i / Δt) * p_i``, where
    ``tau_i`` is its job's duration. With the engine's ``Period`` trigger a client starts at the
    beginning of a window (tasks go out right after each aggregation, so a client that finishes
    mid-window waits, as in Fraboni's FedFix), and a job that started at version ``s`` is
    aggregated at the end of window ``s + ceil(tau_i / Δt) - 1``. So ``ceil(tau_i / Δt)`` is the
    number of windows the job spanned, ``staleness + 1``: the weight needs no timing on the
    wire, and with per-task random durations (latency) it counts the windows this job spanned.

    ``p_i`` sums to one over **all** N clients, as in the paper and ``FL/server.py``
    (``P = n_samples / sum(n_samples)`` over every client), not over ``S``: a client aggregated
    once every ``ceil(tau_i / Δt)`` windows then carries ``p_i`` per window on average, which is
    what makes the procedure unbiased. ``"uniform"`` is ``1 / N`` (Fraboni's experiments);
    ``"examples"`` is ``n_i / sum_j n_j``, where the server does not know every ``n_j`` in
    advance: the sum is estimated as ``N`` times the mean ``n`` over the clients seen so far
    (kept in the state), which is exact once every client has reported once.

    Args:
        period: Δt, seconds of simulated time per window.
        weighting: ``"uniform"`` or ``"examples"`` (``p_i``).
        server_lr: ``eta_g`` (1 in the paper's experiments).
    """

    delta_aggregation: ClassVar[str] = "linear"

    period: float = 1.0
    weighting: str = "uniform"
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.period) and self.period > 0):
            raise ValueError(f"period must be positive and finite, got {self.period}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        _check_lr(self.server_lr)

    @property
    def trigger(self) -> Trigger:
        return Period(self.period)

    def init(self, params: Params) -> State:
        if self.weighting == "uniform":
            return {}
        return {"examples": {}, "total": 0}

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if self.weighting == "examples":
            seen: dict[int, int] = dict(state["examples"])
            total = int(state["total"])
            for u in updates:
                total += u.num_examples - seen.get(u.client_id, 0)
                seen[u.client_id] = u.num_examples
            state = {"examples": seen, "total": total}
        if not updates:
            return params, state, {"step_norm": 0.0}
        windows = [round.version - u.version + 1 for u in updates]  # ceil(tau_i / Δt)
        if self.weighting == "examples" and state["total"] > 0:
            # sum_j n_j over all N, estimated from the clients seen so far.
            all_n = round.num_clients * state["total"] / len(state["examples"])
            p = [u.num_examples / all_n for u in updates]
        else:
            p = [1.0 / round.num_clients] * len(updates)
        weights = [w * pi for w, pi in zip(windows, p, strict=True)]
        step = _weighted_sum(updates, weights)
        return (
            optim.apply(params, step, self.server_lr),
            state,
            {"step_norm": optim.norm(step), "weight_sum": float(sum(weights))},
        )


@dataclass(frozen=True, kw_only=True)
class FedAsync(Strategy):
    """Asynchronous FedAvg: one server step per returning client (Fraboni's "Async").

    ``theta <- theta + eta_g * d_i * s(tau_i) * Δ_i`` with ``Δ_i = y_i - theta_sent``, the
    client's trained model minus the (possibly older) model it was sent, ``d_i = 1``
    (Fraboni's ``"identical"`` weights; his ``"weight"`` variant needs every client's mean job
    time, which does not travel on the wire) and an optional staleness down-weighting ``s``
    shared with :class:`~fedlab.strategies.FedBuff` (``"constant"``, i.e. none, by default as
    in Fraboni; ``"polynomial"`` or ``"hinge"`` are the staleness functions of Xie et al.).

    This is not Xie et al.'s FedAsync mixing ``theta <- (1 - a) theta + a y_i``, which pulls
    the *current* model toward the client's model, i.e. adds ``a (y_i - theta)``: here the
    client's own delta from the model it started from is added. The two agree only when no
    other update arrived while the client trained (``theta = theta_sent``).

    Args:
        server_lr: ``eta_g`` (1 in Fraboni's experiments).
        weighting: ``"identical"``.
        staleness: ``"constant"``, ``"polynomial"`` or ``"hinge"``.
        staleness_exponent: the polynomial exponent.
        hinge_a: the hinge slope.
        hinge_b: the hinge's staleness threshold.
        max_staleness: drop updates staler than this (``None``: keep all).
    """

    delta_aggregation: ClassVar[str] = "linear"

    server_lr: float = 1.0
    weighting: str = "identical"
    staleness: str = "constant"
    staleness_exponent: float = 0.5
    hinge_a: float = 10.0
    hinge_b: int = 4
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        _check_lr(self.server_lr)
        if self.weighting != "identical":
            raise ValueError(f"weighting must be 'identical', got {self.weighting!r}")
        check_staleness(
            self.staleness, self.staleness_exponent, self.hinge_a, self.hinge_b, self.max_staleness
        )

    @property
    def trigger(self) -> Trigger:
        return Buffer(1)

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        kept, n_dropped = within_staleness(updates, round.version, self.max_staleness)
        dropped = float(n_dropped)
        if not kept:
            return params, state, {"stale_dropped": dropped}
        weights = [
            staleness_weight(
                t,
                self.staleness,
                exponent=self.staleness_exponent,
                hinge_a=self.hinge_a,
                hinge_b=self.hinge_b,
            )
            for _, t in kept
        ]
        step = _weighted_sum([u for u, _ in kept], weights)
        return (
            optim.apply(params, step, self.server_lr),
            state,
            {"step_norm": optim.norm(step), "stale_dropped": dropped},
        )
