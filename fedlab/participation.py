"""Participation models: which clients nature makes available at each version.

Availability is a property of the simulated world, not of the strategy: a strategy sees only
who is available (``Round.available``) and who answered, never the true probabilities,
unless it is explicitly built with them (the ``known-probability`` baseline).

``uniform`` makes everybody available and lets the server sample ``fraction`` of them
(classic FedAvg). The other models decide the participants themselves and the server takes
every available client. Every draw derives from ``(seed, version)``, so a resumed run sees
the same participants.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedlab.data import Workload


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


Factory = Callable[..., Participation]
"""Builds a model from ``(workload=..., num_clients=..., seed=..., fraction=..., **options)``."""

MODELS: dict[str, Factory] = {
    "uniform": lambda **_: Uniform(),
}


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
        ValueError: unknown model (with the known ones) or bad options.
    """
    if name not in MODELS:
        raise ValueError(f"unknown participation model {name!r}; choose from {sorted(MODELS)}")
    try:
        return MODELS[name](
            workload=workload,
            num_clients=num_clients,
            seed=seed,
            fraction=fraction,
            **dict(options or {}),
        )
    except TypeError as e:
        raise ValueError(f"bad options for participation {name!r}: {e}") from e
