"""A federation across separate network hosts: the server and each client in its own network
namespace, joined by veth links, talking mutual TLS over their own addresses (not loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy import READY, Proc
from namespaces import Hosts, hosts, unavailable

from fedlab.transport.security import make_certs

CLIENTS = 3
ROUNDS = 3
PORT = 50051  # the namespaces are new: nothing else listens there


@pytest.fixture(scope="module")
def net() -> Iterator[Hosts]:
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    with hosts(CLIENTS) as h:
        yield h


@pytest.mark.slow
def test_mutual_tls_run_across_namespaces(net: Hosts, tmp_path: Path) -> None:
    # The server certificate names the server host's own address, as across real hosts.
    certs = make_certs(tmp_path / "certs", server_names=[net.server_ip], clients=CLIENTS)
    address = f"{net.server_ip}:{PORT}"
    run_dir = tmp_path / "run"
    server = Proc(
        [
            "server",
            "--address",
            address,
            "--certs",
            str(certs),
            "--clients",
            str(CLIENTS),
            "--fraction",
            "1",
            "--min-clients",
            str(CLIENTS),
            "--rounds",
            str(ROUNDS),
            "--local-steps",
            "2",
            "--out",
            str(run_dir),
            "--no-progress",
        ],
        cwd=tmp_path,
        prefix=net.command(net.server, []),
    )
    clients: list[Proc] = []
    try:
        server.expect(rf"listening on {net.server_ip}:\d+ \(mutual TLS\)")
        # A client host reaches the server only over the link: its own loopback has nothing.
        probe = subprocess.run(
            net.command(
                net.clients[0],
                [sys.executable, "-c", _CONNECT, net.server_ip, str(PORT)],
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert probe.stdout.split() == ["reachable", "refused"], probe.stderr
        clients = [
            Proc(
                ["client", "--server", address, "--client-id", str(i), "--certs", str(certs)],
                cwd=tmp_path,
                prefix=net.command(net.clients[i], []),
            )
            for i in range(CLIENTS)
        ]
        assert server.wait(2 * READY) == 0, server.output
        for c in clients:
            assert c.wait() == 0, c.output
            assert "the run is finished" in c.output
    finally:
        for p in (server, *clients):
            p.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"] == ROUNDS
    assert summary["updates_received"] == CLIENTS * ROUNDS
    assert summary["updates_rejected"] == 0 and summary["updates_failed"] == 0


# Connect to the server's address, then to loopback on the same port, from a client host.
_CONNECT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
for target in (host, "127.0.0.1"):
    try:
        socket.create_connection((target, port), timeout=5).close()
        print("reachable")
    except OSError:
        print("refused")
"""


# Both refusals in one interpreter inside the server's host: the address is one of its own.
_INSECURE = """
import sys
from fedlab.cli import main
address, out = sys.argv[1], sys.argv[2]
server = main(["server", "--insecure", "--address", address, "--clients", "2", "--out", out])
client = main(["client", "--insecure", "--server", address, "--client-id", "0"])
print("exit codes", server, client)
"""


def test_insecure_is_refused_on_a_real_interface(net: Hosts, tmp_path: Path) -> None:
    address = f"{net.server_ip}:{PORT}"
    run_dir = tmp_path / "run"
    done = subprocess.run(
        net.command(net.server, [sys.executable, "-c", _INSECURE, address, str(run_dir)]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "exit codes 2 2" in done.stdout, done.stdout + done.stderr
    assert f"--insecure refused on {address}" in done.stderr
    assert f"--insecure refused for {address}" in done.stderr
    assert not run_dir.exists()
