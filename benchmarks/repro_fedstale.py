"""Reproduction: FedStale(beta=0.5) against FedAvg (beta=0) and FedVARP (beta=1).

The FedStale paper's setting (Rodio & Neglia, 2024), scaled down to scikit-learn's digits so
it runs in minutes on a laptop: 24 clients, participation probabilities tiled ``[1.0, 0.5]``
over client ids (even clients always take part, odd ones with probability 0.5, through the
``bernoulli`` participation model), the probabilities unknown to the server (FedAU's
estimate replaces ``1 / p_i``), and data heterogeneity ``h`` made by label swapping: even
clients relabel a fraction ``h`` of their 0s and 1s as each other, odd clients their 8s and
9s. All three methods are ``fedstale`` with a different ``beta``, so they share everything
else. Reported: test accuracy of the final model, mean and standard deviation over seeds.

Usage::

    python benchmarks/repro_fedstale.py --json fedstale.json --plot fedstale.png
    python benchmarks/repro_fedstale.py --rounds 50 --seeds 2 --swaps 0,1   # quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from typing import Any

METHODS = {"FedAvg": 0.0, "FedStale": 0.5, "FedVARP": 1.0}


def run_one(job: tuple[str, float, int, argparse.Namespace]) -> dict[str, Any]:
    """Train one (method, h, seed) and return its final test accuracy."""
    import torch

    from fedlab.callbacks import Evaluator
    from fedlab.config import RunConfig
    from fedlab.data import make_workload
    from fedlab.sim import build_engine

    method, swap, seed, args = job
    torch.set_num_threads(1)
    config = RunConfig(
        workload="digits",
        model=args.model,
        clients=args.clients,
        rounds=args.rounds,
        strategy="fedstale",
        strategy_options={"beta": METHODS[method], "server_lr": args.server_lr},
        participation="bernoulli",
        participation_options={"recipe": "tiled", "values": [1.0, 0.5]},
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=seed,
    )
    # build_workload does not know label_swap yet, so the workload is built here.
    workload = make_workload(
        "digits", num_clients=args.clients, seed=seed, model=args.model, label_swap=swap
    )
    evaluator = Evaluator(workload, every=args.rounds, final=args.rounds)
    engine = build_engine(config, workload=workload)
    start = time.perf_counter()
    engine.run(args.rounds)
    return {
        "method": method,
        "h": swap,
        "seed": seed,
        **evaluator.evaluate(engine.params),
        "seconds": time.perf_counter() - start,
    }


def summarize(results: list[dict[str, Any]]) -> dict[tuple[str, float], tuple[float, float]]:
    """``(method, h) -> (mean, std)`` of the final accuracy over seeds."""
    out = {}
    for method in METHODS:
        for swap in sorted({r["h"] for r in results}):
            accs = [r["accuracy"] for r in results if r["method"] == method and r["h"] == swap]
            if accs:
                std = statistics.stdev(accs) if len(accs) > 1 else 0.0
                out[method, swap] = (statistics.mean(accs), std)
    return out


def table(summary: dict[tuple[str, float], tuple[float, float]]) -> str:
    """Markdown table: one row per h, one column per method, and whether FedStale wins."""
    swaps = sorted({h for _, h in summary})
    lines = [
        "| h | " + " | ".join(METHODS) + " | FedStale >= max(others) |",
        "|---:|" + "---:|" * len(METHODS) + ":---:|",
    ]
    for h in swaps:
        cells = [f"{summary[m, h][0]:.4f} ± {summary[m, h][1]:.4f}" for m in METHODS]
        best_other = max(summary[m, h][0] for m in METHODS if m != "FedStale")
        wins = "yes" if summary["FedStale", h][0] >= best_other else "no"
        lines.append(f"| {h:g} | " + " | ".join(cells) + f" | {wins} |")
    return "\n".join(lines)


def plot(summary: dict[tuple[str, float], tuple[float, float]], path: str) -> None:
    """Final accuracy against heterogeneity h, one line per method with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swaps = sorted({h for _, h in summary})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in METHODS:
        means = [summary[method, h][0] for h in swaps]
        stds = [summary[method, h][1] for h in swaps]
        ax.errorbar(swaps, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xlabel("data heterogeneity h (label swap)")
    ax.set_ylabel("final test accuracy")
    ax.set_title("digits, 24 clients, p tiled [1.0, 0.5]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", default="0,0.5,1", help="values of h, comma separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="PATH", help="write every run and the summary here")
    parser.add_argument("--plot", metavar="PATH", help="write the accuracy-vs-h plot here")
    args = parser.parse_args(argv)

    swaps = [float(s) for s in args.swaps.split(",")]
    jobs = [(m, h, seed, args) for h in swaps for m in METHODS for seed in range(args.seeds)]
    start = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = pool.map(run_one, jobs)
    else:
        results = [run_one(job) for job in jobs]
    wall = time.perf_counter() - start
    summary = summarize(results)
    print(table(summary))
    print(f"\n{len(jobs)} runs in {wall:.0f} s with {args.workers} workers")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
                    "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                    "platform": platform.platform(),
                    "wall_seconds": wall,
                    "runs": results,
                    "summary": [
                        {"method": m, "h": h, "mean": mu, "std": sd}
                        for (m, h), (mu, sd) in summary.items()
                    ],
                },
                f,
                indent=2,
            )
    if args.plot:
        plot(summary, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
