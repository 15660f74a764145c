"""`fedlab simulate --ray-address` on a real two-node Ray cluster started on this machine.

Two ``ray start --block`` processes (a head, and a second node with its own CPUs and a
``node2`` resource) run in a private temp dir on free loopback ports, so nothing collides with
another Ray on the machine. The test checks that the actors ran on both nodes (``ray_nodes``
in ``summary.json``) and that the final model is bit-identical to the in-process run: the Ray
backend runs exactly the in-process client code with the same seeds (without ``--vectorize``,
whose batched kernels add up in another order and equal the in-process run only to rounding).

The cluster is stopped by the processes this module started (SIGTERM to each ``ray start
--block``, which stops its node; then SIGKILL to their process groups and to anything still
running from the private temp dir), never with ``ray stop``, which would stop every Ray on the
machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedlab import tensorio
from fedlab.experiment import simulate

ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Deadlines hold on a loaded 2-core machine shared with other test runs.
READY_S = 180.0
RUN_S = 600.0
STOP_S = 60.0

# The run: tiny, synthetic, three versions of FedAvg.
RUN = ["--clients", "12", "--fraction", "0.5", "--rounds", "3", "--seed", "5",
       "--local-steps", "4"]  # fmt: skip

# Ray's own start-up deadlines are too short on a loaded machine; its processes read these.
SLOW = {"RAY_worker_register_timeout_seconds": "300", "RAY_raylet_start_wait_time_s": "300"}


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # with the cluster's token: what a driver needs to join it
    nodes: dict[str, dict[str, float]]  # node id -> its resources


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel considers free on 127.0.0.1 right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray_start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``ray start --block ARGS`` in a session of its own (its daemons share its group)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start",
             "--block", *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def _node_ports(temp_dir: Path) -> list[str]:
    """Every port a node would otherwise take from a fixed default, set to a free one."""
    names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-grpc-port",
             "--dashboard-agent-listen-port", "--metrics-export-port",
             "--runtime-env-agent-port"]  # fmt: skip
    out = [f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", "--min-worker-port=0",
           "--max-worker-port=0", "--disable-usage-stats"]  # fmt: skip
    for name, port in zip(names, _free_ports(len(names)), strict=True):
        out.append(f"{name}={port}")
    return out


def _wait_for_nodes(address: str, env: dict[str, str], count: int) -> dict[str, dict[str, float]]:
    """Block until ``count`` nodes are alive; return their ids and resources."""
    probe = f"""
import json, sys, time
import ray
ray.init(address={address!r}, log_to_driver=False, logging_level="ERROR")
deadline = time.monotonic() + {READY_S}
while True:
    alive = {{n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}}
    if len(alive) >= {count} or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print("NODES " + json.dumps(alive))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True,
        timeout=2 * READY_S,
    )  # fmt: skip
    lines = [x for x in done.stdout.splitlines() if x.startswith("NODES ")]
    assert done.returncode == 0 and lines, f"cannot reach the cluster:\n{done.stderr[-3000:]}"
    nodes: dict[str, dict[str, float]] = json.loads(lines[-1][len("NODES ") :])
    assert len(nodes) == count, f"{len(nodes)} of {count} Ray nodes came up in {READY_S:g} s"
    return nodes


def _stop(procs: list[subprocess.Popen[bytes]], temp_dir: Path) -> None:
    """Stop what this module started, with bounded waits."""
    for proc in reversed(procs):  # the second node first, then the head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # ray start --block then stops its node
    deadline = time.monotonic() + STOP_S
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # daemons left in its session, if any
        if proc.poll() is None:
            proc.wait(timeout=STOP_S)
    # Workers a raylet started in a session of their own: found by the private temp dir in
    # their command line, which only this module's cluster uses.
    marker = str(temp_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone already, or not ours to read


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # A short path: Ray's unix sockets live under it and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="flray", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({k: os.environ.get(k) or v for k, v in SLOW.items()})
    # Token authentication, as recent Ray turns on by default: every node and the driver
    # need the cluster's token. Given in the environment, it never touches ~/.ray/auth_token.
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    gcs, client_port = _free_ports(2)
    address = f"127.0.0.1:{gcs}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        head = ["--head", f"--port={gcs}", f"--ray-client-server-port={client_port}",
                "--num-cpus=4", "--include-dashboard=false"]  # fmt: skip
        procs.append(_ray_start([*head, *_node_ports(temp_dir)], temp_dir / "head.log", env))
        _wait_for_nodes(address, env, 1)
        # The second node: its own CPUs and a resource no other node has.
        node2 = [f"--address={address}", "--num-cpus=4", '--resources={"node2": 1}']
        procs.append(_ray_start([*node2, *_node_ports(temp_dir)], temp_dir / "node2.log", env))
        nodes = _wait_for_nodes(address, env, 2)
        for proc, name in zip(procs, ("head", "node2"), strict=True):
            assert proc.poll() is None, (temp_dir / f"{name}.log").read_text()[-3000:]
        yield Cluster(address, env, nodes)
    finally:
        _stop(procs, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_node_cluster_matches_inprocess(cluster: Cluster, tmp_path: Path) -> None:
    expected = simulate(
        {"clients": 12, "fraction": 0.5, "rounds": 3, "seed": 5, "local_steps": 4},
        backend="inprocess",  # what the Ray actors run, bit for bit (auto may pick vmap)
        out=str(tmp_path / "inprocess"),
    ).params

    out = tmp_path / "ray"
    done = subprocess.run(
        [sys.executable, "-m", "fedlab", "simulate", *RUN, "--backend", "ray",
         "--ray-address", cluster.address, "--workers", "2", "--cpus-per-worker", "1",
         "--out", str(out), "--no-progress"],
        env=cluster.env, capture_output=True, text=True, timeout=RUN_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    ray_nodes = summary["ray_nodes"]
    # One actor on each node (SPREAD), both trained clients: the head's and the second node's.
    assert set(ray_nodes) == set(cluster.nodes), (ray_nodes, cluster.nodes)
    assert [n["actors"] for n in ray_nodes.values()] == [1, 1]
    assert all(n["jobs"] > 0 for n in ray_nodes.values()), ray_nodes
    assert sum(n["jobs"] for n in ray_nodes.values()) == summary["updates_received"] == 3 * 6
    assert any("node2" in cluster.nodes[node] for node in ray_nodes)
    assert done.stdout.count("ray_nodes ") == 2, done.stdout  # a table row per node

    got = tensorio.load(out / "model.fl")
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name
