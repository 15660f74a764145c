"""Small-scale reproduction of FRL (Federated Rank Learning) under poisoning.

Mozaffari, Shejwalkar, Houmansadr (USENIX Security 2023) claim that FRL, which trains a
supermask over frozen random weights and aggregates the clients' edge rankings by a vote, is
about as accurate as FedAvg without attack and degrades little with 10-20% malicious clients,
where FedAvg, trimmed-mean and Multi-Krum degrade much more; and that its uploads are about
``32 / ceil(log2 n_layer)`` times smaller than FedAvg's. This script checks that on
scikit-learn's digits (MLP), ``--clients`` clients with a Dirichlet(``--alpha``) label split,
``--fraction`` of them per version, each attacked as in the paper where fedlab has it:

* ``fedavg``: FedAvg; malicious clients send ``--scale`` x their update (``scaling``; the
  paper's naive attack uses 1e5).
* ``trimmed-mean``: coordinate-wise trimmed mean (``trim`` ``--trim``) under ``min-max``
  (the NDSS'21 optimization attack, ``std`` direction).
* ``multi-krum``: Multi-Krum (``f`` = ``--krum-f``) under ``min-max``.
* ``frl``: FRL (sparsity 0.5) under ``reversed-ranking`` (the paper's worst-case rank attack).

Every method runs ``--local-epochs`` passes with batch ``--batch-size``; client lr
``--frl-lr`` for FRL (its default 0.4, on scores) and ``--lr`` for the others.

Usage::

    python benchmarks/repro_frl.py --seeds 3 --rounds 80 --plot frl.png --json frl.json

Runs go to ``--jobs`` worker processes (one torch thread each).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from _common import Curve, mean_std, pyplot, run_parallel, train, write_json

METHODS = ("fedavg", "trimmed-mean", "multi-krum", "frl")
ATTACK = {
    "fedavg": "scaling",
    "trimmed-mean": "min-max",
    "multi-krum": "min-max",
    "frl": "reversed-ranking",
}


def run_one(method: str, byzantine: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run; returns the accuracy curve and the summed upload-bit metrics."""
    from fedlab.config import RunConfig

    options: dict[str, Any] = {}
    if method == "trimmed-mean":
        options = {"trim": args.trim}
    elif method == "multi-krum":
        options = {"f": args.krum_f}
    attack, attack_options = "", {}
    if byzantine > 0:
        attack = ATTACK[method]
        if attack == "scaling":
            attack_options = {"factor": args.scale}
    config = RunConfig(
        clients=args.clients,
        rounds=args.rounds,
        strategy=method,
        strategy_options=options,
        workload="digits",
        model="mlp",
        partition="dirichlet",
        alpha=args.alpha,
        fraction=args.fraction,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.frl_lr if method == "frl" else args.lr,
        byzantine=byzantine,
        attack=attack,
        attack_options=attack_options,
        seed=seed,
    )
    bits = {"upload_bits": 0.0, "fedavg_upload_bits": 0.0, "versions": 0}

    class Bits:
        def on_version(self, engine: Any, row: dict[str, Any]) -> None:
            if "strategy_upload_bits" in row:
                bits["upload_bits"] += float(row["strategy_upload_bits"])
                bits["fedavg_upload_bits"] += float(row["strategy_fedavg_upload_bits"])
                bits["versions"] += 1

    curve, seconds = train(
        config, every=args.eval_every, curve=Curve(finite_or=0.0), callbacks=[Bits()]
    )
    return {
        "method": method,
        "byzantine": byzantine,
        "seed": seed,
        "curve": curve,
        "bits": bits,
        "seconds": seconds,
    }


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for method in args.methods:
        for byz in args.byzantine:
            mine = [r for r in runs if r["method"] == method and r["byzantine"] == byz]
            final_mean, final_std = mean_std(r["curve"][-1][1] for r in mine)
            out.append(
                {
                    "method": method,
                    "byzantine": byz,
                    "final_mean": final_mean,
                    "final_std": final_std,
                    "seconds": statistics.fmean(r["seconds"] for r in mine),
                }
            )
    return out


def plot(summary: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """Final test accuracy against the malicious fraction, mean ± std over seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in args.methods:
        rows = [s for s in summary if s["method"] == method]
        ax.errorbar(
            [100 * s["byzantine"] for s in rows],
            [s["final_mean"] for s in rows],
            yerr=[s["final_std"] for s in rows],
            marker="o",
            capsize=3,
            label=f"{method} ({ATTACK[method]})",
        )
    ax.set_xlabel("malicious clients (%)")
    ax.set_ylabel(f"test accuracy after {args.rounds} versions")
    ax.set_title(
        f"digits MLP, {args.clients} clients, Dirichlet({args.alpha:g}), {args.seeds} seeds"
    )
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1")
    parser.add_argument("--rounds", type=int, default=80, help="versions per run")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.5, help="clients per version")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label split")
    parser.add_argument("--byzantine", default="0,0.1,0.2", help="malicious fractions")
    parser.add_argument("--local-epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1, help="client lr of the baselines")
    parser.add_argument("--frl-lr", type=float, default=0.4, help="FRL's score lr")
    parser.add_argument("--scale", type=float, default=1e5, help="scaling factor vs FedAvg")
    parser.add_argument("--trim", type=float, default=0.2, help="trimmed-mean trim per end")
    parser.add_argument("--krum-f", type=int, default=5, help="Multi-Krum's assumed attackers")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--plot", help="write the accuracy plot to this PNG")
    parser.add_argument("--json", help="write curves and the summary to this JSON file")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    for m in args.methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    args.byzantine = [float(b) for b in args.byzantine.split(",")]

    start = time.perf_counter()
    jobs = [(m, b, s) for s in range(args.seeds) for m in args.methods for b in args.byzantine]
    # Longest first (FRL), so the pool does not end on one straggler.
    jobs.sort(key=lambda j: j[0] != "frl")
    runs = run_parallel(run_one, [(*job, args) for job in jobs], args.jobs)
    summary = summarise(runs, args)
    wall = time.perf_counter() - start

    print(
        f"digits MLP, {args.clients} clients, Dirichlet({args.alpha:g}), fraction "
        f"{args.fraction:g}, {args.rounds} versions, {args.local_epochs:g} local epochs, batch "
        f"{args.batch_size}, lr {args.lr:g} (FRL {args.frl_lr:g}), {args.seeds} seeds, "
        f"{wall:.0f} s"
    )
    head = " | ".join(f"{100 * b:g}% malicious" for b in args.byzantine)
    print(f"| method (attack) | {head} | s/run |")
    print("|---|" + "---:|" * (len(args.byzantine) + 1))
    for method in args.methods:
        rows = [s for s in summary if s["method"] == method]
        cells = " | ".join(f"{s['final_mean']:.4f} ± {s['final_std']:.4f}" for s in rows)
        secs = statistics.fmean(s["seconds"] for s in rows)
        print(f"| {method} ({ATTACK[method]}) | {cells} | {secs:.1f} |")
    frl = [r["bits"] for r in runs if r["method"] == "frl" and r["bits"]["versions"]]
    if frl:
        up = sum(b["upload_bits"] for b in frl) / sum(b["versions"] for b in frl)
        fa = sum(b["fedavg_upload_bits"] for b in frl) / sum(b["versions"] for b in frl)
        print(
            f"upload per version: FRL {up / 8e6:.3f} MB vs FedAvg {fa / 8e6:.3f} MB "
            f"({fa / up:.2f}x smaller)"
        )
    if args.plot:
        plot(summary, args, args.plot)
    if args.json:
        write_json(args.json, {"args": vars(args), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
