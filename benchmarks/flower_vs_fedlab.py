"""Benchmark: the same federated workload through fedlab and through Flower's Ray simulation.

Both sides train fedlab's synthetic workload (LEAF Synthetic, lazily generated per client)
with the settings of ``fedlab.config.RunConfig()``: the same data, model, local SGD (lr,
steps, batch size, plain SGD, cross-entropy), FedAvg weighted by examples, ``fraction`` of
the clients per version, and evaluation of the global model on the workload's test set after
every version (fedlab's default ``eval_every=1``; Flower's ``evaluate_fn``). Each system runs
in its own subprocess, so wall time includes start-up and peak memory covers the whole
process tree (Ray's raylet, GCS and workers included).

Usage::

    python benchmarks/flower_vs_fedlab.py --json bench.json
    python benchmarks/flower_vs_fedlab.py --clients 200 --rounds 5 --flower-cpus 1
    python benchmarks/flower_vs_fedlab.py --skip-flower --fedlab-ray-workers 0 \
        --workload digits --local-epochs 1 --batch-size 10   # sequential vs vmap

Settings are run interleaved, repeat by repeat (``--repeat``, default 3), with the machine's
load average recorded before each run; the table reports the median and the minimum of the
steady-state seconds per version (versions after the first, evaluation included).

Memory: ``RSS`` sums the resident set of every process in the tree, counting shared pages
(torch's libraries, Ray's object store) once per process; ``PSS`` splits shared pages among
the processes that map them, so its sum is the tree's actual footprint.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


# --------------------------------------------------------------------------- measuring


def _import_psutil() -> Any:
    """psutil, from the environment or from the copy Ray vendors; ``None`` if neither."""
    try:
        import psutil

        return psutil
    except ImportError:
        pass
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    vendored = Path(next(iter(spec.submodule_search_locations))) / "thirdparty_files"
    if not (vendored / "psutil").is_dir():
        return None
    sys.path.append(str(vendored))
    try:
        import psutil

        return psutil
    except ImportError:
        return None


class TreeMonitor:
    """Polls the memory of a process and all its descendants; kills leftovers at the end.

    Args:
        pid: the root process.
        interval: seconds between polls.
    """

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.psutil = _import_psutil()
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.seen: dict[int, float] = {}  # pid -> create time, to kill only our own processes
        self._stop = threading.Event()
        self._root = self.psutil.Process(pid) if self.psutil else None
        self._thread = threading.Thread(target=self._loop, daemon=True)
        if self._root is not None:
            self._thread.start()

    def _tree(self) -> list[Any]:
        assert self._root is not None
        procs = [self._root]
        with contextlib.suppress(self.psutil.Error):  # the root may exit between polls
            procs += self._root.children(recursive=True)
        return procs

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = pss = 0
            for p in self._tree():
                try:
                    self.seen.setdefault(p.pid, p.create_time())
                    rss += p.memory_info().rss
                    pss += getattr(p.memory_full_info(), "pss", 0)
                except self.psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def stop(self) -> list[int]:
        """Stop polling; kill descendants that outlived the root (Ray daemons). Returns them."""
        self._stop.set()
        if self._root is None:
            return []
        self._thread.join()
        killed = []
        for pid, created in self.seen.items():
            try:
                p = self.psutil.Process(pid)
                if p.create_time() == created and p.is_running():
                    p.kill()
                    killed.append(pid)
            except self.psutil.Error:
                continue
        return killed


@dataclass
class Run:
    """One measured run of one system and setting."""

    system: str
    setting: str
    wall_s: float = math.nan
    s_per_version: float = math.nan
    peak_rss_mib: float = math.nan
    peak_pss_mib: float = math.nan
    accuracy: float = math.nan
    loss: float = math.nan
    ok: bool = False
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def measure(
    cmd: list[str], log: Path, timeout: float, env: dict[str, str] | None = None
) -> tuple[int, float, TreeMonitor, list[int]]:
    """Run ``cmd`` to completion (killed after ``timeout`` seconds, code 124), output to
    ``log``, with ``env`` added to the environment; return code, wall seconds, memory."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        monitor = TreeMonitor(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # its descendants (Ray's daemons) are killed by monitor.stop()
            proc.wait()
            code = 124
    wall = time.perf_counter() - start
    return code, wall, monitor, monitor.stop()


