"""FedStale and FedVARP: fresh updates of the participants plus the stale updates of the rest.

Rodio, Neglia. "FedStale: leveraging stale client updates in federated learning." 2024.
FedVARP (Jhunjhunwala, Sharma, Nagarkatti, Joshi. "FedVARP: Tackling the Variance Due to
Partial Client Participation in Federated Learning." UAI 2022) is the case ``beta = 1``.

In delta form (``Delta_i = y_i - x``; the paper's pseudo-gradient is ``g_i = -Delta_i``), with
``h_i`` the last delta client ``i`` sent (0 before its first) and ``S`` this version's
participants::

    D = sum_{i in S} (alpha_i / p_i) (Delta_i - beta h_i) + beta sum_{i=1..N} alpha_i h_i
    x <- x + server_lr * D;   then h_i <- Delta_i for i in S

``beta = 0`` is unbiased FedAvg, ``beta = 1`` is FedVARP, and
``D(beta) = (1 - beta) D(0) + beta D(1)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab.store import ClientStore
from fedlab.strategies.fedau import estimator_init, estimator_update, estimator_weights
from fedlab.strategy import Strategy, floating
from fedlab.types import ClientId, Metrics, Params, Round, State, Update

WEIGHTS = ("examples", "uniform")
PROBABILITIES = ("estimated", "known")


@dataclass(frozen=True, kw_only=True)
class FedStale(Strategy):
    """A ``beta``-weighted mix of fresh and stale (remembered) client updates.

    The last delta of every client lives in ``Round.memory``, the engine's server-side store
    (``--memory disk`` keeps it in files), as ``{"h": delta, "n": num_examples}``. The
    strategy state keeps ``sum_i w_i h_i`` incrementally, so a version costs ``O(|S| d)``
    however many clients there are; memory is still ``N d``, in the store.

    Args:
        beta: weight of the stale updates, in ``[0, 1]``; 0 is FedAvg, 1 is FedVARP.
        server_lr: ``eta_s``, the step applied to the combined update.
        weights: the objective weights ``alpha_i``. ``"examples"``: ``n_i / n`` where ``n``
            sums the latest example count of every client seen so far; the server cannot know
            ``n_i`` of a client that never answered, and such a client has ``h_i = 0``, so
            only the normaliser is affected, and it reaches the true ``n`` once every client
            has participated (the weights are recomputed exactly each version, since the sum
            is kept unnormalised). ``"uniform"``: ``1 / N``.
        probabilities: how ``1 / p_i`` is obtained. ``"estimated"``: FedAU's online
            estimate from the participation seen before this version (§2 of the spec);
            ``"known"``: the true ``p_i``, which the simulation builder injects (it replaces
            the field by the tuple, see :attr:`needs_probabilities`); or a tuple of ``N``
            probabilities given directly.
        cutoff: FedAU's ``K`` for the estimator: a run of ``K`` absences counts as an
            interval of ``K``; 0 (default) is no cutoff, as in FedAU.
    """

    delta_aggregation: ClassVar[str] = "linear"

    beta: float = 0.5
    server_lr: float = 1.0
    weights: str = "examples"
    probabilities: str | tuple[float, ...] = "estimated"
    cutoff: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta) and 0 <= self.beta <= 1):
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ValueError(f"server_lr must be positive and finite, got {self.server_lr}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if isinstance(self.probabilities, str):
            if self.probabilities not in PROBABILITIES:
                raise ValueError(
                    f"probabilities must be one of {PROBABILITIES} or a list of per-client "
                    f"probabilities, got {self.probabilities!r}"
                )
        else:
            # A TOML array arrives as a list; a tuple keeps the dataclass hashable.
            probs = tuple(float(p) for p in self.probabilities)
            bad = [p for p in probs if not (math.isfinite(p) and 0 < p <= 1)]
            if not probs or bad:
                raise ValueError(
                    f"participation probabilities must be non-empty and in (0, 1], got {bad[:3]}"
                )
            object.__setattr__(self, "probabilities", probs)
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int) or self.cutoff < 0:
            raise ValueError(f"cutoff must be an integer >= 0 (0: no cutoff), got {self.cutoff!r}")

    @property
    def needs_probabilities(self) -> bool:
        """True while the true probabilities are asked for and not yet injected."""
        return self.probabilities == "known"

    def init(self, params: Params) -> State:
        return {
            # sum_i w_i h_i over every client, unnormalised (alpha_i = w_i / total).
            "stale": {
                k: torch.zeros_like(v, dtype=torch.float64) for k, v in floating(params).items()
            },
            "total": 0.0,
            # Built on the first version, when the population size is known.
            "estimator": None,
        }

    def _inverse_probabilities(
        self, state: State, clients: list[ClientId], num_clients: int
    ) -> tuple[list[float], State | None]:
        if self.probabilities == "known":
            raise ValueError(
                "probabilities='known' needs the true participation probabilities; "
                "fedlab.run.build_engine injects them from a participation model that defines "
                "them, or pass the per-client probabilities as a list"
            )
        if isinstance(self.probabilities, tuple):
            if len(self.probabilities) != num_clients:
                raise ValueError(
                    f"{len(self.probabilities)} participation probabilities given for "
                    f"{num_clients} clients"
                )
            return [1.0 / self.probabilities[c] for c in clients], None
        estimator = state["estimator"]
        if estimator is None:
            estimator = estimator_init(num_clients)
        inverse = estimator_weights(estimator, clients)
        return [float(w) for w in inverse.tolist()], estimator

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        memory = round.memory
        if memory is None:
            raise ValueError("FedStale keeps the last updates in Round.memory, which is None")
        clients = [u.client_id for u in updates]
        if len(set(clients)) != len(clients):
            raise ValueError("FedStale expects at most one update per client per version")
        inverse, estimator = self._inverse_probabilities(state, clients, round.num_clients)

        stale = {k: v.clone() for k, v in state["stale"].items()}
        total = float(state["total"])
        fresh = {k: torch.zeros_like(v) for k, v in stale.items()}
        old = [_remembered(memory, u.client_id, stale) for u in updates]
        new_w = [self._weight(u.num_examples) for u in updates]
        # Bring alpha_i of this version's participants up to date in the running sum first,
        # so the fresh and stale terms use the same alpha_i (what makes the estimate unbiased).
        for (h, n_old), w in zip(old, new_w, strict=True):
            w_old = 0.0 if n_old is None else self._weight(n_old)
            if w != w_old and h is not None:
                for k in stale:
                    stale[k].add_(h[k].double(), alpha=w - w_old)
            total += w - w_old
        for u, (h, _), w, inv in zip(updates, old, new_w, inverse, strict=True):
            for k, acc in fresh.items():
                d = u.payload[k].double()
                acc.add_(d if h is None else d - self.beta * h[k].double(), alpha=w * inv)
        norm_by = total if self.weights == "examples" else float(round.num_clients)

        new = dict(params)
        step_sq = 0.0
        if norm_by > 0:
            for k, acc in fresh.items():
                step = acc.add_(stale[k], alpha=self.beta).div_(norm_by)
                step_sq += float(step.pow(2).sum())
                new[k] = params[k] + (self.server_lr * step).to(params[k].dtype)

        # The step used the memory from before this version; now remember the new updates.
        for u, (h, _), w in zip(updates, old, new_w, strict=True):
            for k, acc in stale.items():
                d = u.payload[k].double()
                acc.add_(d if h is None else d - h[k].double(), alpha=w)
            memory.put(
                u.client_id,
                {"h": {k: u.payload[k].clone() for k in stale}, "n": int(u.num_examples)},
            )
        if estimator is not None:
            estimator = estimator_update(estimator, sorted(clients), self.cutoff)
        out: State = {
            "stale": stale,
            "total": total,
            "estimator": state["estimator"] if estimator is None else estimator,
        }
        metrics = {"step_norm": math.sqrt(step_sq), "remembered": float(len(memory))}
        return new, out, metrics

    def _weight(self, num_examples: int) -> float:
        return float(num_examples) if self.weights == "examples" else 1.0


def _remembered(
    memory: ClientStore, client_id: ClientId, like: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor] | None, int | None]:
    """The last delta and example count of ``client_id``, or ``(None, None)``."""
    entry = memory.get(client_id)
    if entry is None:
        return None, None
    h = entry["h"]
    if set(h) != set(like):
        raise ValueError(f"the stored update of client {client_id} does not match the model")
    return h, int(entry["n"])


@dataclass(frozen=True, kw_only=True)
class FedVARP(FedStale):
    """FedStale with ``beta = 1``: every client's last update stands in for it when absent."""

    beta: float = 1.0
