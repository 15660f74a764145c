"""Reproduction: FedStale(beta=0.5) against FedAvg (beta=0) and FedVARP (beta=1).

The FedStale paper's setting (Rodio & Neglia, 2024), scaled down to scikit-learn's digits so
it runs in minutes on a laptop: 24 clients, participation probabilities tiled ``[1.0, 0.5]``
over client ids (even clients always take part, odd ones with probability 0.5, through the
``bernoulli`` participation model), the probabilities unknown to the server (FedAU's
estimate replaces ``1 / p_i``), and data heterogeneity ``h`` made by label swapping: even
clients relabel a fraction ``h`` of their 0s and 1s as each other, odd clients their 8s and
9s. All three methods are ``fedstale`` with a different ``beta``, so they share everything
else. The paper's claim is about the trajectory at a fixed budget, so the global model is
evaluated every ``--eval-every`` versions and the script reports test accuracy at several
budgets (``--budgets``, in versions) and the area under the accuracy curve (mean accuracy
over the evaluation points up to the last budget), mean and standard deviation over seeds,
and in how many seeds FedStale is at least the better of FedAvg and FedVARP (paired by seed).

Usage::

    python benchmarks/repro_fedstale.py --json fedstale.json --plot fedstale.png
    python benchmarks/repro_fedstale.py --rounds 50 --seeds 2 --swaps 0,1   # quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any

from _common import mean_std, pyplot, run_parallel, write_json

METHODS = {"FedAvg": 0.0, "FedStale": 0.5, "FedVARP": 1.0}


def run_one(job: tuple[str, float, int, argparse.Namespace]) -> dict[str, Any]:
    """Train one (method, h, seed); return its accuracy curve (every ``eval_every`` versions)."""
    import torch

    from fedlab.callbacks import Evaluator
    from fedlab.config import RunConfig
    from fedlab.data import make_workload
    from fedlab.run import build_engine

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
    evaluator = Evaluator(workload)
    engine = build_engine(config, workload=workload)
    start = time.perf_counter()
    curve: dict[int, float] = {0: evaluator.evaluate(engine.params)["accuracy"]}
    for version in range(1, args.rounds + 1):
        engine.run(version)
        if version % args.eval_every == 0 or version in args.budget_list:
            curve[version] = evaluator.evaluate(engine.params)["accuracy"]
    return {
        "method": method,
        "h": swap,
        "seed": seed,
        **evaluator.evaluate(engine.params),
        "curve": curve,
        "seconds": time.perf_counter() - start,
    }


def metrics_of(run: dict[str, Any], budgets: list[int]) -> dict[str, float]:
    """Accuracy at each budget, and the area under the curve up to the last budget."""
    curve = {int(k): v for k, v in run["curve"].items()}
    out = {f"@{b}": curve[b] for b in budgets}
    upto = [v for k, v in sorted(curve.items()) if 0 < k <= budgets[-1]]
    out["AUC"] = statistics.mean(upto)
    return out


def summarize(
    results: list[dict[str, Any]], budgets: list[int]
) -> dict[tuple[str, float, str], tuple[float, float, int]]:
    """``(method, h, metric) -> (mean, std, seeds)``; for FedStale the last field counts the
    seeds where it is at least the better of FedAvg and FedVARP (paired by seed)."""
    out = {}
    by = {(r["method"], r["h"], r["seed"]): metrics_of(r, budgets) for r in results}
    seeds = sorted({r["seed"] for r in results})
    for method in METHODS:
        for swap in sorted({r["h"] for r in results}):
            for key in [f"@{b}" for b in budgets] + ["AUC"]:
                vals = [by[method, swap, s][key] for s in seeds if (method, swap, s) in by]
                if not vals:
                    continue
                wins = 0
                if method == "FedStale":
                    wins = sum(
                        by["FedStale", swap, s][key]
                        >= max(by["FedAvg", swap, s][key], by["FedVARP", swap, s][key])
                        for s in seeds
                    )
                out[method, swap, key] = (*mean_std(vals, sample=True), wins)
    return out


def table(summary: dict[tuple[str, float, str], tuple[float, float, int]]) -> str:
    """Markdown table: one row per (h, metric), one column per method, and whether FedStale's
    mean is at least the best other mean (with the per-seed win count)."""
    swaps = sorted({h for _, h, _ in summary})
    keys = list(dict.fromkeys(k for _, _, k in summary))
    lines = [
        "| h | metric | " + " | ".join(METHODS) + " | FedStale >= max(others)? (seeds) |",
        "|---:|---|" + "---:|" * len(METHODS) + ":---:|",
    ]
    for h in swaps:
        for key in keys:
            cells = [f"{summary[m, h, key][0]:.4f} ± {summary[m, h, key][1]:.4f}" for m in METHODS]
            best_other = max(summary[m, h, key][0] for m in METHODS if m != "FedStale")
            mean_wins = "yes" if summary["FedStale", h, key][0] >= best_other else "no"
            wins = summary["FedStale", h, key][2]
            lines.append(f"| {h:g} | {key} | " + " | ".join(cells) + f" | {mean_wins} ({wins}) |")
    return "\n".join(lines)


def plot(summary: dict[tuple[str, float, str], tuple[float, float, int]], path: str) -> None:
    """Area under the accuracy curve against heterogeneity h, one line per method."""
    plt = pyplot()
    swaps = sorted({h for _, h, _ in summary})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in METHODS:
        means = [summary[method, h, "AUC"][0] for h in swaps]
        stds = [summary[method, h, "AUC"][1] for h in swaps]
        ax.errorbar(swaps, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xlabel("data heterogeneity h (label swap)")
    ax.set_ylabel("mean test accuracy over the run (AUC)")
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
    parser.add_argument("--eval-every", type=int, default=5, help="versions between evaluations")
    parser.add_argument(
        "--budgets", default="25,50,100,150", help="versions at which accuracy is reported"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", metavar="PATH", help="write every run and the summary here")
    parser.add_argument("--plot", metavar="PATH", help="write the accuracy-vs-h plot here")
    args = parser.parse_args(argv)

    swaps = [float(s) for s in args.swaps.split(",")]
    args.budget_list = sorted(int(b) for b in args.budgets.split(","))
    if not args.budget_list or args.budget_list[-1] > args.rounds or args.budget_list[0] < 1:
        parser.error(f"budgets must be in 1..{args.rounds}")
    jobs = [(m, h, seed, args) for h in swaps for m in METHODS for seed in range(args.seeds)]
    start = time.perf_counter()
    if args.workers > 1:
        results = run_parallel(run_one, [(job,) for job in jobs], args.workers)
    else:
        results = [run_one(job) for job in jobs]
    wall = time.perf_counter() - start
    summary = summarize(results, args.budget_list)
    print(table(summary))
    print(f"\n{len(jobs)} runs in {wall:.0f} s with {args.workers} workers")
    if args.json:
        write_json(
            args.json,
            {
                "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
                "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                "platform": platform.platform(),
                "wall_seconds": wall,
                "runs": results,
                "summary": [
                    {"method": m, "h": h, "metric": k, "mean": mu, "std": sd}
                    for (m, h, k), (mu, sd, _) in summary.items()
                ],
            },
            indent=2,
        )
    if args.plot:
        plot(summary, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