def _fill_memory(run: Run, monitor: TreeMonitor) -> None:
    if monitor.psutil is None:
        import resource

        # Without psutil only the largest single descendant is known, not the tree's sum.
        run.peak_rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        run.note += " peak RSS is the largest single process (no psutil)"
    else:
        run.peak_rss_mib = monitor.peak_rss / MIB
        run.peak_pss_mib = monitor.peak_pss / MIB


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- fedlab


def _fedlab_command() -> list[str]:
    script = Path(sys.executable).with_name("fedlab")
    if script.exists():
        return [str(script)]
    found = shutil.which("fedlab")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from fedlab.cli import main; sys.exit(main())"]


def _workload_flags(args: argparse.Namespace) -> list[str]:
    """The workload and local-training flags both systems run with."""
    flags = ["--workload", args.workload, "--batch-size", str(args.batch_size)]
    if args.local_epochs > 0:
        flags += ["--local-epochs", str(args.local_epochs)]
    if args.lr > 0:
        flags += ["--lr", str(args.lr)]
    return flags


def run_fedlab(args: argparse.Namespace, tmp: Path, workers: int, backend: str = "") -> Run:
    """``fedlab simulate`` in-process (``workers == 0``), vectorised (``backend="vmap"``)
    or on a Ray pool of ``workers``."""
    setting = backend or ("inprocess" if workers == 0 else f"ray, {workers} workers")
    run = Run("fedlab", setting)
    work = Path(tempfile.mkdtemp(prefix=f"fedlab-{workers}-", dir=tmp))
    out = work / "run"  # fedlab makes it; it refuses a directory that holds other files
    cmd = [
        *_fedlab_command(),
        "simulate",
        "--clients",
        str(args.clients),
        "--fraction",
        str(args.fraction),
        "--rounds",
        str(args.rounds),
        "--seed",
        str(args.seed),
        *_workload_flags(args),
        "--no-progress",
        "--out",
        str(out),
    ]
    if backend:
        cmd += ["--backend", backend, "--device", args.device]
    elif workers:
        cmd += ["--backend", "ray", "--workers", str(workers)]
    log = work / "bench.log"
    code, wall, monitor, killed = measure(cmd, log, args.timeout)
    run.wall_s = wall
    _fill_memory(run, monitor)
    if killed:
        run.note += f" killed {len(killed)} leftover processes"
    if code != 0:
        run.note += f" exit {code}: {_tail(log)}"
        return run
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    run.accuracy = float(summary["accuracy"])
    run.loss = float(summary["loss"])
    run.s_per_version = _steady(
        [float(r["wall"]) for r in rows], float(summary["wall_seconds"]), args.rounds
    )
    run.ok = True
    return run


def _steady(ends: list[float], total: float, rounds: int) -> float:
    """Seconds per version after the first (which pays for start-up), from version end times."""
    if len(ends) >= 2:
        return (ends[-1] - ends[0]) / (len(ends) - 1)
    return total / max(rounds, 1)


# --------------------------------------------------------------------------- Flower


