"""Deployment measurements of the gRPC transport on loopback.

Three measurements, each a subcommand that prints a table and, with ``--json``, writes JSON:

- ``throughput``: bytes per second moving one large model to a client (download: the task)
  and back (upload: the update), over plaintext loopback and over mutual TLS.
- ``upload-memory``: the server's peak memory while N clients each upload an update the size
  of the model, for several N: bounded, or growing with the number of clients? Reported as
  the growth of anonymous memory (the heap) and the file-backed pages of spooled updates.
- ``soak``: the server holding many concurrent clients for many versions with a tiny model:
  errors, versions per second, and the server's memory version after version.

The process running this script is the server: the real :class:`GrpcTransport` driven by the
real :class:`Engine` with FedAvg. Clients run in separate processes (``--client-procs``), each
with one thread and one gRPC channel per client; they do no training (the update is a zero
delta of the model's shapes), so what is measured is the transport and the server, not SGD.

    python benchmarks/deploy_grpc.py throughput --mb 1024
    python benchmarks/deploy_grpc.py upload-memory --mb 100 --clients 5,10,20
    python benchmarks/deploy_grpc.py soak --clients 200 --versions 100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedlab.engine import Engine
from fedlab.strategies import FedAvg
from fedlab.transport.client import FINISHED, Assigned, Connection
from fedlab.transport.security import Policy, client_credentials, make_certs, server_credentials
from fedlab.transport.server import GrpcTransport
from fedlab.types import Params, Update

GB = 1e9
MIB = 1 << 20


def model(mb: float, tensors: int) -> Params:
    """float32 params of ``mb`` MiB in total, split into ``tensors`` equal tensors."""
    per = max(1, int(mb * MIB / 4 / tensors))
    return {f"layer{i}.weight": torch.zeros(per, dtype=torch.float32) for i in range(tensors)}


def memory_mib() -> dict[str, float]:
    """This process's memory in MiB: resident (VmRSS), its anonymous part (RssAnon: the heap,
    what the process itself holds) and its file-backed part (RssFile: mapped files, such as
    spooled updates, which the kernel can write back and reclaim)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


class Peak:
    """Samples :func:`memory_mib` every ``interval`` s in a thread; keeps the peaks."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak = memory_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            now = memory_mib()
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Security:
    """mTLS certificates in a temporary folder, or plaintext on loopback."""

    def __init__(self, mutual: bool, clients: int) -> None:
        self.mutual = mutual
        self.tmp = tempfile.TemporaryDirectory(prefix="fedlab-bench-")
        self.certs = make_certs(Path(self.tmp.name) / "certs", clients=clients) if mutual else None

    def server(self) -> Any:
        return server_credentials(self.certs, mutual=True) if self.certs else None

    def args(self) -> list[str]:
        return ["--certs", str(self.certs)] if self.certs else []


def serve(clients: int, security: Security, args: argparse.Namespace, **kw: Any) -> GrpcTransport:
    """The transport as ``fedlab server`` builds it, spooling large updates to a temp dir."""
    spool = Path(security.tmp.name) / "spool" if args.spool_mb > 0 else None
    return GrpcTransport(
        num_clients=clients,
        address="127.0.0.1:0",
        policy=Policy(num_clients=clients, mutual=security.mutual),
        credentials=security.server(),
        log=None,
        max_uploads=args.max_uploads,
        spool=spool,
        spool_bytes=int(args.spool_mb * MIB),
        **kw,
    )


def start_clients(
    port: int, ids: Sequence[int], security: Security, procs: int, extra: Sequence[str] = ()
) -> list[subprocess.Popen[str]]:
    """``procs`` client processes sharing ``ids`` between them."""
    groups = [ids[i::procs] for i in range(procs) if ids[i::procs]]
    procs_out = []
    for g in groups:
        argv = [sys.executable, __file__, "_clients", "--port", str(port)]
        argv += ["--ids", ",".join(map(str, g)), *security.args(), *extra]
        procs_out.append(subprocess.Popen(argv, stdout=subprocess.PIPE, text=True))
    return procs_out


def collect(procs: list[subprocess.Popen[str]], timeout: float) -> list[dict[str, Any]]:
    """Each client process's JSON report (it prints one line when the run is finished)."""
    reports = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"a client process exited with {p.returncode}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


# ---------------------------------------------------------------------------- client processes


