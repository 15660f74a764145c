"""Benchmark: seconds per federated evaluation (``--eval-clients``), in-process against vmap.

One evaluation of ``N`` clients' own test splits with the global params, without and with
``--personalize K`` (K local SGD steps of each client before its test), computed by the run's
executor exactly as a run does it: :meth:`InProcessExecutor.evaluate` (one client after
another on one model) and :meth:`VmapExecutor.evaluate` (every client's test split through one
model in large batches; personalisation with the batched training loop and stacked per-client
params). Each setting is timed ``--repeat`` times, the systems interleaved repeat by repeat,
after one untimed warm-up evaluation (it fills each executor's data cache, as the first
evaluation of a run does); the machine's load average is recorded before every timed run. It
prints the median and minimum seconds, and the largest difference between the two backends'
figures.

Usage::

    python benchmarks/federated_eval.py                               # synthetic and digits
    python benchmarks/federated_eval.py --workload digits --clients 100 1000 --repeat 3 \\
        --json eval.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedlab.config import RunConfig
from fedlab.evaluation import EvalTask, FederatedEvaluator, Scores
from fedlab.run import build_runtime, build_workload
from fedlab.sim.inprocess import InProcessExecutor
from fedlab.sim.vmap import VmapExecutor

SYSTEMS = ("inprocess", "vmap")


def _difference(a: Scores, b: Scores) -> float:
    """The largest absolute difference of any figure of any client between ``a`` and ``b``."""
    worst = 0.0
    for x, y in zip([*a[0], *a[1]], [*b[0], *b[1]], strict=True):
        assert (x.client_id, x.examples) == (y.client_id, y.examples)
        worst = max([worst, *(abs(x.values[k] - y.values[k]) for k in x.values)])
    return worst


def _evaluate(executor: InProcessExecutor | VmapExecutor, task: EvalTask) -> Scores:
    scores = executor.evaluate(task)
    if executor.runtime.device.type == "cuda":
        torch.cuda.synchronize()  # nothing may still run on the device when the clock is read
    return scores


def measure(
    workload: str, clients: int, personalize: int, repeat: int, device: str
) -> dict[str, Any]:
    """Seconds per evaluation of ``clients`` clients for each system, and their difference."""
    config = RunConfig(
        workload=workload, clients=clients, seed=0, eval_clients=clients, device=device
    )
    data = build_workload(config)
    # Trained-looking params (not the initialisation, whose predictions are all alike).
    torch.manual_seed(0)
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in data.make_model().state_dict().items()}
    evaluator = FederatedEvaluator(
        data, clients=clients, seed=0, personalize=personalize, lr=config.lr,
        batch_size=config.batch_size,
    )  # fmt: skip
    task = evaluator.task(params, 1)
    executors: dict[str, InProcessExecutor | VmapExecutor] = {
        "inprocess": InProcessExecutor(build_runtime(config, data)),
        "vmap": VmapExecutor(build_runtime(config, data), chunk=config.vmap_chunk),
    }
    figures = {name: _evaluate(ex, task) for name, ex in executors.items()}  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in SYSTEMS}
    loads: list[float] = []
    for _ in range(repeat):
        for name in SYSTEMS:
            loads.append(os.getloadavg()[0])
            start = time.perf_counter()
            _evaluate(executors[name], task)
            seconds[name].append(time.perf_counter() - start)
    return {
        "workload": workload,
        "device": device,
        "clients": clients,
        "personalize": personalize,
        "seconds": seconds,
        "median": {k: statistics.median(v) for k, v in seconds.items()},
        "min": {k: min(v) for k, v in seconds.items()},
        "load": [min(loads), max(loads)],
        "max_abs_difference": _difference(figures["inprocess"], figures["vmap"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=["synthetic", "digits"])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--personalize", type=int, nargs="+", default=[0, 5])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (where both backends run)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    print("| workload | clients | personalize | inprocess s (median / min) | vmap s (median / "
          "min) | speed-up (median) | max abs diff | load |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for workload in args.workload:
        for clients in args.clients:
            for k in args.personalize:
                r = measure(workload, clients, k, args.repeat, args.device)
                results.append(r)
                med, low = r["median"], r["min"]
                print(
                    f"| {workload} | {clients} | {k} | {med['inprocess']:.3f} / "
                    f"{low['inprocess']:.3f} | {med['vmap']:.3f} / {low['vmap']:.3f} | "
                    f"{med['inprocess'] / med['vmap']:.1f}x | {r['max_abs_difference']:.1e} | "
                    f"{r['load'][0]:.2f}-{r['load'][1]:.2f} |",
                    flush=True,
                )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
