"""``fedlab plot``: accuracy and loss against version and simulated time, several runs per PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser("plot", help="plot accuracy and loss of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("-o", "--output", default="fedlab-plot.png", help="PNG to write")
    p.add_argument("--metrics", default="accuracy,loss", help="comma-separated metric names")
    p.set_defaults(func=run)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows of a run directory."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a fedlab run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(args: argparse.Namespace) -> int:
    """Draw one row of panels per metric: against version (left) and time (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    runs = [(Path(r), read_rows(Path(r))) for r in args.runs]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.6 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(("version", "time")):
            ax = axes[i][j]
            for run_dir, rows in runs:
                pts = [(r[axis], r[metric]) for r in rows if r.get(metric) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker=".", label=run_dir.name)
            ax.set_xlabel("version" if axis == "version" else "simulated time (s)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0
