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
        shapes and dtypes, every value finite. The deployed server calls it on several threads
        at once (it checks each update before answering its client), so it only reads
        ``update``, ``params`` and the strategy's own (frozen) settings.
        """
        check_like(update.payload, params, what=f"update from client {update.client_id}")

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        """Combine ``updates`` into new params; return ``(params, state, metrics)``."""
        raise NotImplementedError


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (integer tensors always are).

    One pass of ``aminmax``, which propagates NaN, without the boolean tensor of
    ``isfinite(t).all()``: about ten times faster on large float tensors.
    """
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


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
        if not all_finite(got):
            raise UpdateRejected(f"{what}: {name!r} contains NaN or Inf")


_BLOCK = 1 << 16
"""Entries converted to float64 at a time: a block stays in cache, where torch's mixed-dtype
``add_`` is several times slower than converting a block and adding in one dtype."""


def add_into(acc: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * x`` for a float64 ``acc`` and a lower-precision ``x``, in place."""
    if acc.dtype == x.dtype or acc.device.type != "cpu" or not acc.is_contiguous():
        acc.add_(x, alpha=alpha)
        return
    flat, src = acc.view(-1), x.detach().reshape(-1)
    buf = torch.empty(min(_BLOCK, flat.numel()), dtype=acc.dtype)
    for start in range(0, flat.numel(), _BLOCK):
        end = min(start + _BLOCK, flat.numel())
        block = buf[: end - start]
        block.copy_(src[start:end])
        flat[start:end].add_(block, alpha=alpha)


def weighted_sum(
    updates: Sequence[Update], weights: Sequence[float], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """``scale * sum_i w_i * payload_i`` over every payload entry.

    Accumulated in float64 and cast back to each entry's dtype at the end: a float32 sum of
    finite updates can overflow (or lose the small ones next to a large one), float64 cannot
    for any float32 payloads and weights up to ``2**53``. On the CPU the sum is taken one
    cache-sized block of every update at a time, so it costs little more than a float32 one.
    """
    alphas = [w * scale for w in weights]
    out: dict[str, torch.Tensor] = {}
    for name in updates[0].payload:
        ref = updates[0].payload[name]
        if ref.device.type != "cpu":
            acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            for u, alpha in zip(updates, alphas, strict=True):
                acc.add_(u.payload[name], alpha=alpha)
            out[name] = acc.to(ref.dtype)
            continue
        srcs = [u.payload[name].detach().reshape(-1) for u in updates]
        result = torch.empty(ref.numel(), dtype=ref.dtype)
        block = torch.empty(min(_BLOCK, ref.numel()), dtype=torch.float64)
        sums = torch.empty_like(block)
        for start in range(0, ref.numel(), _BLOCK):
            end = min(start + _BLOCK, ref.numel())
            acc, tmp = sums[: end - start].zero_(), block[: end - start]
            for src, alpha in zip(srcs, alphas, strict=True):
                tmp.copy_(src[start:end])
                acc.add_(tmp, alpha=alpha)
            result[start:end].copy_(acc)
        out[name] = result.view(ref.shape)
    return out


def weighted_mean(updates: Sequence[Update], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i * payload_i / sum_i w_i`` over every payload entry, summed in float64."""
    total = float(sum(weights))
    if not updates or total <= 0:
        raise ValueError("weighted_mean needs at least one update with positive total weight")
    return weighted_sum(updates, [w / total for w in weights])


class Fold:
    """A running weighted sum of update payloads, for :meth:`Strategy.stream_weight`.

    The engine folds each update into it as it arrives when it streams. The sum is kept in
    float64: weights are example counts, and a float32 sum of ``n_i * Δ_i`` overflows for
    finite updates (``3e38`` times 100 examples). The mean is cast back to each entry's dtype.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.weight = 0.0
        self.examples = 0

    def add(self, update: Update, weight: float) -> None:
        """Add ``weight * update.payload`` to the sum."""
        for name, t in update.payload.items():
            acc = self.sums.get(name)
            if acc is None:
                self.dtypes[name] = t.dtype
                self.sums[name] = t.detach().double() * weight  # new: the update can go
            else:
                add_into(acc, t, weight)
        self.weight += weight
        self.examples += update.num_examples

    def mean(self, version: int) -> list[Update]:
        """The one update holding the weighted mean; none when every weight was zero."""
        if self.weight <= 0:
            return []
        payload = {k: v.div_(self.weight).to(self.dtypes[k]) for k, v in self.sums.items()}
        return [Update(client_id=-1, version=version, payload=payload, num_examples=self.examples)]
