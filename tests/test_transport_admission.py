"""The gRPC server's gate: admission before reading, per-client limits, stall deadlines.

A peer that opens calls and then sends nothing must not hold the server's threads: calls are
admitted from their metadata before any message is read, a client has one upload open at a
time, and a read or a send that waits on the peer for ``stall_timeout`` cuts the call.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from deploy import serve

from conftest import small_config
from fedlab.cli.client import runtime_builder
from fedlab.proto import fedlab_pb2 as pb
from fedlab.run import build_engine
from fedlab.transport.admission import CLIENT_HEADER, Refusals, call_metadata
from fedlab.transport.client import Assigned, Backoff, Connection, run_client
from fedlab.transport.codec import payload_bytes
from fedlab.transport.security import (
    TOKEN_HEADER,
    Policy,
    client_credentials,
    make_certs,
    server_credentials,
)
from fedlab.types import Task, Update

PARAMS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
TOKENS = {i: f"secret-{i}" for i in range(4)}
SERVICE = "/fedlab.v1.Federation/"
# Generous on a loaded machine; only a hung call takes this long.
PATIENCE = 120.0


def eventually(condition: Callable[[], bool], what: str, timeout: float = PATIENCE) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"not within {timeout:g} s: {what}"
        time.sleep(0.02)


class Stalled:
    """Calls opened on ``channel`` that send nothing (or only ``first``) until released."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.release = threading.Event()
        self.calls: list[Any] = []
        self.sent: list[int] = []  # messages the calls' iterators gave away

    def _messages(self, first: list[bytes]) -> Iterator[bytes]:
        for m in first:
            self.sent.append(1)
            yield m
        self.release.wait()  # never sends more while the test runs

    def open(
        self, method: str, metadata: tuple[tuple[str, str], ...], first: Sequence[bytes] = ()
    ) -> Any:
        call = self.channel.stream_unary(
            SERVICE + method, request_serializer=lambda b: b, response_deserializer=lambda b: b
        ).future(self._messages(list(first)), timeout=2 * PATIENCE, metadata=metadata)
        self.calls.append(call)
        return call

    def close(self) -> None:
        self.release.set()
        for call in self.calls:
            call.cancel()
        self.channel.close()


def code_of(call: Any, timeout: float = PATIENCE) -> grpc.StatusCode:
    """The status a call ended with; fails if it is still open after ``timeout`` s."""
    try:
        call.result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise AssertionError(f"the call was still open after {timeout:g} s") from None
    except grpc.RpcError as e:
        code: grpc.StatusCode = e.code()  # type: ignore[attr-defined]
        return code
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"), clients=4)


@pytest.mark.parametrize("mode", ["tls-tokens", "insecure-tokens", "mtls"])
def test_unauthenticated_stalled_calls_are_refused_before_anything_is_read(
    mode: str, certs: Path
) -> None:
    """``--tls-only --tokens`` used to read the first upload chunk before checking the token,
    so a peer with no token could hold a server thread by sending nothing."""
    mutual = mode == "mtls"
    policy = Policy(num_clients=4, mutual=mutual, tokens=None if mutual else TOKENS)
    server_creds = None if mode == "insecure-tokens" else server_credentials(certs, mutual=mutual)
    t = serve(policy, server_creds)
    address = f"127.0.0.1:{t.port}"
    if mode == "mtls":
        # Without a client certificate the TLS handshake fails: no call reaches a handler.
        bare = grpc.secure_channel(address, client_credentials(certs, None))
        assert code_of(Stalled(bare).open("PushUpdate", call_metadata(0))) == (
            grpc.StatusCode.UNAVAILABLE
        )
        bare.close()
        # With client 1's certificate: calls claiming another id, or none.
        channel = grpc.secure_channel(address, client_credentials(certs, 1))
        attempts = [
            ("no metadata", ()),
            ("another client's id", call_metadata(0)),
            ("a malformed id", ((CLIENT_HEADER, "1x"),)),
        ]
    else:
        if mode == "insecure-tokens":
            channel = grpc.insecure_channel(address)
        else:
            channel = grpc.secure_channel(address, client_credentials(certs, None))
        attempts = [
            ("no metadata", ()),
            ("no token", call_metadata(0)),
            ("a wrong token", call_metadata(0, "guess")),
            ("another client's token", call_metadata(0, TOKENS[1])),
            ("a token without an id", ((TOKEN_HEADER, TOKENS[0]),)),
            ("a malformed id", ((CLIENT_HEADER, "0x1"), (TOKEN_HEADER, TOKENS[0]))),
        ]
    stalled = Stalled(channel)
    try:
        calls = [
            (what, method, stalled.open(method, metadata))
            for what, metadata in attempts
            for method in ("PushUpdate", "Join", "PullTask", "Heartbeat")
        ]
        for what, method, call in calls:
            assert code_of(call) == grpc.StatusCode.PERMISSION_DENIED, (what, method)
        assert not stalled.sent, "the refused calls were asked for a message"
        assert len(t.refused) == len(calls)
        assert not t.joined
    finally:
        stalled.close()
        t.close()


