"""``fedlab datasets``: the workloads, with their models, sizes and partitions."""

from __future__ import annotations

import argparse

from fedlab.data.catalogue import CATALOGUE


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "datasets", help="list the workloads with their models, sizes and default partitions"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one block per workload; defaults are the first model and partition named."""
    for entry in CATALOGUE:
        print(f"{entry.name}: {entry.source}")
        print(f"    models:     {', '.join(entry.models)} (default: {entry.models[0]})")
        print(f"    size:       {entry.size}")
        print(f"    partitions: {', '.join(entry.partitions)} (default: {entry.partitions[0]})")
        if entry.needs:
            print(f"    needs:      {entry.needs}")
    print("Files: docs/how-to-use-federated-datasets.md says where to get them and how to lay")
    print("them out; nothing is ever downloaded.")
    return 0
