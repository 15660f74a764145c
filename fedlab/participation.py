"""Participation models: which clients nature makes available at each version.

Availability is a property of the simulated world, not of the strategy: a strategy sees only
who is available (``Round.available``) and who answered, never the true probabilities,
unless it is explicitly built with them (the ``known-probability`` baseline).

``uniform`` makes everybody available and lets the server sample ``fraction`` of them
(classic FedAvg). The other models decide the participants themselves and the server takes
every available client:

* ``bernoulli``: client ``n`` is available with probability ``p_n``, independently per version.
* ``cyclic``: client ``n`` is available for a block of ``round(cycle * p_n)`` consecutive
  versions out of every cycle (FedAU's cyclic participation).
* ``markov``: a two-state on/off chain per client.
* ``trace``: availability read from a CSV file.

The per-client probabilities ``p_n`` of ``bernoulli``, ``cyclic`` and ``markov`` come from one
of: ``p`` (the same for everybody; defaults to the run's ``fraction``), ``recipe="tiled"`` with
``values`` (a list repeated over client ids), or ``recipe="fedau"`` (the FedAU paper's
label-correlated probabilities, see :func:`fedau_probabilities`).

Every random draw derives from ``(seed, purpose, version)`` with nothing carried between
versions (the Markov chain recomputes its past from those same streams), so a resumed run
and any worker count see the same participants.
"""

from __future__ import annotations

import csv
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedlab import seeding
from fedlab.data import Workload

__all__ = [
    "MODELS",
    "Bernoulli",
    "Cyclic",
    "Markov",
    "Participation",
    "Trace",
    "Uniform",
    "build_participation",
    "fedau_probabilities",
    "read_trace",
]

# Stream purposes, clear of fedlab.seeding's (1..) and fedlab.data's (101..) numbers. They are
# part of the participation definition: changing one changes every run's participants.
_P_BERNOULLI = 201
_P_CYCLIC_PHASE = 202
_P_MARKOV_INIT = 203
_P_MARKOV_STEP = 204
_P_FEDAU_RECIPE = 205

_Floats = npt.NDArray[np.float64]
_Ints = npt.NDArray[np.int64]

# Keys every factory receives from build_participation; the rest are the user's options.
_CONTEXT = ("workload", "num_clients", "seed", "fraction")


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


# --------------------------------------------------------------------------- probabilities


