"""Run a federation from Python and get its results back: :func:`simulate` and :class:`History`.

``fedlab.simulate(clients=100, rounds=10)`` is ``fedlab simulate --clients 100 --rounds 10``:
the same run directory, files, checkpoints, resume, evaluation, trackers and summary, because
both go through :func:`run`, the one run path (``fedlab server`` uses it too). It returns a
:class:`History` instead of printing a table::

    history = fedlab.simulate(clients=100, rounds=10, out="runs/first")
    history["accuracy"]            # one value per version (None where not evaluated)
    history.summary["accuracy"]    # the final evaluation
    history.to_dataframe()         # with pandas installed
    history.plot()                 # a matplotlib Figure
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlab import interchange, tensorio, tracking
from fedlab.callbacks import Evaluator, MetricsLog, ProgressBar
from fedlab.callbacks import read_metrics as read_metrics_log
from fedlab.checkpoint import CHECKPOINT, NEW, PREVIOUS
from fedlab.config import NOT_FINGERPRINTED, ConfigError, RunConfig, from_mapping, load_toml
from fedlab.engine import Callback, Engine
from fedlab.evaluation import CLIENT_METRICS, FederatedEvaluator
from fedlab.privacy import PrivacyBudgetExhausted
from fedlab.types import Params

if TYPE_CHECKING:
    import pandas
    from matplotlib.figure import Figure

    from fedlab.transport import Transport

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.toml"
# What a run directory holds; a fresh run that fails before its first version removes these
# (only these, where the directory existed before) so the same command can run again.
RUN_FILES = (
    CONFIG,
    CHECKPOINT,
    PREVIOUS,
    NEW,
    NEW + ".tmp",
    METRICS,
    METRICS + ".tmp",
    CLIENT_METRICS,
    CLIENT_METRICS + ".tmp",
    SUMMARY,
    interchange.MODEL,
    interchange.MODEL + ".tmp",
    interchange.SAFETENSORS,
    "memory",
    "spool",
    tracking.TENSORBOARD_DIR,
    tracking.MLFLOW_DB,
    tracking.MLFLOW_ARTIFACTS,
    tracking.MLFLOW_RUN,
)
# A full disk, a quota or a read-only file system: the run stops, nothing stored is lost.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
# Permission errors count only on a path inside the run directory (not, say, the user's data).
NO_PERMISSION = frozenset({errno.EACCES, errno.EPERM})


class RunDirError(ValueError):
    """The run directory cannot be written (full, read-only, no permission)."""


@dataclass
class History:
    """What a run produced: its metrics per version, summary, final params and directory.

    Attributes:
        run_dir: the run directory (``metrics.jsonl``, ``summary.json``, the models...).
        config: the resolved configuration the run was made with.
        rows: one dict per version, as in ``metrics.jsonl``.
        summary: ``summary.json``: the final evaluation, counters and times.
        params: the final global model's tensors (``model.fl``).
    """

    run_dir: Path
    config: RunConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    params: Params = field(default_factory=dict)

    @classmethod
    def load(cls, run_dir: str | Path) -> History:
        """The History of a finished run directory (from its files).

        Raises:
            FileNotFoundError: ``run_dir`` is not a fedlab run directory.
        """
        run_dir = Path(run_dir)
        if not (run_dir / CONFIG).exists():
            raise FileNotFoundError(f"{run_dir / CONFIG} does not exist: is it a run directory?")
        summary_path = run_dir / SUMMARY
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        params, _ = interchange.final_params(run_dir)
        return cls(
            run_dir=run_dir,
            config=from_mapping(load_toml(run_dir / CONFIG)),
            rows=read_metrics(run_dir / METRICS),
            summary=summary,
            params=params,
        )

    @property
    def names(self) -> list[str]:
        """Every column of the metrics, ``version`` first, in order of first appearance."""
        seen: dict[str, None] = {"version": None}
        for row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)

    @property
    def metrics(self) -> dict[str, list[Any]]:
        """The metrics as columns: ``{name: [value per version]}``, ``None`` where absent."""
        return {name: [row.get(name) for row in self.rows] for name in self.names}

    @property
    def versions(self) -> list[int]:
        """The version of each row."""
        return [int(row["version"]) for row in self.rows]

    def __getitem__(self, name: str) -> list[Any]:
        """One metric's column, e.g. ``history["accuracy"]``."""
        if name not in self.names:
            raise KeyError(f"no metric {name!r}; the run has {', '.join(self.names)}")
        return [row.get(name) for row in self.rows]

    def to_dataframe(self) -> pandas.DataFrame:
        """The metrics as a pandas DataFrame, one row per version (the index).

        Raises:
            ImportError: pandas is not installed.
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(
                "History.to_dataframe() needs pandas, which is not installed: pip install pandas"
            ) from None
        columns = self.metrics
        index = pd.Index(columns.pop("version"), name="version")
        return pd.DataFrame(
            {k: [math.nan if v is None else v for v in col] for k, col in columns.items()},
            index=index,
        )

    def plot(
        self,
        metrics: Sequence[str] = ("accuracy", "loss"),
        x: Sequence[str] = ("version",),
        path: str | Path | None = None,
    ) -> Figure:
        """One panel per metric and x axis, as ``fedlab plot`` draws them.

        Args:
            metrics: the metrics to draw, one row of panels each.
            x: the x axes, one column each: ``version``, ``time`` or a cumulative bytes axis.
            path: also save the figure there (PNG, SVG or PDF by its suffix).
        """
        from fedlab import plots

        for name in metrics:
            if name not in self.names:
                raise KeyError(f"no metric {name!r}; the run has {', '.join(self.names)}")
        figure = plots.draw([(self.run_dir.name, [self.rows])], list(metrics), list(x))
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure

    def __repr__(self) -> str:
        last = {k: self.summary[k] for k in ("accuracy", "loss") if k in self.summary}
        return (
            f"History(run_dir={str(self.run_dir)!r}, versions={len(self.rows)}, "
            f"metrics={len(self.names) - 1}, final={last})"
        )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (none if it does not exist yet); a torn last line is
    dropped with a warning (see :func:`fedlab.callbacks.read_metrics`)."""
    if not path.exists():
        return []
    rows, dropped = read_metrics_log(path)
    for w in dropped:
        warnings.warn(w, stacklevel=2)
    return rows


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a fedlab run (its saved configuration or a checkpoint)."""
    return (path / CONFIG).is_file() or (path / CHECKPOINT).is_file()


def default_out(config: RunConfig) -> str:
    """``runs/<strategy>-<workload>-<time>``: where a run goes when ``out`` is not set."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"runs/{config.strategy.replace(':', '_')}-{config.workload}-{stamp}"


