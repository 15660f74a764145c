"""Compressed updates: accuracy and bytes of FedAvg with each codec, and codec throughput.

For each workload (the digits CNN, and the synthetic workload's model ``--synthetic-model``) it
runs FedAvg with the same seed, clients, sampling and number of versions, once without
compression and once per codec setting, and reports the final test accuracy, its difference
to the uncompressed run in points, the mean bytes of one uploaded update and the compression
ratio (32 bits per entry over the bits actually sent, from ``metrics.jsonl``'s
``compression_ratio``). Then it times ``encode`` and ``decode`` of every codec on a real
client update of each model and on a random 1M-entry tensor, in MB of float32 input per second
(best of ``--repeat``).

Usage::

    python benchmarks/compression.py --json compression.json

Runs go to ``--jobs`` worker processes (one torch thread each).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

BASELINES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("none", "", {}),
    ("float16", "float16", {}),
    ("int8", "int8", {}),
    ("topk 1% +EF", "topk", {"fraction": 0.01, "error_feedback": True}),
)


def settings(args: argparse.Namespace) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, codec, options) of every run; the first one is the uncompressed reference."""
    out = [b for b in BASELINES if not b[1] or b[1] in args.baselines]
    for k, init, z in itertools.product(args.fedzip_k, args.fedzip_init, args.fedzip_z):
        name = f"fedzip z={z:g}" + (f" k={k}" if k != 3 else "")
        name += f" {init}" if init != "linspace" else ""
        opts: dict[str, Any] = {"z": z, **({"k": k} if k != 3 else {})}
        opts |= {"init": init} if init != "linspace" else {}
        if args.fedzip_ef in ("both", "off"):
            out.append((name, "fedzip", opts))
        if args.fedzip_ef in ("both", "on"):
            out.append((name + " +EF", "fedzip", {**opts, "error_feedback": True}))
    return out


def workload_config(workload: str, args: argparse.Namespace) -> dict[str, Any]:
    """The shared run settings of one workload."""
    base: dict[str, Any] = dict(
        workload=workload,
        clients=args.clients,
        fraction=args.fraction,
        rounds=args.rounds,
        seed=args.seed,
        local_steps=args.local_steps,
        lr=args.lr,
        batch_size=32,
    )
    if workload == "synthetic":
        base["model"] = args.synthetic_model
    return base


