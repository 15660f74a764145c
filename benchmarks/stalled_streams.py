"""Honest progress while an attacker holds stalled upload streams open against the server.

The process running this script is the server: the real :class:`GrpcTransport` (TLS without
client certificates, clients proving who they are with tokens: ``--tls-only --tokens``)
driven by the real :class:`Engine` with FedAvg on a tiny model. ``--clients`` honest clients
run in one process (a thread and a channel each, no training: the update is a zero delta), so
a version costs the transport and the server only. An attacker process keeps ``--streams``
``PushUpdate`` streams open that never send a chunk; each one, once it ends (refused or cut),
is opened again after ``--reopen-delay`` seconds. The attacker is:

- ``none``: no attacker (the baseline);
- ``anonymous``: no token (it holds a TLS channel, as anyone may);
- ``enrolled``: the valid token of client ``--clients`` (an enrolled client that the engine
  never picks, so its stalls cost the honest ones server threads, not a missed update).

Each attacker is measured for ``--seconds`` of versions, ``--repeat`` times, interleaved, with
a fresh server each time; the table gives versions per second and the loss against ``none``.

    python benchmarks/stalled_streams.py --clients 3 --streams 50 --seconds 20 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import torch

from fedlab.engine import Engine
from fedlab.strategies import FedAvg
from fedlab.transport.admission import call_metadata
from fedlab.transport.client import FINISHED, Assigned, Connection
from fedlab.transport.security import Policy, client_credentials, make_certs, server_credentials
from fedlab.transport.server import GrpcTransport
from fedlab.types import Update

ATTACKERS = ("none", "anonymous", "enrolled")


def token(cid: int) -> str:
    """The benchmark's token of client ``cid``."""
    return f"bench-token-{cid}"


# ---------------------------------------------------------------------------- client processes


def honest_main(args: argparse.Namespace) -> int:
    """One thread per honest client: pull, answer with a zero delta, until the run ends."""
    torch.set_num_threads(1)
    report: Counter[str] = Counter()
    lock = threading.Lock()

    def one(cid: int) -> None:
        creds = client_credentials(args.certs, None)
        conn = Connection(f"127.0.0.1:{args.port}", cid, credentials=creds, token=token(cid))
        last = time.monotonic()
        try:
            conn.join()
            while time.monotonic() - last < 30:  # then the server is gone for good
                try:
                    got = conn.pull(5.0)
                    last = time.monotonic()
                    if got == FINISHED:
                        return
                    if not isinstance(got, Assigned):
                        continue
                    zero = {k: torch.zeros_like(v) for k, v in got.task.params.items()}
                    conn.push(Update(cid, got.task.version, zero, 1), got.task_id)
                    last = time.monotonic()
                    with lock:
                        report["tasks"] += 1
                except grpc.RpcError as e:  # counted, then on: the server counts failures too
                    with lock:
                        report[f"error {e.code().name}"] += 1  # type: ignore[attr-defined]
                    time.sleep(0.1)
        except grpc.RpcError as e:  # the join itself failed
            with lock:
                report[f"error {e.code().name}"] += 1  # type: ignore[attr-defined]
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report["cpu_s"] = round(_cpu_seconds(), 2)  # type: ignore[assignment]
    print(json.dumps(dict(report)))
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def attack_main(args: argparse.Namespace) -> int:
    """Keep ``--streams`` upload streams open that send nothing, until stdin closes."""
    channel = grpc.secure_channel(f"127.0.0.1:{args.port}", client_credentials(args.certs, None))
    push = channel.stream_unary(
        "/fedlab.v1.Federation/PushUpdate",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    if args.attacker == "enrolled":
        metadata = call_metadata(args.clients, token(args.clients))
    else:
        metadata = call_metadata(0)  # claims client 0, without its token
    stop = threading.Event()
    ended: Counter[str] = Counter()
    lock = threading.Lock()
    opened = threading.Semaphore(0)

    def nothing() -> Iterator[bytes]:
        stop.wait()
        return
        yield b""  # a generator that never yields

    def stream() -> None:
        first = True
        while not stop.is_set():
            call = push.future(nothing(), timeout=3600, metadata=metadata)
            if first:
                opened.release()
                first = False
            try:
                call.result()
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name  # type: ignore[attr-defined]
            with lock:
                ended[code] += 1
            stop.wait(args.reopen_delay)

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(args.streams)]
    for t in threads:
        t.start()
    for _ in threads:
        opened.acquire()
    print("open", flush=True)
    sys.stdin.read()  # the server process closes our stdin when it is done measuring
    stop.set()
    for t in threads:
        t.join(10)
    channel.close()
    print(json.dumps({**ended, "cpu_s": round(_cpu_seconds(), 2)}), flush=True)
    return 0


# ---------------------------------------------------------------------------- the server