def new_config(config: RunConfig) -> RunConfig:
    """``config`` with its run directory chosen, which must not hold a run already.

    Raises:
        FileExistsError: ``config.out`` holds a checkpoint.
    """
    if not config.out:
        config = config.replace(out=default_out(config))
    run_dir = Path(config.out)
    if (run_dir / CHECKPOINT).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} "
            "(fedlab.simulate(resume=...) in Python) or choose another --out"
        )
    if run_dir.exists():
        if not run_dir.is_dir():
            raise FileExistsError(f"--out {run_dir} is a file, not a directory")
        if any(run_dir.iterdir()) and not is_run_dir(run_dir):
            # Mixing a run's files into someone else's directory would make both unreadable.
            raise FileExistsError(
                f"--out {run_dir} is not empty and is not a fedlab run directory; "
                "choose a new or empty directory"
            )
    return config


def resume_config(run_dir: str | Path, changes: Mapping[str, Any]) -> RunConfig:
    """The saved configuration of ``run_dir`` with ``changes`` to keys that do not change results.

    Raises:
        ConfigError: ``run_dir`` has no saved configuration, or a change would alter the numbers.
    """
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        what = "does not exist" if not run_dir.exists() else "holds no config.toml"
        raise ConfigError(f"{run_dir} is not a fedlab run directory ({what}); nothing to resume")
    saved = load_toml(run_dir / CONFIG)
    for key, value in changes.items():
        key = key.replace("-", "_")
        if key not in NOT_FINGERPRINTED and saved.get(key) != value:
            raise ConfigError(
                f"cannot change {key} on resume: the run was made with {key}={saved.get(key)!r}"
            )
    return from_mapping({**saved, **changes, "out": str(run_dir)})


