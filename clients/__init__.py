"""Client halves and update transforms, imported lazily by name."""

from __future__ import annotations

from typing import Any

from fedlab.registry import BUILTIN, import_builtin

__all__ = ["LocalSGD"]


def __getattr__(name: str) -> Any:
    for group in ("clients", "transforms"):
        for path in BUILTIN[group].values():
            if path.rsplit(":", 1)[1] == name:
                return import_builtin(path)
    raise AttributeError(f"module 'fedlab.clients' has no attribute {name!r}")
