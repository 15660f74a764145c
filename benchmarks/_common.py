"""What the reproduction scripts share: the parallel seed loop, curves, mean ± std, plots, JSON.

Each ``repro_*.py`` script defines its own runs, summary and table; this module is the
plumbing they all repeat. Import it as ``from _common import ...`` (the scripts run from
``benchmarks/``, which Python puts first on ``sys.path``).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def run_parallel(
    fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], workers: int
) -> list[Any]:
    """``[fn(*job) for job in jobs]`` in ``workers`` processes, results in job order."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        return [f.result() for f in futures]


def mean_std(values: Iterable[float], *, sample: bool = False) -> tuple[float, float]:
    """Mean and standard deviation over seeds: population (``pstdev``) unless ``sample``, which
    uses ``stdev`` and gives 0 for a single value."""
    xs = list(values)
    if sample:
        return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0
    return statistics.fmean(xs), statistics.pstdev(xs)


class Curve:
    """An engine callback keeping ``(version, row[key])`` whenever a row has ``key``.

    Args:
        key: the metrics column (``"accuracy"``, ``"msd"``).
        finite_or: the value kept instead of a non-finite one (``None``: keep it as it is).
    """

    def __init__(self, key: str = "accuracy", finite_or: float | None = None) -> None:
        self.key = key
        self.finite_or = finite_or
        self.points: list[tuple[int, float]] = []

    def on_version(self, engine: Any, row: dict[str, Any]) -> None:
        if self.key in row:
            value = float(row[self.key])
            if self.finite_or is not None and not math.isfinite(value):
                value = self.finite_or
            self.points.append((int(row["version"]), value))


def train(
    config: Any,
    *,
    every: int,
    curve: Curve | None = None,
    callbacks: Sequence[Any] = (),
    workload: Any = None,
) -> tuple[list[tuple[int, float]], float]:
    """Run ``config`` for ``config.rounds`` versions in this process (one torch thread),
    evaluating every ``every`` versions and at the end; returns the curve and the seconds the
    versions took (building the engine excluded)."""
    import torch

    from fedlab.callbacks import Evaluator
    from fedlab.run import build_engine, build_workload

    torch.set_num_threads(1)
    workload = workload or build_workload(config)
    curve = curve or Curve()
    evaluator = Evaluator(workload, every=every, final=config.rounds)
    engine = build_engine(config, callbacks=[evaluator, curve, *callbacks], workload=workload)
    start = time.perf_counter()
    engine.run(config.rounds)
    return curve.points, time.perf_counter() - start


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax: Any, curves: Sequence[Sequence[tuple[int, float]]], label: str) -> None:
    """Plot the mean over ``curves`` (same versions) with a one-std band."""
    import numpy as np

    versions = np.array([v for v, _ in curves[0]])
    values = np.array([[a for _, a in c] for c in curves])
    mean, std = values.mean(0), values.std(0)
    ax.plot(versions, mean, label=label)
    ax.fill_between(versions, mean - std, mean + std, alpha=0.2)


def write_json(path: str, payload: dict[str, Any], **kwargs: Any) -> None:
    """Write ``payload`` to ``path`` as JSON."""
    with open(path, "w") as f:
        json.dump(payload, f, **kwargs)
