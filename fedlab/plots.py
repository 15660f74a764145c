"""Drawing metrics rows: the panels of ``fedlab plot`` and :meth:`fedlab.History.plot`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure as FigureType

Rows = list[dict[str, Any]]

CUMULATIVE = ("bytes_up", "bytes_down", "bytes")
LABELS = {
    "version": "version",
    "time": "simulated time (s)",
    "bytes_up": "MB uploaded by clients (cumulative)",
    "bytes_down": "MB sent to clients (cumulative)",
    "bytes": "MB on the wire, both ways (cumulative)",
}


def with_cumulative(rows: Rows) -> Rows:
    """``rows`` with running totals, in MB, of the bytes columns as ``total_<axis>``."""
    up = down = 0.0
    out = []
    for r in rows:
        up += r.get("bytes_up", 0) / 1e6
        down += r.get("bytes_down", 0) / 1e6
        out.append({**r, "total_bytes_up": up, "total_bytes_down": down, "total_bytes": up + down})
    return out


def draw(
    runs: Sequence[tuple[str, Rows]], metrics: Sequence[str], axes: Sequence[str]
) -> FigureType:
    """One row of panels per metric, one column per x axis, one line per named run.

    Raises:
        ValueError: an x axis that is not one of :data:`LABELS`.
    """
    # A bare Figure, not pyplot: no global backend switch, nothing left open in pyplot's
    # registry, and a notebook still shows the returned figure.
    from matplotlib.figure import Figure

    unknown = [x for x in axes if x not in LABELS]
    if unknown or not axes:
        raise ValueError(f"--x takes {', '.join(LABELS)}; got {','.join(axes)!r}")
    if any(x in CUMULATIVE for x in axes):
        runs = [(name, with_cumulative(rows)) for name, rows in runs]
    fig = Figure(figsize=(5.5 * len(axes), 3.6 * len(metrics)))
    panels = fig.subplots(len(metrics), len(axes), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(axes):
            ax = panels[i][j]
            key = f"total_{axis}" if axis in CUMULATIVE else axis
            for name, rows in runs:
                pts = [(r[key], r[metric]) for r in rows if r.get(metric) is not None]
                if pts:
                    xs, ys = zip(*pts, strict=True)
                    ax.plot(xs, ys, marker=".", label=name)
            ax.set_xlabel(LABELS[axis])
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    panels[0][0].legend(fontsize="small")
    fig.tight_layout()
    return fig