def measure(attacker: str, args: argparse.Namespace, certs: Path) -> dict[str, Any]:
    """One fresh server, honest clients and ``attacker``; versions per second over a window."""
    n = args.clients
    tokens = {cid: token(cid) for cid in range(n + 1)}  # client n: the enrolled attacker
    t = GrpcTransport(
        num_clients=n,
        address="127.0.0.1:0",
        policy=Policy(num_clients=n + 1, tokens=tokens),
        credentials=server_credentials(certs, mutual=False),
        log=None,
        linger=10.0,
        stall_timeout=args.stall_timeout,
    )
    params = {"w": torch.zeros(2500), "b": torch.zeros(10)}
    engine = Engine(
        strategy=FedAvg(), transport=t, params=params, seed=0, fraction=1.0, min_clients=n
    )
    me = [sys.executable, __file__]
    common = ["--port", str(t.port), "--certs", str(certs), "--clients", str(n)]
    attack = None
    if attacker != "none":
        attack = subprocess.Popen(
            [*me, "_attack", *common, "--attacker", attacker, "--streams", str(args.streams),
             "--reopen-delay", str(args.reopen_delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert attack.stdout is not None
        if attack.stdout.readline().strip() != "open":
            raise RuntimeError("the attacker process did not start")
    honest = subprocess.Popen([*me, "_honest", *common], stdout=subprocess.PIPE, text=True)
    try:
        # Clients that cannot join (every server thread taken) make the window's progress 0.
        joined = t.wait_for_clients(n, timeout=max(60.0, args.seconds))
        load_before = os.getloadavg()[0]
        start, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < args.seconds:
            engine.step()
        wall = time.perf_counter() - start
        server_cpu = time.process_time() - cpu
        load_after = os.getloadavg()[0]
        versions = engine.version
        t.close()
        out, _ = honest.communicate(timeout=120)
        clients = json.loads(out.strip().splitlines()[-1])
        ended: dict[str, Any] = {}
        attacker_cpu = 0.0
        if attack is not None:
            out, _ = attack.communicate("", timeout=120)
            ended = json.loads(out.strip().splitlines()[-1])
        attacker_cpu = ended.pop("cpu_s", 0.0)
    finally:
        t.close()
        for p in (honest, attack):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    return {
        "attacker": attacker,
        "joined": joined,
        "versions": versions,
        "updates": engine.counters.received,
        "seconds": round(wall, 1),
        # Versions that aggregated every honest client's update: a version whose tasks all
        # failed (stall timeout) closes without progress.
        "versions_per_s": round(engine.counters.received / n / wall, 2),
        "failed": engine.counters.failed,
        "refused": t.refusals,
        "stalls_ended": sum(ended.values()),
        "end_codes": ",".join(f"{k}:{v}" for k, v in sorted(ended.items())) or "-",
        "client_errors": sum(v for k, v in clients.items() if k.startswith("error")),
        # Where the 2 cores went: the server in the window, each client process in all.
        "server_cpu_s": round(server_cpu, 1),
        "honest_cpu_s": clients.get("cpu_s", 0.0),
        "attacker_cpu_s": attacker_cpu,
        "load_1min": f"{load_before:.1f}-{load_after:.1f}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=3, help="honest clients (default 3)")
    p.add_argument("--streams", type=int, default=50, help="stalled streams (default 50)")
    p.add_argument("--seconds", type=float, default=20.0, help="window per measurement")
    p.add_argument("--repeat", type=int, default=3, help="measurements per attacker")
    p.add_argument(
        "--reopen-delay",
        type=float,
        default=1.0,
        help="seconds before the attacker opens a stream again once it ended (default 1)",
    )
    p.add_argument("--stall-timeout", type=float, default=30.0, help="the server's --stall-timeout")
    p.add_argument("--attackers", default=",".join(ATTACKERS), help="which ones to measure")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    p.add_argument("--attacker", help=argparse.SUPPRESS)
    p.add_argument("role", nargs="?", choices=["_honest", "_attack"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "_honest":
        return honest_main(args)
    if args.role == "_attack":
        return attack_main(args)
    torch.set_num_threads(1)
    attackers = args.attackers.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedlab-stalled-") as tmp:
        certs = make_certs(Path(tmp) / "certs", clients=0)
        for _ in range(args.repeat):
            for a in attackers:
                rows.append(measure(a, args, certs))
                print(json.dumps(rows[-1]), flush=True)
    base = [r["versions_per_s"] for r in rows if r["attacker"] == "none"]
    summary = []
    for a in attackers:
        rates = [r["versions_per_s"] for r in rows if r["attacker"] == a]
        mean = statistics.fmean(rates)
        loss = f"{100 * (1 - mean / statistics.fmean(base)):.1f}%" if base else "-"
        summary.append((a, ", ".join(f"{x:.2f}" for x in rates), f"{mean:.2f}", loss))
    print(f"\nstalled_streams.py {' '.join(sys.argv[1:])}")
    print("| attacker | versions/s per run | mean | loss vs none |")
    print("|---|---|---|---|")
    for a, rates_text, mean_text, loss in summary:
        print(f"| {a} | {rates_text} | {mean_text} | {loss} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
