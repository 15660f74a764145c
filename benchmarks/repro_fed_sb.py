"""Small-scale reproduction of Fed-SB against FedIT and full FedAvg (accuracy and bytes).

Singhal et al. (arXiv 2502.15436) claim that Fed-SB (LoRA-SB adapters ``W0 + B R A`` with
``B``, ``A`` frozen and only the ``r x r`` core ``R`` trained and averaged) aggregates exactly
and costs far less communication than federated LoRA (FedIT, which averages ``B`` and ``A``
separately) while matching or beating its accuracy. This script checks that on the
``digits-shift`` workload: an MLP pretrained centrally on upright digits, fine-tuned
federatedly on digits turned 90 degrees (``--clients`` clients, Dirichlet(``--alpha``) label
split, ``--fraction`` per version). Methods:

* ``fedavg``: full fine-tuning with FedAvg (every weight travels).
* ``fedit``: LoRA rank ``--fedit-rank`` on both Linear layers, ``B`` and ``A`` averaged.
* ``fed-sb``: LoRA-SB rank ``--sb-rank`` on both layers, data-free init (SVD of ``W0``).
* ``fed-sb-grad``: the same with the paper's gradient init, on the server's public sample.
* ``fedit-head``, ``fed-sb-grad-head``: as above with the classifier (layer ``2``) trained in
  full and averaged (the paper trains the head for classification); only layer ``0`` adapted.

Each method has its own client learning rate (``--lrs``), chosen by a sweep on seed 0 (see
benchmarks/README.md). Bytes: ``upload_bytes`` and ``download_bytes`` per version from the
strategies' metrics (full model for FedAvg), plus Fed-SB's one-off ``B`` and ``A`` per client.
The aggregation gap measures exactness on one more version of real client updates from the
trained model (not counted in the accuracy): the distance
of the aggregated adapted weights from the (weighted) mean of the clients' adapted weights,
relative to how far that mean moved (0 for an exact aggregate).

Usage::

    python benchmarks/repro_fed_sb.py --seeds 3 --plot fed_sb.png --json fed_sb.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

from _common import mean_std, pyplot, run_parallel, write_json

METHODS = ("fedavg", "fedit", "fed-sb", "fed-sb-grad", "fedit-head", "fed-sb-grad-head")
LRS = "fedavg=0.4,fedit=0.2,fed-sb=1.0,fed-sb-grad=1.0,fedit-head=0.2,fed-sb-grad-head=1.0"


def strategy_of(method: str, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The registry name and options of ``method``."""
    if method == "fedavg":
        return "fedavg", {}
    head = {"head": "2"} if method.endswith("-head") else {}
    if method.startswith("fedit"):
        return "fedit", {"rank": args.fedit_rank, **head}
    init = "gradient" if "grad" in method else "weights"
    return "fed-sb", {"rank": args.sb_rank, "initialization": init, **head}


