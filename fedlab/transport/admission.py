"""The gRPC server's gate: who may hold a server thread, for how many calls, for how long.

The synchronous gRPC server runs every call on one thread of a bounded pool, and a thread
stays with its call while the handler waits for the peer's next message. So the gate makes
three checks before a handler reads anything, and watches every read afterwards:

- **Admission from call metadata.** A call carries its client id and token in metadata
  (:func:`call_metadata`); the gate checks them, and the client certificate of mutual TLS,
  against the :class:`~fedlab.transport.security.Policy` before any message is read, so an
  unauthenticated peer is refused at once and holds nothing. Once the request is read, the
  id it names must be the id the call was admitted for.
- **Per-client limits.** An admitted client holds at most :data:`CALLS_PER_CLIENT` calls and
  :data:`UPLOADS_PER_CLIENT` upload at once; more are refused at once with
  ``RESOURCE_EXHAUSTED`` (retryable). The server sizes its pool for these limits, so no set of
  clients, stalled or not, can take the threads that the others' pulls and heartbeats need.
- **Stall deadlines.** Each read of a request message (the first included) and each send of a
  response message must finish within ``stall_timeout`` seconds; a :class:`Watchdog` cancels
  the call otherwise, which wakes the blocked handler thread.

Refusals do no reading and allocate nothing beyond their reason, and are logged at most once
per ``interval`` seconds with a count of those not shown (:class:`Refusals`), so a flood of
them cannot flood the log either.
"""

from __future__ import annotations

import collections
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import grpc

from fedlab.transport.security import TOKEN_HEADER, Policy

CLIENT_HEADER = "fedlab-client-id"
"""The metadata key carrying the id a call is made for."""

CALLS_PER_CLIENT = 4
"""Calls one client may have open at once: an honest client has at most two (a pull or an
upload, and a heartbeat); the rest is room for calls of a restarted client that the server has
not yet seen end."""

UPLOADS_PER_CLIENT = 1
"""Uploads one client may have open at once."""

T = TypeVar("T")


