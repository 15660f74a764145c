"""Helpers for the deployment tests: `fedlab` subprocesses on loopback, read line by line,
and in-process gRPC servers (:func:`serve`) with their client connections (:func:`connect`).

Every wait is on a sign of readiness (a printed line, a file, an exit) with a deadline meant
to hold on a loaded machine: a process that starts in 2 s alone may take a minute beside a
full test suite, so deadlines are minutes, and a test that passes never waits for them.
Every process started here is killed by :func:`kill_all` (the deployment tests call it after
each test), so a failed test leaves nothing running.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedlab.transport.client import Connection
from fedlab.transport.security import Policy
from fedlab.transport.server import GrpcTransport

READY = 180.0
"""Seconds to wait for a process to be ready (print a line, write a file) or to exit."""

_started: list[Proc] = []


class Proc:
    """A ``python -m fedlab ...`` subprocess whose output lines are collected as they come.

    ``prefix`` runs it through another command (``ip netns exec NAME`` for another host).
    """

    def __init__(self, args: Sequence[str], *, cwd: Path, prefix: Sequence[str] = ()) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fedlab", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        _started.append(self)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float = READY) -> re.Match[str]:
        """The first new output line matching ``pattern``; fails after ``timeout`` s."""
        end = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r}:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"exited before {pattern!r}:\n{self.output}")
            self.lines.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    @property
    def output(self) -> str:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def wait(self, timeout: float = READY) -> int:
        """The exit status; kills the process and fails if it does not exit in time."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not exit within {timeout} s:\n{self.output}") from None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()


def kill_all() -> None:
    """Kill every process these helpers started that is still running."""
    while _started:
        _started.pop().kill()


def wait_until(
    condition: Callable[[], bool], what: str, *, watch: Proc | None = None, timeout: float = READY
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` s, or as soon as ``watch``
    exits (with its output), whichever comes first."""
    end = time.monotonic() + timeout
    while not condition():
        if watch is not None and not watch.alive():
            raise AssertionError(f"exited before {what}:\n{watch.output}")
        if time.monotonic() > end:
            output = f":\n{watch.output}" if watch is not None else ""
            raise AssertionError(f"not within {timeout:g} s: {what}{output}")
        time.sleep(0.05)


def start_server(args: Sequence[str], *, cwd: Path, port: int = 0) -> tuple[Proc, int]:
    """Start ``fedlab server`` on loopback; return it and the port it listens on."""
    server = Proc(["server", "--address", f"127.0.0.1:{port}", "--no-progress", *args], cwd=cwd)
    try:
        m = server.expect(r"listening on 127\.0\.0\.1:(\d+)")
    except AssertionError:
        server.kill()
        raise
    return server, int(m.group(1))


def start_clients(ids: Sequence[int], port: int, args: Sequence[str], *, cwd: Path) -> list[Proc]:
    """Start one ``fedlab client`` per id against the server on ``port``."""
    return [
        Proc(
            [
                "client",
                "--server",
                f"127.0.0.1:{port}",
                "--client-id",
                str(i),
                "--threads",
                "1",
                *args,
            ],
            cwd=cwd,
        )
        for i in ids
    ]


def serve(policy: Policy, credentials: Any = None, **kw: Any) -> GrpcTransport:
    """A :class:`GrpcTransport` in this process on a free loopback port, for ``policy``'s
    clients (``num_clients`` may say otherwise); it logs nothing and, unless ``kw`` says
    otherwise, does not linger on close."""
    kw.setdefault("linger", 0.0)
    kw.setdefault("num_clients", policy.num_clients)
    return GrpcTransport(
        address="127.0.0.1:0",
        policy=policy,
        credentials=credentials,
        log=None,
        **kw,
    )


def connect(t: GrpcTransport, cid: int, **kw: Any) -> Connection:
    """Client ``cid``'s connection to ``t`` (``kw``: credentials, token...)."""
    return Connection(f"127.0.0.1:{t.port}", cid, **kw)
