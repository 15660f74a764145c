"""Benchmark: client updates per second of local SGD, sequential against the vmap backend's loop.

A 28x28 LeNet-5 (two 5x5 convolutions, three linear layers), every client with its own
examples (random images and labels: throughput does not depend on what they show), batch 20,
one local epoch from the same starting params. Three ways to train them:

- ``sequential``: :meth:`fedlab.clients.LocalSGD.fit`, one client after another on one model
  (what ``--backend inprocess`` does);
- ``vmap fp32``: :func:`fedlab.clients.sgd_vmap.fit_batched` over chunks of clients (what
  ``--backend vmap`` does), chunks sized by :func:`fedlab.sim.vmap.auto_chunk`;
- ``sequential bf16`` and ``vmap bf16``: the same with the task setting ``precision = "bf16"``,
  what ``--precision bf16`` sends (:mod:`fedlab.precision`: bf16 matmuls and convolutions,
  fp32 master params).

It prints clients per second and how far each other run's final params are from the
sequential fp32 ones (largest absolute difference of any client's delta, and that over the
largest delta entry). On a GPU the clock is read after ``torch.cuda.synchronize()``.

Usage::

    python benchmarks/gpu_throughput.py                      # CUDA if present, else small CPU
    python benchmarks/gpu_throughput.py --device cuda --clients 1000 --json gpu.json
    python benchmarks/gpu_throughput.py --device cpu --clients 100
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlab.client import ClientContext
from fedlab.clients.sgd import LocalSGD
from fedlab.clients.sgd_vmap import BatchItem, fit_batched
from fedlab.data import ClientData
from fedlab.sim.vmap import auto_chunk
from fedlab.types import Task


def lenet() -> nn.Module:
    """LeNet-5 for 28x28 single-channel images (LeCun et al. 1998, ReLU and max pooling)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clients(n: int, examples: int, device: torch.device) -> list[ClientData]:
    gen = torch.Generator().manual_seed(0)
    return [
        ClientData(
            x=torch.randn(examples, 1, 28, 28, generator=gen).to(device),
            y=torch.randint(0, 10, (examples,), generator=gen).to(device),
        )
        for _ in range(n)
    ]


def sequential(
    model: nn.Module, data: list[ClientData], task: Task, device: torch.device
) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """Seconds and every client's delta, one client after another on one model."""
    algorithm = LocalSGD()
    deltas = []
    _sync(device)
    start = time.perf_counter()
    for cid, d in enumerate(data):
        model.load_state_dict(task.params)
        fit = algorithm.fit(model, d, task, None, ClientContext(cid, seed=0, device=device))
        deltas.append(dict(fit.payload))
    _sync(device)
    return time.perf_counter() - start, deltas


def batched(
    model: nn.Module,
    data: list[ClientData],
    task: Task,
    device: torch.device,
    chunk: int,
) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """Seconds and every client's delta, ``chunk`` clients per batched call."""
    algorithm = LocalSGD()
    items = [
        BatchItem(d, task, None, ClientContext(cid, seed=0, device=device))
        for cid, d in enumerate(data)
    ]
    deltas: list[dict[str, torch.Tensor]] = []
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(items), chunk):
        deltas += [dict(f.payload) for f in fit_batched(algorithm, model, items[i : i + chunk])]
    _sync(device)
    return time.perf_counter() - start, deltas


def difference(
    got: list[dict[str, torch.Tensor]], ref: list[dict[str, torch.Tensor]]
) -> tuple[float, float]:
    """Largest absolute difference of any delta entry, and that over the largest entry."""
    diff = max(float((g[k] - r[k]).abs().max()) for g, r in zip(got, ref, strict=True) for k in r)
    scale = max(float(r[k].abs().max()) for r in ref for k in r)
    return diff, diff / max(scale, 1e-30)


def main(argv: list[str] | None = None) -> int:
    """Run the three ways, print a table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda when present)")
    p.add_argument("--clients", type=int, default=0, help="default: 1000 on CUDA, 100 on CPU")
    p.add_argument("--examples", type=int, default=50, help="examples per client")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--chunk", type=int, default=0, help="clients per call (0: auto_chunk)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    n = args.clients or (1000 if device.type == "cuda" else 100)
    torch.manual_seed(0)
    model = lenet().to(device)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = {"local_epochs": 1.0, "batch_size": args.batch_size, "lr": 0.05}
    task = Task(0, params, config)
    data = _clients(n, args.examples, device)
    chunk = args.chunk or auto_chunk(model, data[0].x[:1], args.batch_size)
    # Warm-up: kernels chosen, caches filled, lazy initialisation done, outside the clock.
    sequential(model, data[:2], task, device)
    batched(model, data[: min(chunk, 8)], task, device, chunk)
    seq_s, ref = sequential(model, data, task, device)
    results: list[dict[str, Any]] = [
        {"way": "sequential", "seconds": seq_s, "clients_per_s": n / seq_s}
    ]
    bf16 = Task(0, params, {**config, "precision": "bf16"})
    ways = (
        ("sequential bf16", lambda t: sequential(model, data, t, device), bf16),
        ("vmap fp32", lambda t: batched(model, data, t, device, chunk), task),
        ("vmap bf16", lambda t: batched(model, data, t, device, chunk), bf16),
    )
    for name, way, t in ways:
        try:
            if t is bf16:  # its own warm-up: bf16 kernels are other kernels
                sequential(model, data[:2], t, device)
                batched(model, data[: min(chunk, 8)], t, device, chunk)
            secs, got = way(t)
        except (RuntimeError, ValueError) as e:  # a device without bf16 says so
            results.append({"way": name, "error": str(e).splitlines()[0]})
            continue
        diff, rel = difference(got, ref)
        results.append(
            {
                "way": name,
                "seconds": secs,
                "clients_per_s": n / secs,
                "speedup": seq_s / secs,
                "max_abs_diff": diff,
                "max_rel_diff": rel,
            }
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"LeNet 28x28, {n} clients x {args.examples} examples, batch {args.batch_size}, one "
        f"epoch; {device} ({name or platform.machine()}), chunk {chunk}, "
        f"threads {args.threads}, torch {torch.__version__}"
    )
    print(f"{'way':<15} {'seconds':>8} {'clients/s':>10} {'speedup':>8} {'max |diff|':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['way']:<15} failed: {r['error']}")
            continue
        print(
            f"{r['way']:<15} {r['seconds']:8.2f} {r['clients_per_s']:10.1f} "
            f"{r.get('speedup', 1.0):8.1f} {r.get('max_abs_diff', 0.0):11.2e}"
        )
    if args.json:
        doc = {
            "device": str(device),
            "device_name": name,
            "clients": n,
            "examples": args.examples,
            "batch_size": args.batch_size,
            "chunk": chunk,
            "torch": torch.__version__,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
