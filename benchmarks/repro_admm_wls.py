"""Small-scale reproduction of ADMM-WLS: MSD against iteration over noisy links.

Lari, Arablouei, Gogineni, Werner (arXiv 2409.13451) claim that standard FL-ADMM over noisy
links accumulates the channel noise (through the dual variables) while their dual-free local
update keeps a bounded, lower steady-state MSD, also under random scheduling. The paper's
iteration could not be checked (ALGORITHMS.md §5): ``variant="proposed"`` of ``admm-wls`` is
a reconstruction, so this script measures that reconstruction, not the paper's algorithm.

Settings: the ``wls`` workload (``y = X w° + nu``, diagonal weights, MSD = ``||z - w°||^2``
against the true ``w°``), ``--clients`` clients, penalty ``--rho``; for each of
``standard`` / ``proposed`` x link noise {0, ``--noise``} x fraction {1.0, ``--partial``}.

Usage::

    python benchmarks/repro_admm_wls.py --seeds 3 --rounds 500 --plot admm.png --json admm.json

Runs go to ``--jobs`` worker processes (one torch thread each).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

from _common import Curve, mean_std, pyplot, run_parallel, train, write_json

VARIANTS = ("standard", "proposed")


def run_one(
    variant: str, noise: float, fraction: float, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One run; returns the curve ``[(version, msd), ...]`` of the global model."""
    from fedlab.config import RunConfig

    config = RunConfig(
        clients=args.clients,
        rounds=args.rounds,
        strategy="admm-wls",
        strategy_options={"variant": variant, "rho": args.rho, "link_noise": noise},
        workload="wls",
        fraction=fraction,
        seed=seed,
    )
    curve, seconds = train(config, every=1, curve=Curve("msd"))
    return {
        "variant": variant,
        "noise": noise,
        "fraction": fraction,
        "seed": seed,
        "curve": curve,
        "seconds": seconds,
    }


def db(x: float) -> float:
    return 10 * math.log10(x) if x > 0 else -math.inf


def steady(run: dict[str, Any], rounds: int) -> float:
    """Steady-state MSD in dB: the mean linear MSD over the last 20% of iterations."""
    cut = rounds - math.ceil(rounds / 5)
    return db(statistics.fmean(m for v, m in run["curve"] if v > cut))


def settings(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    return [
        (variant, noise, fraction)
        for fraction in (1.0, args.partial)
        for noise in (0.0, args.noise)
        for variant in VARIANTS
    ]


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for variant, noise, fraction in settings(args):
        mine = [
            r
            for r in runs
            if (r["variant"], r["noise"], r["fraction"]) == (variant, noise, fraction)
        ]
        steady_mean, steady_std = mean_std(steady(r, args.rounds) for r in mine)
        out.append(
            {
                "variant": variant,
                "noise": noise,
                "fraction": fraction,
                "steady_db_mean": steady_mean,
                "steady_db_std": steady_std,
                "seconds": statistics.fmean(r["seconds"] for r in mine),
            }
        )
    return out


def plot(runs: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """MSD in dB against iteration, mean over seeds (of the linear MSD), one panel per
    fraction, one line per variant x noise."""
    import numpy as np

    plt = pyplot()
    fractions = (1.0, args.partial)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    styles = {"standard": "-", "proposed": "--"}
    for ax, fraction in zip(axes, fractions, strict=True):
        for variant, noise, frac in settings(args):
            if frac != fraction:
                continue
            curves = [
                r["curve"]
                for r in runs
                if (r["variant"], r["noise"], r["fraction"]) == (variant, noise, fraction)
            ]
            versions = np.array([v for v, _ in curves[0]])
            msd = np.array([[m for _, m in c] for c in curves]).mean(0)
            ax.plot(
                versions,
                10 * np.log10(np.maximum(msd, 1e-300)),
                styles[variant],
                label=f"{variant}, link noise {noise:g}",
            )
        ax.set_title(f"fraction {fraction:g} ({args.clients} clients, rho {args.rho:g})")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("MSD (dB)")
    lo = min(ax.get_ylim()[0] for ax in axes)
    axes[0].set_ylim(max(lo, -80), None)
    fig.suptitle(f"ADMM-WLS (proposed = reconstruction), mean of {args.seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1")
    parser.add_argument("--rounds", type=int, default=500, help="iterations per run")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rho", type=float, default=1.0, help="ADMM penalty")
    parser.add_argument("--noise", type=float, default=0.1, help="link noise std")
    parser.add_argument("--partial", type=float, default=0.3, help="partial-scheduling fraction")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--plot", help="write the MSD plot to this PNG")
    parser.add_argument("--json", help="write curves and the summary to this JSON file")
    args = parser.parse_args()

    start = time.perf_counter()
    jobs = [(v, n, f, s) for s in range(args.seeds) for v, n, f in settings(args)]
    runs = run_parallel(run_one, [(*job, args) for job in jobs], args.jobs)
    summary = summarise(runs, args)
    wall = time.perf_counter() - start

    print(
        f"wls, {args.clients} clients, rho {args.rho:g}, {args.rounds} iterations, "
        f"{args.seeds} seeds, {wall:.0f} s; steady state = mean MSD of the last 20%"
    )
    print("| fraction | link noise | standard (dB) | proposed (dB) |")
    print("|---:|---:|---:|---:|")
    for i in range(0, len(summary), 2):
        a, b = summary[i], summary[i + 1]
        print(
            f"| {a['fraction']:g} | {a['noise']:g} "
            f"| {a['steady_db_mean']:.1f} ± {a['steady_db_std']:.1f} "
            f"| {b['steady_db_mean']:.1f} ± {b['steady_db_std']:.1f} |"
        )
    if args.plot:
        plot(runs, args, args.plot)
    if args.json:
        write_json(args.json, {"args": vars(args), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
