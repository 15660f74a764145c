"""Aggregation strategies, one module per paper, imported lazily by name.

``from fedlab.strategies import FedAvg`` works for every built-in strategy; the module behind
a name is only imported when the name is first used.
"""

from __future__ import annotations

from typing import Any

from fedlab.registry import BUILTIN, import_builtin

__all__ = [
    "ADMMWLS",
    "DPBREM",
    "FRL",
    "CenteredClipping",
    "FedAU",
    "FedAsync",
    "FedAvg",
    "FedBuff",
    "FedFix",
    "FedIT",
    "FedSB",
    "FedStale",
    "FedVARP",
    "KnownProbability",
    "Krum",
    "Median",
    "MultiKrum",
    "TrimmedMean",
]


def __getattr__(name: str) -> Any:
    for path in BUILTIN["strategies"].values():
        if path.rsplit(":", 1)[1] == name:
            return import_builtin(path)
    raise AttributeError(f"module 'fedlab.strategies' has no attribute {name!r}")
