"""Asynchronous FL under heterogeneous client speeds: FedBuff and FedFix against sync FedAvg
and FedAsync, accuracy against simulated time.

The default speed model is Fraboni et al.'s F-80 scenario (client i needs
``5 * (1 - 0.8 i / 9)`` s per job, deterministic, 1 to 5 s) with FedFix at the paper's
Δt = 0.2, 0.5, 0.8 of the slowest job; ``--speed lognormal --speed-spread 1.0`` is the
heavy-tailed case, where a few clients are 5-20x slower than the median.

Every method keeps the same population training under the same virtual clock (per-client
speeds drawn once from ``--speed``/``--speed-spread``) and runs until the same simulated time
budget. Sync FedAvg (Fraboni's "FL") gives every client a task each version and waits for the
slowest; FedBuff, FedFix and FedAsync keep every client busy (``concurrency = clients``, as in
Fraboni et al.'s experiments). The global model is evaluated on a grid of simulated times (the
model in force at each grid time), so the cost of evaluation does not depend on how often a
method aggregates.

    python benchmarks/repro_async.py --plot async.png --json async.json
    python benchmarks/repro_async.py --speed lognormal --speed-spread 1.0 --period 1,2,3.5,7

``--methods`` adds ``fedasync-weight``: FedAsync with Fraboni's ``Async_weight`` aggregation
weights (computed here from the speed model), instead of fedlab's ``d_i = 1``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from _common import mean_std, pyplot, run_parallel, write_json

from fedlab import optim
from fedlab.callbacks import Evaluator
from fedlab.config import RunConfig
from fedlab.engine import Engine
from fedlab.run import build_engine, build_speeds, build_workload
from fedlab.strategies.fedfix import FedAsync
from fedlab.types import Metrics, Params, Round, State, Update


class TimeGrid:
    """Evaluates the model in force at each point of a grid of simulated times."""

    def __init__(self, evaluator: Evaluator, grid: list[float], params: Params) -> None:
        self.evaluator = evaluator
        self.grid = grid
        self.acc: list[float] = []
        self._last = dict(params)
        self._last_acc: float | None = None

    def _eval_last(self) -> float:
        if self._last_acc is None:
            self._last_acc = self.evaluator.evaluate(self._last)["accuracy"]
        return self._last_acc

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        # Grid points before this aggregation saw the previous model.
        while len(self.acc) < len(self.grid) and self.grid[len(self.acc)] < row["time"]:
            self.acc.append(self._eval_last())
        self._last = dict(engine.params)
        self._last_acc = None

    def finish(self) -> None:
        while len(self.acc) < len(self.grid):
            self.acc.append(self._eval_last())


@dataclass(frozen=True, kw_only=True)
class FedAsyncTimeWeighted(FedAsync):
    """Fraboni's ``Async_weight``: ``d_i = tau_i * sum_j (1 / tau_j) * p_i`` (uniform ``p_i``).

    The weights need every client's mean job time, which fedlab's FedAsync cannot know (it
    does not travel on the wire), so this benchmark computes them from the speed model and
    swaps this strategy in. A slow client's delta is scaled up by ``tau_i / H`` (``H`` the
    harmonic mean job time) to make up for how rarely it is aggregated.
    """

    client_weights: tuple[float, ...] = ()

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        step: dict[str, torch.Tensor] = {}
        for name in updates[0].payload:
            acc = torch.zeros_like(updates[0].payload[name])
            for u in updates:
                acc.add_(u.payload[name], alpha=self.client_weights[u.client_id])
            step[name] = acc
        return optim.apply(params, step, self.server_lr), state, {"step_norm": optim.norm(step)}


def fraboni_async_weights(config: RunConfig) -> tuple[float, ...]:
    speeds = build_speeds(config)
    tau = [speeds.unit_time(i) for i in range(config.clients)]  # same work for every client
    inv = sum(1 / t for t in tau)
    return tuple(t * inv / config.clients for t in tau)


@dataclass(frozen=True)
class Method:
    name: str
    changes: dict[str, Any]
    time_weighted: bool = False  # FedAsync with Fraboni's "weight" d_i instead of d_i = 1


METHOD_KEYS = ("sync", "fedbuff", "fedfix", "fedasync", "fedasync-weight")


def periods(args: argparse.Namespace) -> list[float]:
    return [float(x) for x in str(args.period).split(",") if x.strip()]


def methods(args: argparse.Namespace) -> list[Method]:
    n = args.clients
    wanted = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in wanted if m not in METHOD_KEYS]
    if bad:
        raise SystemExit(f"unknown methods {bad}; choose from {METHOD_KEYS}")
    out = [Method("FedAvg (sync)", {"strategy": "fedavg", "fraction": 1.0})]  # the reference
    if "fedbuff" in wanted:
        out.append(
            Method(
                f"FedBuff K={args.buffer}",
                {"strategy": "fedbuff", "buffer": args.buffer, "concurrency": n},
            )
        )
    if "fedfix" in wanted:
        for dt in periods(args):
            out.append(
                Method(f"FedFix dt={dt:g}", {"strategy": "fedfix", "period": dt, "concurrency": n})
            )
    if "fedasync" in wanted:
        out.append(Method("FedAsync", {"strategy": "fedasync", "concurrency": n}))
    if "fedasync-weight" in wanted:
        out.append(
            Method(
                "FedAsync (tau-weighted)",
                {"strategy": "fedasync", "concurrency": n},
                time_weighted=True,
            )
        )
    return out


def run_one(base: RunConfig, method: Method, seed: int, grid: list[float]) -> dict[str, Any]:
    torch.set_num_threads(1)
    config = base.replace(seed=seed, **method.changes)
    workload = build_workload(config)
    evaluator = Evaluator(workload)
    engine = build_engine(config, workload=workload)
    if method.time_weighted:
        engine.strategy = FedAsyncTimeWeighted(client_weights=fraboni_async_weights(config))
    cb = TimeGrid(evaluator, grid, engine.params)
    engine.callbacks.append(cb)
    wall = time.perf_counter()
    while engine.transport.now() < grid[-1]:
        engine.step()
    cb.finish()
    engine.transport.close()
    return {
        "acc": cb.acc,
        "versions": engine.version,
        "wall": time.perf_counter() - wall,
        "final": cb.acc[-1],
    }


def time_to(acc: list[float], grid: list[float], target: float) -> float:
    for t, a in zip(grid, acc, strict=True):
        if a >= target:
            return t
    return math.inf


def stability(acc: list[float], tail: float = 0.2, drop: float = 0.02) -> tuple[float, int, float]:
    """Std of accuracy over the last ``tail`` of the time axis, drops larger than ``drop``
    between consecutive grid points over the whole run, and the largest such fall."""
    k = max(2, int(len(acc) * tail))
    falls = [a - b for a, b in itertools.pairwise(acc)]
    drops = sum(1 for f in falls if f > drop)
    return statistics.pstdev(acc[-k:]), drops, max([0.0, *falls])


def fmt(xs: list[float]) -> str:
    finite = [x for x in xs if math.isfinite(x)]
    if len(finite) < len(xs):
        return f"not reached ({len(xs) - len(finite)}/{len(xs)} seeds)"
    mean, sd = mean_std(finite, sample=True)
    return f"{mean:.1f} ± {sd:.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="digits")
    p.add_argument("--model", default="mlp")
    p.add_argument("--partition", default="dirichlet")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--speed", default="fx", help="fx: Fraboni's F-X scenario (the paper's)")
    p.add_argument("--speed-spread", type=float, default=0.8, help="fx: X/100 (F-80)")
    p.add_argument("--buffer", type=int, default=10)
    p.add_argument(
        "--period",
        default="1,2.5,4",
        help="FedFix window(s) Δt in simulated s, comma separated (default: the paper's "
        "0.2, 0.5, 0.8 x the slowest F-80 job, which takes 5 s)",
    )
    p.add_argument(
        "--methods",
        default="sync,fedbuff,fedfix,fedasync",
        help=f"comma separated, from {','.join(METHOD_KEYS)} (sync always runs: the target)",
    )
    p.add_argument("--time", type=float, default=400.0, help="simulated seconds per run")
    p.add_argument("--points", type=int, default=80, help="evaluation grid points")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--target", type=float, default=0.8, help="share of sync final accuracy")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--plot", default="")
    p.add_argument("--json", default="")
    args = p.parse_args()
    torch.set_num_threads(1)

    base = RunConfig(
        workload=args.workload,
        model=args.model,
        partition=args.partition,
        alpha=args.alpha,
        clients=args.clients,
        local_steps=args.local_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        speed=args.speed,
        speed_spread=args.speed_spread,
    )
    grid = [args.time * (i + 1) / args.points for i in range(args.points)]
    results: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods(args)}
    jobs = [(m, seed) for m in methods(args) for seed in range(args.seeds)]
    runs = run_parallel(run_one, [(base, m, seed, grid) for m, seed in jobs], args.jobs)
    for (m, seed), r in zip(jobs, runs, strict=True):
        results[m.name].append(r)
        print(
            f"{m.name:>16} seed {seed}: final {r['final']:.3f}, "
            f"{r['versions']} versions, {r['wall']:.1f} s wall",
            flush=True,
        )

    sync = next(iter(results.values()))
    target = args.target * statistics.mean(r["final"] for r in sync)
    print(
        f"\ntarget accuracy {target:.3f} ({args.target:.0%} of sync FedAvg's mean final), "
        f"budget {args.time:g} simulated s\n"
    )
    print(
        "| method | time to target (s) | final accuracy | versions | tail std | drops "
        "| largest drop |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    summary: dict[str, Any] = {}
    for name, runs in results.items():
        tt = [time_to(r["acc"], grid, target) for r in runs]
        fin = [r["final"] for r in runs]
        stab = [stability(r["acc"]) for r in runs]
        tails = [s for s, _, _ in stab]
        drops = [float(d) for _, d, _ in stab]
        worst = [w for _, _, w in stab]
        vers = [float(r["versions"]) for r in runs]
        fin_mean, fin_std = mean_std(fin, sample=True)
        print(
            f"| {name} | {fmt(tt)} | {fin_mean:.3f} ± {fin_std:.3f} | "
            f"{statistics.mean(vers):.0f} | {statistics.mean(tails):.4f} | "
            f"{statistics.mean(drops):.1f} | {statistics.mean(worst):.3f} |"
        )
        summary[name] = {
            "time_to_target": tt,
            "final": fin,
            "tail_std": tails,
            "drops": drops,
            "largest_drop": worst,
        }
    if args.json:
        write_json(
            args.json,
            {
                "args": vars(args),
                "grid": grid,
                "target": target,
                "summary": summary,
                "acc": {k: [r["acc"] for r in v] for k, v in results.items()},
            },
        )
    if args.plot:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, runs in results.items():
            mean = [statistics.mean(r["acc"][i] for r in runs) for i in range(len(grid))]
            ax.plot(grid, mean, label=name)
        ax.axhline(target, color="grey", ls=":", lw=1, label="target")
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_title(
            f"{args.workload}, {args.clients} clients, {args.speed} speeds "
            f"(spread {args.speed_spread:g})"
        )
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
