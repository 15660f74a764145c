"""Small-scale reproduction of DP-BREM against DP-FedAvg with robust aggregators.

Gu, Li, Xiong (USENIX Security 2025) claim that at the same record-level DP noise, DP-BREM
(client momentum plus centered clipping around the previous aggregate) stays accurate under
ALIE and IPM, where DP-FedAvg with coordinate-wise median or with direct clipping of the client
updates degrades. This script checks that on scikit-learn's digits (MLP), ``--clients``
clients, with the ``dp-brem`` strategy's three aggregators, which share the clients, the
schedules and the noise calibration (noise std ``--noise`` x the tracked sensitivity, so the
same ``ε`` for all):

* ``dp-brem``: ``aggregator="centered"``, client momentum ``--momentum``.
* ``direct-clip``: clip each client's update to ``--tau`` around 0, average, add noise;
  client momentum ``--baseline-momentum`` (0: DP-FedAvg, plain clipped gradients).
* ``median``: coordinate-wise median of the updates plus noise (on the median itself: its
  sensitivity is one client's); client momentum ``--baseline-momentum``.

Attacks, each with ``--byzantine`` of the clients: none; ``alie`` (``mean - z std`` of the
honest updates, ``z`` = the reference code's ``4 z_max`` unless ``--alie-z``); ``ipm``
(``-ε`` x the honest mean, ``ε`` = ``--ipm-eps``). The attackers are omniscient: they craft
from the honest updates that are aggregated in the same version (momenta for DP-BREM), where
the reference code crafts from the Byzantine clients' own fresh gradients.

Usage::

    python benchmarks/repro_dp_brem.py --seeds 3 --plot dpbrem.png --json dpbrem.json

Runs go to ``--jobs`` worker processes (one torch thread each).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

from _common import Curve, band, mean_std, pyplot, run_parallel, train, write_json

METHODS = ("dp-brem", "direct-clip", "median")
AGGREGATOR = {"dp-brem": "centered", "direct-clip": "direct-clip", "median": "median"}
ATTACKS = ("none", "alie", "ipm")


def reference_alie_z(n: int, m: int) -> float:
    """The reference code's ALIE ``z``: ``4 Φ⁻¹(min((n - m - s) / (n - m), 0.95))``."""
    s = math.floor(n / 2 + 1) - m
    return 4 * statistics.NormalDist().inv_cdf(min((n - m - s) / (n - m), 0.95))