def run(
    config: RunConfig,
    *,
    resume: bool = False,
    command: str = "simulate",
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    transport: Transport | None = None,
    ready: Callable[[Engine], None] | None = None,
    say: Callable[[str], None] = print,
) -> History:
    """Run ``config`` to its last version over ``transport`` (default: the simulation).

    The one run path of ``fedlab simulate``, ``fedlab server`` and :func:`simulate`: the run
    directory, checkpoints, resume, evaluation, metrics, trackers, summary and final model are
    the same whatever carries the tasks and whoever asked.

    Args:
        config: the resolved configuration; ``config.out`` is the run directory.
        resume: continue the checkpoint in ``config.out`` instead of starting.
        command: ``simulate`` or ``server``: names the clock in the summary and the messages.
        progress: draw a progress bar.
        callbacks: more engine callbacks, called after evaluation and before the metrics log
            (what they add to a row is logged).
        transport: carries the tasks (``None``: the simulation of ``config``).
        ready: called with the engine just before the first version runs.
        say: where warnings and the stop messages go.
    """
    run_dir = Path(config.out)
    existed = run_dir.exists()
    started: list[Engine] = []
    try:
        return _run(
            config,
            resume=resume,
            command=command,
            progress=progress,
            callbacks=callbacks,
            transport=transport,
            ready=ready,
            say=say,
            started=started,
        )
    except KeyboardInterrupt:
        raise  # the run stopped at a checkpoint on purpose: it is resumed, not removed
    except Exception as e:
        fresh = not resume and (not started or started[0].version == 0)
        removed = fresh and _remove_half_made(run_dir, existed)
        if isinstance(e, OSError) and _unwritable(e, run_dir):
            then = (
                f"nothing was kept: free space (or make {run_dir} writable) and run the same "
                "command again"
                if removed or not is_run_dir(run_dir)
                else f"the checkpoint is intact: once space is freed (or {run_dir} is "
                f"writable), continue with: fedlab {command} --resume {run_dir}"
            )
            where = f" ({e.filename})" if e.filename else ""
            raise RunDirError(
                f"cannot write the run directory {run_dir}: {e.strerror or e}{where}; {then}"
            ) from e
        raise


def _unwritable(error: BaseException, run_dir: Path) -> bool:
    """Whether ``error`` says the run directory cannot be written."""
    if not isinstance(error, OSError):
        return False
    if error.errno in DISK_FULL:
        return True
    if error.errno not in NO_PERMISSION or error.filename is None:
        return False
    path = Path(os.path.abspath(os.fsdecode(error.filename)))
    return path.is_relative_to(os.path.abspath(run_dir))


def _remove_half_made(run_dir: Path, existed: bool) -> bool:
    """Remove what a fresh run that failed before its first version wrote; True if done.

    A directory this run created goes entirely; in one that existed (empty, or a run's
    leftovers) only the run's own files go, never anything else.
    """
    try:
        if not existed:
            if run_dir.exists():
                shutil.rmtree(run_dir)
            return True
        for name in RUN_FILES:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return True
    except OSError:
        return False  # a read-only directory: nothing was written there either


