"""A participation model from its name and the user's options: checks and defaults."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedlab import seeding
from fedlab.data import Workload
from fedlab.participation.fedau import fedau_probabilities, label_counts
from fedlab.participation.models import (
    _P_CYCLIC_PHASE,
    Bernoulli,
    Cyclic,
    Markov,
    Participation,
    Trace,
    Uniform,
    _Floats,
)
from fedlab.participation.trace import read_trace

# Keys every factory receives from build_participation; the rest are the user's options.
_CONTEXT = ("workload", "num_clients", "seed", "fraction")


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
            label_counts(workload, num_clients), seed=seed, mean_p=mean, min_p=floor, alpha=conc
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
