"""Callbacks the engine calls after every version: evaluation, the metrics log, progress."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fedlab.client import load_params
from fedlab.objectives import CLASSIFICATION, Objective, objective_of
from fedlab.types import Params

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from fedlab.data import Workload
    from fedlab.engine import Engine


class Evaluator:
    """Accuracy and loss of the global model on the workload's test set.

    A workload that defines its own ``evaluate(params) -> dict[str, float]`` (regression
    workloads such as ``wls``, where accuracy means nothing) is evaluated by that instead.

    Args:
        workload: supplies the model architecture and the test data.
        every: evaluate every ``every`` versions (and always at ``final``).
        final: the last version of the run.
        device: where to evaluate.
        batch_size: examples per forward pass.
    """

    def __init__(
        self,
        workload: Workload,
        *,
        every: int = 1,
        final: int = 0,
        device: str = "cpu",
        batch_size: int = 1024,
    ) -> None:
        self.workload = workload
        self.every = every
        self.final = final
        self.device = torch.device(device)
        self.batch_size = batch_size
        own = getattr(workload, "evaluate", None)
        self._own: Callable[[Params], Mapping[str, float]] | None = own if callable(own) else None
        if self._own is not None:
            return
        self.objective = objective_of(workload)
        self.model = workload.make_model().to(self.device)
        self._slots = dict(self.model.state_dict())
        test = workload.test_data()
        self.x, self.y = test.x.to(self.device), test.y.to(self.device)

    def evaluate(self, params: Params) -> dict[str, float]:
        """The test metrics and mean loss of ``params`` under the workload's objective
        (classification: accuracy and cross-entropy), or the workload's own evaluation."""
        if self._own is not None:
            return {k: float(v) for k, v in self._own(params).items()}
        load_params(self._slots, params)
        return evaluate_model(self.model, self.x, self.y, self.objective, self.batch_size)

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        v = engine.version
        if v % self.every == 0 or v == self.final:
            row.update(self.evaluate(engine.params))


def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective, batch_size: int
) -> dict[str, float]:
    """``model``'s mean metrics and ``loss`` on ``(x, y)`` under ``objective``, in eval mode."""
    model.eval()
    # Sums stay on the device until the end: one host sync per evaluation, not per batch.
    losses: list[torch.Tensor] = []
    scores: dict[str, list[torch.Tensor]] = {name: [] for name, _ in objective.metrics}
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            out = model(x[i : i + batch_size])
            yb = y[i : i + batch_size]
            if objective is CLASSIFICATION and out.dim() == 2:  # exact counts
                # classes along dim 1 of [1, classes, batch]: torch's CPU log-softmax over a
                # short last dimension (10 classes) is 5x slower; the sum agrees to rounding
                losses.append(F.cross_entropy(out.T.unsqueeze(0), yb.unsqueeze(0), reduction="sum"))
                scores["accuracy"].append((out.argmax(1) == yb).sum())
                continue
            losses.append(objective.example_losses(out, yb).sum())
            for name, value in objective.example_scores(out, yb).items():
                scores[name].append(value.sum())
    n = max(len(y), 1)
    totals = {name: _total(parts) for name, parts in scores.items()}
    totals["loss"] = _total(losses)
    return {name: total / n for name, total in totals.items()}


def _total(parts: list[torch.Tensor]) -> float:
    """The sum of per-batch sums, exact for counts (integer tensors)."""
    if not parts:
        return 0.0
    sums = torch.stack(parts).cpu()  # the one copy to the host; float64 exists on every CPU
    if sums.is_floating_point():
        return float(sums.sum(dtype=torch.float64))
    return float(int(sums.sum()))


class MetricsError(ValueError):
    """A metrics file holds a line that is not a metrics row (before its last line)."""


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a ``metrics.jsonl`` file, and warnings about what was dropped.

    A torn last line (a power loss in the middle of an append: cut short, or NUL bytes) is
    dropped with a warning: the checkpoint, not this log, is the run's state, and a resumed
    run writes the rows after it again.

    Raises:
        MetricsError: a line before the last one is not a JSON object; the message names the
            file and the line.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    filled = [i for i, line in enumerate(lines) if line.strip()]
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for i in filled:
        try:
            row = json.loads(lines[i].decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == filled[-1]:
                warnings.append(
                    f"dropped the torn last line {i + 1} of {path} ({e}); the checkpoint "
                    "holds the run's state"
                )
                break
            raise MetricsError(f"{path}, line {i + 1}: not a metrics row: {e}") from e
        rows.append(row)
    return rows, warnings


class MetricsLog:
    """Appends one JSON line per version to ``metrics.jsonl``.

    On resume, :meth:`truncate` drops rows past the checkpoint's version, which the resumed
    run writes again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def truncate(self, version: int) -> list[str]:
        """Keep only rows with ``version <= version``; return warnings (a torn last line).

        Raises:
            MetricsError: a line other than the last is not a metrics row.
        """
        if not self.path.exists():
            return []
        rows, warnings = read_metrics(self.path)
        keep = [r for r in rows if r.get("version", 0) <= version]
        # Replaced atomically: a crash while rewriting must not lose the rows kept.
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)
        return warnings

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        clean = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


class ProgressBar:
    """A terminal progress bar with ETA and the latest accuracy (rich)."""

    def __init__(self, total: int, *, start: int = 0, description: str = "simulate") -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress: Progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("versions"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        self.task: TaskID = self.progress.add_task(
            description, total=total, completed=start, status=""
        )
        self.progress.start()

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        status = ""
        if "accuracy" in row:
            status = f"acc {row['accuracy']:.3f}  loss {row['loss']:.3f}"
        self.progress.update(self.task, completed=engine.version, status=status)

    def close(self) -> None:
        """Stop drawing."""
        self.progress.stop()
