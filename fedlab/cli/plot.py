"""``fedlab plot``: metrics against version, simulated time or bytes sent, several runs per PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedlab.callbacks import read_metrics
from fedlab.config import load_toml
from fedlab.evaluation import CLIENT_METRICS
from fedlab.plots import CUMULATIVE, FORMATS, LABELS, draw, draw_clients, group_seeds


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser("plot", help="plot accuracy and loss of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument(
        "-o",
        "--output",
        default="fedlab-plot.png",
        help="the figure to write: PNG, SVG or PDF by its suffix",
    )
    p.add_argument("--metrics", default="accuracy,loss", help="comma-separated metric names")
    p.add_argument(
        "--x",
        default="version,time",
        help="comma-separated x axes, one column each: version, time, or the cumulative "
        f"megabytes {', '.join(CUMULATIVE)}",
    )
    p.add_argument(
        "--clients",
        metavar="METRIC",
        default="",
        help="instead: the distribution over clients of METRIC (e.g. accuracy) at the last "
        "federated evaluation (runs made with --eval-clients), personalised dashed",
    )
    p.set_defaults(func=run)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows of a run directory."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a fedlab run directory?")
    rows, warnings = read_metrics(path)  # a run still writing may have a half-written line
    for w in warnings:
        print(f"fedlab: warning: {w}", file=sys.stderr)
    return rows


def numeric_columns(rows: list[dict[str, Any]]) -> set[str]:
    """Names of the columns that hold a number in at least one row."""
    return {
        k
        for r in rows
        for k, v in r.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _config(run_dir: Path) -> dict[str, Any] | None:
    """The run's saved configuration, to tell runs that differ only by seed."""
    path = run_dir / "config.toml"
    return load_toml(path) if path.exists() else None


def _run_clients(args: argparse.Namespace) -> int:
    """``--clients METRIC``: one distribution per run from its ``client_metrics.jsonl``."""
    runs = []
    for r in map(Path, args.runs):
        path = r / CLIENT_METRICS
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: --clients plots federated evaluation, which a run "
                "records when made with --eval-clients"
            )
        lines, warnings = read_metrics(path)
        for w in warnings:
            print(f"fedlab: warning: {w}", file=sys.stderr)
        if not lines:
            raise ValueError(f"{path} holds no client yet")
        runs.append((r.name, lines))
    known = {k for _, lines in runs for line in lines for k in line} - {"version", "client"}
    if args.clients not in known:
        raise ValueError(
            f"no run has the per-client metric {args.clients!r}; known: {', '.join(sorted(known))}"
        )
    draw_clients(runs, args.clients).savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Draw one row of panels per metric, one column per x axis (version and time by default)."""
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    xs_axes = [x.strip() for x in args.x.split(",") if x.strip()]
    unknown = [x for x in xs_axes if x not in LABELS]
    if unknown or not xs_axes:
        raise ValueError(f"--x takes {', '.join(LABELS)}; got {args.x!r}")
    if Path(args.output).suffix.lower() not in FORMATS:
        raise ValueError(f"-o must end in {', '.join(FORMATS)}; got {args.output!r}")
    if args.clients:
        return _run_clients(args)
    if not metrics:
        raise ValueError(f"--metrics names no metric; got {args.metrics!r}")
    runs = [(Path(r).name, read_rows(Path(r)), _config(Path(r))) for r in args.runs]
    known: set[str] = set()
    for _, rows, _ in runs:
        known |= numeric_columns(rows)
    missing = [m for m in metrics if m not in known]
    if missing:
        # A misspelt metric would draw empty axes and look like a run that logged nothing.
        raise ValueError(
            f"no run has the metric {', '.join(map(repr, missing))}; known: "
            f"{', '.join(sorted(known)) or 'none'}"
        )
    fig = draw(group_seeds(runs), metrics, xs_axes)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0
