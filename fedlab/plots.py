"""Drawing metrics rows: the panels of ``fedlab plot`` and :meth:`fedlab.History.plot`.

A *series* is one line: a single run, or several runs that differ only by seed, drawn as
their mean with a band of one standard deviation (:func:`group_seeds`). Epsilon columns are
drawn as the cumulative maximum over versions: ``client_epsilon_max`` is the largest epsilon
among the clients of one version, and read per version it would look as if privacy came back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fedlab.config import NOT_FINGERPRINTED

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Rows = list[dict[str, Any]]
Series = tuple[str, list[Rows]]

CUMULATIVE = ("bytes_up", "bytes_down", "bytes")
LABELS = {
    "version": "version",
    "time": "simulated time (s)",
    "bytes_up": "MB uploaded by clients (cumulative)",
    "bytes_down": "MB sent to clients (cumulative)",
    "bytes": "MB on the wire, both ways (cumulative)",
}
FORMATS = (".png", ".svg", ".pdf")
# Configuration keys that may differ between the runs of one mean-and-band series.
_SEED_FREE = NOT_FINGERPRINTED | {"seed", "out"}


def with_cumulative(rows: Rows) -> Rows:
    """``rows`` with running totals, in MB, of the bytes columns as ``total_<axis>``."""
    up = down = 0.0
    out = []
    for r in rows:
        up += r.get("bytes_up", 0) / 1e6
        down += r.get("bytes_down", 0) / 1e6
        out.append({**r, "total_bytes_up": up, "total_bytes_down": down, "total_bytes": up + down})
    return out


def cumulative_max(metric: str) -> bool:
    """Whether ``metric`` is an epsilon drawn as its running maximum (not a mean)."""
    return "epsilon" in metric and not metric.endswith("_mean")


def group_seeds(runs: Sequence[tuple[str, Rows, Mapping[str, Any] | None]]) -> list[Series]:
    """One series per set of runs whose configurations differ only by seed (or run settings).

    ``runs`` are ``(name, rows, config)``; a run without a configuration is its own series.
    A series of several runs is labelled by the common start of their names and the count.
    """
    groups: dict[str, list[tuple[str, Rows]]] = {}
    for i, (name, rows, config) in enumerate(runs):
        if config is None:
            key = f"#{i}"
        else:
            key = repr(sorted((k, repr(v)) for k, v in config.items() if k not in _SEED_FREE))
        groups.setdefault(key, []).append((name, rows))
    series: list[Series] = []
    for members in groups.values():
        names = [n for n, _ in members]
        if len(members) == 1:
            label = names[0]
        else:
            stem = "".join(c[0] for c in _common_start(names)) or names[0]
            label = f"{stem}* (mean ± sd of {len(members)} seeds)"
        series.append((label, [rows for _, rows in members]))
    return series


def _common_start(names: Sequence[str]) -> list[tuple[str, ...]]:
    """The leading characters every name shares, as columns of characters."""
    out = []
    for column in zip(*names, strict=False):
        if len(set(column)) > 1:
            break
        out.append(column)
    return out


def _points(rows: Rows, key: str, metric: str) -> dict[int, tuple[float, float]]:
    """``{version: (x, y)}`` where ``metric`` was recorded (running max for epsilons)."""
    out: dict[int, tuple[float, float]] = {}
    best = -math.inf
    for r in rows:
        y = r.get(metric)
        if y is None or r.get(key) is None:
            continue
        if cumulative_max(metric):
            best = max(best, float(y))
            y = best
        out[int(r["version"])] = (float(r[key]), float(y))
    return out


def _draw_series(ax: Axes, label: str, runs: list[Rows], key: str, metric: str) -> None:
    per_run = [_points(rows, key, metric) for rows in runs]
    if len(per_run) == 1:
        pts = sorted(per_run[0].items())
        if pts:
            ax.plot([p[0] for _, p in pts], [p[1] for _, p in pts], marker=".", label=label)
        return
    # Versions every run recorded: the mean is over the same seeds at every point. On the
    # time and bytes axes, x is the mean over seeds too.
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    if not common:
        return
    xs: list[float] = []
    means: list[float] = []
    sds: list[float] = []
    for v in common:
        x = [p[v][0] for p in per_run]
        y = [p[v][1] for p in per_run]
        mean = sum(y) / len(y)
        xs.append(sum(x) / len(x))
        means.append(mean)
        sds.append(math.sqrt(sum((t - mean) ** 2 for t in y) / (len(y) - 1)))
    (line,) = ax.plot(xs, means, marker=".", label=label)
    low = [m - s for m, s in zip(means, sds, strict=True)]
    high = [m + s for m, s in zip(means, sds, strict=True)]
    ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def draw(series: Sequence[Series], metrics: Sequence[str], axes: Sequence[str]) -> Figure:
    """One row of panels per metric, one column per x axis, one line (or band) per series.

    Raises:
        ValueError: an x axis that is not one of :data:`LABELS`.
    """
    # A bare Figure, not pyplot: no global backend switch, nothing left open in pyplot's
    # registry, and a notebook still shows the returned figure.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    unknown = [x for x in axes if x not in LABELS]
    if unknown or not axes:
        raise ValueError(f"--x takes {', '.join(LABELS)}; got {','.join(axes)!r}")
    if any(x in CUMULATIVE for x in axes):
        series = [(label, [with_cumulative(r) for r in runs]) for label, runs in series]
    fig = Figure(figsize=(5.5 * len(axes), 3.6 * len(metrics) + 0.6), layout="constrained")
    panels = fig.subplots(len(metrics), len(axes), squeeze=False)
    for i, metric in enumerate(metrics):
        for j, axis in enumerate(axes):
            ax = panels[i][j]
            key = f"total_{axis}" if axis in CUMULATIVE else axis
            for label, runs in series:
                _draw_series(ax, label, runs, key, metric)
            ax.set_xlabel(LABELS[axis])
            ax.set_ylabel(f"{metric} (cumulative max)" if cumulative_max(metric) else metric)
            if axis == "version":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            elif axis in CUMULATIVE and ax.has_data():
                ax.set_xscale("log")  # codecs differ by factors, not by megabytes
            ax.grid(alpha=0.3)
    # One legend for the figure: every panel has the same lines.
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=min(len(handles), 3),
            fontsize="small",
        )
    return fig


def last_evaluation(lines: Rows) -> tuple[int, Rows]:
    """The version of the last federated evaluation in ``client_metrics.jsonl`` lines, and
    its clients' lines."""
    version = max(int(line["version"]) for line in lines)
    return version, [line for line in lines if int(line["version"]) == version]


