"""The participation models and their protocol: who is available at each version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedlab import seeding

# Stream purposes, clear of fedlab.seeding's (1..) and fedlab.data's (101..) numbers. They are
# part of the participation definition: changing one changes every run's participants.
_P_BERNOULLI = 201
_P_CYCLIC_PHASE = 202
_P_MARKOV_INIT = 203
_P_MARKOV_STEP = 204
_P_FEDAU_RECIPE = 205

_Floats = npt.NDArray[np.float64]
_Ints = npt.NDArray[np.int64]


class Participation(Protocol):
    """Decides the available clients at each version."""

    def participants(self, version: int) -> Sequence[int] | None:
        """Sorted ids of the clients available at ``version``; ``None``: all, server samples."""
        ...

    def probabilities(self) -> np.ndarray | None:
        """Each client's true long-run participation probability, where one is defined."""
        ...


@dataclass(frozen=True)
class Uniform:
    """Every client is always available; the server samples a fraction per version."""

    def participants(self, version: int) -> Sequence[int] | None:
        return None

    def probabilities(self) -> np.ndarray | None:
        return None


@dataclass(frozen=True, eq=False)
class Bernoulli:
    """Client ``n`` is available at each version with probability ``p[n]``, independently.

    Args:
        p: per-client probabilities in ``[0, 1]``.
        seed: the run seed; version ``v`` draws from the stream ``(seed, purpose, v)``.
    """

    p: _Floats
    seed: int

    def participants(self, version: int) -> Sequence[int] | None:
        u = seeding.numpy_rng(self.seed, _P_BERNOULLI, _version(version)).random(len(self.p))
        ids: list[int] = np.flatnonzero(u < self.p).tolist()
        return ids

    def probabilities(self) -> np.ndarray | None:
        return self.p.copy()


@dataclass(frozen=True, eq=False)
class Cyclic:
    """Each client alternates a block of available versions with a block of unavailable ones.

    This is FedAU's cyclic participation: with cycle length ``c`` and probability ``p_n``,
    client ``n`` is available for ``a_n = max(1, round(c * p_n))`` consecutive versions, then
    unavailable for ``b_n = max(1, c - a_n)``, forever, starting unavailable for ``r_n``
    versions. It is available at ``v`` exactly when ``(v - r_n) mod (a_n + b_n) < a_n``, which
    costs O(1) per client and version, whatever the version.

    Args:
        active: ``a_n`` per client.
        inactive: ``b_n`` per client.
        phase: ``r_n`` per client.
    """

    active: _Ints
    inactive: _Ints
    phase: _Ints

    def participants(self, version: int) -> Sequence[int] | None:
        period = self.active + self.inactive
        on = (_version(version) - self.phase) % period < self.active
        ids: list[int] = np.flatnonzero(on).tolist()
        return ids

    def probabilities(self) -> np.ndarray | None:
        return (self.active / (self.active + self.inactive)).astype(np.float64)


@dataclass(frozen=True, eq=False)
class Markov:
    """A two-state on/off Markov chain per client.

    Version 0's states are drawn from the stationary distribution, so every version has the
    stationary marginal ``p_on / (p_on + p_off)``; version ``v`` moves every chain one step with
    the stream ``(seed, purpose, v)``. States at ``v`` are computed by iterating from 0 and the
    last computed version is cached, so a run's sequential calls cost O(N) each and a resumed
    run pays one replay from 0 (deterministic, so it equals the uninterrupted run).

    Args:
        p_on: per-client probability of switching off -> on at a version.
        p_off: per-client probability of switching on -> off at a version.
        seed: the run seed.
    """

    p_on: _Floats
    p_off: _Floats
    seed: int
    # The last computed (version, states): a cache, not state; it never changes a result.
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.p_on) != len(self.p_off) or not (self.p_on > 0).all():
            raise ValueError("Markov needs p_on > 0 and p_off of the same length")

    def _stationary(self) -> _Floats:
        stationary: _Floats = self.p_on / (self.p_on + self.p_off)
        return stationary

    def states(self, version: int) -> npt.NDArray[np.bool_]:
        """The on/off state of every client at ``version``."""
        version = _version(version)
        n = len(self.p_on)
        start = self._cache.get("version")
        if start is None or start > version:
            state = seeding.numpy_rng(self.seed, _P_MARKOV_INIT).random(n) < self._stationary()
            start = 0
        else:
            state = self._cache["state"]
        for v in range(start + 1, version + 1):
            u = seeding.numpy_rng(self.seed, _P_MARKOV_STEP, v).random(n)
            state = np.where(state, u >= self.p_off, u < self.p_on)
        self._cache["version"] = version
        self._cache["state"] = state
        return state.copy()

    def participants(self, version: int) -> Sequence[int] | None:
        ids: list[int] = np.flatnonzero(self.states(version)).tolist()
        return ids

    def probabilities(self) -> np.ndarray | None:
        return self._stationary().astype(np.float64)


@dataclass(frozen=True, eq=False)
class Trace:
    """Availability replayed from a recorded trace.

    Args:
        schedule: ``schedule[v]`` is the sorted tuple of clients available at version ``v``.
        num_clients: size of the population.
        repeat: past the end of the trace, start again from its first version (``False``:
            nobody is available any more).
    """

    schedule: tuple[tuple[int, ...], ...]
    num_clients: int
    repeat: bool = True

    def participants(self, version: int) -> Sequence[int] | None:
        version = _version(version)
        if version >= len(self.schedule):
            if not self.repeat:
                return []
            version %= len(self.schedule)
        return list(self.schedule[version])

    def probabilities(self) -> np.ndarray | None:
        counts = np.zeros(self.num_clients, dtype=np.float64)
        for ids in self.schedule:
            counts[list(ids)] += 1
        return counts / len(self.schedule)


def _version(version: int) -> int:
    if version < 0:
        raise ValueError(f"version must be >= 0, got {version}")
    return int(version)
