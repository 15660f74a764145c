"""Helpers for the deployment tests: `fedlab` subprocesses on loopback, read line by line."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path


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
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
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

    def wait(self, timeout: float = 30.0) -> int:
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


def start_server(args: Sequence[str], *, cwd: Path, port: int = 0) -> tuple[Proc, int]:
    """Start ``fedlab server`` on loopback; return it and the port it listens on."""
    server = Proc(["server", "--address", f"127.0.0.1:{port}", "--no-progress", *args], cwd=cwd)
    m = server.expect(r"listening on 127\.0\.0\.1:(\d+)")
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
