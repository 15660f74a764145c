"""``fedlab plot``: metrics against version, simulated time or bytes sent, several runs per PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedlab.callbacks import read_metrics


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser("plot", help="plot accuracy and loss of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("-o", "--output", default="fedlab-plot.png", help="PNG to write")
    p.add_argument("--metrics", default="accuracy,loss", help="comma-separated metric names")
    p.add_argument(
        "--x",
        default="version,time",
        help="comma-separated x axes, one column each: version, time, or the cumulative "
        f"megabytes {', '.join(CUMULATIVE)}",
    )
    p.set_defaults(func=run)


CUMULATIVE = ("bytes_up", "bytes_down", "bytes")
LABELS = {
    "version": "version",
    "time": "simulated time (s)",
    "bytes_up": "MB uploaded by clients (cumulative)",
    "bytes_down": "MB sent to clients (cumulative)",
    "bytes": "MB on the wire, both ways (cumulative)",
}


def with_cumulative(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with running totals, in MB, of the bytes columns as ``total_<axis>``."""
    up = down = 0.0
    out = []
    for r in rows:
        up += r.get("bytes_up", 0) / 1e6
        down += r.get("bytes_down", 0) / 1e6
        out.append({**r, "total_bytes_up": up, "total_bytes_down": down, "total_bytes": up + down})
    return out


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


def run(args: argparse.Namespace) -> int:
    """Draw one row of panels per metric, one column per x axis (version and time by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    xs_axes = [x.strip() for x in args.x.split(",") if x.strip()]
    unknown = [x for x in xs_axes if x not in LABELS]
    if unknown or not xs_axes:
        raise ValueError(f"--x takes {', '.join(LABELS)}; got {args.x!r}")
    if not metrics:
        raise ValueError(f"--metrics names no metric; got {args.metrics!r}")
    runs = [(Path(r), read_rows(Path(r))) for r in args.runs]
    known: set[str] = set()
    for _, rows in runs:
        known |= numeric_columns(rows)
    missing = [m for m in metrics if m not in known]
    if missing:
        # A misspelt metric would draw empty axes and look like a run that logged nothing.
        raise ValueError(
            f"no run has the metric {', '.join(map(repr, missing))}; known: "
            f"{', '.join(sorted(known)) or 'none'}"
        )
    if any(x in CUMULATIVE for x in xs_axes):
        runs = [(d, with_cumulative(rows)) for d, rows in runs]
    fig, axes = plt.subplots(
        len(metrics), len(xs_axes), figsize=(5.5 * len(xs_axes), 3.6 * len(metrics)), squeeze=False
    )
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(xs_axes):
            ax = axes[i][j]
            key = f"total_{axis}" if axis in CUMULATIVE else axis
            for run_dir, rows in runs:
                pts = [(r[key], r[metric]) for r in rows if r.get(metric) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker=".", label=run_dir.name)
            ax.set_xlabel(LABELS[axis])
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0
