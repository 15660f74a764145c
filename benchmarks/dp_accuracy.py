"""Accuracy against epsilon for sample-level (DP-SGD) and client-level (DP-FedAvg) DP.

Two settings, each at a few noise multipliers plus a non-private baseline:

* ``sample``: record-level DP-SGD on every client (``--dp sample``), scikit-learn's digits with
  the MLP, ``--sample-clients`` clients (IID), ``--sample-fraction`` of them per version, per-record
  clipping ``--max-grad-norm``. The epsilon is the worst client's (``client_epsilon_max``) at
  each client's default ``δ = 1 / (10 n_i)``.
* ``client``: client-level DP-FedAvg with central noise (``--dp client``) on the synthetic
  workload (logistic regression), ``--client-clients`` clients, ``--fraction`` per version,
  update clipping ``--clip-norm``, and one run with local noise for comparison. The epsilon is
  the run's (``strategy_epsilon``) at ``δ = 1 / (10 N)``.

Usage::

    python benchmarks/dp_accuracy.py --json dp.json

Runs go to ``--jobs`` worker processes (one torch thread each). Prints a table (final test
accuracy, epsilon, seconds per run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def run_one(kind: str, noise: str, z: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run; returns final accuracy, the epsilon spent and the wall time."""
    import torch

    from fedlab.callbacks import Evaluator
    from fedlab.config import RunConfig
    from fedlab.run import build_engine, build_workload

    torch.set_num_threads(1)
    common: dict[str, Any] = dict(rounds=args.rounds, seed=seed, local_steps=args.local_steps)
    if kind == "sample":
        config = RunConfig(
            **common,
            fraction=args.sample_fraction,
            clients=args.sample_clients,
            workload="digits",
            model="mlp",
            partition="iid",
            batch_size=args.batch_size,
            lr=args.sample_lr,
            **(
                dict(dp="sample", noise_multiplier=z, max_grad_norm=args.max_grad_norm)
                if z > 0
                else {}
            ),
        )
        key = "client_epsilon_max"
    else:
        config = RunConfig(
            **common,
            fraction=args.fraction,
            clients=args.client_clients,
            workload="synthetic",
            batch_size=args.batch_size,
            lr=args.client_lr,
            strategy_options={"server_lr": args.server_lr},
            **(
                dict(dp="client", dp_noise=noise, noise_multiplier=z, clip_norm=args.clip_norm)
                if z > 0
                else {}
            ),
        )
        key = "strategy_epsilon"
    workload = build_workload(config)
    evaluator = Evaluator(workload, every=args.rounds, final=args.rounds)
    seen: dict[str, float] = {}

    class Record:
        def on_version(self, engine: Any, row: dict[str, Any]) -> None:
            if key in row:
                seen["epsilon"] = max(seen.get("epsilon", 0.0), float(row[key]))
            if "accuracy" in row:
                seen["accuracy"] = float(row["accuracy"])

    engine = build_engine(config, callbacks=[evaluator, Record()], workload=workload)
    start = time.perf_counter()
    engine.run(args.rounds)
    engine.transport.close()
    return {
        "kind": kind,
        "noise": noise if z > 0 else "none",
        "z": z,
        "seed": seed,
        "accuracy": seen.get("accuracy", math.nan),
        "epsilon": seen.get("epsilon", math.nan) if z > 0 else None,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0 .. SEEDS-1")
    parser.add_argument("--rounds", type=int, default=30, help="versions per run")
    parser.add_argument("--fraction", type=float, default=0.1, help="client level: per version")
    parser.add_argument("--sample-fraction", type=float, default=0.5, help="sample level")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="(expected) batch size")
    parser.add_argument("--sample-clients", type=int, default=20)
    parser.add_argument("--sample-lr", type=float, default=0.5)
    parser.add_argument("--sample-z", default="0,0.7,1.0,2.0", help="DP-SGD sigmas (0: no DP)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--client-clients", type=int, default=500)
    parser.add_argument("--client-lr", type=float, default=0.1)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--client-z", default="0,0.5,1.0,2.0", help="DP-FedAvg z (0: no DP)")
    parser.add_argument("--local-z", default="1.0", help="z of the local-noise runs")
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--json", help="write every run and the summary to this JSON file")
    args = parser.parse_args()

    plan: list[tuple[str, str, float]] = []
    plan += [("sample", "sample", float(z)) for z in args.sample_z.split(",")]
    plan += [("client", "central", float(z)) for z in args.client_z.split(",")]
    plan += [("client", "local", float(z)) for z in args.local_z.split(",") if z]
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(run_one, kind, noise, z, seed, args)
            for seed in range(args.seeds)
            for kind, noise, z in plan
        ]
        runs = [f.result() for f in futures]
    wall = time.perf_counter() - start

    summary = []
    for kind, noise, z in plan:
        mine = [
            r for r in runs if r["kind"] == kind and r["z"] == z and (r["noise"] == noise or z == 0)
        ]
        acc = [r["accuracy"] for r in mine]
        summary.append(
            {
                "kind": kind,
                "noise": noise if z > 0 else "none",
                "z": z,
                "epsilon": statistics.fmean(r["epsilon"] for r in mine) if z > 0 else None,
                "accuracy_mean": statistics.fmean(acc),
                "accuracy_std": statistics.pstdev(acc),
                "seconds": statistics.fmean(r["seconds"] for r in mine),
            }
        )
    print(
        f"{args.rounds} versions, fraction {args.sample_fraction:g} (sample level) and "
        f"{args.fraction:g} (client level), {args.local_steps} local steps, "
        f"batch {args.batch_size}, {args.seeds} seeds, {wall:.0f} s in all"
    )
    print("| level | workload | noise | z | epsilon | accuracy | s/run |")
    print("|---|---|---|---:|---:|---:|---:|")
    for s in summary:
        workload = (
            f"digits MLP, {args.sample_clients} clients"
            if s["kind"] == "sample"
            else f"synthetic logreg, {args.client_clients} clients"
        )
        eps = "∞ (no DP)" if s["epsilon"] is None else f"{s['epsilon']:.2f}"
        print(
            f"| {s['kind']} | {workload} | {s['noise']} | {s['z']:g} | {eps} | "
            f"{s['accuracy_mean']:.4f} ± {s['accuracy_std']:.4f} | {s['seconds']:.1f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
