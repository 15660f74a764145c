"""The core value types that travel between the engine, strategies and clients.

Everything here is an immutable value: the engine never mutates a ``Params`` mapping it has
handed out, and strategies return new mappings instead of editing the ones they receive. That
is what lets an asynchronous task keep a reference to the model version it started from
without copying it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Params = Mapping[str, torch.Tensor]
"""Model parameters (or any named tensors: deltas, rankings, R matrices...)."""

Metrics = Mapping[str, float]
"""Scalar metrics, as written to ``metrics.jsonl``."""

State = dict[str, Any]
"""Explicit state of a strategy, client or transform: nested dicts and lists of tensors,
numbers, strings, booleans and ``None``, so that :mod:`fedlab.tensorio` can save it."""

ClientId = int
"""Clients are numbered ``0 .. num_clients - 1``."""


class ClientStore(Protocol):
    """Per-client state, keyed by client id."""

    def get(self, client_id: ClientId) -> State | None:
        """The state last put for ``client_id``, or ``None``."""
        ...

    def put(self, client_id: ClientId, state: State | None) -> None:
        """Keep ``state`` for ``client_id``; an empty or ``None`` state removes the entry."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, client_id: object) -> bool:
        """Whether a state is kept for ``client_id`` (without loading it)."""
        ...

    def state_dict(self) -> State:
        """What a checkpoint must hold to restore the store as it is now."""
        ...

    def load_state_dict(self, state: State) -> None:
        """Restore from :meth:`state_dict`."""
        ...

    def checkpointed(self) -> None:
        """Called once a checkpoint holding :meth:`state_dict` is safely on disk."""
        ...


@dataclass(frozen=True)
class Task:
    """What the server sends a client: the model to start from and how to train.

    Attributes:
        version: the global model version ``params`` were taken from.
        params: the parameters to start from (not to be mutated).
        config: small scalar settings (``lr``, ``local_steps``, ``batch_size``...).
    """

    version: int
    params: Params
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Update:
    """What a client sends back.

    Attributes:
        client_id: who trained.
        version: the version of the model the client started from; the strategy reads
            staleness as ``round.version - update.version``.
        payload: named tensors (a delta ``y - x`` for local SGD, rankings for FRL, ...).
        num_examples: how many examples the client trained on.
        metrics: the client's scalar training metrics.
    """

    client_id: ClientId
    version: int
    payload: Params
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class Round:
    """The context of one ``configure`` or ``aggregate`` call.

    Attributes:
        version: the current global model version.
        time: seconds on the transport's clock (virtual in simulation, wall in deployment).
        num_clients: size of the client population, ids ``0 .. num_clients - 1``.
        slots: how many new tasks the engine asks ``configure`` for.
        busy: clients that hold a task already and must not get another.
        seed: a seed derived from ``(run seed, version, call counter)`` for this call's
            randomness, so results never depend on scheduling.
        available: the clients that can take part now, as the participation model decides
            (``None``: every client is available and the server samples).
        memory: the server's per-client store (FedStale's last updates, ...), checkpointed
            by the engine with everything else; ``None`` outside an engine.
    """

    version: int
    time: float
    num_clients: int
    slots: int = 0
    busy: frozenset[ClientId] = frozenset()
    seed: int = 0
    available: tuple[ClientId, ...] | None = None
    memory: ClientStore | None = None