def run_one(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run; returns the accuracy curve and the byte counts."""
    import torch

    from fedlab.callbacks import Evaluator
    from fedlab.config import RunConfig
    from fedlab.lora import nbytes
    from fedlab.run import build_engine, build_workload
    from fedlab.strategy import floating

    torch.set_num_threads(1)
    strategy, options = strategy_of(method, args)
    config = RunConfig(
        clients=args.clients,
        rounds=args.rounds,
        strategy=strategy,
        strategy_options=options,
        workload="digits-shift",
        partition="dirichlet",
        alpha=args.alpha,
        fraction=args.fraction,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        lr=args.lrs[method],
        seed=seed,
    )
    workload = build_workload(config)
    evaluator = Evaluator(workload, every=args.eval_every, final=args.rounds)
    curve: list[tuple[int, float, float]] = []  # (version, cumulative bytes, accuracy)
    uploads: list[float] = []
    total = 0.0

    class Record:
        def on_version(self, engine: Any, row: dict[str, Any]) -> None:
            nonlocal total
            if "strategy_upload_bytes" in row:
                up = float(row["strategy_upload_bytes"])
                down = float(row["strategy_download_bytes"])
            else:  # FedAvg: the whole model each way
                up = down = float(nbytes(floating(engine.params).values()) * row["updates"])
            total += up + down
            if row["updates"]:
                uploads.append(up / row["updates"])
            if "accuracy" in row:
                curve.append((int(row["version"]), total, float(row["accuracy"])))

    engine = build_engine(config, callbacks=[evaluator, Record()], workload=workload)
    # One-off: the frozen B and A every client receives once (Fed-SB only).
    one_off = 0
    if strategy == "fed-sb":
        per_client = nbytes(t for f in ("b", "a") for t in engine.state[f].values())
        one_off = per_client * args.clients
    total = float(one_off)
    effective = getattr(engine.strategy, "model_params", None)
    start_params = effective(engine.state, engine.params) if effective else engine.params
    curve.append((0, total, evaluator.evaluate(start_params)["accuracy"]))
    began = time.perf_counter()
    engine.run(args.rounds)
    seconds = time.perf_counter() - began
    gap = aggregation_gap(engine, config, workload) if effective else float("nan")
    return {
        "method": method,
        "seed": seed,
        "curve": curve,
        "upload_per_client": statistics.fmean(uploads),
        "one_off_bytes": one_off,
        "total_bytes": total,
        "aggregation_gap": gap,
        "seconds": seconds,
    }


def aggregation_gap(engine: Any, config: Any, workload: Any) -> float:
    """``||W_agg - mean_i W_i|| / ||mean_i W_i - W_start||`` over the adapted layers, for one
    more version of real client updates from the trained model: 0 when aggregation is exact
    (``W_i``: client ``i``'s effective weights, ``mean``: the strategy's own weighting)."""
    import torch

    from fedlab.lora import KEYS, effective
    from fedlab.run import build_runtime
    from fedlab.types import Round

    strategy, state, params = engine.strategy, engine.state, engine.params
    rnd = Round(version=0, time=0.0, num_clients=config.clients, slots=engine.slots, seed=0)
    tasks = strategy.configure(state, params, rnd)
    runtime = build_runtime(config, workload)
    updates = [runtime.run(c, t, None)[0] for c, t in sorted(tasks.items())]
    new_params, _, _ = strategy.aggregate(state, params, updates, rnd)
    start = strategy.model_params(state, params)
    w = torch.tensor([float(u.num_examples) for u in updates])
    w = w / w.sum() if strategy.weighting == "examples" else torch.full_like(w, 1 / len(w))
    gap = spread = 0.0
    for name, w0 in state["w0"].items():
        models = []
        for u in updates:
            f = {k: u.payload.get(KEYS[k] + name, state[k][name]) for k in strategy.factors}
            models.append(effective(w0, f["b"], f["a"], f.get("r"), strategy.adapter_scale))
        mean = sum(wi * m for wi, m in zip(w.tolist(), models, strict=True))
        gap += float((new_params[name] - mean).norm() ** 2)
        spread += float((mean - start[name]).norm() ** 2)
    return (gap / spread) ** 0.5


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for method in args.methods:
        mine = [r for r in runs if r["method"] == method]
        final_mean, final_std = mean_std(r["curve"][-1][2] for r in mine)
        out.append(
            {
                "method": method,
                "start_mean": statistics.fmean(r["curve"][0][2] for r in mine),
                "final_mean": final_mean,
                "final_std": final_std,
                "upload_per_client": statistics.fmean(r["upload_per_client"] for r in mine),
                "total_bytes": statistics.fmean(r["total_bytes"] for r in mine),
                "aggregation_gap": statistics.fmean(r["aggregation_gap"] for r in mine),
                "seconds": statistics.fmean(r["seconds"] for r in mine),
            }
        )
    return out


def plot(runs: list[dict[str, Any]], args: argparse.Namespace, path: str) -> None:
    """Test accuracy against cumulative bytes (log axis), mean over seeds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in args.methods:
        # Version 0 is left out: before any traffic, at zero bytes, off a log axis.
        mine = [r["curve"][1:] for r in runs if r["method"] == method]
        points = list(zip(*mine, strict=True))
        x = [statistics.fmean(p[1] for p in pt) for pt in points]
        y = [statistics.fmean(p[2] for p in pt) for pt in points]
        ax.plot(x, y, marker=".", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("bytes communicated (cumulative, up + down, incl. one-off B and A)")
    ax.set_ylabel("test accuracy (turned digits)")
    ax.set_title(
        f"digits-shift, pretrained MLP, {args.clients} clients, Dirichlet({args.alpha:g}), "
        f"{args.seeds} seeds"
    )
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1")
    parser.add_argument("--rounds", type=int, default=30, help="versions per run")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.5, help="clients per version")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet label split")
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sb-rank", type=int, default=8, help="Fed-SB's r")
    parser.add_argument("--fedit-rank", type=int, default=4, help="FedIT's r")
    parser.add_argument("--lrs", default=LRS, help="METHOD=LR,... client learning rates")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    parser.add_argument("--plot", help="write the accuracy-vs-bytes plot to this PNG")
    parser.add_argument("--json", help="write curves and the summary to this JSON file")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    for m in args.methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    args.lrs = {k: float(v) for k, v in (kv.split("=") for kv in args.lrs.split(","))}
    missing = [m for m in args.methods if m not in args.lrs]
    if missing:
        parser.error(f"--lrs lacks {missing}")

    start = time.perf_counter()
    jobs = [(m, s) for s in range(args.seeds) for m in args.methods]
    runs = run_parallel(run_one, [(*job, args) for job in jobs], args.jobs)
    summary = summarise(runs, args)
    wall = time.perf_counter() - start

    print(
        f"digits-shift (MLP pretrained on upright digits, fine-tuned on turned ones), "
        f"{args.clients} clients, Dirichlet({args.alpha:g}), fraction {args.fraction:g}, "
        f"{args.rounds} versions, {args.local_steps} local steps, batch {args.batch_size}, "
        f"Fed-SB r={args.sb_rank}, FedIT r={args.fedit_rank}, {args.seeds} seeds, {wall:.0f} s"
    )
    print(
        "| method | lr | start acc | final acc | upload B/client/version | total MB | "
        "aggregation gap | s/run |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        gap = "—" if math.isnan(s["aggregation_gap"]) else f"{s['aggregation_gap']:.1e}"
        print(
            f"| {s['method']} | {args.lrs[s['method']]:g} | {s['start_mean']:.4f} | "
            f"{s['final_mean']:.4f} ± {s['final_std']:.4f} | {s['upload_per_client']:.0f} | "
            f"{s['total_bytes'] / 1e6:.3f} | {gap} | {s['seconds']:.1f} |"
        )
    if args.plot:
        plot(runs, args, args.plot)
    if args.json:
        write_json(args.json, {"args": vars(args), "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