def flower_worker(args: argparse.Namespace) -> int:
    """Run the workload through Flower's simulation runtime; write results to ``--result``."""
    import random

    import torch
    import torch.nn.functional as F
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedlab.callbacks import Evaluator
    from fedlab.client import batches_per_pass, minibatches
    from fedlab.config import RunConfig
    from fedlab.run import build_workload
    from fedlab.seeding import TRAIN, torch_generator

    # RunConfig's defaults are fedlab's: workload, model, synthetic alpha/beta, lr, steps...
    cfg = RunConfig(
        clients=args.clients,
        rounds=args.rounds,
        seed=args.seed,
        fraction=args.fraction,
        workload=args.workload,
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        **({"lr": args.lr} if args.lr > 0 else {}),
    )
    cpus = float(args.flower_worker)
    times: list[float] = []
    history: list[dict[str, float]] = []

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        # One thread per client, as fedlab's workers use (threads=1): small models train
        # fastest single-threaded when several run side by side.
        torch.set_num_threads(1)
        cid = int(context.node_config["partition-id"])
        workload = build_workload(cfg)  # lazy: building it costs a few integers
        model = workload.make_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = workload.client_data(cid)
        n = len(data)
        bs = min(cfg.batch_size, n) if cfg.batch_size > 0 else n
        steps = (  # as fedlab's LocalSGD.plan: one epoch is one pass, partial batch included
            max(1, math.ceil(cfg.local_epochs * batches_per_pass(n, bs)))
            if cfg.local_epochs > 0
            else cfg.local_steps
        )
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        version = int(msg.content["config"]["server-round"]) - 1
        # The batches fedlab would draw for this client at this version.
        gen = torch_generator(cfg.seed, TRAIN, version, cid)
        model.train()
        loss_sum, seen = 0.0, 0
        for idx in minibatches(n, bs, steps, gen):
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss) * len(idx)
            seen += len(idx)
        metrics = MetricRecord({"train_loss": loss_sum / max(seen, 1), "num-examples": n})
        reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=reply, reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(cfg.seed)  # Flower samples nodes with the global `random` module
        workload = build_workload(cfg)
        evaluator = Evaluator(workload, device="cpu")

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            res = evaluator.evaluate(arrays.to_torch_state_dict())
            times.append(time.perf_counter())
            history.append(res)
            return MetricRecord(res)

        strategy = FedAvg(
            fraction_train=cfg.fraction,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.min_clients,
            min_available_nodes=cfg.clients,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(workload.make_model().state_dict()),
            num_rounds=cfg.rounds,
            evaluate_fn=evaluate,
        )

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg.clients,
        backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}},
    )
    if len(history) != cfg.rounds + 1:
        print(f"Flower evaluated {len(history)} times, expected {cfg.rounds + 1}")
        return 1
    import flwr

    result = {
        "accuracy": history[-1]["accuracy"],
        "loss": history[-1]["loss"],
        # times[0] is the initial evaluation; times[1] ends version 1, which pays start-up.
        "s_per_version": _steady(times[1:], times[-1] - times[0], cfg.rounds),
        "flwr": flwr.__version__,
    }
    Path(args.result).write_text(json.dumps(result))
    return 0


def run_flower(args: argparse.Namespace, tmp: Path, cpus: float) -> Run:
    """This script in ``--flower-worker`` mode, as a measured subprocess."""
    run = Run("flower", f"ray, num_cpus={cpus:g}/client, niceness 0")
    work = Path(tempfile.mkdtemp(prefix=f"flower-{cpus:g}-", dir=tmp))
    result = work / "result.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--flower-worker",
        str(cpus),
        "--clients",
        str(args.clients),
        "--rounds",
        str(args.rounds),
        "--seed",
        str(args.seed),
        "--fraction",
        str(args.fraction),
        *_workload_flags(args),
        "--result",
        str(result),
    ]
    log = work / "bench.log"
    # Ray renices its workers to 15 by default, which on a busy machine hands their CPU to
    # every other process; niceness 0 is Flower's best setting here.
    code, wall, monitor, killed = measure(cmd, log, args.timeout, {"RAY_worker_niceness": "0"})
    run.wall_s = wall
    _fill_memory(run, monitor)
    if killed:
        run.note += f" killed {len(killed)} leftover processes"
    if code != 0 or not result.exists():
        run.note += f" exit {code}: {_tail(log)}"
        return run
    res = json.loads(result.read_text())
    run.accuracy = float(res["accuracy"])
    run.loss = float(res["loss"])
    run.s_per_version = float(res["s_per_version"])
    run.extra["flwr"] = res["flwr"]
    run.ok = True
    return run


