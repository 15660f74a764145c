"""FedBuff: asynchronous federated learning with a buffer of K client updates.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba. "Federated Learning with Buffered
Asynchronous Aggregation." AISTATS 2022. Reference implementation read: FLSim's
``FedBuffAggregator`` and ``async_staleness_weights`` (facebookresearch/FLSim @ 7311f2d).

The engine keeps ``concurrency`` clients training at all times (trigger ``Buffer(K)``) and
calls :meth:`FedBuff.aggregate` with exactly the K buffered updates. Every delta is relative
to the model the client started from (``y - x_start``, as local SGD returns it), never to the
current model; staleness is ``round.version - update.version``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedlab import optim
from fedlab.strategy import Buffer, Strategy, Trigger, weighted_sum
from fedlab.types import Metrics, Params, Round, State, Update

STALENESS = ("polynomial", "constant", "hinge")
WEIGHTINGS = ("uniform", "examples")


def staleness_weight(
    tau: int, kind: str, *, exponent: float = 0.5, hinge_a: float = 10.0, hinge_b: int = 4
) -> float:
    """The staleness down-weighting ``s(tau)`` shared by FedBuff and FedAsync.

    Args:
        tau: staleness in server versions (``>= 0``).
        kind: ``"polynomial"``: ``1 / (1 + tau)^exponent``; ``"constant"``: 1; ``"hinge"``:
            1 while ``tau <= hinge_b``, then ``1 / (hinge_a * (tau - hinge_b) + 1)``.
        exponent: the polynomial exponent ``a``.
        hinge_a: the hinge slope.
        hinge_b: the staleness up to which the hinge does not down-weight.

    FLSim divides the polynomial weight by ``s(avg_staleness)`` (1 by default, so
    ``sqrt(2) / sqrt(1 + tau)``); that is a constant factor on the server lr, left out here.
    """
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + tau) ** -exponent)
    if kind == "hinge":
        return 1.0 if tau <= hinge_b else 1.0 / (hinge_a * (tau - hinge_b) + 1.0)
    raise ValueError(f"staleness must be one of {STALENESS}, got {kind!r}")


def check_staleness(
    kind: str, exponent: float, hinge_a: float, hinge_b: int, max_staleness: int | None
) -> None:
    """Validate the staleness options of FedBuff and FedAsync, raising ``ValueError``."""
    if kind not in STALENESS:
        raise ValueError(f"staleness must be one of {STALENESS}, got {kind!r}")
    if not (math.isfinite(exponent) and exponent >= 0):
        raise ValueError(f"staleness_exponent must be >= 0 and finite, got {exponent}")
    if not (math.isfinite(hinge_a) and hinge_a > 0):
        raise ValueError(f"hinge_a must be positive and finite, got {hinge_a}")
    if hinge_b < 0:
        raise ValueError(f"hinge_b must be >= 0, got {hinge_b}")
    if max_staleness is not None and max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0 or None, got {max_staleness}")


def within_staleness(
    updates: Sequence[Update], version: int, max_staleness: int | None
) -> tuple[list[tuple[Update, int]], int]:
    """The updates no staler than ``max_staleness`` (all with ``None``), each with its
    staleness ``version - update.version``, and how many were dropped."""
    kept = [
        (u, version - u.version)
        for u in updates
        if max_staleness is None or version - u.version <= max_staleness
    ]
    return kept, len(updates) - len(kept)


@dataclass(frozen=True, kw_only=True)
class FedBuff(optim.ServerOptimizerOptions, Strategy):
    """Buffered asynchronous aggregation with staleness weights and a server optimizer.

    For the K buffered updates ``x <- ServerOpt(x, (1/K) sum_i s(tau_i) e_i Δ_i)``, with
    ``tau_i`` the update's staleness and ``e_i`` its example weight (1, or ``n_i`` divided by
    the buffer's mean ``n``, so that the weights still average to one).

    The buffer is averaged over K, as in the paper. FLSim sums it instead (its WEIGHTED_SUM
    reducer); that is the same algorithm with the server lr multiplied by K. Updates staler
    than ``max_staleness`` are dropped (FLSim discards them before they enter the buffer); the
    engine has already counted them towards K, so the rest are averaged over how many are
    kept, which keeps the step's scale, and a buffer that is all dropped leaves the model and
    the optimizer state unchanged.

    Args:
        buffer: K, the number of updates per server step.
        staleness: ``"polynomial"``, ``"constant"`` or ``"hinge"`` (see
            :func:`staleness_weight`).
        staleness_exponent: the polynomial exponent (0.5: ``1 / sqrt(1 + tau)``).
        hinge_a: the hinge slope.
        hinge_b: the hinge's staleness threshold.
        max_staleness: drop updates staler than this (``None``: keep all).
        weighting: ``"uniform"`` (the paper) or ``"examples"``.
        server_optimizer: ``"sgd"`` or ``"adam"`` (:mod:`fedlab.optim`).
        server_lr: the server learning rate.
        server_momentum: server SGD momentum.
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps``.
    """

    delta_aggregation: ClassVar[str] = "linear"

    buffer: int = 10
    staleness: str = "polynomial"
    staleness_exponent: float = 0.5
    hinge_a: float = 10.0
    hinge_b: int = 4
    max_staleness: int | None = None
    weighting: str = "uniform"

    def __post_init__(self) -> None:
        if self.buffer < 1:
            raise ValueError(f"buffer must be at least 1, got {self.buffer}")
        check_staleness(
            self.staleness, self.staleness_exponent, self.hinge_a, self.hinge_b, self.max_staleness
        )
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        _ = self.optimizer  # a bad optimizer hyperparameter fails at construction

    @property
    def trigger(self) -> Trigger:
        return Buffer(self.buffer)

    def weight(self, tau: int) -> float:
        """``s(tau)`` with this strategy's staleness options."""
        return staleness_weight(
            tau,
            self.staleness,
            exponent=self.staleness_exponent,
            hinge_a=self.hinge_a,
            hinge_b=self.hinge_b,
        )

    def init(self, params: Params) -> State:
        return self.optimizer.init(params)

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        kept, dropped = within_staleness(updates, round.version, self.max_staleness)
        if not kept:
            return params, state, {"stale_dropped": float(dropped)}
        examples = [1.0] * len(kept)
        if self.weighting == "examples":
            mean_n = sum(u.num_examples for u, _ in kept) / len(kept)
            if mean_n > 0:
                examples = [u.num_examples / mean_n for u, _ in kept]
        weights = [self.weight(t) * e for (_, t), e in zip(kept, examples, strict=True)]
        delta = weighted_sum([u for u, _ in kept], weights, scale=1 / len(kept))
        opt = self.optimizer
        direction, state = opt.direction(delta, state)
        new = optim.apply(params, direction, opt.lr)
        return (
            new,
            state,
            {
                "step_norm": optim.norm(direction),
                "stale_dropped": float(dropped),
                "mean_weight": sum(weights) / len(weights),
            },
        )