def fedau_probabilities(
    label_counts: npt.ArrayLike, *, seed: int, mean_p: float, min_p: float, alpha: float
) -> _Floats:
    """FedAU's label-correlated participation probabilities.

    ``p_n = clip(s * <q_n, d>, min_p, 1)`` where ``q_n`` is client ``n``'s label distribution
    over ``C`` classes and ``d ~ Dir(alpha * 1_C)`` is drawn once from the seed, so clients
    rich in the labels ``d`` favours show up more often.

    The scale ``s`` is fitted (by bisection) so that the mean of ``p`` is exactly ``mean_p``,
    floor and clip included. The official code uses the fixed scale ``mean_p * C``
    (``10 * 0.1`` on 10 classes), which gives the same ``p`` when the clients' average label
    distribution is uniform (then the mean of ``<q_n, d>`` is ``1 / C`` whatever ``d`` is); on
    a Dirichlet(0.1) split of 100 clients that average is far from uniform and the fixed
    scale's realised mean wanders (0.083 instead of 0.1 on digits, seed 0), so a run's
    expected participation would not be what ``mean_p`` says. The official code has no upper
    clip (its default never needs one); we clip at 1 so that ``p`` stays a probability.

    Args:
        label_counts: ``(N, C)`` counts of each label per client; a client with no examples
            gets the floor.
        seed: the run seed (``d`` comes from its own stream).
        mean_p: the mean of the returned probabilities, in ``[min_p, 1]``.
        min_p: the floor.
        alpha: Dirichlet concentration of ``d`` (FedAU: 0.1).

    Raises:
        ValueError: bad shape, or a ``mean_p`` no scale can reach.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise ValueError(f"label_counts must be (clients, classes), got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    q = counts / np.where(totals > 0, totals, 1.0)
    d = seeding.numpy_rng(seed, _P_FEDAU_RECIPE).dirichlet(np.full(counts.shape[1], alpha))
    x = q @ d

    def probs(scale: float) -> _Floats:
        p: _Floats = np.clip(scale * x, min_p, 1.0)
        return p

    # The largest mean any scale reaches: clients with x > 0 at 1, the others at the floor.
    top: _Floats = np.where(x > 0, 1.0, min_p)
    if not min_p <= mean_p <= top.mean():
        raise ValueError(
            f"mean_p={mean_p} is out of reach: with min_p={min_p} the mean participation "
            f"probability of these clients can only be in [{min_p}, {top.mean():.4g}]"
        )
    if mean_p == top.mean():
        return top
    lo, hi = 0.0, 1.0
    while probs(hi).mean() < mean_p:
        hi *= 2  # terminates: the mean tends to top.mean() > mean_p
    for _ in range(100):  # the mean is continuous and non-decreasing in the scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if probs(mid).mean() < mean_p else (lo, mid)
    return probs(hi)


def _label_counts(workload: Workload, num_clients: int) -> _Ints:
    # One client_data call per client, once, at construction: fine up to ~1e5 clients of the
    # built-in workloads (seconds), and the only O(N * data) cost of any participation model.
    c = workload.num_classes
    out = np.zeros((num_clients, c), dtype=np.int64)
    for k in range(num_clients):
        y = workload.client_data(k).y.numpy()
        if y.size and (y.min() < 0 or y.max() >= c):
            raise ValueError(f"client {k} has labels outside [0, {c}) of the workload")
        out[k] = np.bincount(y, minlength=c)
    return out


def _probability_source(
    *,
    workload: Workload,
    num_clients: int,
    seed: int,
    default: float,
    p: Any,
    recipe: Any,
    values: Any,
    mean_p: Any,
    min_p: Any,
    alpha: Any,
) -> _Floats:
    """Per-client probabilities from ``p``, ``recipe="tiled"`` or ``recipe="fedau"``."""
    fedau_only = {"mean_p": mean_p, "min_p": min_p, "alpha": alpha}
    if recipe is None:
        if values is not None:
            raise ValueError("option 'values' needs recipe='tiled'")
        given = sorted(k for k, v in fedau_only.items() if v is not None)
        if given:
            raise ValueError(f"option(s) {', '.join(given)} need recipe='fedau'")
        prob = _probability("p", default if p is None else p)
        return np.full(num_clients, prob, dtype=np.float64)
    if p is not None:
        raise ValueError("give either 'p' or 'recipe', not both")
    if recipe == "tiled":
        given = sorted(k for k, v in fedau_only.items() if v is not None)
        if given:
            raise ValueError(f"option(s) {', '.join(given)} need recipe='fedau', not 'tiled'")
        if not isinstance(values, list | tuple) or not values:
            raise ValueError("recipe='tiled' needs 'values', a non-empty list of probabilities")
        tile = np.array([_probability("values", v) for v in values], dtype=np.float64)
        return tile[np.arange(num_clients) % len(tile)]
    if recipe == "fedau":
        if values is not None:
            raise ValueError("option 'values' needs recipe='tiled', not 'fedau'")
        mean = _probability("mean_p", 0.1 if mean_p is None else mean_p)
        floor = _probability("min_p", 0.02 if min_p is None else min_p)
        conc = _number("alpha", 0.1 if alpha is None else alpha)
        if mean <= 0:
            raise ValueError(f"mean_p must be positive, got {mean}")
        if conc <= 0:
            raise ValueError(f"alpha must be positive, got {conc}")
        return fedau_probabilities(
            _label_counts(workload, num_clients), seed=seed, mean_p=mean, min_p=floor, alpha=conc
        )
    raise ValueError(f"unknown recipe {recipe!r}; choose 'tiled' or 'fedau'")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _probability(name: str, value: Any) -> float:
    out = _number(name, value)
    if not 0 <= out <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return out


def _integer(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- factories


def _uniform(*, workload: Workload, num_clients: int, seed: int, fraction: float) -> Uniform:
    return Uniform()


def _bernoulli(
    *,
    workload: Workload,
    num_clients: int,
    seed: int,
    fraction: float,
    p: Any = None,
    recipe: Any = None,
    values: Any = None,
    mean_p: Any = None,
    min_p: Any = None,
    alpha: Any = None,
) -> Bernoulli:
    probs = _probability_source(
        workload=workload,
        num_clients=num_clients,
        seed=seed,
        default=fraction,
        p=p,
        recipe=recipe,
        values=values,
        mean_p=mean_p,
        min_p=min_p,
        alpha=alpha,
    )
    return Bernoulli(p=probs, seed=seed)


def _cyclic(
    *,
    workload: Workload,
    num_clients: int,
    seed: int,
    fraction: float,
    cycle: Any = 100,
    groups: Any = 0,
    p: Any = None,
    recipe: Any = None,
    values: Any = None,
    mean_p: Any = None,
    min_p: Any = None,
    alpha: Any = None,
) -> Cyclic:
    cycle = _integer("cycle", cycle, minimum=2)
    groups = _integer("groups", groups, minimum=0)
    if groups > cycle:
        raise ValueError(f"groups ({groups}) cannot exceed cycle ({cycle})")
    probs = _probability_source(
        workload=workload,
        num_clients=num_clients,
        seed=seed,
        # With groups and no probability given, the groups take turns over the cycle.
        default=1 / groups if groups and p is None and recipe is None else fraction,
        p=p,
        recipe=recipe,
        values=values,
        mean_p=mean_p,
        min_p=min_p,
        alpha=alpha,
    )
    active = np.maximum(1, np.round(cycle * probs)).astype(np.int64)
    inactive = np.maximum(1, cycle - active).astype(np.int64)
    if groups:
        # Client n starts its active block at (n mod groups) * cycle / groups: a fixed rota.
        phase = (np.arange(num_clients, dtype=np.int64) % groups) * cycle // groups
    else:
        # FedAU's code: every client starts unavailable for a random part of its off block.
        phase = seeding.numpy_rng(seed, _P_CYCLIC_PHASE).integers(0, inactive).astype(np.int64)
    return Cyclic(active=active, inactive=inactive, phase=phase)


def _markov(
    *,
    workload: Workload,
    num_clients: int,
    seed: int,
    fraction: float,
    p_on: Any = None,
    p_off: Any = None,
    p: Any = None,
    recipe: Any = None,
    values: Any = None,
    mean_p: Any = None,
    min_p: Any = None,
    alpha: Any = None,
) -> Markov:
    if p_on is None:
        raise ValueError("markov needs 'p_on', the off -> on transition probability")
    on = _probability("p_on", p_on)
    if on <= 0:
        raise ValueError("p_on must be positive (a chain that never switches on never runs)")
    if p_off is not None:
        given = [k for k, v in {"p": p, "recipe": recipe}.items() if v is not None]
        if given:
            raise ValueError(f"give either 'p_off' or {' / '.join(given)}, not both")
        off = _probability("p_off", p_off)
        return Markov(p_on=np.full(num_clients, on), p_off=np.full(num_clients, off), seed=seed)
    probs = _probability_source(
        workload=workload,
        num_clients=num_clients,
        seed=seed,
        default=fraction,
        p=p,
        recipe=recipe,
        values=values,
        mean_p=mean_p,
        min_p=min_p,
        alpha=alpha,
    )
    if (probs <= 0).any():
        raise ValueError("markov with per-client probabilities needs every probability > 0")
    # FedAU's code: keep the stationary probability p_n with p_on as the switch-on rate, and
    # where that would need p_off > 1, slow both down by the same factor (same p_n).
    p_on_n = np.full(num_clients, on)
    p_off_n = on * (1 / probs - 1)
    over = p_off_n > 1
    p_on_n[over] /= p_off_n[over]
    p_off_n[over] = 1.0
    return Markov(p_on=p_on_n, p_off=p_off_n, seed=seed)


def _trace(
    *,
    workload: Workload,
    num_clients: int,
    seed: int,
    fraction: float,
    path: Any = None,
    period: Any = None,
    versions: Any = None,
    repeat: Any = True,
) -> Trace:
    if not isinstance(path, str) or not path:
        raise ValueError("trace needs 'path', a CSV file with columns client_id,version")
    if not isinstance(repeat, bool):
        raise ValueError(f"repeat must be true or false, got {repeat!r}")
    if period is not None:
        period = _number("period", period)
        if period <= 0:
            raise ValueError(f"period must be positive, got {period}")
    if versions is not None:
        versions = _integer("versions", versions, minimum=1)
    rows = read_trace(path, num_clients=num_clients, period=period)
    if not rows:
        raise ValueError(f"{path}: the trace has no rows")
    last = max(v for _, v, _ in rows)
    length = last + 1 if versions is None else versions
    by_version: list[set[int]] = [set() for _ in range(length)]
    for cid, v, line in rows:
        if v >= length:
            raise ValueError(f"{path}, line {line}: version {v} is past versions={length}")
        by_version[v].add(cid)
    schedule = tuple(tuple(sorted(s)) for s in by_version)
    return Trace(schedule=schedule, num_clients=num_clients, repeat=repeat)


def read_trace(
    path: str | Path, *, num_clients: int, period: float | None = None
) -> list[tuple[int, int, int]]:
    """Rows ``(client_id, version, line)`` of a participation trace.

    The file is CSV with a header: ``client_id,version`` (the client is available at that
    version), or ``client_id,time`` together with ``period`` (version ``floor(time / period)``).

    Raises:
        ValueError: unreadable file, unknown or missing columns, a malformed row, a client id
            outside ``[0, num_clients)`` or a negative version or time, naming the line.
    """
    try:
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
    except OSError as e:
        raise ValueError(f"cannot read trace {path}: {e}") from e
    if not lines:
        raise ValueError(f"{path}: empty file; expected a header client_id,version")
    header = [h.strip() for h in lines[0]]
    known = ("client_id", "version", "time")
    for h in header:
        if h not in known:
            raise ValueError(
                f"{path}, line 1: unknown column {h!r}; expected client_id,version "
                "or client_id,time (with the period option)"
            )
    if sorted(header) == ["client_id", "version"]:
        if period is not None:
            raise ValueError(f"{path}: 'period' applies only to a trace with a time column")
    elif sorted(header) == ["client_id", "time"]:
        if period is None:
            raise ValueError(f"{path}: a trace with a time column needs the 'period' option")
    else:
        raise ValueError(
            f"{path}, line 1: columns {header} are not client_id,version or client_id,time"
        )
    col_id, col_when = header.index("client_id"), 1 - header.index("client_id")
    rows: list[tuple[int, int, int]] = []
    for line, fields in enumerate(lines[1:], start=2):
        if not any(x.strip() for x in fields):
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}, line {line}: expected 2 fields, got {len(fields)}")
        where = f"{path}, line {line}"
        try:
            cid = int(fields[col_id])
        except ValueError:
            raise ValueError(f"{where}: client_id {fields[col_id]!r} is not an integer") from None
        if not 0 <= cid < num_clients:
            raise ValueError(f"{where}: client_id {cid} is outside [0, {num_clients})")
        raw = fields[col_when].strip()
        if period is None:
            try:
                version = int(raw)
            except ValueError:
                raise ValueError(f"{where}: version {raw!r} is not an integer") from None
        else:
            try:
                t = float(raw)
            except ValueError:
                raise ValueError(f"{where}: time {raw!r} is not a number") from None
            if not math.isfinite(t):
                raise ValueError(f"{where}: time {raw!r} is not finite")
            version = math.floor(t / period) if t >= 0 else -1
        if version < 0:
            raise ValueError(f"{where}: negative {'version' if period is None else 'time'}")
        rows.append((cid, version, line))
    return rows


Factory = Callable[..., Participation]
"""Builds a model from ``(workload=..., num_clients=..., seed=..., fraction=..., **options)``."""

MODELS: dict[str, Factory] = {
    "uniform": _uniform,
    "bernoulli": _bernoulli,
    "cyclic": _cyclic,
    "markov": _markov,
    "trace": _trace,
}


def _option_names(factory: Factory) -> list[str] | None:
    """The options ``factory`` accepts; ``None`` when it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in _CONTEXT]


def build_participation(
    name: str,
    *,
    workload: Workload,
    num_clients: int,
    seed: int,
    fraction: float,
    options: Mapping[str, Any] | None = None,
) -> Participation:
    """The participation model ``name`` with its ``options``.

    Raises:
        ValueError: unknown model (with the known ones), unknown option (with the valid
            ones) or a bad option value.
    """
    if name not in MODELS:
        raise ValueError(f"unknown participation model {name!r}; choose from {sorted(MODELS)}")
    factory = MODELS[name]
    options = dict(options or {})
    valid = _option_names(factory)
    if valid is not None:
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"participation {name!r} has no option {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(valid) or 'none'}"
            )
    try:
        return factory(
            workload=workload, num_clients=num_clients, seed=seed, fraction=fraction, **options
        )
    except TypeError as e:
        raise ValueError(f"bad options for participation {name!r}: {e}") from e
