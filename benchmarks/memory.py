"""Benchmark: peak resident memory of a simulation, by backend and number of registered clients.

Each case runs in a fresh Python process (``fedlab.simulate`` on the synthetic workload, a
few versions, ``--per-version`` clients per version, evaluation at the end only) and reports
that process's peak resident set size: ``VmHWM`` from ``/proc/self/status`` (``ru_maxrss``
where there is no ``/proc``). A fresh process per case keeps one case's allocations out of
the next one's peak; the baseline row (``import fedlab`` and torch, no run) says what the
interpreter alone costs.

The issue's targets (issue 11, "Memory"): with 100,000 registered clients the vmap backend's
peak stays within 1.5x of the in-process (sequential) backend's, and 1,000,000 registered
clients run in under 4 GB with either backend.

Usage::

    python benchmarks/memory.py                                  # the issue's cases
    python benchmarks/memory.py --clients 100000 1000000 --rounds 3 --json memory.json
    python benchmarks/memory.py --clients 1000 --backends vmap  # a quick look
    python benchmarks/memory.py --strategy fedbuff --json memory-fedbuff.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GB = 1e9

# What the child process runs: one simulation, then its peak RSS in bytes on the last line.
_CHILD = """
import json, resource, sys, time
import fedlab

def peak():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

settings = json.loads(sys.argv[1])
start = time.perf_counter()
if settings:
    fedlab.simulate(**settings)
print(json.dumps({"peak_bytes": peak(), "seconds": time.perf_counter() - start}))
"""


def run_case(settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Peak RSS and seconds of one run (``{}``: only the imports) in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {last}"}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    """Run every (clients, backend) case, print a table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--backends", nargs="+", default=["inprocess", "vmap"])
    p.add_argument("--strategy", default="fedavg", help="e.g. fedbuff (asynchronous)")
    p.add_argument("--per-version", type=int, default=100, help="clients per version")
    p.add_argument("--rounds", type=int, default=3, help="versions per run")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    if args.per_version < 1 or args.rounds < 1 or min(args.clients) < args.per_version:
        print("memory: error: need rounds >= 1 and clients >= per-version >= 1", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    base = run_case({}, args.timeout)
    rows.append({"case": "imports only", "load": load, **base})
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            for backend in args.backends:
                load = os.getloadavg()[0]
                settings = {
                    "strategy": args.strategy,
                    "clients": n,
                    "rounds": args.rounds,
                    "fraction": args.per_version / n,
                    "backend": backend,
                    "eval_every": args.rounds,
                    "out": str(Path(tmp) / f"{backend}-{n}"),
                }
                start = time.perf_counter()
                result = run_case(settings, args.timeout)
                rows.append(
                    {
                        "case": f"{backend}, {n:,} clients",
                        "clients": n,
                        "backend": backend,
                        "load": load,
                        "wall_seconds": time.perf_counter() - start,
                        **result,
                    }
                )
                print(_line(rows[-1]), flush=True)
    print(
        f"\n{args.strategy}, synthetic, {args.per_version} clients per version (in flight), "
        f"{args.rounds} versions, "
        "peak RSS of a fresh process per case"
    )
    print(f"{'case':<30} {'peak GB':>8} {'run s':>7} {'load':>5}")
    for row in rows:
        print(_line(row))
    ratios = _ratios(rows)
    for n, ratio in ratios.items():
        print(f"vmap / inprocess peak at {n:,} clients: {ratio:.2f}x")
    if args.json:
        doc = {
            "strategy": args.strategy,
            "per_version": args.per_version,
            "rounds": args.rounds,
            "rows": rows,
            "vmap_over_inprocess": ratios,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


def _line(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['case']:<30} failed: {row['error']}"
    return (
        f"{row['case']:<30} {row['peak_bytes'] / GB:8.3f} {row['seconds']:7.1f} {row['load']:5.2f}"
    )


def _ratios(rows: list[dict[str, Any]]) -> dict[int, float]:
    peaks = {
        (r["clients"], r["backend"]): r["peak_bytes"]
        for r in rows
        if "peak_bytes" in r and "clients" in r
    }
    return {
        n: peaks[(n, "vmap")] / peaks[(n, "inprocess")]
        for n, backend in peaks
        if backend == "vmap" and (n, "inprocess") in peaks
    }


if __name__ == "__main__":
    sys.exit(main())