def draw_clients(runs: Sequence[tuple[str, Rows]], metric: str) -> Figure:
    """The distribution over clients of ``metric`` at each run's last federated evaluation.

    One empirical CDF per run (the share of evaluated clients at or below each value), and,
    where the run personalised, the ``personalized_`` figure as a dashed line of the same
    colour: the FedAvg+FT gap at every quantile, the 10th percentile and the worst client
    included.

    Raises:
        ValueError: a run has no line with ``metric``.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    for label, lines in runs:
        version, last = last_evaluation(lines)
        values = sorted(float(line[metric]) for line in last if metric in line)
        if not values:
            raise ValueError(f"run {label!r} has no per-client {metric!r}")
        shares = [(i + 1) / len(values) for i in range(len(values))]
        (line,) = ax.step(values, shares, where="post", label=f"{label} (version {version})")
        personal = sorted(
            float(x[f"personalized_{metric}"]) for x in last if f"personalized_{metric}" in x
        )
        if personal:
            ax.step(
                personal,
                [(i + 1) / len(personal) for i in range(len(personal))],
                where="post",
                linestyle="--",
                color=line.get_color(),
                label=f"{label}, personalised",
            )
    ax.axhline(0.1, color="grey", linewidth=0.8, linestyle=":")  # the 10th percentile
    ax.set_xlabel(f"client {metric}")
    ax.set_ylabel("share of clients at or below")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(ax.lines), 2), fontsize="small")
    return fig
