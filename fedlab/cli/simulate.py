"""``fedlab simulate``: run a whole federation on this machine."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlab import experiment
from fedlab.cli.flags import add_run_flags, given_flags, resolve_config
from fedlab.config import ConfigError, RunConfig
from fedlab.engine import Engine
from fedlab.transport import Transport


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "simulate",
        help="simulate a federation on this machine",
        description="Simulate a federation. Every flag has a key of the same name in --config.",
    )
    add_run_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) a simulation; write the run directory; print the final table."""
    return execute(args, prepare_config(args), command="simulate")


def prepare_config(args: argparse.Namespace) -> RunConfig:
    """The run's configuration: from a saved run on ``--resume``, else flags and TOML."""
    if args.resume:
        if args.config:
            raise ConfigError(
                "--config cannot be combined with --resume: the run's config is saved"
            )
        return experiment.resume_config(args.resume, given_flags(args))
    return experiment.new_config(resolve_config(args))


def execute(
    args: argparse.Namespace,
    config: RunConfig,
    *,
    command: str,
    transport: Transport | None = None,
    ready: Callable[[Engine], None] | None = None,
) -> int:
    """Run ``config`` through :func:`fedlab.experiment.run` and print the summary table.

    Shared by ``fedlab simulate`` and ``fedlab server``; ``fedlab.simulate`` calls the same
    run path, so the run directory is the same whoever started the run.
    """
    history = experiment.run(
        config,
        resume=bool(args.resume),
        command=command,
        progress=not args.no_progress,
        transport=transport,
        ready=ready,
    )
    _print_table(history.summary, history.run_dir, command)
    return 0


def _print_table(summary: dict[str, Any], run_dir: Path, command: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedlab {command}: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, dict):
            # ray_nodes: one row per node (its id shortened, as `ray status` shows them)
            for sub, inner in value.items():
                shown = ", ".join(f"{v} {k}" for k, v in inner.items()) if isinstance(
                    inner, dict
                ) else str(inner)  # fmt: skip
                table.add_row(f"{key} {str(sub)[:12]}", shown)
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
