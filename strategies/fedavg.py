"""FedAvg with a server learning rate and optional server momentum.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017. The server-momentum variant is FedAvgM (Hsu,
Qi, Brown, 2019): ``v <- mu v + mean_delta; x <- x + eta_g v``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlab.strategy import Strategy, floating, weighted_mean
from fedlab.types import Metrics, Params, Round, State, Update

WEIGHTINGS = ("examples", "uniform")


@dataclass(frozen=True, kw_only=True)
class FedAvg(Strategy):
    """Weighted average of client deltas, applied with a server learning rate.

    Args:
        server_lr: ``eta_g``; 1.0 with no momentum is the original FedAvg.
        server_momentum: ``mu``; 0 disables server momentum.
        weighting: ``"examples"`` (``n_i / sum n_j``) or ``"uniform"``.
    """

    server_lr: float = 1.0
    server_momentum: float = 0.0
    weighting: str = "examples"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be positive and finite, got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")

    def init(self, params: Params) -> State:
        if self.server_momentum == 0:
            return {}
        return {"momentum": {k: torch.zeros_like(v) for k, v in floating(params).items()}}

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            return params, state, {}
        weights = [float(u.num_examples) for u in updates]
        if self.weighting == "uniform" or sum(weights) <= 0:
            weights = [1.0] * len(updates)
        step = weighted_mean(updates, weights)
        if self.server_momentum > 0:
            momentum = {
                k: state["momentum"][k].mul(self.server_momentum).add_(d) for k, d in step.items()
            }
            state = {**state, "momentum": momentum}
            step = momentum
        new = dict(params)
        for k, d in step.items():
            new[k] = params[k] + self.server_lr * d
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in step.values()))
        return new, state, {"step_norm": norm}
