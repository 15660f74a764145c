"""Small-scale reproduction of FedAU's claim under label-correlated participation.

Wang and Ji (ICLR 2024) claim that under unknown, heterogeneous participation FedAU beats
FedAvg averaged over participants and FedAvg averaged over all clients, and comes close to
weighting by the true probabilities. This script checks that on scikit-learn's digits split
over ``--clients`` clients by Dirichlet(0.1) labels, with the paper's Bernoulli participation
whose probabilities follow each client's label mix (mean 0.1, floor 0.02), so that
frequent participants over-represent some labels and a plain average is biased.

Methods (``FedAU(weighting=...)`` and ``KnownProbability``), same client lr for all:

* ``fedau``: FedAU, ``K`` = infinity, server lr 1.
* ``fedavg-participating``: mean of the participants' deltas, server lr 1.
* ``fedavg-all``: sum of the participants' deltas over N, server lr ``1 / mean_p`` (10), the
  paper's convention that makes its expected step the size of the others'.
* ``known-probability``: ``1 / p_n`` weights with the true ``p_n``, server lr 1.

Usage::

    python benchmarks/repro_fedau.py --seeds 3 --rounds 1000 --plot fedau.png --json fedau.json

Runs go to ``--jobs`` worker processes (one torch thread each).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

from _common import band, mean_std, pyplot, run_parallel, train, write_json

METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedau": ("fedau", {}),
    "fedavg-participating": ("fedau", {"weighting": "participating"}),
    "fedavg-all": ("fedau", {"weighting": "all"}),  # server_lr set from mean_p below
    "known-probability": ("known-probability", {}),
}


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training run; returns the accuracy curve ``[(version, accuracy), ...]``."""
    from fedlab.config import RunConfig

    strategy, options = METHODS[method]
    options = dict(options)
    if method == "fedavg-all":
        options["server_lr"] = 1 / args.mean_p
    config = RunConfig(
        clients=args.clients,
        rounds=args.rounds,
        strategy=strategy,
        strategy_options=options,
        workload="digits",
        model=args.model,
        partition="dirichlet",
        alpha=args.alpha,
        participation="bernoulli",
        participation_options={"recipe": "fedau", "mean_p": args.mean_p},
        local_steps=args.local_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=seed,
    )
    curve, seconds = train(config, every=args.eval_every)
    return {"method": method, "seed": seed, "curve": curve, "seconds": seconds}


def summarise(runs: list[dict[str, Any]], rounds: int) -> dict[str, dict[str, float]]:
    """Per method: mean and std over seeds of final accuracy and of the last-10% average."""
    out: dict[str, dict[str, float]] = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        final_mean, final_std = mean_std(r["curve"][-1][1] for r in mine)
        last10_mean, last10_std = mean_std(
            statistics.fmean(a for v, a in r["curve"] if v > rounds - math.ceil(rounds / 10))
            for r in mine
        )
        out[method] = {
            "final_mean": final_mean,
            "final_std": final_std,
            "last10_mean": last10_mean,
            "last10_std": last10_std,
            "seconds": statistics.fmean(r["seconds"] for r in mine),
        }
    return out


def plot(runs: list[dict[str, Any]], path: str) -> None:
    """Accuracy against version, mean over seeds with a one-std band, one line per method."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        curves = [r["curve"] for r in runs if r["method"] == method]
        band(ax, curves, method)
    ax.set_xlabel("version")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"digits, Dirichlet(0.1), FedAU Bernoulli participation ({len(curves)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1")
    parser.add_argument("--rounds", type=int, default=1000, help="versions per run")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet label split")
    parser.add_argument("--mean-p", type=float, default=0.1, help="mean participation")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05, help="client learning rate")
    parser.add_argument("--model", default="mlp", help="digits model: mlp or cnn (slower)")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--plot", help="write the accuracy plot to this PNG")
    parser.add_argument("--json", help="write curves and the summary to this JSON file")
    args = parser.parse_args()
    chosen = args.methods.split(",")
    for m in chosen:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for m in list(METHODS):
        if m not in chosen:
            del METHODS[m]

    start = time.perf_counter()
    jobs = [(m, s) for s in range(args.seeds) for m in METHODS]
    runs = run_parallel(run_one, [(*job, args) for job in jobs], args.jobs)
    summary = summarise(runs, args.rounds)
    wall = time.perf_counter() - start

    print(
        f"digits, {args.clients} clients, Dirichlet({args.alpha}), bernoulli recipe=fedau "
        f"mean_p={args.mean_p}, {args.rounds} versions, {args.local_steps} local steps, "
        f"lr {args.lr}, {args.seeds} seeds, {wall:.0f} s"
    )
    print("| method | final accuracy | last-10% accuracy | s/run |")
    print("|---|---:|---:|---:|")
    for method, s in summary.items():
        print(
            f"| {method} | {s['final_mean']:.4f} ± {s['final_std']:.4f} "
            f"| {s['last10_mean']:.4f} ± {s['last10_std']:.4f} | {s['seconds']:.1f} |"
        )
    if args.plot:
        plot(runs, args.plot)
    if args.json:
        write_json(args.json, {"args": vars(args), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
