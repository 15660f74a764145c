"""Experiment tracking: the run in TensorBoard and MLflow, as callbacks (``--log``).

Each tracker is an engine callback that sends every metrics row, plus two moments the engine
does not know about: the start (the resolved configuration as hyperparameters) and the end
(the summary and the final model). The run path (:func:`fedlab.experiment.run`) calls those.

* ``tensorboard``: event files in ``RUN_DIR/tensorboard`` through
  :class:`torch.utils.tensorboard.SummaryWriter`: one scalar per metric and version, the
  configuration in the HParams dashboard and as text, the summary, and histograms of the final
  params (TensorBoard has no artifact store). ``tensorboard --logdir runs`` shows every run.
* ``mlflow``: one MLflow run, by default in an SQLite store in the run directory
  (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``; MLflow 3 no longer writes
  plain-file stores) with its artifacts beside it, or on the server ``mlflow_uri`` names. The
  configuration goes in as params, every row as metrics, the summary as ``summary.*`` metrics,
  and the run's files (``model.safetensors``, ``model.fl``, ``config.toml``, ``summary.json``)
  as artifacts. A resumed run continues the same MLflow run.

Both packages are optional extras; naming a tracker whose package is missing is a
:class:`~fedlab.config.ConfigError` before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedlab.config import ConfigError, RunConfig
from fedlab.types import Params

if TYPE_CHECKING:
    from fedlab.engine import Engine

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_RUN = "mlflow_run.json"
# The MLflow experiment runs go to unless MLFLOW_EXPERIMENT_NAME names another.
EXPERIMENT = "fedlab"
# Files of the run directory that go to MLflow as artifacts when they exist.
ARTIFACTS = ("model.safetensors", "model.fl", "config.toml", "summary.json")


class Tracker(Protocol):
    """An engine callback that also sees the end of the run."""

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        """Send one metrics row."""

    def finish(self, summary: Mapping[str, Any], params: Params, run_dir: Path) -> None:
        """Send the summary and the final model; the run ended normally."""

    def close(self) -> None:
        """Release the tracker (also after a failed or interrupted run)."""


def _missing(name: str, extra: str) -> ConfigError:
    return ConfigError(
        f"log = {name!r} needs the {extra} package, which is not installed: "
        f"pip install 'fedlab[{extra}]'"
    )


def require(config: RunConfig) -> None:
    """Fail now, before the run writes anything, when a tracker's package is missing.

    Raises:
        ConfigError: with the ``pip install`` line that fixes it.
    """
    for name in config.trackers:
        if name == "tensorboard":
            try:
                import torch.utils.tensorboard  # noqa: F401
            except ImportError:
                raise _missing(name, "tensorboard") from None
        elif name == "mlflow":
            try:
                import mlflow.tracking  # noqa: F401
            except ImportError:
                raise _missing(name, "mlflow") from None


def build(config: RunConfig, run_dir: Path, *, version: int) -> list[Tracker]:
    """The trackers ``config.log`` names, for a run at ``version`` (0: a new run)."""
    require(config)
    trackers: list[Tracker] = []
    for name in config.trackers:
        if name == "tensorboard":
            trackers.append(TensorBoardLog(run_dir / TENSORBOARD_DIR, config, version=version))
        else:
            from mlflow.exceptions import MlflowException

            try:
                trackers.append(MLflowLog(run_dir, config, version=version))
            except MlflowException as e:
                for tracker in trackers:
                    tracker.close()
                # The run directory and checkpoint are written: --resume continues once the
                # store is reachable (or with another --mlflow-uri).
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                where = config.mlflow_uri or "the run directory"
                raise ConfigError(f"MLflow at {where}: {first}") from None
    return trackers


def flat_config(config: RunConfig) -> dict[str, Any]:
    """The configuration as flat hyperparameters: option tables as ``table.key``."""
    out: dict[str, Any] = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def numbers(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of ``row`` (booleans as 0/1), without ``version``."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "version" or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class TensorBoardLog:
    """Writes the run as TensorBoard event files in ``log_dir``.

    On resume, events at versions after the checkpoint (written before the interruption and
    about to be written again) are purged, so the curves have one point per version.
    """

    def __init__(self, log_dir: Path, config: RunConfig, *, version: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        fresh = version == 0 or not log_dir.exists()  # a resumed run may start tracking late
        self.writer = SummaryWriter(str(log_dir), purge_step=version + 1 if version else None)
        self.version = version
        if fresh:
            self._hparams(config)
            self.writer.add_text("config", "```toml\n" + config.to_toml() + "```", 0)

    def _hparams(self, config: RunConfig) -> None:
        from torch.utils.tensorboard.summary import hparams

        values = {
            k: v if isinstance(v, int | float | str | bool) else json.dumps(v)
            for k, v in flat_config(config).items()
        }
        experiment, start, _ = hparams(values, {})  # type: ignore[no-untyped-call]
        # Into this run's own event file: SummaryWriter.add_hparams would open a new sub-run.
        file_writer = self.writer.file_writer
        assert file_writer is not None  # SummaryWriter opens it in its constructor
        for summary in (experiment, start):
            file_writer.add_summary(summary)

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        self.version = engine.version
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, engine.version)

    def finish(self, summary: Mapping[str, Any], params: Params, run_dir: Path) -> None:
        step = int(summary.get("versions", self.version))
        for key, value in numbers(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, step)
        table = "| key | value |\n|---|---|\n" + "".join(
            f"| {k} | {v} |\n" for k, v in summary.items()
        )
        self.writer.add_text("summary", table, step)
        for name, tensor in params.items():
            if tensor.is_floating_point() and tensor.numel() > 0:
                self.writer.add_histogram(f"model/{name}", tensor.detach().float().cpu(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflowLog:
    """Logs the run as one MLflow run (see the module docstring for where it goes)."""

    def __init__(self, run_dir: Path, config: RunConfig, *, version: int = 0) -> None:
        from mlflow.tracking import MlflowClient

        run_dir = run_dir.resolve()
        local = not config.mlflow_uri
        self.uri = config.mlflow_uri or f"sqlite:///{run_dir / MLFLOW_DB}"
        # MLflow announces at INFO level that it creates its tables; a quiet run stays quiet.
        db_log = logging.getLogger("mlflow.store.db.utils")
        level = db_log.level
        db_log.setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self._start(run_dir, config, local=local, version=version)
        finally:
            db_log.setLevel(level)

    def _start(self, run_dir: Path, config: RunConfig, *, local: bool, version: int) -> None:
        self.finished = False
        saved = self._saved(run_dir / MLFLOW_RUN) if version else None
        if saved is not None:
            self.run_id = saved
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            found = self.client.get_experiment_by_name(name)
            experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(
                    name,
                    artifact_location=(run_dir / MLFLOW_ARTIFACTS).as_uri() if local else None,
                )
            )
            run = self.client.create_run(
                experiment_id, run_name=run_dir.name, tags={"fedlab.run_dir": str(run_dir)}
            )
            self.run_id = run.info.run_id
            (run_dir / MLFLOW_RUN).write_text(
                json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n"
            )
        self._params(config)

    def _saved(self, path: Path) -> str | None:
        """The MLflow run this run directory logged to before, if it is in the same store."""
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or saved.get("tracking_uri") != self.uri:
            return None
        run_id = saved.get("run_id")
        return run_id if isinstance(run_id, str) else None

    def _params(self, config: RunConfig) -> None:
        from mlflow.entities import Param

        # MLflow params cannot change once logged, and rounds (say) may grow on resume:
        # a resumed run adds only the keys it has not logged; config.toml has the rest.
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in flat_config(config).items() if k not in logged]
        for i in range(0, len(params), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        self._metrics(numbers(row), engine.version)

    def finish(self, summary: Mapping[str, Any], params: Params, run_dir: Path) -> None:
        step = int(summary.get("versions", 0))
        self._metrics({f"summary.{k}": v for k, v in numbers(summary).items()}, step)
        for key, value in summary.items():
            if not isinstance(value, int | float):
                self.client.set_tag(self.run_id, f"summary.{key}", str(value))
        for name in ARTIFACTS:
            if (run_dir / name).exists():
                folder = "model" if name.startswith("model.") else None
                self.client.log_artifact(self.run_id, str(run_dir / name), folder)
        self.client.set_terminated(self.run_id, "FINISHED")
        self.finished = True

    def close(self) -> None:
        if not self.finished:
            # Interrupted or failed: --resume sets it running again.
            self.client.set_terminated(self.run_id, "KILLED")