# --------------------------------------------------------------------------- report


def _table(runs: list[Run]) -> str:
    head = (
        "system",
        "setting",
        "wall s median",
        "wall s min",
        "s/version median",
        "s/version min",
        "load before",
        "peak RSS MiB",
        "peak PSS MiB",
        "accuracy",
    )
    rows = [head] + [
        (
            r.system,
            r.setting,
            f"{r.extra.get('wall_median', r.wall_s):.1f}",
            f"{r.wall_s:.1f}",
            f"{r.extra.get('s_per_version_median', r.s_per_version):.3f}",
            f"{r.extra.get('s_per_version_min', r.s_per_version):.3f}",
            ",".join(f"{x:.1f}" for x in r.extra.get("load_all", [])),
            f"{r.peak_rss_mib:.0f}",
            f"{r.peak_pss_mib:.0f}",
            f"{r.accuracy:.4f}" if r.ok else "failed",
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ratios(runs: list[Run]) -> list[dict[str, Any]]:
    flowers = [r for r in runs if r.system == "flower" and r.ok]
    if not flowers:
        return []
    # Flower's best setting: the lowest median wall time end to end.
    best = min(flowers, key=lambda r: r.extra.get("wall_median", r.wall_s))
    return [
        {
            "fedlab": r.setting,
            "flower": best.setting,
            "wall_ratio": r.wall_s / best.wall_s,
            "s_per_version_ratio": r.s_per_version / best.s_per_version,
            "speedup": best.wall_s / r.wall_s,
            "speedup_median": best.extra.get("wall_median", best.wall_s)
            / r.extra.get("wall_median", r.wall_s),
            "accuracy_diff_points": 100 * (r.accuracy - best.accuracy),
        }
        for r in runs
        if r.system == "fedlab" and r.ok
    ]


def _vmap_ratio(runs: list[Run]) -> dict[str, float]:
    """Steady-state speed of fedlab's vmap backend over its sequential in-process one."""
    by = {r.setting: r for r in runs if r.system == "fedlab" and r.ok}
    seq, vec = by.get("inprocess"), by.get("vmap")
    if seq is None or vec is None:
        return {}
    return {
        "median_speedup": seq.extra["s_per_version_median"] / vec.extra["s_per_version_median"],
        "min_speedup": seq.extra["s_per_version_min"] / vec.extra["s_per_version_min"],
        "accuracy_diff_points": 100 * (vec.accuracy - seq.accuracy),
    }


def main(argv: list[str] | None = None) -> int:
    """Parse flags; run fedlab, then Flower at each CPU setting; print and save the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20, help="versions (Flower rounds)")
    p.add_argument("--fraction", type=float, default=0.1, help="clients per version")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", default="synthetic", help="synthetic or digits (its CNN)")
    p.add_argument("--batch-size", type=int, default=32, help="client minibatch size")
    p.add_argument(
        "--local-epochs", type=float, default=0.0, help="local epochs (0: fedlab's local steps)"
    )
    p.add_argument("--lr", type=float, default=0.0, help="client lr (0: fedlab's default)")
    p.add_argument(
        "--fedlab-backends",
        default="inprocess,vmap",
        help="fedlab in-process backends to run: inprocess, vmap (comma separated)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the vmap backend")
    p.add_argument("--skip-flower", action="store_true")
    p.add_argument(
        "--flower-cpus",
        default="0.5,1",
        help="Flower client_resources num_cpus values to try (comma separated; 0.5 runs "
        "4 clients at once on 2 cores, Flower's best setting there)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=900,
        help="seconds one run may take before it is killed (and reported failed)",
    )
    p.add_argument(
        "--fedlab-ray-workers",
        type=int,
        default=2,
        help="also run fedlab's Ray backend with this many workers (0: skip)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per setting, interleaved setting by setting; the median and the minimum "
        "are reported (other jobs on the machine only ever slow a run down)",
    )
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--flower-worker", metavar="CPUS", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.flower_worker is not None:
        return flower_worker(args)

    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="fedlab-bench-") as tmpdir:
        tmp = Path(tmpdir)
        settings: list[tuple[str, str]] = [
            ("fedlab", b.strip()) for b in args.fedlab_backends.split(",") if b.strip()
        ]
        if args.fedlab_ray_workers > 0:
            settings.append(("fedlab", f"ray{args.fedlab_ray_workers}"))
        if not args.skip_flower:
            settings += [("flower", c.strip()) for c in args.flower_cpus.split(",") if c.strip()]
        repeats = max(1, args.repeat)
        tries: dict[tuple[str, str], list[Run]] = {s: [] for s in settings}
        # Interleaved repeat by repeat, so a burst of load on the shared machine hits every
        # system rather than one.
        for i in range(repeats):
            for system, value in settings:
                label = f"{system} {value}"
                print(f"running {label} ({i + 1}/{repeats}) ...", flush=True)
                load = os.getloadavg()[0]
                if system == "flower":
                    run = run_flower(args, tmp, float(value))
                elif value.startswith("ray"):
                    run = run_fedlab(args, tmp, int(value[3:]))
                else:
                    run = run_fedlab(args, tmp, 0, "" if value == "inprocess" else value)
                run.extra["load_before"] = load
                if not run.ok:
                    print(f"  {label} failed:{run.note}", flush=True)
                tries[(system, value)].append(run)
        for key in settings:
            done = [r for r in tries[key] if r.ok] or tries[key]
            best = min(done, key=lambda r: r.wall_s)
            spv = [r.s_per_version for r in done]
            best.extra["wall_all"] = [round(r.wall_s, 2) for r in tries[key]]
            best.extra["s_per_version_all"] = [round(x, 4) for x in spv]
            best.extra["s_per_version_median"] = statistics.median(spv)
            best.extra["s_per_version_min"] = min(spv)
            best.extra["wall_median"] = statistics.median(r.wall_s for r in done)
            best.extra["load_all"] = [round(r.extra["load_before"], 2) for r in tries[key]]
            runs.append(best)

    ratios = _ratios(runs)
    print()
    print(
        f"{args.clients} clients, {math.ceil(args.fraction * args.clients)} per version, "
        f"{args.rounds} versions, seed {args.seed}; {os.cpu_count()} CPUs, "
        f"{platform.machine()}; Flower clients call torch.set_num_threads(1), as fedlab "
        "workers do"
    )
    print(_table(runs))
    vmap_ratio = _vmap_ratio(runs)
    if vmap_ratio:
        print(
            f"fedlab vmap vs inprocess, steady-state s/version: "
            f"{vmap_ratio['median_speedup']:.1f}x faster (medians), "
            f"{vmap_ratio['min_speedup']:.1f}x (minima), "
            f"accuracy {vmap_ratio['accuracy_diff_points']:+.2f} points"
        )
    for r in ratios:
        print(
            f"fedlab {r['fedlab']} vs flower {r['flower']}: end to end "
            f"{r['speedup_median']:.1f}x faster (median walls), {r['speedup']:.1f}x (minima), "
            f"s/version x{r['s_per_version_ratio']:.2f}, "
            f"accuracy {r['accuracy_diff_points']:+.2f} points"
        )
    if args.json:
        doc = {
            "date": time.strftime("%Y-%m-%d"),
            "config": {
                k: getattr(args, k)
                for k in (
                    "clients",
                    "rounds",
                    "fraction",
                    "seed",
                    "repeat",
                    "workload",
                    "batch_size",
                    "local_epochs",
                    "lr",
                    "device",
                )
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "runs": [asdict(r) for r in runs],
            "ratios": ratios,
            "vmap_vs_inprocess": vmap_ratio,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
