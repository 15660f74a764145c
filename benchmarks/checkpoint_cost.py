"""What a checkpoint costs the training loop: a 10M-parameter model, before and after.

Each measurement runs the synthetic workload with a wide MLP (about 10M parameters) for
``--versions`` versions in a fresh process, and reports the seconds per version spent in the
engine's checkpoint call (``Engine.save_checkpoint``, the hot path), the wait for the last
write at the end of the run, seconds per version overall, and the size of ``checkpoint.fl``.

Modes, interleaved repeat by repeat:

- ``off``: no run directory, no checkpoint (the floor);
- ``before``: the engine of git revision ``--before`` (exported to a temporary directory and
  imported instead of this checkout): a synchronous write of every tensor where it appears;
- ``after``: this checkout, a checkpoint every version (written on a background thread,
  each tensor once);
- ``after-every-N``: this checkout with ``checkpoint_every = N`` for each ``--every N``.

Run from the repository root::

    python benchmarks/checkpoint_cost.py --before 3d590f4 --versions 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
HIDDEN = 3136  # 60 -> 3136 -> 3136 -> 10: 10,060,298 parameters


def wide() -> nn.Module:
    """The model: an MLP on the 60 synthetic features with about 10M parameters."""
    return nn.Sequential(
        nn.Linear(60, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )


def worker(mode: str, versions: int, every: int, run_dir: str | None) -> dict[str, Any]:
    """One measurement in this process; ``fedlab`` is whichever one ``sys.path`` finds."""
    import torch

    import fedlab.engine
    from fedlab.config import RunConfig
    from fedlab.run import build_engine

    torch.set_num_threads(1)
    settings: dict[str, Any] = dict(
        clients=20, fraction=0.1, local_steps=2, batch_size=32, seed=0, model="checkpoint_cost:wide"
    )
    if every > 1:
        settings["checkpoint_every"] = every
    config = RunConfig(rounds=versions, **settings)
    engine = build_engine(config, run_dir=run_dir)
    model_bytes = sum(t.numel() * t.element_size() for t in engine.params.values())
    calls: list[tuple[int, float]] = []
    last_return = [0.0]
    real = fedlab.engine.Engine.save_checkpoint

    def timed(self: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        real(self, *args, **kwargs)
        last_return[0] = time.perf_counter()
        calls.append((self.version, last_return[0] - start))

    engine.save_checkpoint()  # version 0, as a run does before training: not counted
    fedlab.engine.Engine.save_checkpoint = timed  # type: ignore[method-assign]
    start = time.perf_counter()
    engine.run(versions)
    end = time.perf_counter()
    hot = [seconds for version, seconds in calls if version >= 1]
    size = os.path.getsize(Path(run_dir) / "checkpoint.fl") if run_dir else 0
    return {
        "mode": mode,
        "engine": str(Path(fedlab.engine.__file__).parent),
        "params": sum(t.numel() for t in engine.params.values()),
        "model_mb": model_bytes / 2**20,
        "versions": versions,
        "checkpoints": len(hot),
        "hot_s_per_version": sum(hot) / versions,
        "hot_s_per_checkpoint_median": statistics.median(hot) if hot else 0.0,
        "end_wait_s": end - last_return[0] if hot else 0.0,
        "s_per_version": (end - start) / versions,
        "file_mb": size / 2**20,
    }


def export(revision: str, into: Path) -> Path:
    """The ``fedlab`` package of ``revision`` (strategies and clients inside it) under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "fedlab", "strategies", "clients"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for sub in ("strategies", "clients"):
        shutil.move(str(into / sub), str(into / "fedlab" / sub))
    return into


def measure(mode: str, versions: int, every: int, old: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    if old is not None:
        env["PYTHONPATH"] = f"{old}{os.pathsep}{env.get('PYTHONPATH', '')}"
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, str(Path(__file__)), "--worker", mode, "--versions", str(versions)]
        argv += ["--every", str(every)] + ([] if mode == "off" else ["--run-dir", tmp + "/run"])
        load = os.getloadavg()[0]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        result["load"] = load
        return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--before", metavar="REV", help="git revision of the engine to compare with")
    p.add_argument("--every", type=int, action="append", default=[], metavar="N")
    p.add_argument("--json", metavar="PATH", help="also write every measurement here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        every = args.every[0] if args.every else 1
        print(json.dumps(worker(args.worker, args.versions, every, args.run_dir)))
        return
    modes: list[tuple[str, int]] = [("off", 1), ("after", 1)]
    modes += [(f"after-every-{n}", n) for n in args.every]
    with tempfile.TemporaryDirectory() as tmp:
        old = export(args.before, Path(tmp)) if args.before else None
        if old is not None:
            modes.insert(1, ("before", 1))
        results: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            for mode, every in modes:
                r = measure(mode, args.versions, every, old if mode == "before" else None)
                r["repeat"] = repeat
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    print(
        "| mode | checkpoints | hot path s/version (median of repeats) | end wait s "
        "| s/version overall | checkpoint.fl MiB | load |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    for mode, _ in modes:
        rs = [r for r in results if r["mode"] == mode]
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        loads = ", ".join(f"{r['load']:.2f}" for r in rs)
        print(
            f"| {mode} | {rs[0]['checkpoints']} | {med['hot_s_per_version']:.4f} "
            f"| {med['end_wait_s']:.3f} | {med['s_per_version']:.3f} | {med['file_mb']:.1f} "
            f"| {loads} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