def call_metadata(client_id: int, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with every call: its id, and its token when it has one."""
    pairs = [(CLIENT_HEADER, str(client_id))]
    if token:
        pairs.append((TOKEN_HEADER, token))
    return tuple(pairs)


class Refusals:
    """Refused calls: counted, the last 1000 reasons kept, logged at a bounded rate.

    Args:
        log: where lines go (``None``: nowhere).
        interval: at most one line per this many seconds; the refusals not shown are counted
            in the next line (and in :meth:`flush`).
    """

    def __init__(self, log: Any = sys.stderr, interval: float = 5.0) -> None:
        self.log = log
        self.interval = interval
        self.reasons: collections.deque[str] = collections.deque(maxlen=1000)
        self.total = 0
        self._unshown = 0
        self._last = -math.inf
        self._lock = threading.Lock()

    def note(self, peer: str, reason: str) -> None:
        """Count one refusal; log it unless a line was logged less than ``interval`` s ago."""
        with self._lock:
            self.reasons.append(reason)
            self.total += 1
            now = time.monotonic()
            if now - self._last < self.interval:
                self._unshown += 1
                return
            unshown, self._unshown, self._last = self._unshown, 0, now
        if self.log is not None:
            more = f" ({unshown} more refusals not shown before this one)" if unshown else ""
            print(f"fedlab server: refused {peer}: {reason}{more}", file=self.log, flush=True)

    def flush(self) -> None:
        """Log the count of refusals not shown yet, if any."""
        with self._lock:
            unshown, self._unshown = self._unshown, 0
        if unshown and self.log is not None:
            print(
                f"fedlab server: {unshown} more refusals not shown ({self.total} in all)",
                file=self.log,
                flush=True,
            )


class _Watch:
    __slots__ = ("context", "deadline", "expired", "what")

    def __init__(self, context: grpc.ServicerContext, what: str) -> None:
        self.context = context
        self.what = what
        self.deadline = math.inf
        self.expired = False


class Watchdog:
    """Cancels calls that keep a server thread waiting on their peer for ``timeout`` seconds.

    One thread serves every call: armed watches wait in arming order, which is also deadline
    order since they share one timeout, so the thread sleeps until the oldest one is due.
    """

    def __init__(self, timeout: float, on_expire: Callable[[grpc.ServicerContext, str], None]):
        self.timeout = timeout
        self._on_expire = on_expire
        self._armed: collections.OrderedDict[int, _Watch] = collections.OrderedDict()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fedlab-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, context: grpc.ServicerContext, what: str) -> Iterator[_Watch]:
        """Cancel ``context``'s call unless the block ends within ``timeout`` seconds."""
        w = _Watch(context, what)
        with self._cond:
            w.deadline = time.monotonic() + self.timeout
            self._armed[id(w)] = w
            if len(self._armed) == 1:
                self._cond.notify()
        try:
            yield w
        finally:
            with self._cond:
                self._armed.pop(id(w), None)

    def close(self) -> None:
        """Stop the watchdog's thread."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                due: list[_Watch] = []
                while self._armed:
                    first = next(iter(self._armed.values()))
                    if first.deadline > now:
                        break
                    self._armed.popitem(last=False)
                    first.expired = True
                    due.append(first)
                if due:
                    # Cancelling takes gRPC's own locks: never while holding ours.
                    self._cond.release()
                    try:
                        for w in due:
                            self._on_expire(w.context, w.what)
                            w.context.cancel()
                    finally:
                        self._cond.acquire()
                    continue
                wait = next(iter(self._armed.values())).deadline - now if self._armed else None
                self._cond.wait(wait)


class Gate:
    """Admission, per-client limits and stall deadlines for every call of the server.

    Args:
        policy: who is admitted.
        stall_timeout: seconds a read of a request message, or a send of a response message,
            may keep a server thread waiting on the peer.
        log: where refusals are reported (``None``: nowhere).
        on_admit: called with each admitted client's id (a sign of life).
        log_interval: at most one refusal line per this many seconds.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        stall_timeout: float,
        log: Any = sys.stderr,
        on_admit: Callable[[int], None] = lambda cid: None,
        log_interval: float = 5.0,
    ) -> None:
        if UPLOADS_PER_CLIENT != 1:  # the upload set below counts one per client
            raise AssertionError("UPLOADS_PER_CLIENT must be 1")
        self.policy = policy
        self.refusals = Refusals(log, log_interval)
        self._on_admit = on_admit
        self._lock = threading.Lock()
        self._calls: dict[int, int] = {}
        self._uploads: set[int] = set()
        self._watchdog = Watchdog(stall_timeout, self._stalled)

    @staticmethod
    def threads(num_clients: int) -> int:
        """Server threads enough for every admitted client at its limit, plus refusals."""
        return CALLS_PER_CLIENT * min(num_clients, 1024) + 16

    def close(self) -> None:
        """Stop the watchdog; log the refusals not shown yet."""
        self._watchdog.close()
        self.refusals.flush()

    def refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> NoReturn:
        """Count and log the refusal, and end the call with ``code``."""
        self.refusals.note(context.peer(), reason)
        context.abort(code, reason)
        raise AssertionError("unreachable")  # abort raises

    def admit(self, context: grpc.ServicerContext) -> int:
        """The client id the call is admitted for; refuses it (reading nothing) otherwise."""
        cid, token = None, None
        for key, value in context.invocation_metadata() or ():
            text = value if isinstance(value, str) else value.decode(errors="replace")
            if key == CLIENT_HEADER:
                cid = text
            elif key == TOKEN_HEADER:
                token = text
        if cid is None or not (cid.isascii() and cid.isdigit()) or len(cid) > 18:
            self.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the call names no client id in its {CLIENT_HEADER!r} metadata "
                "(a fedlab client older than this server?)",
            )
        names: bytes | list[bytes] = context.auth_context().get("x509_common_name") or []
        first = names[0] if isinstance(names, list) and names else None
        common = first.decode(errors="replace") if isinstance(first, bytes) else None
        reason = self.policy.check(int(cid), common_name=common, token=token)
        if reason is not None:
            self.refuse(context, grpc.StatusCode.PERMISSION_DENIED, reason)
        self._on_admit(int(cid))
        return int(cid)

    def claim(self, context: grpc.ServicerContext, admitted: int, claimed: int) -> None:
        """Refuse the call when its request names another client than it was admitted for."""
        if claimed != admitted:
            self.refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"a call admitted for client {admitted} names client {claimed}",
            )

    @contextmanager
    def call(self, context: grpc.ServicerContext, *, upload: bool = False) -> Iterator[int]:
        """Admit the call and hold one of its client's call slots (and its upload slot).

        Yields the client id. The slots are held until the block ends, that is until the
        handler's thread is free again.
        """
        cid = self.admit(context)
        with self._lock:
            calls = self._calls.get(cid, 0)
            busy = None
            if upload and cid in self._uploads:
                busy = f"client {cid} already has an upload open"
            elif calls >= CALLS_PER_CLIENT:
                busy = f"client {cid} already has {calls} calls open"
            else:
                self._calls[cid] = calls + 1
                if upload:
                    self._uploads.add(cid)
        if busy is not None:
            self.refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
        try:
            yield cid
        finally:
            with self._lock:
                self._calls[cid] -= 1
                if not self._calls[cid]:
                    del self._calls[cid]
                if upload:
                    self._uploads.discard(cid)

    def read(self, requests: Iterator[T], context: grpc.ServicerContext, what: str) -> Iterator[T]:
        """``requests``, each message (and the end) awaited for at most ``stall_timeout`` s."""
        while True:
            with self._watchdog.watch(context, what) as watch:
                try:
                    message = next(requests)
                except StopIteration:
                    if watch.expired:
                        # gRPC ends the request stream of the call the watchdog cancelled: that
                        # is a cut, not the client's end of the stream (no verdict on a half
                        # update, whose task must stay assigned).
                        context.abort(grpc.StatusCode.CANCELLED, f"{what}: call cut")
                    return
            yield message

    def one(self, requests: Iterator[T], context: grpc.ServicerContext, what: str) -> T:
        """The single request message of a call, awaited for at most ``stall_timeout`` s."""
        with self._watchdog.watch(context, what):
            message = next(requests, None)
        if message is None:
            self.refuse(context, grpc.StatusCode.INVALID_ARGUMENT, f"{what} without a request")
        return message

    def send(self, responses: Iterator[T], context: grpc.ServicerContext, what: str) -> Iterator[T]:
        """``responses``, each one's send awaited for at most ``stall_timeout`` s.

        gRPC sends a message between two resumptions of the handler's generator, blocking
        while the peer's flow-control window is full: a peer that stops reading is cut.
        """
        for message in responses:
            with self._watchdog.watch(context, what):
                yield message

    def _stalled(self, context: grpc.ServicerContext, what: str) -> None:
        self.refusals.note(
            context.peer(), f"{what}: nothing for {self._watchdog.timeout:g} s, call cut"
        )