def clients_main(args: argparse.Namespace) -> int:
    """Run one thread per client id until the server says the run is finished."""
    torch.set_num_threads(1)
    credentials = None
    ids = [int(i) for i in args.ids.split(",")]
    # Downloads in flight at once in this process: each holds a whole model until it is freed.
    downloads = threading.Semaphore(args.downloads)
    report: dict[str, Any] = {"tasks": 0, "errors": 0, "pull_s": [], "push_s": [], "bytes": 0}
    lock = threading.Lock()
    zeros: dict[tuple[tuple[str, ...], int], Params] = {}

    def payload_like(params: Params) -> Params:
        # One shared zero delta per model shape: the update costs no memory per thread.
        key = (tuple(params), sum(t.numel() for t in params.values()))
        with lock:
            if key not in zeros:
                zeros[key] = {k: torch.zeros_like(v) for k, v in params.items()}
            return zeros[key]

    def one(cid: int) -> None:
        creds = client_credentials(args.certs, cid) if args.certs else credentials
        conn = Connection(f"127.0.0.1:{args.port}", cid, credentials=creds)
        try:
            conn.join()
            while True:
                # Waiting first lets the server have the task ready, so that the pull times the
                # download rather than the wait for the next version.
                time.sleep(args.pull_delay)
                with downloads:
                    t0 = time.perf_counter()
                    got = conn.pull(5.0)
                    t1 = time.perf_counter()
                    if got == FINISHED:
                        return
                    if not isinstance(got, Assigned):
                        continue
                    version, task_id = got.task.version, got.task_id
                    nbytes = sum(t.numel() * t.element_size() for t in got.task.params.values())
                    payload = payload_like(got.task.params)
                    del got  # free the download before uploading
                t2 = time.perf_counter()
                conn.push(Update(cid, version, payload, 1), task_id)
                t3 = time.perf_counter()
                with lock:
                    report["tasks"] += 1
                    report["bytes"] += nbytes
                    report["pull_s"].append(t1 - t0)
                    report["push_s"].append(t3 - t2)
        except Exception as e:  # reported, not raised: the server side counts failures too
            with lock:
                report["errors"] += 1
                report.setdefault("messages", []).append(f"client {cid}: {e!r}"[:300])
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(cid,)) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report["peak_rss_mib"] = memory_mib()["VmHWM"]
    print(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------- measurements


def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Move an ``--mb`` MiB model to one client and back, ``--repeat`` times per mode."""
    rows = []
    for mode in args.modes.split(","):
        security = Security(mode == "mtls", 1)
        params = model(args.mb, args.tensors)
        t = serve(1, security, args, linger=5.0)
        engine = Engine(strategy=FedAvg(), transport=t, params=params, seed=0, fraction=1.0)
        procs = start_clients(t.port, [0], security, 1, ["--pull-delay", "2"])
        t.wait_for_clients(1, timeout=120)
        start = time.perf_counter()
        engine.run(args.repeat)
        wall = time.perf_counter() - start
        t.close()
        (report,) = collect(procs, 120)
        size = report["bytes"] / report["tasks"]
        rows.append(
            {
                "mode": mode,
                "model_mib": round(size / MIB, 1),
                "download_gb_s": round(size / min(report["pull_s"]) / GB, 3),
                "upload_gb_s": round(size / min(report["push_s"]) / GB, 3),
                "round_trip_s": round(wall / args.repeat, 3),
            }
        )
        del engine, params
    return rows


def upload_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Server memory while N clients upload an ``--mb`` model in one synchronous version."""
    rows = []
    counts = [int(n) for n in args.clients.split(",")]
    if max(counts) * args.mb > args.max_gb * 1024 and not args.force:
        raise SystemExit(
            f"{max(counts)} updates of {args.mb} MiB may need {max(counts) * args.mb / 1024:.1f}"
            f" GiB on the server, over --max-gb {args.max_gb}; pass --force to run anyway"
        )
    if len(counts) > 1:
        # One fresh process per count: memory a previous count freed but the allocator kept
        # would otherwise hide in the next one's baseline.
        for n in counts:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "row.json"
                argv = [sys.executable, __file__, *sys.argv[1:], "--clients", str(n)]
                subprocess.run([*argv, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
                rows += json.loads(out.read_text())
        return rows
    for n in counts:
        security = Security(args.mtls, n)
        params = model(args.mb, args.tensors)
        t = serve(n, security, args, linger=5.0)
        engine = Engine(
            strategy=FedAvg(),
            transport=t,
            params=params,
            seed=0,
            fraction=1.0,
            min_clients=n,
            stream=args.stream,  # as fedlab server does, unless --keep-updates
        )
        procs = start_clients(
            t.port, range(n), security, min(args.client_procs, n), ["--downloads", "2"]
        )
        t.wait_for_clients(n, timeout=300)
        import gc

        gc.collect()
        before = memory_mib()
        start = time.perf_counter()
        with Peak() as peak:
            engine.run(1)
        wall = time.perf_counter() - start
        t.close()
        reports = collect(procs, 300)
        anon = peak.peak["RssAnon"] - before["RssAnon"]
        rows.append(
            {
                "clients": n,
                "model_mib": args.mb,
                "spool_mib": args.spool_mb,
                "streamed": args.stream,
                "rss_before_mib": round(before["VmRSS"]),
                "peak_rss_mib": round(peak.peak["VmRSS"]),
                "peak_anon_growth_mib": round(anon),
                "anon_per_client_mib": round(anon / n, 1),
                "peak_file_mib": round(peak.peak["RssFile"]),
                "seconds": round(wall, 2),
                "client_errors": sum(r["errors"] for r in reports),
                "updates": engine.counters.received,
            }
        )
        del engine, params, t
    return rows


def soak(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--clients`` concurrent clients, every one in every version, for ``--versions``."""
    n = args.clients
    security = Security(args.mtls, n)
    params = model(args.mb, 2)
    samples: list[tuple[int, float, float]] = []

    class Sample:
        def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
            samples.append((engine.version, time.perf_counter(), memory_mib()["VmRSS"]))

    t = serve(n, security, args, linger=10.0, stall_timeout=60.0)
    engine = Engine(
        strategy=FedAvg(),
        transport=t,
        params=params,
        seed=0,
        fraction=1.0,
        min_clients=n,
        callbacks=[Sample()],
    )
    procs = start_clients(t.port, range(n), security, min(args.client_procs, n))
    t.wait_for_clients(n, timeout=600)
    start = time.perf_counter()
    engine.run(args.versions)
    wall = time.perf_counter() - start
    t.close()
    reports = collect(procs, 600)
    rss = [m for _, _, m in samples]
    # Memory after the first tenth of the run (warm-up: pools, caches) against the end.
    warm = rss[max(1, len(rss) // 10) - 1]
    row = {
        "clients": n,
        "versions": engine.version,
        "updates": engine.counters.received,
        "rejected": engine.counters.rejected,
        "failed": engine.counters.failed,
        "refused": len(t.refused),
        "client_errors": sum(r["errors"] for r in reports),
        "seconds": round(wall, 1),
        "versions_per_s": round(engine.version / wall, 2),
        "rss_first_mib": round(rss[0]),
        "rss_warm_mib": round(warm),
        "rss_last_mib": round(rss[-1]),
        "rss_max_mib": round(max(rss)),
        "growth_after_warmup_mib": round(rss[-1] - warm, 1),
    }
    messages = [m for r in reports for m in r.get("messages", [])]
    if messages:
        row["first_errors"] = messages[:3]
    return [row]


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    keys = [k for k in rows[0] if k != "first_errors"]
    print(f"\n{title}")
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
        for m in r.get("first_errors", []):
            print(f"  error: {m}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("throughput", help="bytes per second for one large model")
    a.add_argument("--mb", type=float, default=1024, help="model size in MiB (default 1024)")
    a.add_argument("--tensors", type=int, default=8, help="tensors the model is split into")
    a.add_argument("--repeat", type=int, default=3, help="round trips; the fastest is kept")
    a.add_argument("--modes", default="insecure,mtls", help="insecure and/or mtls")
    b = sub.add_parser("upload-memory", help="server memory while N clients upload")
    b.add_argument("--mb", type=float, default=100, help="model size in MiB (default 100)")
    b.add_argument("--tensors", type=int, default=8)
    b.add_argument("--clients", default="5,10,20", help="client counts to try (default 5,10,20)")
    b.add_argument("--client-procs", type=int, default=4, help="client processes (default 4)")
    b.add_argument("--max-gb", type=float, default=4.0, help="refuse runs that may need more")
    b.add_argument("--force", action="store_true", help="run past --max-gb")
    b.add_argument("--mtls", action="store_true", help="mutual TLS (default: plaintext)")
    b.add_argument(
        "--keep-updates",
        dest="stream",
        action="store_false",
        help="keep every update until the version aggregates instead of folding each into a "
        "running mean as it arrives (what fedlab server does for FedAvg)",
    )
    c = sub.add_parser("soak", help="many concurrent clients for many versions")
    c.add_argument("--clients", type=int, default=200)
    c.add_argument("--versions", type=int, default=100)
    c.add_argument("--mb", type=float, default=0.01, help="model size in MiB (default 0.01)")
    c.add_argument("--client-procs", type=int, default=4)
    c.add_argument("--mtls", action="store_true", help="mutual TLS (default: plaintext)")
    for q in (a, b, c):
        q.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
        q.add_argument(
            "--spool-mb",
            type=float,
            default=16.0,
            help="updates above this many MiB are received into memory-mapped files, as "
            "fedlab server does by default (0: in RAM)",
        )
        q.add_argument(
            "--max-uploads", type=int, default=16, help="uploads received at once (default 16)"
        )
    w = sub.add_parser("_clients")  # internal: one client process
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--ids", required=True)
    w.add_argument("--certs")
    w.add_argument("--downloads", type=int, default=1_000_000)
    w.add_argument("--pull-delay", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.command == "_clients":
        return clients_main(args)
    torch.set_num_threads(1)
    run = {"throughput": throughput, "upload-memory": upload_memory, "soak": soak}
    rows = run[args.command](args)
    print_table(f"deploy_grpc.py {' '.join(sys.argv[1:])}", rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
