"""FedAvg with a server learning rate and a server optimizer (SGD, momentum or Adam).

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017. The server-momentum variant is FedAvgM (Hsu,
Qi, Brown, 2019): ``v <- mu v + mean_delta; x <- x + eta_g v``; the Adam variant is FedAdam
(Reddi et al., ICLR 2021), see :mod:`fedlab.optim`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from fedlab import optim
from fedlab.strategy import Strategy, weighted_mean
from fedlab.types import Metrics, Params, Round, State, Update

WEIGHTINGS = ("examples", "uniform")


@dataclass(frozen=True, kw_only=True)
class FedAvg(optim.ServerOptimizerOptions, Strategy):
    """Weighted average of client deltas, applied by a server optimizer.

    Args:
        server_lr: ``eta_g``; 1.0 with plain SGD and no momentum is the original FedAvg.
        server_momentum: ``mu`` of server SGD; 0 disables server momentum.
        weighting: ``"examples"`` (``n_i / sum n_j``) or ``"uniform"``.
        server_optimizer: ``"sgd"`` (FedAvg, FedAvgM) or ``"adam"`` (FedAdam).
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps`` (FedOpt's ``tau``).
    """

    delta_aggregation: ClassVar[str] = "linear"

    weighting: str = "examples"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        self.optimizer  # noqa: B018  (builds it, so a bad hyperparameter fails here)

    def init(self, params: Params) -> State:
        return self.optimizer.init(params)

    def stream_weight(self, update: Update) -> float | None:
        # Only the weighted mean of the deltas enters the step, so it can be folded up as
        # updates arrive (a mean over one update of weight sum(n_i) is that mean again).
        return float(update.num_examples) if self.weighting == "examples" else 1.0

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            return params, state, {}
        weights = [float(u.num_examples) for u in updates]
        if self.weighting == "uniform" or sum(weights) <= 0:
            weights = [1.0] * len(updates)
        opt = self.optimizer
        direction, state = opt.direction(weighted_mean(updates, weights), state)
        new = optim.apply(params, direction, opt.lr)
        return new, state, {"step_norm": optim.norm(direction)}