def run_one(method: str, attack: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run; returns the accuracy curve and the final ``ε``."""
    from fedlab.config import RunConfig

    byzantine = 0.0 if attack == "none" else args.byzantine
    attack_options: dict[str, Any] = {}
    if attack == "alie":
        attack_options = {"z": args.alie_z}
    elif attack == "ipm":
        attack_options = {"epsilon": args.ipm_eps}
    config = RunConfig(
        clients=args.clients,
        rounds=args.rounds,
        strategy="dp-brem",
        strategy_options={
            "aggregator": AGGREGATOR[method],
            "momentum": args.momentum if method == "dp-brem" else args.baseline_momentum,
            "noise_multiplier": args.noise,
            "record_clip": args.record_clip,
            "tau": args.tau,
            "batch_size": args.batch_size,
            "schedule_versions": args.rounds,
            "server_lr": args.lr,
        },
        workload="digits",
        model="mlp",
        partition="dirichlet" if args.alpha > 0 else "iid",
        alpha=args.alpha if args.alpha > 0 else 0.5,
        fraction=1.0,
        byzantine=byzantine,
        attack="" if attack == "none" else attack,
        attack_options=attack_options,
        seed=seed,
    )
    epsilon = Curve("strategy_epsilon")
    curve, seconds = train(
        config, every=args.eval_every, curve=Curve(finite_or=0.0), callbacks=[epsilon]
    )
    return {
        "method": method,
        "attack": attack,
        "byzantine": byzantine,
        "seed": seed,
        "curve": curve,
        "epsilon": epsilon.points[-1][1] if epsilon.points else math.nan,
        "seconds": seconds,
    }


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for method in args.methods:
        for attack in args.attacks:
            mine = [r for r in runs if r["method"] == method and r["attack"] == attack]
            final_mean, final_std = mean_std(r["curve"][-1][1] for r in mine)
            out.append(
                {
                    "method": method,
                    "attack": attack,
                    "final_mean": final_mean,
                    "final_std": final_std,
                    "epsilon": statistics.fmean(r["epsilon"] for r in mine),
                    "seconds": statistics.fmean(r["seconds"] for r in mine),
                }
            )
    return out


def label(attack: str, args: argparse.Namespace) -> str:
    return "no attack" if attack == "none" else f"{attack.upper()} {100 * args.byzantine:g}%"


def plot(runs: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """Test accuracy against version, one panel per attack, mean ± std band over seeds."""
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, len(args.attacks), figsize=(4.5 * len(args.attacks), 4))
    for ax, attack in zip(np.atleast_1d(axes), args.attacks, strict=True):
        for method in args.methods:
            mine = [r for r in runs if r["method"] == method and r["attack"] == attack]
            band(ax, [r["curve"] for r in mine], method)
        ax.set_title(label(attack, args))
        ax.set_xlabel("version")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy")
    np.atleast_1d(axes)[0].legend()
    fig.suptitle(f"digits MLP, {args.clients} clients, noise multiplier {args.noise:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1")
    parser.add_argument("--rounds", type=int, default=100, help="versions per run (= T)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.0, help="Dirichlet split (0: iid)")
    parser.add_argument("--byzantine", type=float, default=0.2, help="attacked fraction")
    parser.add_argument("--noise", type=float, default=0.5, help="noise multiplier z")
    parser.add_argument("--record-clip", type=float, default=1.0, help="R_0")
    parser.add_argument("--tau", type=float, default=0.3, help="C_0 of both clippings")
    parser.add_argument("--batch-size", type=int, default=32, help="B")
    parser.add_argument("--momentum", type=float, default=0.9, help="DP-BREM's client beta")
    parser.add_argument("--baseline-momentum", type=float, default=0.0, help="baselines' beta")
    parser.add_argument("--lr", type=float, default=1.0, help="eta_0 (decays to 0.1 eta_0)")
    parser.add_argument("--alie-z", type=float, default=0.0, help="0: the reference's 4 z_max")
    parser.add_argument("--ipm-eps", type=float, default=1.0)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated subset")
    parser.add_argument("--plot", help="write the accuracy curves to this PNG")
    parser.add_argument("--json", help="write curves and the summary to this JSON file")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    args.attacks = args.attacks.split(",")
    for m in args.methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for a in args.attacks:
        if a not in ATTACKS:
            parser.error(f"unknown attack {a!r}; choose from {', '.join(ATTACKS)}")
    if args.alie_z == 0:
        m = max(1, math.floor(args.byzantine * args.clients + 0.5))
        args.alie_z = reference_alie_z(args.clients, m)

    start = time.perf_counter()
    jobs = [(m, a, s) for s in range(args.seeds) for m in args.methods for a in args.attacks]
    runs = run_parallel(run_one, [(*job, args) for job in jobs], args.jobs)
    summary = summarise(runs, args)
    wall = time.perf_counter() - start

    print(
        f"digits MLP, {args.clients} clients ({'iid' if args.alpha <= 0 else args.alpha}), "
        f"{args.rounds} versions, B {args.batch_size}, R {args.record_clip:g}, tau "
        f"{args.tau:g}, noise multiplier {args.noise:g}, beta {args.momentum:g} (baselines "
        f"{args.baseline_momentum:g}), lr {args.lr:g}, ALIE z {args.alie_z:.3f}, IPM eps "
        f"{args.ipm_eps:g}, {args.seeds} seeds, {wall:.0f} s"
    )
    head = " | ".join(label(a, args) for a in args.attacks)
    print(f"| method | {head} | epsilon | s/run |")
    print("|---|" + "---:|" * (len(args.attacks) + 2))
    for method in args.methods:
        rows = [s for s in summary if s["method"] == method]
        cells = " | ".join(f"{s['final_mean']:.4f} ± {s['final_std']:.4f}" for s in rows)
        eps = rows[0]["epsilon"]
        eps_cell = f"{eps:.2f}" if math.isfinite(eps) else "not computed"
        secs = statistics.fmean(s["seconds"] for s in rows)
        print(f"| {method} | {cells} | {eps_cell} | {secs:.1f} |")
    if args.plot:
        plot(runs, args, args.plot)
    if args.json:
        write_json(args.json, {"args": vars(args), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
