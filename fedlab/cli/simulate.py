"""``fedlab simulate``: run a whole federation on this machine."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlab import tensorio
from fedlab.callbacks import Evaluator, MetricsLog, ProgressBar
from fedlab.cli.flags import add_run_flags, given_flags, resolve_config
from fedlab.config import NOT_FINGERPRINTED, ConfigError, RunConfig, from_mapping, load_toml
from fedlab.engine import CHECKPOINT, PREVIOUS, Engine
from fedlab.privacy import PrivacyBudgetExhausted
from fedlab.sim import build_engine, build_workload
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


# What a run directory holds; a fresh run that fails before its first version removes these
# (only these, where the directory existed before) so the same command can run again.
RUN_FILES = (
    "config.toml",
    CHECKPOINT,
    PREVIOUS,
    CHECKPOINT + ".new",
    CHECKPOINT + ".new.tmp",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "summary.json",
    "model.fl",
    "model.fl.tmp",
    "memory",
    "spool",
)
# A full disk, a quota or a read-only file system: the run stops, nothing stored is lost.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
# Permission errors count only on a path inside the run directory (not, say, the user's data).
NO_PERMISSION = frozenset({errno.EACCES, errno.EPERM})


class RunDirError(ValueError):
    """The run directory cannot be written (full, read-only, no permission)."""


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


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a fedlab run (its saved configuration or a checkpoint)."""
    return (path / "config.toml").is_file() or (path / CHECKPOINT).is_file()


def _resume_config(args: argparse.Namespace) -> RunConfig:
    run_dir = Path(args.resume)
    if not is_run_dir(run_dir):
        what = "does not exist" if not run_dir.exists() else "holds no config.toml"
        raise ConfigError(f"{run_dir} is not a fedlab run directory ({what}); nothing to resume")
    saved = load_toml(run_dir / "config.toml")
    flags = given_flags(args)
    if args.config:
        raise ConfigError("--config cannot be combined with --resume: the run's config is saved")
    for key, value in flags.items():
        if key not in NOT_FINGERPRINTED and saved.get(key) != value:
            raise ConfigError(
                f"cannot change {key} on resume: the run was made with {key}={saved.get(key)!r}"
            )
    return from_mapping({**saved, **flags, "out": str(run_dir)})


def _default_out(config: RunConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"runs/{config.strategy.replace(':', '_')}-{config.workload}-{stamp}"


def run(args: argparse.Namespace) -> int:
    """Run (or resume) a simulation; write the run directory; print the final table."""
    return execute(args, prepare_config(args), command="simulate")


def prepare_config(args: argparse.Namespace) -> RunConfig:
    """The run's configuration: from a saved run on ``--resume``, else flags and TOML."""
    if args.resume:
        config = _resume_config(args)
    else:
        config = resolve_config(args)
        if not config.out:
            config = config.replace(out=_default_out(config))
    run_dir = Path(config.out)
    if not args.resume and (run_dir / CHECKPOINT).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} "
            "or choose another --out"
        )
    if not args.resume and run_dir.exists():
        if not run_dir.is_dir():
            raise FileExistsError(f"--out {run_dir} is a file, not a directory")
        if any(run_dir.iterdir()) and not is_run_dir(run_dir):
            # Mixing a run's files into someone else's directory would make both unreadable.
            raise FileExistsError(
                f"--out {run_dir} is not empty and is not a fedlab run directory; "
                "choose a new or empty directory"
            )
    return config


def execute(
    args: argparse.Namespace,
    config: RunConfig,
    *,
    command: str,
    transport: Transport | None = None,
    ready: Callable[[Engine], None] | None = None,
) -> int:
    """Run ``config`` to its last version over ``transport`` (default: the simulation).

    Shared by ``fedlab simulate`` and ``fedlab server``: the run directory, checkpoints,
    resume, evaluation, metrics and the summary are the same whatever carries the tasks.
    ``ready`` is called with the engine just before the first version runs.

    A fresh run that fails before its first version removes the run directory it made, so
    the same command can run again; a run directory that cannot be written (full, read-only)
    ends the run with one line saying how to continue.
    """
    run_dir = Path(config.out)
    existed = run_dir.exists()
    started: list[Engine] = []
    try:
        return _execute(args, config, command, transport, ready, started)
    except KeyboardInterrupt:
        raise  # the run stopped at a checkpoint on purpose: it is resumed, not removed
    except Exception as e:
        fresh = not args.resume and (not started or started[0].version == 0)
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


def _execute(
    args: argparse.Namespace,
    config: RunConfig,
    command: str,
    transport: Transport | None,
    ready: Callable[[Engine], None] | None,
    started: list[Engine],
) -> int:
    run_dir = Path(config.out)
    workload = build_workload(config)
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    evaluator = Evaluator(
        workload, every=config.eval_every, final=config.rounds, device=config.device
    )
    callbacks: list[Any] = [evaluator, metrics]
    # A deployed server folds FedAvg-family updates as they arrive: its memory must not grow
    # with the number of clients uploading large models at once.
    engine = build_engine(
        config,
        run_dir=run_dir,
        callbacks=callbacks,
        workload=workload,
        transport=transport,
        stream=transport is not None,
    )
    started.append(engine)
    if args.resume:
        engine.resume()
        for w in engine.resume_warnings:
            print(f"fedlab: warning: {w}; resumed from {engine.resumed_from}")
        for w in metrics.truncate(engine.version):
            print(f"fedlab: warning: {w}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config.to_toml())
        engine.save_checkpoint()
    (run_dir / "config.toml").write_text(config.to_toml())
    progress = (
        None
        if args.no_progress
        else ProgressBar(config.rounds, start=engine.version, description=command)
    )
    if progress is not None:
        engine.callbacks.append(progress)
    stopped = ""
    try:
        if ready is not None:
            ready(engine)
        engine.run(config.rounds)
    except KeyboardInterrupt:
        print(
            f"stopped at version {engine.version}; continue with: "
            f"fedlab {command} --resume {run_dir}"
        )
        raise
    except PrivacyBudgetExhausted as e:
        # A clean stop: the checkpoint of the last released version is the final model.
        stopped = str(e)
    finally:
        if progress is not None:
            progress.close()
        engine.transport.close()
    final = evaluator.evaluate(engine.params)
    summary = _summary(engine, config, final, command)
    if stopped:
        summary["stopped"] = stopped
        print(
            f"fedlab: privacy budget spent: {stopped}. The checkpoint at version "
            f"{engine.version} is intact; resuming it stops here again, because "
            "target_epsilon is part of the run's configuration and cannot change on resume. "
            "To train further, start a new run with a budget that covers it."
        )
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tensorio.save(run_dir / "model.fl", dict(engine.params))
    _print_table(summary, run_dir, command)
    return 0


def _summary(
    engine: Engine, config: RunConfig, final: dict[str, float], command: str
) -> dict[str, Any]:
    clock = "simulated_time" if command == "simulate" else "transport_time"
    return {
        "strategy": config.strategy,
        "workload": config.workload,
        "clients": config.clients,
        "versions": engine.version,
        **final,  # accuracy and loss, or a workload's own metrics (wls: msd, msd_db)
        clock: engine.transport.now(),
        "wall_seconds": engine.state_dict()["wall"],
        "updates_received": engine.counters.received,
        "updates_rejected": engine.counters.rejected,
        "updates_failed": engine.counters.failed,
    }


def _print_table(summary: dict[str, Any], run_dir: Path, command: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fedlab {command}: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
