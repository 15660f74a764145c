"""FedAU: FedAvg with online-estimated aggregation weights for unknown participation.

Shiqiang Wang and Mingyue Ji. "A Lightweight Method for Tackling Unknown Participation
Statistics in Federated Averaging." ICLR 2024.

Clients take part with unknown, heterogeneous probabilities ``p_n``; weighting a participant's
delta by ``1 / p_n`` makes the aggregate unbiased. FedAU estimates ``1 / p_n`` online as the
mean of client ``n``'s participation intervals (the versions between its participations),
optionally cutting an interval at ``K``; the server keeps three numbers per client.

The estimator is exposed as pure functions (:func:`estimator_init`,
:func:`estimator_weights`, :func:`estimator_update`) so that other strategies (FedStale with
unknown probabilities) reuse it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab.strategy import Strategy, add_into, floating
from fedlab.types import Metrics, Params, Round, State, Update

WEIGHTINGS = ("adaptive", "participating", "all")

# --------------------------------------------------------------------------- the estimator


def estimator_init(num_clients: int) -> State:
    """The estimator's state before version 0: no interval recorded for anybody.

    Returns:
        ``{"since": int64[N], "count": int64[N], "mean": float64[N]}``: versions since the
        client's last recorded interval, how many intervals were recorded, and their mean.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    return {
        "since": torch.zeros(num_clients, dtype=torch.int64),
        "count": torch.zeros(num_clients, dtype=torch.int64),
        "mean": torch.zeros(num_clients, dtype=torch.float64),
    }


def estimator_weights(state: State, clients: Sequence[int]) -> torch.Tensor:
    """FedAU's weights ``omega_n`` for ``clients``, from intervals recorded before now.

    Call this before :func:`estimator_update` records the current version: the weight must
    not depend on whether the client participates now (FedAU's independence requirement).

    Returns:
        float64 weights, one per client in ``clients``: the mean recorded interval, or 1.0
        for a client with none recorded yet.
    """
    idx = _index(clients, len(state["mean"]))
    return torch.where(
        state["count"][idx] > 0, state["mean"][idx], torch.ones(len(idx), dtype=torch.float64)
    )


def estimator_update(state: State, participants: Sequence[int], cutoff: int) -> State:
    """Record one version: who participated, and that everybody else did not.

    A participant records the interval ``since + 1`` (the versions since its last recorded
    interval, this one included; the first counts from version 0) and restarts its count. A
    non-participant's count grows by one; with ``cutoff = K > 0``, reaching ``K`` records an
    interval of ``K`` and restarts the count, which bounds the weight of a client that stops
    participating (``cutoff = 0``: no cutoff, FedAU's ``K = infinity``). Every client must be
    observed at every version, so call this exactly once per version, also when nobody
    participated.

    Args:
        state: from :func:`estimator_init` or a previous update (not modified).
        participants: the clients that participated at this version (duplicates are fine).
        cutoff: ``K``, or 0 for none.

    Returns:
        The new state.
    """
    if cutoff < 0:
        raise ValueError(f"cutoff must be >= 0 (0: no cutoff), got {cutoff}")
    n = len(state["since"])
    took_part = torch.zeros(n, dtype=torch.bool)
    took_part[_index(participants, n)] = True
    since = state["since"] + 1
    record = took_part | (since >= cutoff) if cutoff > 0 else took_part
    # A non-participant records exactly K here and a participant at most K (its count was
    # reset on reaching K), so ``since`` is the interval in both cases.
    count = state["count"] + record.long()
    mean = torch.where(
        record, state["mean"] + (since.double() - state["mean"]) / count.clamp(min=1), state["mean"]
    )
    return {"since": torch.where(record, 0, since), "count": count, "mean": mean}


def _index(clients: Sequence[int], num_clients: int) -> torch.Tensor:
    idx = torch.tensor([int(c) for c in clients], dtype=torch.int64)
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= num_clients):
        raise ValueError(f"client ids must be in [0, {num_clients}), got {list(clients)}")
    return idx


# --------------------------------------------------------------------------- strategies