def _pushed(conn: Connection, task_id: str, version: int = 0) -> None:
    conn.push(Update(conn.client_id, version, PARAMS, 1), task_id)


def _header(cid: int, task_id: str, version: int = 0) -> bytes:
    header = pb.UpdateHeader(
        client_id=cid,
        version=version,
        task_id=task_id,
        num_examples=1,
        total_bytes=payload_bytes(PARAMS),
        tensors=len(PARAMS),
    )
    return pb.UpdateChunk(header=header).SerializeToString()


def test_one_upload_per_client_and_stalled_uploads_are_cut() -> None:
    t = serve(Policy(num_clients=2, tokens=TOKENS), stall_timeout=1.0)
    address = f"127.0.0.1:{t.port}"
    stalled = Stalled(grpc.insecure_channel(address))
    try:
        t.submit(0, Task(0, PARAMS))
        conn = Connection(address, 0, token=TOKENS[0])
        got = conn.pull(1.0)
        assert isinstance(got, Assigned)
        # An upload that sends its header, then nothing: it holds client 0's upload slot.
        first = stalled.open("PushUpdate", conn.metadata, [_header(0, got.task_id)])
        eventually(lambda: 0 in t._gate._uploads, "the stalled upload is admitted")
        # A second upload of the same client is refused at once, and leaves the task alone.
        with pytest.raises(grpc.RpcError) as info:
            _pushed(conn, got.task_id)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "already has an upload open" in t.refused[-1]
        assert not t._events and 0 in t._tasks
        # The stall deadline cuts the first one; the slot is free again.
        assert code_of(first) == grpc.StatusCode.CANCELLED
        assert any("client 0: upload: nothing for 1 s" in r for r in t.refused), t.refused
        # An upload that never sends its first chunk is cut as well.
        assert code_of(stalled.open("PushUpdate", conn.metadata)) == grpc.StatusCode.CANCELLED
        eventually(lambda: 0 not in t._gate._uploads, "the slot is given back")
        _pushed(conn, got.task_id)
        event = t.next_update(5.0)
        assert isinstance(event, Update) and event.client_id == 0
    finally:
        stalled.close()
        t.close()


