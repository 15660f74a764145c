"""The gRPC transport: the engine's :class:`~fedlab.transport.Transport` on a wall clock.

Clients initiate every call: they join, long-poll for a task, stream their update back and send
heartbeats while training. The engine thread calls :meth:`GrpcTransport.submit` and
:meth:`GrpcTransport.next_update`; gRPC handler threads serve the clients. A task is
single-use: its random id must come back with the update, and the assignment is removed the
moment an update for it is accepted, so a replayed or duplicated update finds nothing to answer.
Before it answers a push, the server runs the engine's own update check (installed through
:meth:`GrpcTransport.check_updates`), so the client hears ``REFUSED`` for anything the engine
would reject, and that task is consumed.
A client that stops sending signs of life for ``stall_timeout`` seconds turns into a
:class:`~fedlab.transport.Failure`, so no client can block a run.
"""

from __future__ import annotations

import collections
import hmac
import json
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch

from fedlab.proto import fedlab_pb2 as pb
from fedlab.transport import Checked, Failure, UpdateCheck
from fedlab.transport.admission import Gate
from fedlab.transport.codec import Assembler, Chunk, WireError, encode, payload_bytes
from fedlab.transport.security import Policy, check_run_id
from fedlab.transport.service import OPTIONS, handlers
from fedlab.types import ClientId, Params, State, Task, Update

MAX_WAIT = 30.0
"""Longest long-poll, in seconds: a pull returns ``NONE`` after this and the client polls again."""


@dataclass
class _Assignment:
    version: int
    task_id: str
    params: Params
    config_json: str
    limit: int
    alive: float  # monotonic time of the client's last sign of life for this task


@dataclass(frozen=True)
class _Encoded:
    version: int
    params: Params
    chunks: list[bytes]


