"""The deployed client against bad servers and bad settings: run ids that are paths, TLS that
cannot work, and updates the server refuses."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from deploy import Proc, connect, serve

from conftest import small_config
from fedlab.cli import main
from fedlab.proto import fedlab_pb2 as pb
from fedlab.run import build_engine
from fedlab.transport import Failure
from fedlab.transport.client import Assigned, Backoff, ClientError, run_client
from fedlab.transport.codec import encode, payload_bytes
from fedlab.transport.security import (
    Policy,
    SecurityError,
    check_run_id,
    client_credentials,
    make_certs,
    server_credentials,
)
from fedlab.types import Task, Update

PARAMS = {"w": torch.zeros(2)}


class _Runtime:
    """Stands in for a ClientRuntime: counts the tasks it trains; its metrics may be NaN."""

    def __init__(self, loss: float = 1.0) -> None:
        self.model = torch.nn.Linear(2, 1)
        self.loss = loss
        self.runs: list[int] = []

    def run(self, cid: int, task: Task, state: Any) -> tuple[Update, dict[str, Any]]:
        self.runs.append(task.version)
        update = Update(cid, task.version, {"w": torch.ones(2)}, 1, {"loss": self.loss})
        return update, {"n": torch.tensor(len(self.runs))}


def _client_thread(target: Any, *args: Any, **kw: Any) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            result["done"] = target(*args, **kw)
        except ClientError as e:
            result["error"] = str(e)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, result


# ---------------------------------------------------------------- run ids


@pytest.mark.parametrize("run", ["a" * 64, "3f2a", "run-1.2_x", "..a", "a..b"])
def test_valid_run_ids(run: str) -> None:
    assert check_run_id(run) == run


@pytest.mark.parametrize(
    "run", ["", ".", "..", "../x", "/../../../escape", "a/b", "a\\b", "a" * 65, "é", "a b", "x\0"]
)
def test_run_ids_that_could_be_paths_are_refused_by_the_server(run: str) -> None:
    with pytest.raises(SecurityError, match="not valid: a run id is 1 to 64 of"):
        serve(Policy(num_clients=1), run=run)


def test_a_run_id_from_the_server_never_becomes_a_path_outside_the_state_dir(
    tmp_path: Path,
) -> None:
    t = serve(Policy(num_clients=1), linger=5.0)
    t.run = "/../../../escape"  # a malicious server sends whatever it likes
    state_dir = tmp_path / "a" / "b" / "state"
    runtime = _Runtime()
    try:
        t.submit(0, Task(0, PARAMS))
        thread, result = _client_thread(
            run_client,
            connect(t, 0),
            lambda joined: runtime,
            state_dir=state_dir,
            log=None,
            poll=0.5,
        )
        thread.join(60)
        if thread.is_alive():  # it accepted the run id and served the task: end the run
            t.next_update(60)
    finally:
        t.close()
    thread.join(60)
    assert "the run id the server sent '/../../../escape' is not valid" in result.get("error", "")
    assert runtime.runs == [], "the client trained for a server whose run id is a path"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "the client wrote a file"


# ---------------------------------------------------------------- TLS set-up errors


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"), clients=2)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("other"), clients=2)


def test_a_client_without_its_certificate_is_refused_at_start_up(
    certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing listens on port 9: the client must stop before connecting anywhere.
    args = ["client", "--server", "127.0.0.1:9", "--client-id", "7", "--certs", str(certs)]
    assert main([*args, "--give-up", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("fedlab: error: no certificate for client 7: ")
    assert str(certs / "client-7.pem") in err and str(certs / "client-7.key") in err
    assert "`fedlab certs --out DIR --clients N`" in err


def test_half_a_certificate_and_a_missing_ca_are_refused(tmp_path: Path, certs: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
    (partial / "client-1.pem").write_bytes((certs / "client-1.pem").read_bytes())
    with pytest.raises(SecurityError, match=r"client-1\.pem exists but .*client-1\.key does not"):
        client_credentials(partial, 1, require=False)
    with pytest.raises(SecurityError, match=r"cannot read .*ca\.pem: .*fedlab certs"):
        client_credentials(tmp_path / "empty", 0)
    # With a token (server-only TLS) a client certificate is optional.
    client_credentials(certs, 7, require=False)


def _first_contact(server_creds: grpc.ServerCredentials | None, mutual: bool, **client: Any) -> str:
    t = serve(Policy(num_clients=8, mutual=mutual), server_creds)
    try:
        thread, result = _client_thread(
            run_client,
            connect(t, 0, **client),
            lambda joined: _Runtime(),
            log=None,
            give_up=20.0,
            backoff=Backoff(0.05, 0.5, seed=0),
        )
        thread.join(120)
    finally:
        t.close()
    assert not thread.is_alive()
    error: str = result.get("error", "")
    return error


@pytest.mark.parametrize(
    "case", ["plaintext client", "plaintext server", "no cert", "wrong CA", "wrong name"]
)
def test_tls_handshake_failures_say_so_with_the_likely_cause(
    case: str, certs: Path, other_ca: Path
) -> None:
    tls, mtls = server_credentials(certs, mutual=False), server_credentials(certs, mutual=True)
    if case == "plaintext client":
        error = _first_contact(tls, False)
        cause = "this client is plaintext (--insecure): connect with --certs DIR"
    elif case == "plaintext server":
        error = _first_contact(None, False, credentials=client_credentials(certs, 0))
        cause = "the server speaks plaintext"
    elif case == "no cert":
        error = _first_contact(mtls, True, credentials=client_credentials(certs, None))
        cause = "it probably requires a client certificate (mutual TLS)"
    elif case == "wrong CA":
        error = _first_contact(tls, False, credentials=client_credentials(other_ca, None))
        cause = "not signed by this client's ca.pem"
    else:
        creds = client_credentials(certs, None)
        error = _first_contact(tls, False, credentials=creds, server_name="elsewhere.example")
        cause = "does not name the host this client connects to: pass --server-name"
    assert error.startswith("TLS handshake failed: "), error
    assert cause in error, error


def test_grpc_core_log_lines_stay_out_of_the_clients_output(
    tmp_path: Path, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    t = serve(Policy(num_clients=2))  # plaintext: this TLS client's handshake fails
    try:
        client = Proc(
            [
                "client",
                "--server",
                f"127.0.0.1:{t.port}",
                "--client-id",
                "0",
                "--certs",
                str(certs),
                "--give-up",
                "10",
            ],
            cwd=tmp_path,
        )
        code = client.wait(120)
    finally:
        t.close()
    assert code == 1, client.output
    lines = client.output.strip().splitlines()
    assert lines[-1].startswith("fedlab client: error: TLS handshake failed: "), client.output
    core = [line for line in lines if re.match(r"[DIWEF]\d{4} \d\d:\d\d:\d\d", line)]
    assert not core, client.output


# ---------------------------------------------------------------- refused updates


def test_a_refused_update_consumes_its_task_and_is_never_retrained() -> None:
    t = serve(Policy(num_clients=1), linger=5.0)
    runtime = _Runtime(loss=float("nan"))  # every update it sends is refused
    try:
        thread, result = _client_thread(
            run_client, connect(t, 0), lambda joined: runtime, log=None, poll=0.5
        )
        for version in (3, 4):
            t.submit(0, Task(version, PARAMS))
            event = t.next_update(120)
            assert isinstance(event, Failure) and event.refused, event
            assert event.version == version and "metrics must be finite" in event.reason
            assert 0 not in t.state_dict()["tasks"], "the refused task is still assigned"
        assert runtime.runs == [3, 4], "a refused task was trained again"
        assert len(t.refused) == 2
    finally:
        t.close()
    thread.join(60)
    assert result.get("done") == 0  # it finished no task: both were refused


def test_the_client_hears_refused_and_the_engine_counts_a_rejection() -> None:
    config = small_config(clients=2, fraction=1.0, rounds=1)
    t = serve(Policy(num_clients=2), run=config.fingerprint(), config_toml=config.to_toml())
    engine = build_engine(config, transport=t)
    try:
        engine._fill(engine.strategy.trigger)
        conn = connect(t, 0)
        got = conn.pull(1.0)
        assert isinstance(got, Assigned)
        bad = Update(0, got.task.version, got.task.params, 1, {"loss": float("inf")})
        assert conn.push(bad, got.task_id) == "client 0: metrics must be finite"
        event = t.next_update(30)
        assert isinstance(event, Failure) and event.refused
        engine._handle(event)
        assert engine.counters.rejected == 1 and engine.counters.failed == 0
        assert 0 not in engine.inflight and 1 in engine.inflight
        assert conn.pull(0.0) is None, "the refused task was handed out again"
        # A replay of the refused update finds no task and changes nothing.
        with pytest.raises(grpc.RpcError) as info:
            conn.push(bad, got.task_id)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert t.next_update(0.0) is None
        conn.close()
    finally:
        t.close()


def test_an_accepted_update_is_answered_accepted() -> None:
    t = serve(Policy(num_clients=1))
    try:
        t.submit(0, Task(0, PARAMS))
        conn = connect(t, 0)
        got = conn.pull(1.0)
        assert isinstance(got, Assigned)
        header = pb.UpdateHeader(
            client_id=0,
            version=0,
            task_id=got.task_id,
            num_examples=1,
            total_bytes=payload_bytes(PARAMS),
            tensors=len(PARAMS),
        )
        chunks = [pb.UpdateChunk(header=header).SerializeToString(), *encode(PARAMS)]
        reply = conn._push_update(iter(chunks), timeout=10, metadata=conn.metadata)
        assert reply.status == pb.PushReply.ACCEPTED and reply.accepted and not reply.reason
        assert isinstance(t.next_update(10), Update)
        conn.close()
    finally:
        t.close()