def test_a_call_naming_another_client_than_its_metadata_is_refused() -> None:
    t = serve(Policy(num_clients=2, tokens=TOKENS))
    try:
        t.submit(1, Task(0, PARAMS))
        victim = Connection(f"127.0.0.1:{t.port}", 1, token=TOKENS[1])
        got = victim.pull(1.0)
        assert isinstance(got, Assigned)
        # Client 0, with its own valid credentials, uploads for client 1's task.
        intruder = Connection(f"127.0.0.1:{t.port}", 0, token=TOKENS[0])
        intruder.client_id = 1  # the request names client 1; the metadata still says 0
        for call in (
            lambda: intruder.push(Update(1, 0, PARAMS, 1), got.task_id),
            lambda: intruder.join(timeout=10),
            lambda: intruder.heartbeat(got.task_id, timeout=10),
            lambda: intruder.pull(0.0),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "admitted for client 0 names client 1" in t.refused[-1]
        assert t.next_update(0.0) is None and 1 in t._tasks
    finally:
        t.close()


def test_a_peer_that_stops_reading_its_task_is_cut() -> None:
    t = serve(Policy(num_clients=1), stall_timeout=1.0, max_update_bytes=1 << 30)
    try:
        big = {"w": torch.zeros((32 << 20) // 4)}  # far more than the flow-control windows
        t.submit(0, Task(0, big))
        conn = Connection(f"127.0.0.1:{t.port}", 0)
        stream = conn._pull_task(
            pb.PullRequest(client_id=0, wait_seconds=1.0), timeout=PATIENCE, metadata=conn.metadata
        )
        assert next(stream).header.status == pb.TaskHeader.TASK
        # ... and reads no further: the server's send waits on the full window, then is cut.
        eventually(
            lambda: any("client 0: task download: nothing for 1 s" in r for r in t.refused),
            "the stalled download is cut",
        )
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED  # type: ignore[attr-defined]
        conn.close()
    finally:
        t.close()


def test_refusals_are_logged_at_a_bounded_rate() -> None:
    out = io.StringIO()
    refusals = Refusals(out, interval=3600.0)
    for i in range(100):
        refusals.note("peer", f"reason {i}")
    assert out.getvalue().splitlines() == ["fedlab server: refused peer: reason 0"]
    refusals.flush()
    assert out.getvalue().splitlines()[-1] == (
        "fedlab server: 99 more refusals not shown (100 in all)"
    )
    assert refusals.total == 100 and len(refusals.reasons) == 100


@pytest.mark.slow
def test_honest_clients_finish_while_many_stalled_calls_are_open(certs: Path) -> None:
    """The engine's three clients finish every version while 50 streams without credentials
    and 50 with a valid token (client 3's, enrolled but never picked) send nothing."""
    config = small_config(clients=3, fraction=1.0, rounds=6)
    policy = Policy(num_clients=4, tokens=TOKENS)  # client 3 is the attacker's
    t = serve(
        policy,
        server_credentials(certs, mutual=False),
        num_clients=3,
        run=config.fingerprint(),
        config_toml=config.to_toml(),
        linger=5.0,
    )
    address = f"127.0.0.1:{t.port}"
    anonymous = Stalled(grpc.secure_channel(address, client_credentials(certs, None)))
    enrolled = Stalled(grpc.secure_channel(address, client_credentials(certs, None)))
    engine = build_engine(config, transport=t)
    try:
        for _ in range(50):
            anonymous.open("PushUpdate", call_metadata(0))
            enrolled.open("PushUpdate", call_metadata(3, TOKENS[3]))
        for _ in range(10):
            enrolled.open("Join", call_metadata(3, TOKENS[3]))
        # Every call but client 3's first upload and first calls is refused at once.
        eventually(lambda: len(t.refused) >= 50 + 49 + 10 - 3, "the stalled calls are refused")
        clients = [
            threading.Thread(
                target=run_client,
                args=(
                    Connection(address, i, credentials=client_credentials(certs, None),
                               token=TOKENS[i]),
                    runtime_builder({"device": "cpu"}),
                ),
                kwargs={"log": None, "poll": 1.0, "backoff": Backoff(0.05, 0.5, seed=i)},
                daemon=True,
            )
            for i in range(3)
        ]  # fmt: skip
        for th in clients:
            th.start()
        runner = threading.Thread(target=engine.run, args=(config.rounds,), daemon=True)
        runner.start()
        runner.join(2 * PATIENCE)
        assert not runner.is_alive(), f"stuck at version {engine.version} of {config.rounds}"
        assert engine.version == config.rounds
        assert engine.counters.received == 3 * config.rounds
        assert engine.counters.failed == 0
        t.close()
        for th in clients:
            th.join(PATIENCE)
            assert not th.is_alive()
    finally:
        anonymous.close()
        enrolled.close()
        t.close()