class GrpcTransport:
    """Serves tasks to remote clients over gRPC and hands their updates to the engine.

    Args:
        num_clients: the client population (ids ``0 .. num_clients - 1``).
        address: ``HOST:PORT`` to listen on (port 0 picks a free one; see :attr:`port`).
        policy: who is admitted.
        credentials: gRPC server credentials, or ``None`` for plaintext (the caller decides
            whether that is allowed).
        run: the run's id (its fingerprint), told to joining clients; see
            :func:`~fedlab.transport.security.check_run_id`.
        config_toml: the run configuration, told to joining clients.
        heartbeat: seconds between a training client's heartbeats.
        stall_timeout: seconds without a sign of life after which a task fails; also the
            longest a call may keep a server thread waiting for its next request message
            (the first included) or for the peer to take a response message, after which
            the call is cut (see :mod:`fedlab.transport.admission`).
        max_update_bytes: the largest update accepted (0: four times the task's params plus
            1 MiB).
        linger: seconds :meth:`close` waits for joined clients to hear the run is over.
        max_uploads: updates received or waiting for the engine at the same time; others wait
            their turn, so the memory of uploads is bounded by ``max_uploads`` updates whatever
            the number of clients.
        spool: a directory where updates larger than ``spool_bytes`` are received into
            memory-mapped files (see :class:`~fedlab.transport.codec.Assembler`), so the
            updates a synchronous version holds until it aggregates live in the page cache,
            not in the server's memory (``None``: always in RAM).
        spool_bytes: the update size above which ``spool`` is used.
        log: where refusals are reported, at most one line per 5 s with a count of those
            not shown (``None``: nowhere).
    """

    def __init__(
        self,
        *,
        num_clients: int,
        address: str,
        policy: Policy,
        credentials: grpc.ServerCredentials | None,
        run: str = "run",
        config_toml: str = "",
        heartbeat: float = 5.0,
        stall_timeout: float = 30.0,
        max_update_bytes: int = 0,
        linger: float = 5.0,
        max_uploads: int = 16,
        spool: str | os.PathLike[str] | None = None,
        spool_bytes: int = 16 << 20,
        log: Any = sys.stderr,
    ) -> None:
        self.num_clients = num_clients
        self.policy = policy
        self.run = check_run_id(run)  # clients name their state files after it
        self.config_toml = config_toml
        self.heartbeat = heartbeat
        self.stall_timeout = stall_timeout
        self.max_update_bytes = max_update_bytes
        self.linger = linger
        if max_uploads < 1:
            raise ValueError(f"max_uploads must be at least 1, got {max_uploads}")
        self._uploads = threading.BoundedSemaphore(max_uploads)
        self.spool = Path(spool) if spool is not None else None
        self.spool_bytes = spool_bytes
        if self.spool is not None:
            self.spool.mkdir(parents=True, exist_ok=True)
            for leftover in self.spool.glob("*.part"):  # a crash between create and unlink
                leftover.unlink(missing_ok=True)
        self._closed = False
        self.log = log
        self.joined: set[ClientId] = set()
        self._cond = threading.Condition()
        self._tasks: dict[ClientId, _Assignment] = {}
        self._events: collections.deque[Update | Checked | Failure] = collections.deque()
        self._restored: dict[ClientId, tuple[int, str]] = {}
        self._finished = False
        self._told: set[ClientId] = set()
        self._seen: dict[ClientId, float] = {}
        self._t0 = time.monotonic()
        self._offset = 0.0
        self._encoded: _Encoded | None = None
        self._encoding = threading.Lock()
        self._check: UpdateCheck | None = None
        self._gate = Gate(policy, stall_timeout=stall_timeout, log=log, on_admit=self._saw)
        # Every call holds a worker thread while it waits (long-polls, reads, sends): the pool
        # has room for every client at the gate's per-client limit, so none can starve another.
        workers = Gate.threads(num_clients)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=OPTIONS)
        self._server.add_generic_rpc_handlers((handlers(self, self._gate),))
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._server.start()

    # ------------------------------------------------------------------ the engine's side

    def clients(self) -> int:
        return self.num_clients

    def now(self) -> float:
        return self._offset + time.monotonic() - self._t0

    def submit(self, client_id: ClientId, task: Task) -> None:
        with self._cond:
            if client_id in self._tasks:
                raise RuntimeError(f"client {client_id} already has a task")
            restored = self._restored.pop(client_id, None)
            # A task restored from a checkpoint keeps its id, so an update finished while
            # the server was down is still accepted after it resumes.
            if restored is not None and restored[0] == task.version:
                task_id = restored[1]
            else:
                task_id = secrets.token_hex(16)
            limit = self.max_update_bytes or 4 * payload_bytes(task.params) + (1 << 20)
            self._tasks[client_id] = _Assignment(
                version=task.version,
                task_id=task_id,
                params=task.params,
                config_json=json.dumps(dict(task.config), allow_nan=False),
                limit=limit,
                alive=time.monotonic(),
            )
            self._cond.notify_all()

    def check_updates(self, check: UpdateCheck) -> None:
        """Run ``check`` on every update before answering its client (see :meth:`push`).

        ``check`` returns the decoded update or why it is rejected; it is called on gRPC
        handler threads, so it must only read what it shares with the engine thread.
        """
        self._check = check

    def next_update(self, timeout: float | None) -> Update | Checked | Failure | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._expire()
                if self._events:
                    event = self._events.popleft()
                    if not isinstance(event, Failure):
                        # The engine has it now: its upload slot goes to the next client.
                        self._uploads.release()
                    return event
                if timeout is None and not self._tasks:
                    return None
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    return None
                self._cond.wait(wait)

    def _expire(self) -> None:
        now = time.monotonic()
        for cid, a in list(self._tasks.items()):
            if now - a.alive > self.stall_timeout:
                del self._tasks[cid]
                self._events.append(
                    Failure(cid, a.version, f"no sign of life for {self.stall_timeout:g} s")
                )

    def state_dict(self) -> State:
        with self._cond:
            return {
                "now": self.now(),
                "tasks": {
                    cid: {"version": a.version, "task_id": a.task_id}
                    for cid, a in self._tasks.items()
                },
            }

    def load_state_dict(self, state: State) -> None:
        with self._cond:
            if self._tasks:
                raise RuntimeError("load_state_dict must come before any submit")
            self._offset = float(state["now"])
            self._t0 = time.monotonic()
            self._restored = {
                int(c): (int(t["version"]), str(t["task_id"])) for c, t in state["tasks"].items()
            }

    def wait_for_clients(self, n: int, timeout: float | None = None) -> bool:
        """Block until ``n`` distinct clients have joined; ``False`` if ``timeout`` passes."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.joined) >= n, timeout)

    def close(self) -> None:
        """Tell clients the run is over (waiting up to ``linger`` s for them to hear), stop."""
        with self._cond:
            if self._closed:
                return
            self._closed = self._finished = True
            self._cond.notify_all()
            self._cond.wait_for(self._everyone_told, self.linger)
        self._server.stop(grace=1.0).wait()
        self._gate.close()
        self._encoded = None

    def _everyone_told(self) -> bool:
        # Clients silent for longer than the stall timeout are gone; nobody waits for them.
        now = time.monotonic()
        live = {c for c in self.joined if now - self._seen.get(c, 0.0) <= self.stall_timeout}
        return live <= self._told

    # ------------------------------------------------------------------ the clients' side

    @property
    def refused(self) -> collections.deque[str]:
        """The reasons of the last 1000 refused calls."""
        return self._gate.refusals.reasons

    @property
    def refusals(self) -> int:
        """How many calls were refused or cut so far."""
        return self._gate.refusals.total

    def _saw(self, client_id: ClientId) -> None:
        with self._cond:
            self._seen[client_id] = time.monotonic()

    def _refuse(self, context: grpc.ServicerContext, code: grpc.StatusCode, reason: str) -> None:
        self._gate.refuse(context, code, reason)

    def _note_refusal(self, context: grpc.ServicerContext, reason: str) -> None:
        """Count and log (at a bounded rate) a refusal that answers rather than aborts."""
        self._gate.refusals.note(context.peer(), reason)

    def _alive(self, client_id: ClientId, task_id: str = "") -> None:
        a = self._tasks.get(client_id)
        if a is not None and (not task_id or hmac.compare_digest(a.task_id, task_id)):
            a.alive = time.monotonic()

    def join(self, client_id: ClientId) -> pb.JoinReply:
        with self._cond:
            self.joined.add(client_id)
            self._told.discard(client_id)
            self._alive(client_id)
            self._cond.notify_all()
        return pb.JoinReply(
            run=self.run, config_toml=self.config_toml, heartbeat_seconds=self.heartbeat
        )

    def pull(self, client_id: ClientId, wait: float, active: Any) -> Iterator[bytes]:
        """The serialized ``TaskChunk`` messages of the client's task, once it has one."""
        wait = min(max(wait, 0.0), MAX_WAIT)
        end = time.monotonic() + wait
        with self._cond:
            self.joined.add(client_id)
            while not self._finished and client_id not in self._tasks:
                left = end - time.monotonic()
                if left <= 0 or not active():
                    break
                self._cond.wait(min(left, 1.0))
            if self._finished:
                self._told.add(client_id)
                self._cond.notify_all()
                a = None
            else:
                a = self._tasks.get(client_id)
                self._alive(client_id)
        if a is None:
            status = pb.TaskHeader.FINISHED if self._finished else pb.TaskHeader.NONE
            yield pb.TaskChunk(header=pb.TaskHeader(status=status)).SerializeToString()
            return
        yield pb.TaskChunk(
            header=pb.TaskHeader(
                status=pb.TaskHeader.TASK,
                version=a.version,
                task_id=a.task_id,
                config_json=a.config_json,
                total_bytes=payload_bytes(a.params),
                tensors=len(a.params),
            )
        ).SerializeToString()
        yield from self._chunks(a.version, a.params)

    def _chunks(self, version: int, params: Params) -> Iterable[bytes]:
        """The serialized params of a task, encoded once for every client pulling them.

        Only the newest version's params are kept encoded (about their size in memory), so
        memory does not grow with the number of clients or versions; params of an older
        version, or other params of the same version, are encoded chunk by chunk as they stream.
        """
        with self._encoding:  # a second puller waits for the first one's encoding
            held = self._encoded
            if held is not None and held.params is params:
                return held.chunks
            if held is not None and version <= held.version:
                return encode(params)
            self._encoded = None  # freed before its successor is built
            chunks = list(encode(params))
            self._encoded = _Encoded(version, params, chunks)
            return chunks

    def heartbeat_from(self, client_id: ClientId, task_id: str) -> pb.HeartbeatReply:
        with self._cond:
            self._alive(client_id, task_id)
            if self._finished:
                self._told.add(client_id)  # it stops after its current task, pushing nothing
                self._cond.notify_all()
            return pb.HeartbeatReply(finished=self._finished)

    def push(
        self, chunks: Iterator[Chunk[pb.UpdateHeader]], context: grpc.ServicerContext
    ) -> pb.PushReply:
        first = next(chunks, None)
        if first is None or first.header is None:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, "update without a header")
            raise AssertionError("unreachable")  # abort raises
        h = first.header
        cid = int(h.client_id)  # the call's own client: the gate checked it
        with self._cond:
            a = self._tasks.get(cid)
            reason = self._unassigned(cid, a, h.version, h.task_id)
        if reason is not None or a is None:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, reason or "")
            raise AssertionError("unreachable")
        # A slot is held from the first byte until the engine takes the update (next_update),
        # so received-but-unconsumed updates are bounded too, not only those in transit.
        while not self._uploads.acquire(timeout=1.0):
            if not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "the upload was cancelled")
            with self._cond:
                self._alive(cid, h.task_id)  # waiting for its turn is no stall
        try:
            payload, metrics = self._receive(cid, h, a.limit, first, chunks)
        except WireError as e:
            self._uploads.release()
            if not context.is_active():
                # Cut for stalling (the stream then reads as ended) or cancelled by the client:
                # no verdict on an update that never fully arrived, and the task stays its own.
                context.abort(grpc.StatusCode.CANCELLED, "the upload was cut")
            return self._refuse_update(context, cid, h, str(e))
        except BaseException:
            self._uploads.release()
            raise
        update = Update(
            client_id=cid,
            version=int(h.version),
            payload=payload,
            num_examples=int(h.num_examples),
            metrics=metrics,
        )
        event = self._checked(update)
        if isinstance(event, str):
            self._uploads.release()
            return self._refuse_update(context, cid, h, event)
        with self._cond:
            # The assignment may have expired, or a duplicate upload may have won meanwhile.
            now = self._tasks.get(cid)
            reason = self._unassigned(cid, now, h.version, h.task_id)
            if reason is None:
                del self._tasks[cid]
                self._events.append(event)
                self._cond.notify_all()
        if reason is not None:
            self._uploads.release()
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION, reason)
        return pb.PushReply(accepted=True, status=pb.PushReply.ACCEPTED)

    def _checked(self, update: Update) -> Update | Checked | str:
        """``update`` passed through the engine's check: why it is rejected, or what goes to
        the engine (with the decoded update, when there is a check).

        An error inside the check itself is no verdict on the client: the update goes to the
        engine as received, which decodes and validates it on its own thread and reports the
        error there.
        """
        if self._check is None:
            return update
        try:
            verdict = self._check(update)
        except Exception:
            return update
        return verdict if isinstance(verdict, str) else Checked(update, verdict)

    def _refuse_update(
        self, context: grpc.ServicerContext, cid: ClientId, h: pb.UpdateHeader, reason: str
    ) -> pb.PushReply:
        """Refuse the update for the client's current task, and consume that task.

        Left assigned, the task would be pulled, retrained and refused again, in a loop as
        fast as the client trains; consumed, the engine counts it as rejected and may hand
        the client a new one.
        """
        self._note_refusal(context, reason)  # counted before the engine can hear of it
        with self._cond:
            if self._unassigned(cid, self._tasks.get(cid), h.version, h.task_id) is None:
                del self._tasks[cid]
                self._events.append(Failure(cid, int(h.version), reason, refused=True))
                self._cond.notify_all()
        return pb.PushReply(accepted=False, status=pb.PushReply.REFUSED, reason=reason)

    def _receive(
        self,
        cid: ClientId,
        h: pb.UpdateHeader,
        limit: int,
        first: Chunk[pb.UpdateHeader],
        chunks: Iterator[Chunk[pb.UpdateHeader]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Read one update's pieces into tensors.

        Raises:
            WireError: any violation (non-finite metrics, sizes, dtypes, checksum), naming
                the client.
        """
        try:
            metrics = {str(k): float(v) for k, v in h.metrics.items()}
            if not all(math.isfinite(v) for v in metrics.values()):
                raise WireError("metrics must be finite")
            spool = self.spool if h.total_bytes > self.spool_bytes else None
            asm = Assembler(
                total_bytes=h.total_bytes, tensors=h.tensors, max_bytes=limit, spool=spool
            )
            checksum = None
            chunk: Chunk[pb.UpdateHeader] | None = first
            while chunk is not None:
                if chunk is not first and chunk.header is not None:
                    raise WireError("a second header in one update")
                for piece, data in chunk.pieces:
                    asm.add(piece, data)
                with self._cond:
                    self._alive(cid, h.task_id)  # a long upload is a sign of life too
                if chunk.checksum:
                    checksum = chunk.checksum
                    break
                chunk = next(chunks, None)
            if checksum is None:
                raise WireError("the update ended without its checksum")
            if next(chunks, None) is not None:
                raise WireError("data after the checksum")
            return asm.finish(checksum), metrics
        except WireError as e:
            raise WireError(f"client {cid}: {e}") from e

    @staticmethod
    def _unassigned(cid: int, a: _Assignment | None, version: int, task_id: str) -> str | None:
        if a is None:
            return f"client {cid} holds no task (expired, answered already, or never assigned)"
        if a.version != version:
            return f"client {cid} sent an update for version {version}, its task is {a.version}"
        if not hmac.compare_digest(a.task_id.encode(), task_id.encode()):
            return f"client {cid} named a task id that is not its current task"
        return None
