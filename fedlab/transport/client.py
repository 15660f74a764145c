"""The deployed client: join, pull a task, train it with a :class:`ClientRuntime`, push back.

The client initiates every call, so it works behind NAT. It keeps its own per-client state
(momenta, duals, error feedback) in a state directory, saved once the server accepted the
update it belongs to. When the server is unreachable (restarting, resuming from a checkpoint,
a network blip) it retries with exponential backoff and jitter, keeping a finished update to
push again; it gives up only after ``give_up`` seconds without reaching the server.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedlab import tensorio
from fedlab.client import ClientRuntime
from fedlab.proto import fedlab_pb2 as pb
from fedlab.proto import fedlab_pb2_grpc as pb_grpc
from fedlab.transport.admission import call_metadata
from fedlab.transport.codec import Assembler, Chunk, WireError, decode, encode, payload_bytes
from fedlab.transport.security import (
    SecurityError,
    check_run_id,
    explain_connection_failure,
)
from fedlab.transport.service import OPTIONS
from fedlab.types import State, Task, Update

# Codes after which trying again may succeed: the server is down, restarting or overloaded.
RETRY = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


class ClientError(RuntimeError):
    """The server refused this client, or stayed unreachable for too long."""


@dataclass(frozen=True)
class Joined:
    """What the server says when a client joins."""

    run: str
    config_toml: str
    heartbeat: float


@dataclass(frozen=True)
class Assigned:
    """A task pulled from the server, with the id its update must name."""

    task: Task
    task_id: str


FINISHED = "finished"


class Connection:
    """One client's calls to the server.

    Args:
        address: the server's ``HOST:PORT``.
        client_id: this client's id.
        credentials: gRPC channel credentials, or ``None`` for plaintext.
        token: sent with every call, in its metadata beside the client id, when given.
        server_name: the name to expect in the server's certificate (default: the host).
        client_cert: the certificate file ``credentials`` present, if any (for messages).
    """

    def __init__(
        self,
        address: str,
        client_id: int,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        server_name: str | None = None,
        client_cert: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.tls = credentials is not None
        self.client_cert = client_cert
        options = list(OPTIONS)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.stub = pb_grpc.FederationStub(self.channel)
        # Task and update chunks bypass the stub's protobuf objects (see fedlab.transport.codec).
        service = "/" + pb.DESCRIPTOR.services_by_name["Federation"].full_name
        self._pull_task = self.channel.unary_stream(
            f"{service}/PullTask",
            request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=_task_chunk,
        )
        self._push_update: grpc.StreamUnaryMultiCallable[bytes, pb.PushReply] = (
            self.channel.stream_unary(  # sends serialized chunks as they are
                f"{service}/PushUpdate", response_deserializer=pb.PushReply.FromString
            )
        )
        # Sent with every call: the server admits a call from these before reading it.
        self.metadata = call_metadata(client_id, token)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def join(self, timeout: float = 30.0) -> Joined:
        """Announce this client."""
        reply = self.stub.Join(
            pb.JoinRequest(client_id=self.client_id), timeout=timeout, metadata=self.metadata
        )
        return Joined(reply.run, reply.config_toml, reply.heartbeat_seconds or 5.0)

    def pull(self, wait: float = 10.0, max_bytes: int | None = None) -> Assigned | str | None:
        """This client's task, ``None`` if none came within ``wait`` s, or :data:`FINISHED`.

        ``max_bytes`` bounds the params accepted (``None``: whatever the header announces).

        Raises:
            WireError: the task stream is malformed.
        """
        stream: Iterator[Chunk[pb.TaskHeader]] = self._pull_task(
            pb.PullRequest(client_id=self.client_id, wait_seconds=wait),
            timeout=wait + 600.0,
            metadata=self.metadata,
        )
        first = next(stream, None)
        if first is None or first.header is None:
            raise WireError("task stream without a header")
        h = first.header
        if h.status == pb.TaskHeader.FINISHED:
            return FINISHED
        if h.status != pb.TaskHeader.TASK:
            return None
        # The server's params are trusted no further than an update is on the server.
        limit = h.total_bytes if max_bytes is None else max_bytes
        asm = Assembler(total_bytes=h.total_bytes, tensors=h.tensors, max_bytes=limit)
        checksum = b""
        for chunk in stream:
            for piece, data in chunk.pieces:
                asm.add(piece, data)
            if chunk.checksum:
                checksum = chunk.checksum
                break
        params = asm.finish(checksum)
        config = json.loads(h.config_json) if h.config_json else {}
        if not isinstance(config, dict):
            raise WireError("task config is not a JSON object")
        return Assigned(Task(int(h.version), params, config), h.task_id)

    def push(self, update: Update, task_id: str, timeout: float = 600.0) -> str | None:
        """Stream ``update`` to the server.

        Returns:
            ``None`` once the server accepted it, else why the server refused it: then its
            task is consumed all the same (pull a new one; never retrain it).
        """
        header = pb.UpdateHeader(
            client_id=self.client_id,
            version=update.version,
            task_id=task_id,
            num_examples=update.num_examples,
            metrics={k: float(v) for k, v in update.metrics.items()},
            total_bytes=payload_bytes(update.payload),
            tensors=len(update.payload),
        )

        def chunks() -> Iterator[bytes]:
            yield pb.UpdateChunk(header=header).SerializeToString()
            yield from encode(update.payload)

        reply = self._push_update(chunks(), timeout=timeout, metadata=self.metadata)
        if reply.status == pb.PushReply.REFUSED:
            return reply.reason or "refused"
        return None

    def heartbeat(self, task_id: str = "", timeout: float = 10.0) -> bool:
        """Tell the server this client is alive; ``True`` once the run is finished."""
        reply = self.stub.Heartbeat(
            pb.HeartbeatRequest(client_id=self.client_id, task_id=task_id),
            timeout=timeout,
            metadata=self.metadata,
        )
        return bool(reply.finished)


def _task_chunk(buf: bytes) -> Chunk[pb.TaskHeader]:
    return decode(buf, pb.TaskHeader)


class Backoff:
    """Exponential backoff with full jitter, capped at ``cap`` seconds per wait."""

    def __init__(self, base: float = 0.2, cap: float = 5.0, seed: int | None = None) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0
        self._rng = random.Random(seed)

    def next(self) -> float:
        """Seconds to wait before the next attempt."""
        delay = self._rng.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        """After a success: start again from short waits."""
        self.attempt = 0


class _Heartbeats:
    """Sends heartbeats for ``task_id`` every ``interval`` s until stopped (errors ignored)."""

    def __init__(self, conn: Connection, task_id: str, interval: float) -> None:
        self.finished = False  # the server said the run is over
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(conn, task_id, interval), daemon=True
        )

    def _run(self, conn: Connection, task_id: str, interval: float) -> None:
        while not self._stop.wait(interval):
            # The server may be restarting; the push retries, so a missed beat is harmless.
            with contextlib.suppress(grpc.RpcError):
                self.finished = conn.heartbeat(task_id, timeout=interval) or self.finished

    def __enter__(self) -> _Heartbeats:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_client(
    conn: Connection,
    build: Callable[[Joined], ClientRuntime],
    *,
    state_dir: str | Path | None = None,
    give_up: float = 300.0,
    poll: float = 10.0,
    backoff: Backoff | None = None,
    log: Any = sys.stderr,
) -> int:
    """Serve tasks until the server says the run is finished; return the tasks completed.

    Args:
        conn: the connection to the server.
        build: makes the runtime once the server told the run's configuration.
        state_dir: where this client's state is kept between tasks (``None``: in memory).
        give_up: seconds without reaching the server before raising :class:`ClientError`.
        poll: long-poll seconds per pull.
        backoff: the retry schedule.
        log: where progress and retries are reported (``None``: nowhere).

    Raises:
        ClientError: the server refused this client, sent an invalid run id, could not be
            reached for ``give_up`` s, or the first connection failed its TLS handshake.
    """
    backoff = backoff or Backoff()
    cid = conn.client_id
    runtime: ClientRuntime | None = None
    joined: Joined | None = None
    state: State | None = None
    state_path: Path | None = None
    pending: tuple[Update, str, State] | None = None
    answered: tuple[str, Update] | None = None  # the last update the server accepted
    limit: int | None = None
    done = 0
    last_contact = time.monotonic()
    reached = False  # the server answered a call at least once

    def say(message: str) -> None:
        if log is not None:
            print(f"fedlab client {cid}: {message}", file=log, flush=True)

    while True:
        try:
            if joined is None:
                joined = conn.join()
                reached = True
                try:
                    check_run_id(joined.run, source="the run id the server sent")
                except SecurityError as e:
                    raise ClientError(str(e)) from None
                if runtime is None:
                    runtime = build(joined)
                    # Tasks carry this model's params: refuse anything much larger.
                    limit = 4 * payload_bytes(runtime.model.state_dict()) + (1 << 20)
                if state_dir is not None:
                    # One file per run, so a state from another run is never picked up.
                    state_path = Path(state_dir) / f"client-{cid}-{joined.run[:16]}.fl"
                    state_path.parent.mkdir(parents=True, exist_ok=True)
                    state = tensorio.load(state_path) if state_path.exists() else None
                say("joined")
            if pending is not None:
                update, task_id, new_state = pending
                try:
                    refused = conn.push(update, task_id)
                except grpc.RpcError as e:
                    if e.code() not in (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.INVALID_ARGUMENT,
                    ):
                        raise
                    say(f"update for version {update.version} refused: {e.details()}")
                else:
                    if refused is not None:
                        # Its task is consumed: keep the state the server's view of this client
                        # matches, and take the next task the next pull brings.
                        say(f"update for version {update.version} refused: {refused}")
                    elif answered is None or answered[0] != task_id:
                        state = new_state
                        if state_path is not None:
                            tensorio.save(state_path, state)
                        done += 1
                    if refused is None:
                        answered = (task_id, update)
                pending = None
            got = conn.pull(poll, limit)
            last_contact = time.monotonic()
            backoff.reset()
            if got == FINISHED:
                say(f"the run is finished; {done} tasks done")
                return done
            if not isinstance(got, Assigned):
                continue
            assert runtime is not None
            if answered is not None and answered[0] == got.task_id:
                # The server restarted from a checkpoint older than our accepted answer: send
                # the same update again instead of training twice on an advanced state.
                say(f"the server lost the update for version {got.task.version}; resending it")
                pending = (answered[1], got.task_id, state or {})
                continue
            with _Heartbeats(conn, got.task_id, joined.heartbeat) as beats:
                update, new_state = runtime.run(cid, got.task, state)
            if beats.finished:
                say(f"the run finished while training; {done} tasks done")
                return done
            pending = (update, got.task_id, new_state)
        except grpc.RpcError as e:
            code = e.code()
            if code not in RETRY:
                raise ClientError(f"the server refused client {cid}: {e.details()}") from e
            if code == grpc.StatusCode.UNAVAILABLE and not reached:
                # Refused in the TLS handshake before any call was answered: a setting to
                # fix, not a blip to wait out. (Once the server answered, a closed socket is
                # more likely a restart, and is retried.)
                tls = explain_connection_failure(
                    e.details() or "", tls=conn.tls, client_cert=conn.client_cert
                )
                if tls is not None:
                    raise ClientError(tls) from e
            if time.monotonic() - last_contact > give_up:
                raise ClientError(
                    f"could not reach the server for {give_up:g} s: {e.details()}"
                ) from e
            delay = backoff.next()
            say(f"server unreachable ({code.name}); retrying in {delay:.1f} s")
            time.sleep(delay)
            joined = None  # rejoin: the server may have restarted
        except WireError as e:
            say(f"malformed task from the server ({e}); asking again")
            time.sleep(backoff.next())
