"""Network namespaces as separate hosts for deployment tests.

:func:`hosts` makes one namespace for the server and one per client, each with its own
interface and address, joined by veth links to a bridge that lives inside the server's
namespace. Nothing is added to the machine's own network: the only routes are between these
namespaces, so no test traffic can leave them. Every namespace is deleted on exit, also when
the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

SUBNET = "10.213.7"  # inside the namespaces only; the bridge is not on the machine's network
SERVER_IP = f"{SUBNET}.1"


@dataclass(frozen=True)
class Hosts:
    """The namespaces of one test: ``server`` and ``clients[i]``, with their addresses."""

    server: str
    clients: tuple[str, ...]
    server_ip: str = SERVER_IP

    def client_ip(self, i: int) -> str:
        """The address of client host ``i``."""
        return f"{SUBNET}.{10 + i}"

    def command(self, namespace: str, argv: list[str]) -> list[str]:
        """``argv`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *argv]


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or ``None`` when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    probe = f"fedlab-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@contextmanager
def hosts(clients: int, *, tag: str = "") -> Iterator[Hosts]:
    """A server namespace and ``clients`` client namespaces, deleted on exit.

    Args:
        clients: number of client hosts.
        tag: part of the namespace names, to tell concurrent tests apart (default: the pid).
    """
    prefix = f"fl{tag or os.getpid()}"
    made: list[str] = []
    try:
        server = f"{prefix}-srv"
        _ip("netns", "add", server)
        made.append(server)
        _ip("-n", server, "link", "set", "lo", "up")
        _ip("-n", server, "link", "add", "br0", "type", "bridge")
        _ip("-n", server, "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        _ip("-n", server, "link", "set", "br0", "up")
        names = []
        for i in range(clients):
            name = f"{prefix}-c{i}"
            _ip("netns", "add", name)
            made.append(name)
            names.append(name)
            _ip("-n", name, "link", "set", "lo", "up")
            # One veth pair per client: "eth0" in the client's namespace, its peer on the
            # server's bridge.
            port = f"p{i}"
            veth = ["type", "veth", "peer", "name", "eth0", "netns", name]
            _ip("link", "add", port, "netns", server, *veth)
            _ip("-n", server, "link", "set", port, "master", "br0")
            _ip("-n", server, "link", "set", port, "up")
            _ip("-n", name, "addr", "add", f"{SUBNET}.{10 + i}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
        yield Hosts(server=server, clients=tuple(names))
    finally:
        for name in reversed(made):
            # Processes still inside a namespace would keep it (and its veths) alive.
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
