"""Server optimizers: how an aggregated delta moves the global model.

Every strategy in the FedAvg family ends with one aggregated delta ``Δ̄`` (the model moves by
``+lr * step``). Writing that last move as an optimizer on the pseudo-gradient ``-Δ̄`` lets plain
FedAvg, FedAvgM (server momentum) and FedAdam (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021) share the strategies that produce ``Δ̄`` (FedAvg, FedBuff, ...).

Optimizers are frozen dataclasses of hyperparameters; their state is explicit (a dict of
tensors and numbers, checkpointed by :mod:`fedlab.tensorio`), like a strategy's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from fedlab.strategy import floating
from fedlab.types import Params, State

OPTIMIZERS = ("sgd", "adam")


class ServerOptimizer(Protocol):
    """What a strategy needs from a server optimizer."""

    @property
    def lr(self) -> float:
        """The server learning rate: the model moves by ``lr`` times the direction."""
        ...

    def init(self, params: Params) -> State:
        """The optimizer's state for the initial model."""
        ...

    def direction(
        self, delta: Mapping[str, torch.Tensor], state: State
    ) -> tuple[dict[str, torch.Tensor], State]:
        """The step direction for ``delta`` (the model moves by ``lr`` times it) and new state."""
        ...

    def step(
        self, params: Params, delta: Mapping[str, torch.Tensor], state: State
    ) -> tuple[dict[str, torch.Tensor], State]:
        """Move ``params`` by the aggregated ``delta``; return ``(params, state)``."""
        ...


def _check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"server_lr must be positive and finite, got {lr}")


def apply(
    params: Params, direction: Mapping[str, torch.Tensor], lr: float
) -> dict[str, torch.Tensor]:
    """``params + lr * direction`` on the entries of ``direction``; others are kept as they are."""
    new = dict(params)
    for k, d in direction.items():
        new[k] = params[k] + lr * d
    return new


def norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The global L2 norm of ``tensors``, accumulated in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


@dataclass(frozen=True, kw_only=True)
class ServerSGD:
    """SGD with optional heavy-ball momentum on the aggregated delta.

    ``v <- mu * v + Δ̄; x <- x + lr * v`` (FedAvgM, Hsu et al. 2019); ``mu = 0`` is
    ``x <- x + lr * Δ̄``, and ``lr = 1`` with no momentum is the original FedAvg.

    Args:
        lr: the server learning rate ``eta_g``.
        momentum: ``mu`` in ``[0, 1)``; 0 keeps no state.
    """

    lr: float = 1.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        if not 0 <= self.momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.momentum}")

    def init(self, params: Params) -> State:
        if self.momentum == 0:
            return {}
        return {"momentum": {k: torch.zeros_like(v) for k, v in floating(params).items()}}

    def direction(
        self, delta: Mapping[str, torch.Tensor], state: State
    ) -> tuple[dict[str, torch.Tensor], State]:
        if self.momentum == 0:
            return dict(delta), state
        momentum = {k: state["momentum"][k].mul(self.momentum).add_(d) for k, d in delta.items()}
        return momentum, {**state, "momentum": momentum}

    def step(
        self, params: Params, delta: Mapping[str, torch.Tensor], state: State
    ) -> tuple[dict[str, torch.Tensor], State]:
        direction, state = self.direction(delta, state)
        return apply(params, direction, self.lr), state


@dataclass(frozen=True, kw_only=True)
class ServerAdam:
    """Adam on the pseudo-gradient ``-Δ̄`` (FedAdam, Reddi et al. 2021, Algorithm 2).

    ``m <- b1 m + (1 - b1) Δ̄; v <- b2 v + (1 - b2) Δ̄²; x <- x + lr * m / (sqrt(v) + eps)``.

    FedOpt has no bias correction, and neither has this optimizer by default: with the
    paper's ``eps = 1e-3`` (large next to typical ``sqrt(v)``) the first steps are simply short.
    ``bias_correction=True`` divides ``m`` and ``v`` by ``1 - b^t`` as ``torch.optim.Adam`` does
    (FLSim's FedBuff uses torch's Adam, so this reproduces it).

    Args:
        lr: the server learning rate.
        beta1: first-moment decay.
        beta2: second-moment decay.
        eps: added to ``sqrt(v)``; FedOpt's "degree of adaptivity" ``tau``.
        bias_correction: divide the moments by ``1 - beta^t``.
    """

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3
    bias_correction: bool = False

    def __post_init__(self) -> None:
        _check_lr(self.lr)
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not 0 <= b < 1:
                raise ValueError(f"server_{name} must be in [0, 1), got {b}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"server_eps must be positive and finite, got {self.eps}")

    def init(self, params: Params) -> State:
        zeros = {k: torch.zeros_like(v) for k, v in floating(params).items()}
        return {"m": zeros, "v": {k: z.clone() for k, z in zeros.items()}, "t": 0}

    def direction(
        self, delta: Mapping[str, torch.Tensor], state: State
    ) -> tuple[dict[str, torch.Tensor], State]:
        b1, b2 = self.beta1, self.beta2
        t = int(state["t"]) + 1
        m = {k: state["m"][k].mul(b1).add_(d, alpha=1 - b1) for k, d in delta.items()}
        v = {k: state["v"][k].mul(b2).addcmul_(d, d, value=1 - b2) for k, d in delta.items()}
        c1, c2 = (1 - b1**t, 1 - b2**t) if self.bias_correction else (1.0, 1.0)
        out = {k: (m[k] / c1) / ((v[k] / c2).sqrt() + self.eps) for k in delta}
        return out, {"m": m, "v": v, "t": t}

    def step(
        self, params: Params, delta: Mapping[str, torch.Tensor], state: State
    ) -> tuple[dict[str, torch.Tensor], State]:
        direction, state = self.direction(delta, state)
        return apply(params, direction, self.lr), state


def build(
    name: str,
    *,
    lr: float,
    momentum: float = 0.0,
    beta1: float = 0.9,
    beta2: float = 0.99,
    eps: float = 1e-3,
) -> ServerOptimizer:
    """The server optimizer ``name`` (one of ``OPTIMIZERS``) from a strategy's options.

    Raises:
        ValueError: unknown name, a bad hyperparameter, or momentum given to Adam (whose
            momentum is ``beta1``).
    """
    if name == "sgd":
        return ServerSGD(lr=lr, momentum=momentum)
    if name == "adam":
        if momentum != 0:
            raise ValueError("server momentum is for sgd; Adam's momentum is server_beta1")
        return ServerAdam(lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    raise ValueError(f"server_optimizer must be one of {OPTIMIZERS}, got {name!r}")


@dataclass(frozen=True, kw_only=True)
class ServerOptimizerOptions:
    """The server-optimizer hyperparameters, as options of the strategies that take them.

    A strategy that steps with a server optimizer inherits these fields (before
    :class:`fedlab.strategy.Strategy`), so ``--strategy-opt server_lr=...`` means the same
    thing for each of them.

    Args:
        server_optimizer: ``"sgd"`` (FedAvg, FedAvgM) or ``"adam"`` (FedAdam).
        server_lr: the server learning rate ``eta_g``.
        server_momentum: server SGD momentum ``mu``; 0 disables it.
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps`` (FedOpt's ``tau``).
    """

    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_eps: float = 1e-3

    @property
    def optimizer(self) -> ServerOptimizer:
        """The server optimizer these options describe."""
        return build(
            self.server_optimizer,
            lr=self.server_lr,
            momentum=self.server_momentum,
            beta1=self.server_beta1,
            beta2=self.server_beta2,
            eps=self.server_eps,
        )
