"""The deployed server answers with the engine's own verdict: an update the engine would reject
(NaN or Inf, wrong shapes, a server bound) is refused to the client, consumes its task and is
counted as rejected once, over real loopback gRPC; an accepted one reaches the engine decoded
once and is validated there again."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from conftest import small_config
from fedlab.run import build_engine
from fedlab.transforms import Pipeline, TransformContext, UpdateTransform
from fedlab.transport import Checked, Failure
from fedlab.transport.client import Assigned, Connection, run_client
from fedlab.transport.security import Policy
from fedlab.transport.server import GrpcTransport
from fedlab.types import Params, State, Task, Update

PATIENCE = 120.0


def _serve(config: Any, **kw: Any) -> GrpcTransport:
    kw.setdefault("linger", 0.0)
    return GrpcTransport(
        num_clients=config.clients,
        address="127.0.0.1:0",
        policy=Policy(num_clients=config.clients),
        credentials=None,
        log=None,
        run=config.fingerprint(),
        config_toml=config.to_toml(),
        **kw,
    )


def _honest(params: Params) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, 0.01) for k, v in params.items() if v.is_floating_point()}


def _corrupt(kind: str, params: Params) -> tuple[dict[str, torch.Tensor], int]:
    payload = _honest(params)
    name = next(iter(payload))
    if kind == "nan":
        payload[name] = torch.full_like(payload[name], float("nan"))
    elif kind == "shape":
        payload[name] = torch.zeros(1, dtype=payload[name].dtype)
    elif kind == "norm":
        payload[name] = torch.full_like(payload[name], 10.0)
    return payload, 1001 if kind == "examples" else 1


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("nan", "NaN"),
        ("shape", "shape"),
        ("examples", "max_num_examples 1000"),
        ("norm", "max_update_norm 1"),
    ],
)
def test_an_update_the_engine_rejects_is_refused_to_its_client(kind: str, said: str) -> None:
    config = small_config(
        clients=2, fraction=1.0, rounds=1, max_update_norm=1.0, max_num_examples=1000
    )
    t = _serve(config)
    engine = build_engine(config, transport=t, stream=True)  # as the deployed server does
    try:
        engine._fill(engine.strategy.trigger)
        conn = Connection(f"127.0.0.1:{t.port}", 0)
        got = conn.pull(5.0)
        assert isinstance(got, Assigned)
        payload, n = _corrupt(kind, got.task.params)
        reason = conn.push(Update(0, got.task.version, payload, n), got.task_id)
        assert reason is not None, "the client was told its update was accepted"
        assert said in reason and "client 0" in reason, reason
        # The engine never sees the update: it hears of a refused task, and counts it once.
        event = t.next_update(PATIENCE)
        assert isinstance(event, Failure) and event.refused and event.reason == reason
        assert t.next_update(0.0) is None
        engine._handle(event)
        assert engine.counters.rejected == 1 and engine.counters.received == 0
        assert engine.counters.failed == 0 and not engine.buffer
        assert 0 not in engine.inflight and 1 in engine.inflight
        assert 0 not in t.state_dict()["tasks"], "the refused task is still assigned"
        assert conn.pull(0.0) is None, "the refused task was handed out again"
        conn.close()
        # An honest update is still accepted, and the version aggregates with it alone.
        other = Connection(f"127.0.0.1:{t.port}", 1)
        got = other.pull(5.0)
        assert isinstance(got, Assigned)
        update = Update(1, got.task.version, _honest(got.task.params), 10)
        assert other.push(update, got.task_id) is None
        other.close()
        engine.step()
        assert engine.version == 1 and engine.counters.rejected == 1
    finally:
        t.close()


class _Runtime:
    """Trains nothing: answers each task with a small delta, NaN for the tasks listed."""

    def __init__(self, poisoned: set[int]) -> None:
        self.model = torch.nn.Linear(2, 1)
        self.poisoned = poisoned
        self.runs: list[int] = []

    def run(self, cid: int, task: Task, state: Any) -> tuple[Update, dict[str, Any]]:
        self.runs.append(task.version)
        payload, _ = _corrupt("nan" if task.version in self.poisoned else "", task.params)
        return Update(cid, task.version, payload, 10, {"loss": 1.0}), {}


def test_a_client_refused_by_the_engine_pulls_a_new_task_and_never_retrains() -> None:
    config = small_config(clients=2, fraction=1.0, rounds=2)
    t = _serve(config, linger=PATIENCE)
    engine = build_engine(config, transport=t, stream=True)
    runtimes = {0: _Runtime(poisoned={0}), 1: _Runtime(poisoned=set())}
    results: dict[int, Any] = {}

    def client(cid: int) -> None:
        conn = Connection(f"127.0.0.1:{t.port}", cid)
        results[cid] = run_client(conn, lambda joined: runtimes[cid], log=None, poll=0.5)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in runtimes]
    for th in threads:
        th.start()
    try:
        runner = threading.Thread(target=engine.run, args=(2,), daemon=True)
        runner.start()
        runner.join(PATIENCE)
        assert not runner.is_alive(), "the run did not finish"
    finally:
        t.close()
    for th in threads:
        th.join(PATIENCE)
    assert engine.version == 2
    assert runtimes[0].runs == [0, 1], "the refused task was trained again"
    assert runtimes[1].runs == [0, 1]
    assert engine.counters.rejected == 1 and engine.counters.received == 3
    assert results == {0: 1, 1: 2}  # tasks each client had accepted


class _Counting(UpdateTransform):
    """Passes payloads through and counts the server's decodes."""

    def __init__(self) -> None:
        self.decodes = 0

    def encode(
        self, payload: Params, ctx: TransformContext, state: State | None
    ) -> tuple[Params, State | None]:
        return payload, state

    def decode(self, payload: Params, ctx: TransformContext) -> Params:
        self.decodes += 1
        return payload


def test_an_accepted_update_is_decoded_once_and_validated_again_by_the_engine() -> None:
    config = small_config(clients=2, fraction=1.0, rounds=1)
    t = _serve(config)
    engine = build_engine(config, transport=t)
    counting = _Counting()
    engine.pipeline = Pipeline((counting,))
    try:
        engine._fill(engine.strategy.trigger)
        conn = Connection(f"127.0.0.1:{t.port}", 0)
        got = conn.pull(5.0)
        assert isinstance(got, Assigned)
        update = Update(0, got.task.version, _honest(got.task.params), 10)
        assert conn.push(update, got.task_id) is None
        event = t.next_update(PATIENCE)
        assert isinstance(event, Checked) and counting.decodes == 1
        engine._handle(event)
        assert counting.decodes == 1 and len(engine.buffer) == 1
        conn.close()
        # Defence in depth: what a transport hands over as checked is validated again.
        other = Connection(f"127.0.0.1:{t.port}", 1)
        got = other.pull(5.0)
        assert isinstance(got, Assigned)
        bad, _ = _corrupt("nan", got.task.params)
        sent = Update(1, got.task.version, _honest(got.task.params), 10)
        engine._handle(Checked(sent, Update(1, got.task.version, bad, 10)))
        assert engine.counters.rejected == 1 and len(engine.buffer) == 1
        other.close()
    finally:
        t.close()
