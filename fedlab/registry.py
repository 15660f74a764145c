"""Where names become classes: built-ins, entry points, dotted paths and ``register()``.

A strategy, client half or transform is found by name in this order: registered in-process
with :func:`register`, shipped with fedlab (``BUILTIN``), published by an installed package
under the entry-point groups ``fedlab.strategies``, ``fedlab.clients`` or ``fedlab.transforms``.
A name containing ``:`` is a dotted path ``package.module:Class``. Nothing is imported until
it is asked for, so ``import fedlab`` stays cheap.

Where names arrive from someone else (a deployed client builds its run from the configuration
the server sends), :func:`trusted_paths` limits dotted paths to those the local user named:
inside it every other dotted path is refused before anything is imported, whichever setting
carried it, while built-ins, installed entry points and registered names resolve as always.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import importlib
from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Any, Literal

Group = Literal["strategies", "clients", "transforms"]
GROUPS: tuple[Group, ...] = ("strategies", "clients", "transforms")

BUILTIN: dict[Group, dict[str, str]] = {
    "strategies": {
        "fedavg": "fedlab.strategies.fedavg:FedAvg",
        "fedau": "fedlab.strategies.fedau:FedAU",
        "known-probability": "fedlab.strategies.fedau:KnownProbability",
        "fedstale": "fedlab.strategies.fedstale:FedStale",
        "fedvarp": "fedlab.strategies.fedstale:FedVARP",
        "fedbuff": "fedlab.strategies.fedbuff:FedBuff",
        "fedfix": "fedlab.strategies.fedfix:FedFix",
        "fedasync": "fedlab.strategies.fedfix:FedAsync",
        "median": "fedlab.strategies.robust:Median",
        "trimmed-mean": "fedlab.strategies.robust:TrimmedMean",
        "krum": "fedlab.strategies.robust:Krum",
        "multi-krum": "fedlab.strategies.robust:MultiKrum",
        "centered-clipping": "fedlab.strategies.robust:CenteredClipping",
        "frl": "fedlab.strategies.frl:FRL",
        "admm-wls": "fedlab.strategies.admm_wls:ADMMWLS",
        "dp-brem": "fedlab.strategies.dp_brem:DPBREM",
        "fed-sb": "fedlab.strategies.fed_sb:FedSB",
        "fedit": "fedlab.strategies.fedit:FedIT",
    },
    "clients": {
        "sgd": "fedlab.clients.sgd:LocalSGD",
        "frl": "fedlab.clients.frl:FRLClient",
        "admm-wls": "fedlab.clients.admm_wls:ADMMClient",
        "dp-brem": "fedlab.clients.dp_brem:DPBREMClient",
        "fed-sb": "fedlab.clients.fed_sb:FedSBClient",
        "fedit": "fedlab.clients.fedit:FedITClient",
    },
    "transforms": {
        "fedzip": "fedlab.clients.fedzip:FedZip",
        "float16": "fedlab.clients.codecs:Float16",
        "int8": "fedlab.clients.codecs:Int8",
        "topk": "fedlab.clients.codecs:TopK",
    },
}

_registered: dict[Group, dict[str, Any]] = {g: {} for g in GROUPS}


def _check_group(group: str) -> Group:
    if group not in GROUPS:
        raise ValueError(f"unknown registry group {group!r}; expected one of {list(GROUPS)}")
    return group


def register(group: Group, name: str, obj: Any) -> None:
    """Make ``obj`` available under ``name`` in ``group`` for this process."""
    _registered[_check_group(group)][name] = obj


def _entry_points(group: Group) -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=f"fedlab.{group}")}


def names(group: Group) -> list[str]:
    """Every name known in ``group``, sorted."""
    g = _check_group(group)
    return sorted(set(_registered[g]) | set(BUILTIN[g]) | set(_entry_points(g)))


class UntrustedCode(ValueError):
    """A dotted path outside the paths trusted by :func:`trusted_paths` was asked for.

    Attributes:
        path: the refused path.
    """

    def __init__(self, path: str) -> None:
        super().__init__(
            f"refusing to import {path!r}: only dotted paths named by this process's own "
            "settings may be imported here"
        )
        self.path = path


# ``None``: any dotted path may be imported (the local user named it: simulate, server, the
# Python API). A set: only those. A context variable, so the limit holds for exactly the
# code that runs inside :func:`trusted_paths`, and a test or another thread is not affected.
_trusted: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar(
    "fedlab_trusted_paths", default=None
)


@contextlib.contextmanager
def trusted_paths(paths: Iterable[str]) -> Iterator[frozenset[str]]:
    """Within the block, :func:`load_dotted` imports only ``paths`` (nested blocks intersect).

    Built-ins, installed entry points and :func:`register`-ed names are unaffected: they are
    code this installation already chose to run. Every dotted path any setting names (a
    strategy, client, codec, attack, model factory or data function) passes through
    :func:`load_dotted`, so this is the one check between a name and ``importlib``.
    """
    allowed = frozenset(paths)
    outer = _trusted.get()
    if outer is not None:
        allowed &= outer
    token = _trusted.set(allowed)
    try:
        yield allowed
    finally:
        _trusted.reset(token)


def load_dotted(path: str) -> Any:
    """Import ``package.module:attr`` (``attr`` may be dotted), with a clear error.

    Raises:
        UntrustedCode: inside :func:`trusted_paths`, ``path`` is not one of the trusted
            paths (checked before anything is imported).
        ValueError: ``path`` is malformed or cannot be imported.
    """
    trusted = _trusted.get()
    if trusted is not None and path not in trusted:
        raise UntrustedCode(path)
    return import_builtin(path)


def import_builtin(path: str) -> Any:
    """Import a dotted path that fedlab itself names (``BUILTIN``, the built-in attacks).

    Unchecked by :func:`trusted_paths`: never pass it a path that came from a setting.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{path!r} is not a dotted path of the form 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} from {path!r}: {e}") from e
    except Exception as e:  # user code may fail at import time in any way
        raise ValueError(
            f"importing module {module_name!r} (from {path!r}) raised {type(e).__name__}: {e}"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(
                f"module {module_name!r} has no attribute {attr!r} (lookup failed at {part!r})"
            ) from None
    return obj


def resolve(group: Group, name: str) -> Any:
    """The object registered as ``name`` in ``group`` (or at a dotted path).

    Raises:
        ValueError: unknown name, with the closest known names.
    """
    g = _check_group(group)
    if ":" in name:
        return load_dotted(name)
    if name in _registered[g]:
        return _registered[g][name]
    if name in BUILTIN[g]:
        return import_builtin(BUILTIN[g][name])
    eps = _entry_points(g)
    if name in eps:
        return eps[name].load()
    known = names(g)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    kind = g.rstrip("s") if g != "strategies" else "strategy"
    raise ValueError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")


def create(group: Group, name: str, options: Mapping[str, Any] | None = None) -> Any:
    """Resolve ``name`` in ``group`` and construct it with keyword ``options``.

    Raises:
        ValueError: unknown name, unknown option (listing the valid ones) or a bad value.
    """
    cls = resolve(group, name)
    options = dict(options or {})
    if dataclasses.is_dataclass(cls):
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"{name!r} has no option {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(valid) or 'none'}"
            )
        if isinstance(cls, type):
            from fedlab.config import coerce_options

            options = coerce_options(cls, options, repr(name))
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"cannot create {name!r} with {options}: {e}") from e