def _run(
    config: RunConfig,
    *,
    resume: bool,
    command: str,
    progress: bool,
    callbacks: Sequence[Callback],
    transport: Transport | None,
    ready: Callable[[Engine], None] | None,
    say: Callable[[str], None],
    started: list[Engine],
) -> History:
    from fedlab.run import build_engine, build_workload

    tracking.require(config)  # before anything is written
    run_dir = Path(config.out)
    workload = build_workload(config)
    metrics = MetricsLog(run_dir / METRICS)
    evaluator = Evaluator(
        workload, every=config.eval_every, final=config.rounds, device=config.device
    )
    evaluators: list[Callback] = [evaluator]
    federated: FederatedEvaluator | None = None
    if config.eval_clients:
        if command != "simulate":
            # A deployed server holds no client's data; evaluation on clients would be a task
            # the clients run, which the protocol does not have.
            raise ConfigError(
                f"--eval-clients evaluates on each client's own data, which only a simulation "
                f"holds: leave it out of fedlab {command}"
            )
        federated = FederatedEvaluator(
            workload,
            clients=config.eval_clients,
            seed=config.seed,
            personalize=config.personalize,
            lr=config.lr,
            batch_size=config.batch_size,
            drop_last=config.drop_last,
            every=config.eval_every,
            final=config.rounds,
            device=config.device,
            path=run_dir / CLIENT_METRICS,
        )
        evaluators.append(federated)
    # A deployed server folds FedAvg-family updates as they arrive: its memory must not grow
    # with the number of clients uploading large models at once.
    engine = build_engine(
        config,
        run_dir=run_dir,
        callbacks=[*evaluators, *callbacks, metrics],
        workload=workload,
        transport=transport,
        stream=transport is not None,
    )
    started.append(engine)
    if resume:
        engine.resume()
        for w in engine.resume_warnings:
            say(f"fedlab: warning: {w}; resumed from {engine.resumed_from}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    # Trackers start before the run directory changes: one that cannot (an MLflow store out
    # of reach) stops here with the directory as it was.
    try:
        trackers = tracking.build(config, run_dir, version=engine.version)
    except BaseException:
        engine.transport.close()
        raise
    engine.callbacks.extend(trackers)
    bar: ProgressBar | None = None
    stopped = ""
    try:
        if resume:
            for log in (metrics, MetricsLog(run_dir / CLIENT_METRICS)):
                for w in log.truncate(engine.version):
                    say(f"fedlab: warning: {w}")
        else:
            (run_dir / CONFIG).write_text(config.to_toml())
            engine.save_checkpoint()
        (run_dir / CONFIG).write_text(config.to_toml())
        if progress:
            bar = ProgressBar(config.rounds, start=engine.version, description=command)
            engine.callbacks.append(bar)
        try:
            if ready is not None:
                ready(engine)
            engine.run(config.rounds)
        except KeyboardInterrupt:
            say(
                f"stopped at version {engine.version}{_from(engine)}; continue with: "
                f"fedlab {command} --resume {run_dir}"
            )
            raise
        except PrivacyBudgetExhausted as e:
            # A clean stop: the checkpoint of the last released version is the final model.
            stopped = str(e)
        finally:
            if bar is not None:
                bar.close()
            engine.close()  # the last checkpoint write was waited for (or reported) by run()
        final = evaluator.evaluate(engine.params)
        if federated is not None:
            final.update(federated.evaluate(engine.params, engine.version))
        summary = _summary(engine, config, final, command)
        if stopped:
            summary["stopped"] = stopped
            say(
                f"fedlab: privacy budget spent: {stopped}. The checkpoint at version "
                f"{engine.checkpointed_version} is intact; resuming it stops here again, because "
                "target_epsilon is part of the run's configuration and cannot change on "
                "resume. To train further, start a new run with a budget that covers it."
            )
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        params = dict(engine.params)
        tensorio.save(run_dir / interchange.MODEL, params)
        interchange.save_safetensors(
            run_dir / interchange.SAFETENSORS,
            params,
            {
                "format": "pt",
                "fedlab.strategy": config.strategy,
                "fedlab.version": str(engine.version),
            },
        )
        for tracker in trackers:
            tracker.finish(summary, params, run_dir)
    finally:
        for tracker in trackers:
            tracker.close()
    return History(
        run_dir=run_dir,
        config=config,
        rows=read_metrics(run_dir / METRICS),
        summary=summary,
        params=params,
    )


def _from(engine: Engine) -> str:
    """Where a resume of ``engine``'s run starts, when not at its current version."""
    at = engine.checkpointed_version
    return "" if at in (None, engine.version) else f" (the checkpoint is at version {at})"


def _summary(
    engine: Engine, config: RunConfig, final: dict[str, float], command: str
) -> dict[str, Any]:
    clock = "simulated_time" if command == "simulate" else "transport_time"
    # An executor may say where it trained (the Ray backend: ``ray_nodes``, actors and jobs
    # per node), which a run on a cluster wants on record.
    executor_summary = getattr(getattr(engine.transport, "executor", None), "summary", None)
    return {
        "strategy": config.strategy,
        "workload": config.workload,
        "clients": config.clients,
        "versions": engine.version,
        **final,  # accuracy and loss, or a workload's own metrics (wls: msd, msd_db)
        clock: engine.transport.now(),
        "wall_seconds": engine.wall,
        "updates_received": engine.counters.received,
        "updates_rejected": engine.counters.rejected,
        "updates_failed": engine.counters.failed,
        **(executor_summary() if callable(executor_summary) else {}),
    }


def simulate(
    config: RunConfig | Mapping[str, Any] | str | Path | None = None,
    /,
    *,
    resume: str | Path | None = None,
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    **settings: Any,
) -> History:
    """Simulate a federation on this machine and return its :class:`History`.

    The same run as ``fedlab simulate``: every keyword is a :class:`RunConfig` key (a flag of
    the command without ``--``), and the run directory holds the same files.

    Args:
        config: a :class:`RunConfig`, a mapping of its keys, or a TOML run file; ``settings``
            override it key by key (option tables merge).
        resume: continue the run saved in this directory instead (``settings`` may change
            only keys that do not change results, such as ``rounds``).
        progress: draw a progress bar (default: quiet).
        callbacks: engine callbacks of your own, called after evaluation each version.
        **settings: configuration keys, e.g. ``clients=100, rounds=10, strategy="fedavg"``.

    Raises:
        ConfigError: a bad key or value, or a change to a resumed run's results.
        FileExistsError: ``out`` already holds a run (resume it, or choose another ``out``).

    Example:
        >>> history = fedlab.simulate(clients=20, rounds=3, out="runs/demo")  # doctest: +SKIP
        >>> history.summary["accuracy"]  # doctest: +SKIP
    """
    if resume is not None:
        if config is not None:
            raise ConfigError("config cannot be combined with resume: the run's config is saved")
        resolved = resume_config(resume, settings)
    else:
        resolved = new_config(_resolve(config, settings))
    return run(
        resolved,
        resume=resume is not None,
        progress=progress,
        callbacks=callbacks,
        say=lambda message: warnings.warn(message, stacklevel=3),
    )


def _resolve(
    config: RunConfig | Mapping[str, Any] | str | Path | None, settings: Mapping[str, Any]
) -> RunConfig:
    if config is None:
        base: dict[str, Any] = {}
    elif isinstance(config, RunConfig):
        base = config.to_dict()
    elif isinstance(config, str | Path):
        base = load_toml(config)
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(
            f"config must be a RunConfig, a mapping or a TOML path, got {type(config).__name__}"
        )
    merged = {**base, **settings}
    if isinstance(merged.get("out"), os.PathLike):  # out=Path("runs/a") reads naturally
        merged["out"] = os.fspath(merged["out"])
    for key, value in settings.items():
        if key.endswith("_options") and isinstance(base.get(key), Mapping):
            merged[key] = {**base[key], **value}
    return from_mapping(merged)
