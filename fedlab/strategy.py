"""The strategy contract: how the server picks clients and turns updates into a new model.

A strategy is a frozen dataclass of hyperparameters. Its state is explicit: ``init`` creates
it, ``aggregate`` receives and returns it, and the engine checkpoints it. The strategy never
runs a loop; the engine calls ``aggregate`` when the strategy's :class:`Trigger` fires, which is
why the same strategy runs synchronously and asynchronously, in simulation and deployment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab import seeding
from fedlab.types import ClientId, Metrics, Params, Round, State, Task, Update


@dataclass(frozen=True)
class Trigger:
    """When the engine calls ``aggregate``."""


@dataclass(frozen=True)
class EveryRound(Trigger):
    """Synchronous: aggregate once every client given a task this version has answered."""


@dataclass(frozen=True)
class Buffer(Trigger):
    """Asynchronous (FedBuff): aggregate as soon as ``k`` updates are buffered."""

    k: int

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"Buffer(k) needs k >= 1, got {self.k}")


@dataclass(frozen=True)
class Period(Trigger):
    """Asynchronous (FedFix): aggregate every ``seconds`` on the transport's clock."""

    seconds: float

    def __post_init__(self) -> None:
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ValueError(f"Period(seconds) needs a positive finite period, got {self.seconds}")


class UpdateRejected(ValueError):
    """An update failed validation; the engine drops and counts it, and the run goes on."""


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """Base class of every aggregation strategy.

    Subclasses add hyperparameters as dataclass fields and override :meth:`aggregate` (and
    :meth:`init`, :meth:`configure` or :meth:`validate` where they differ from plain FedAvg
    conventions). ``client`` names the paired client half in the registry.
    """

    client: ClassVar[str] = "sgd"
    delta_aggregation: ClassVar[str] = ""
    """How ``aggregate`` combines delta payloads: ``"linear"`` (a data-independent weighted
    combination, so client-level DP may hand it one noisy mean in place of every update),
    ``"robust"`` (deltas, combined non-linearly) or ``""`` (the payload is not a delta)."""

    @property
    def trigger(self) -> Trigger:
        """When the engine aggregates; synchronous by default."""
        return EveryRound()

    def init(self, params: Params) -> State:
        """Create the strategy's state for the initial model."""
        return {}

    def configure(self, state: State, params: Params, round: Round) -> dict[ClientId, Task]:
        """Choose clients for ``round.slots`` new tasks and say what each should do.

        The default samples ``round.slots`` clients uniformly among those that are available
        and not busy, with the stream derived from ``round.seed`` (all of them when there are
        no more than ``slots``), and sends every client the current params.
        """
        task = Task(version=round.version, params=params)
        if round.available is not None:
            candidates = [c for c in round.available if c not in round.busy]
            if len(candidates) > round.slots:
                rng = seeding.numpy_rng(round.seed, seeding.SAMPLE)
                picked = rng.choice(len(candidates), size=round.slots, replace=False)
                candidates = sorted(candidates[int(i)] for i in picked)
            return {c: task for c in candidates}
        rng = seeding.numpy_rng(round.seed, seeding.SAMPLE)
        chosen = seeding.sample_without_replacement(
            rng,
            round.num_clients,
            min(round.slots, round.num_clients - len(round.busy)),
            round.busy,
        )
        return {c: task for c in chosen}

    def stream_weight(self, update: Update) -> float | None:
        """``update``'s weight when ``aggregate`` needs the updates only through the weighted
        mean of their payloads; ``None`` (the default) when it needs every update.

        A weight lets a deployed server fold each update into a running sum as it arrives and
        hand ``aggregate`` one update holding the mean, so its memory does not grow with the
        number of clients. ``aggregate`` must then give the same result for that one update.
        """
        return None

    def validate(self, update: Update, params: Params) -> None:
        """Reject an update that cannot be aggregated, raising :class:`UpdateRejected`.

        The default expects a delta: exactly the floating-point entries of ``params``, same
        shapes and dtypes, every value finite.
        """
        check_like(update.payload, params, what=f"update from client {update.client_id}")

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        """Combine ``updates`` into new params; return ``(params, state, metrics)``."""
        raise NotImplementedError


def floating(params: Params) -> dict[str, torch.Tensor]:
    """The entries of ``params`` that training moves (floating-point tensors)."""
    return {k: v for k, v in params.items() if v.is_floating_point()}


def check_like(payload: Params, params: Params, *, what: str) -> None:
    """Raise :class:`UpdateRejected` unless ``payload`` matches the floating part of ``params``.

    Checks names, shapes, dtypes and finiteness, so one bad client cannot corrupt the model.
    """
    expected = floating(params)
    if set(payload) != set(expected):
        missing = sorted(set(expected) - set(payload))[:3]
        extra = sorted(set(payload) - set(expected))[:3]
        raise UpdateRejected(f"{what}: wrong tensor names (missing {missing}, unexpected {extra})")
    for name, ref in expected.items():
        got = payload[name]
        if not isinstance(got, torch.Tensor):
            raise UpdateRejected(f"{what}: {name!r} is not a tensor")
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise UpdateRejected(
                f"{what}: {name!r} has shape {tuple(got.shape)} and dtype {got.dtype}, "
                f"expected {tuple(ref.shape)} and {ref.dtype}"
            )
        if not bool(torch.isfinite(got).all()):
            raise UpdateRejected(f"{what}: {name!r} contains NaN or Inf")


def weighted_mean(updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i * payload_i / sum_i w_i`` over every payload entry."""
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("weighted_mean needs at least one update with positive total weight")
    out: dict[str, torch.Tensor] = {}
    for name in updates[0].payload:
        acc = torch.zeros_like(updates[0].payload[name])
        for u, w in zip(updates, weights, strict=True):
            acc.add_(u.payload[name], alpha=w / total)
        out[name] = acc
    return out