def run_one(workload: str, setting: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One FedAvg run; returns accuracy and the bytes it moved."""
    import torch

    from fedlab.callbacks import Evaluator
    from fedlab.config import RunConfig
    from fedlab.run import build_engine, build_workload

    torch.set_num_threads(1)
    label, codec, options = settings(args)[setting]
    config = RunConfig(
        **{**workload_config(workload, args), "seed": seed},
        compress=codec,
        compress_options=options,
    )
    rows: list[dict[str, Any]] = []

    class Keep:
        def on_version(self, engine: Any, row: dict[str, Any]) -> None:
            rows.append(row)

    workload_obj = build_workload(config)
    engine = build_engine(config, callbacks=[Keep()], workload=workload_obj)
    start = time.perf_counter()
    engine.run(config.rounds)
    wall = time.perf_counter() - start
    final = Evaluator(workload_obj).evaluate(engine.params)
    updates = sum(r["updates"] for r in rows)
    up = sum(r["bytes_up"] for r in rows)
    entries = sum(r["compression_ratio"] * r["bytes_up"] * 8 / 32 for r in rows)
    return {
        "workload": workload,
        "seed": seed,
        "setting": label,
        "codec": codec,
        "options": options,
        "accuracy": final["accuracy"],
        "bytes_per_update": up / updates,
        "bytes_up": up,
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "ratio": 32 * entries / (8 * up),
        "wall_s": wall,
    }


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Encode and decode MB/s of every codec on real updates and a 1M-entry tensor."""
    import torch

    from fedlab import registry
    from fedlab.config import RunConfig
    from fedlab.run import build_runtime
    from fedlab.transforms import TransformContext

    torch.set_num_threads(1)
    payloads: dict[str, dict[str, torch.Tensor]] = {}
    for workload in ("digits", "synthetic"):
        config = RunConfig(**workload_config(workload, args))
        runtime = build_runtime(config)
        params = {k: v.clone() for k, v in runtime.model.state_dict().items()}
        from fedlab.types import Task

        update, _ = runtime.run(0, Task(0, params, config.task_config), None)
        payloads[f"{workload} update"] = dict(update.payload)
    gen = torch.Generator().manual_seed(args.seed)
    payloads["1M-entry tensor"] = {"w": torch.randn(1000, 1000, generator=gen)}
    ctx = TransformContext(client_id=0, version=0, seed=args.seed)
    out = []
    seen = set()
    for label, codec, options in settings(args)[1:]:
        # Error feedback adds one addition and one subtraction; time each codec once without.
        plain = {k: v for k, v in options.items() if k != "error_feedback"}
        if (codec, tuple(sorted(plain.items()))) in seen:
            continue
        seen.add((codec, tuple(sorted(plain.items()))))
        label = label.replace(" +EF", "")
        transform = registry.create("transforms", codec, plain)
        for name, payload in payloads.items():
            mb = sum(t.numel() * 4 for t in payload.values()) / 1e6
            enc_s, dec_s = float("inf"), float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                encoded, _ = transform.encode(payload, ctx, None)
                t1 = time.perf_counter()
                transform.decode(encoded, ctx)
                t2 = time.perf_counter()
                enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
            sent = sum(t.numel() * t.element_size() for t in encoded.values())
            out.append(
                {
                    "codec": label,
                    "payload": name,
                    "mb": mb,
                    "ratio": 32 * sum(t.numel() for t in payload.values()) / (8 * sent),
                    "encode_mb_s": mb / enc_s,
                    "decode_mb_s": mb / dec_s,
                }
            )
    return out


def main() -> None:
    """Run every setting on both workloads, time the codecs, print tables and JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--fraction", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="runs per setting: seeds SEED, SEED+1...")
    p.add_argument(
        "--fedzip-z",
        default="0.2,0.035",
        help="FedZip z values, each run with and without error feedback",
    )
    p.add_argument("--fedzip-k", default="3", help="FedZip cluster counts, each with every z")
    p.add_argument("--fedzip-init", default="linspace", help="FedZip k-means initializations")
    p.add_argument(
        "--fedzip-ef", choices=("both", "on", "off"), default="both", help="error feedback runs"
    )
    p.add_argument(
        "--baselines",
        default="float16,int8,topk",
        help="baseline codecs run beside 'none' (comma list; empty for none)",
    )
    p.add_argument("--synthetic-model", default="mlp")
    p.add_argument("--workloads", default="digits,synthetic")
    p.add_argument("--repeat", type=int, default=3, help="timing repeats; 0 skips the timings")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args()

    args.fedzip_z = [float(z) for z in str(args.fedzip_z).split(",") if z.strip()]
    args.fedzip_k = [int(k) for k in str(args.fedzip_k).split(",") if k.strip()]
    args.fedzip_init = [i.strip() for i in str(args.fedzip_init).split(",") if i.strip()]
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    seeds = [args.seed + i for i in range(args.seeds)]
    n = len(settings(args))
    jobs = [(w, i, s) for w in workloads for i in range(n) for s in seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_one, *zip(*jobs, strict=True), [args] * len(jobs)))
    speed = throughput(args) if args.repeat > 0 else []

    print(
        f"\nFedAvg, {args.clients} clients, {args.fraction} per version, {args.rounds} versions, "
        f"seeds {seeds}: mean final accuracy and its difference to 'none' (mean over seeds of "
        "the per-seed difference, with its min and max)"
    )
    print("| workload | codec | accuracy | vs none (points) | min, max | bytes/update | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|")
    table = []
    for w in workloads:
        ref = {r["seed"]: r["accuracy"] for r in results if r["workload"] == w and not r["codec"]}
        for label, _, _ in settings(args):
            runs = [r for r in results if r["workload"] == w and r["setting"] == label]
            for r in runs:
                r["delta_points"] = 100 * (r["accuracy"] - ref[r["seed"]])
            deltas = [r["delta_points"] for r in runs]
            row = {
                "workload": w,
                "setting": label,
                "accuracy": statistics.mean(r["accuracy"] for r in runs),
                "delta_points": statistics.mean(deltas),
                "delta_min": min(deltas),
                "delta_max": max(deltas),
                "bytes_per_update": statistics.mean(r["bytes_per_update"] for r in runs),
                "ratio": statistics.mean(r["ratio"] for r in runs),
            }
            table.append(row)
            print(
                f"| {w} | {label} | {row['accuracy']:.4f} | {row['delta_points']:+.2f} | "
                f"{row['delta_min']:+.1f}, {row['delta_max']:+.1f} | "
                f"{row['bytes_per_update']:.0f} | {row['ratio']:.1f}x |"
            )
    print("\n| codec | payload | MB | ratio | encode MB/s | decode MB/s |")
    print("|---|---|---:|---:|---:|---:|")
    for s in speed:
        print(
            f"| {s['codec']} | {s['payload']} | {s['mb']:.3f} | {s['ratio']:.1f}x | "
            f"{s['encode_mb_s']:.1f} | {s['decode_mb_s']:.1f} |"
        )
    blob = {"args": vars(args), "table": table, "runs": results, "throughput": speed}
    print(json.dumps(blob))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(blob, f, indent=2)


if __name__ == "__main__":
    main()