def _apply(
    params: Params, updates: Sequence[Update], weights: Sequence[float], server_lr: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``x + server_lr * sum_i weights_i * delta_i`` and the norm of the step."""
    new = dict(params)
    sq = 0.0
    for name, x in floating(params).items():
        # In float64: a float32 sum of finite updates can overflow.
        acc = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for u, w in zip(updates, weights, strict=True):
            add_into(acc, u.payload[name], w)
        new[name] = x + server_lr * acc.to(x.dtype)
        sq += float(acc.pow(2).sum())
    return new, math.sqrt(sq)


def _check_server_lr(server_lr: float) -> None:
    if not (math.isfinite(server_lr) and server_lr > 0):
        raise ValueError(f"server_lr must be positive and finite, got {server_lr}")


@dataclass(frozen=True, kw_only=True)
class FedAU(Strategy):
    """FedAvg with FedAU's adaptive weights, and the paper's two FedAvg baselines.

    Every client available at a version gets a task (use a participation model other than
    ``uniform``, which makes the server sample ``fraction`` of the clients instead); the
    update is ``x <- x + server_lr * (1/N) * sum_n omega_n * delta_n`` over the clients that
    answered, with ``N = round.num_clients``, the whole population. A client counts as
    participating at a version when its update is aggregated: an available client whose
    update was rejected or lost did not participate, for the estimator as for the model.

    Args:
        weighting: ``"adaptive"`` (FedAU: ``omega_n`` estimated online), ``"participating"``
            (``(1/|S|) sum_S delta``, FedAvg over the clients that answered) or ``"all"``
            (``(1/N) sum_S delta``, unit weights over the whole population). The paper tunes
            the baselines' learning rates separately: its README runs ``participating`` with
            client lr 0.0562 and ``server_lr`` 1.78, ``all`` with client lr 0.1 and
            ``server_lr`` 10, and FedAU with client lr 0.1 and ``server_lr`` 1.
        cutoff: ``K``, the longest interval recorded; 0 (default) is no cutoff, the paper's
            main variant (its code's default ``K = 100000`` never triggers in its runs). The
            paper also reports ``K = 50``. Used by ``"adaptive"`` only.
        server_lr: ``eta_g``.
    """

    delta_aggregation: ClassVar[str] = "linear"

    weighting: str = "adaptive"
    cutoff: int = 0
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int) or self.cutoff < 0:
            raise ValueError(f"cutoff must be an integer >= 0 (0: no cutoff), got {self.cutoff}")
        _check_server_lr(self.server_lr)

    def init(self, params: Params) -> State:
        # The population size is first known at aggregate time (Round.num_clients).
        return {}

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        n = round.num_clients
        clients = [u.client_id for u in updates]
        metrics: dict[str, float] = {"participants": float(len(updates))}
        if self.weighting == "adaptive":
            estimator = state.get("estimator") or estimator_init(n)
            if len(estimator["since"]) != n:
                raise ValueError(
                    f"FedAU state tracks {len(estimator['since'])} clients, the round has {n}"
                )
            omega = estimator_weights(estimator, clients)
            # The weights above use only earlier versions; now record this one for everybody.
            state = {**state, "estimator": estimator_update(estimator, clients, self.cutoff)}
            weights = (omega / n).tolist()
            if updates:
                metrics["mean_weight"] = float(omega.mean())
        elif self.weighting == "all":
            weights = [1.0 / n] * len(updates)
        else:
            weights = [1.0 / max(len(updates), 1)] * len(updates)
        if not updates:
            return params, state, metrics
        new, norm = _apply(params, updates, weights, self.server_lr)
        return new, state, {**metrics, "step_norm": norm}


@dataclass(frozen=True, kw_only=True)
class KnownProbability(Strategy):
    """The oracle baseline: participants weighted by ``1 / p_n`` with the true probabilities.

    ``x <- x + server_lr * (1/N) * sum_S delta_n / p_n``, the same normalisation as FedAU.
    The simulator injects ``probabilities`` from the participation model (``build_engine``
    does it for any strategy with ``needs_probabilities``).

    Args:
        probabilities: ``p_n`` for every client ``0 .. N-1``, each in ``(0, 1]``.
        server_lr: ``eta_g``.
    """

    delta_aggregation: ClassVar[str] = "linear"
    # An oracle needs a participation model that defines the true probabilities: the default
    # one (uniform, the server samples) does not.
    run_defaults: ClassVar[Mapping[str, str]] = {"participation": "bernoulli"}

    probabilities: tuple[float, ...] | None = None
    server_lr: float = 1.0

    @property
    def needs_probabilities(self) -> bool:
        """True until probabilities are given, by the user or injected by the simulator."""
        return self.probabilities is None

    def __post_init__(self) -> None:
        _check_server_lr(self.server_lr)
        if self.probabilities is not None:
            # A list from TOML or --strategy-opt becomes a tuple, so the strategy stays hashable.
            object.__setattr__(self, "probabilities", tuple(float(p) for p in self.probabilities))
            bad = [p for p in self.probabilities if not (0 < p <= 1)]
            if bad:
                raise ValueError(
                    f"probabilities must be in (0, 1]; got {bad[:3]} (a client that never "
                    "participates has no finite 1/p weight)"
                )

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if self.probabilities is None:
            raise ValueError(
                "known-probability needs the true participation probabilities: run it through "
                "fedlab.run.build_engine with a participation model that defines them "
                "(bernoulli, cyclic, markov, trace), or pass probabilities=..."
            )
        n = round.num_clients
        if len(self.probabilities) != n:
            raise ValueError(
                f"known-probability has {len(self.probabilities)} probabilities for {n} clients"
            )
        if not updates:
            return params, state, {"participants": 0.0}
        weights = [1.0 / (self.probabilities[u.client_id] * n) for u in updates]
        new, norm = _apply(params, updates, weights, self.server_lr)
        return new, state, {"participants": float(len(updates)), "step_norm": norm}
