"""``fedlab strategies``: list the registered strategies, one line each."""

from __future__ import annotations

import argparse

from fedlab import registry


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser("strategies", help="list the registered strategies")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print ``name  first docstring line`` for every strategy."""
    names = registry.names("strategies")
    width = max((len(n) for n in names), default=0) + 2
    for name in names:
        try:
            doc = (registry.resolve("strategies", name).__doc__ or "").strip().splitlines()
            line = doc[0] if doc else ""
        except Exception as e:  # a broken plugin must not hide the others
            line = f"(cannot load: {e})"
        print(f"{name:{width}s}{line}")
    return 0
