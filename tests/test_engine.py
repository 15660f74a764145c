"""The engine: triggers, determinism, rejection of bad updates, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import math
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import (
    BufferedFedAvg,
    PeriodicFedAvg,
    Rows,
    assert_params_equal,
    assert_resume_bit_identical,
    small_config,
)
from fedlab import registry, tensorio
from fedlab.checkpoint import CHECKPOINT, PREVIOUS, CheckpointError
from fedlab.client import ClientContext, Fit
from fedlab.data import ClientData
from fedlab.engine import Engine
from fedlab.run import build_engine
from fedlab.strategies import FedAvg
from fedlab.types import State, Task, Update

registry.register("strategies", "test-buffered", BufferedFedAvg)
registry.register("strategies", "test-periodic", PeriodicFedAvg)


def run(config: Any, versions: int, **kw: Any) -> tuple[Engine, list[dict[str, Any]]]:
    rows = Rows()
    engine = build_engine(config, callbacks=[rows], **kw)
    engine.run(versions)
    return engine, rows.rows


def test_sync_versions_have_the_sampled_number_of_updates() -> None:
    _, rows = run(small_config(clients=30, fraction=0.2), 3)
    assert [r["updates"] for r in rows] == [6, 6, 6]
    assert [r["version"] for r in rows] == [1, 2, 3]
    times = [r["time"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    assert all(r["staleness"] == 0 for r in rows)


def test_over_selection_aggregates_once_the_planned_number_answered() -> None:
    config = small_config(clients=30, fraction=0.2, over_selection=0.5, speed_spread=1.0)
    engine, rows = run(config, 3)
    # 9 clients get a task, the version closes at the 6th answer; stragglers come back
    # during later versions, are dropped as stale, and are busy until then.
    assert [r["updates"] for r in rows] == [6, 6, 6]
    assert engine.counters.stale_dropped > 0
    assert all(r["staleness"] == 0 for r in rows)


def test_round_timeout_aggregates_what_arrived_on_the_virtual_clock() -> None:
    slow = small_config(clients=30, fraction=0.2, speed_spread=1.5)
    _, waited = run(slow, 2)
    config = slow.replace(round_timeout=1.0, min_updates=2)
    _, cut = run(config, 2)
    assert all(2 <= r["updates"] < 6 for r in cut), [r["updates"] for r in cut]
    assert cut[-1]["time"] < waited[-1]["time"]


def test_buffer_trigger_aggregates_every_k_with_staleness() -> None:
    config = small_config(strategy="test-buffered", strategy_options={"k": 2}, concurrency=5)
    _, rows = run(config, 6)
    assert all(r["updates"] == 2 for r in rows)
    assert max(r["staleness"] for r in rows) > 0  # later updates started on older versions


def test_period_trigger_aggregates_on_the_clock() -> None:
    config = small_config(strategy="test-periodic", strategy_options={"seconds": 4.0})
    _, rows = run(config, 4)
    assert [r["time"] for r in rows] == pytest.approx([4.0, 8.0, 12.0, 16.0])


@pytest.mark.parametrize("strategy", ["fedavg", "test-buffered", "test-periodic"])
def test_same_seed_same_result_other_seed_differs(strategy: str) -> None:
    a, _ = run(small_config(strategy=strategy), 3)
    b, _ = run(small_config(strategy=strategy), 3)
    c, _ = run(small_config(strategy=strategy, seed=12), 3)
    assert_params_equal(a.params, b.params)
    assert not torch.equal(a.params["weight"], c.params["weight"])


def test_million_clients_cost_no_memory_per_client() -> None:
    tracemalloc.start()
    engine = build_engine(small_config(clients=1_000_000, fraction=0.0001, local_steps=1))
    engine.run(1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert engine.counters.received == 100
    assert peak < 30 * 2**20, f"peak {peak / 2**20:.1f} MiB"


# --------------------------------------------------------------------------- bad updates


@dataclasses.dataclass(frozen=True, kw_only=True)
class Saboteur:
    """Client half whose odd clients return NaN, wrong shapes or wrong dtypes."""

    mode: str = "nan"

    def setup(self, model: nn.Module, task: Task) -> nn.Module:
        return model

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        payload = {k: torch.full_like(v, 0.01) for k, v in task.params.items()}
        if ctx.client_id % 2:
            k = next(iter(payload))
            if self.mode == "nan":
                payload[k] = payload[k].clone()
                payload[k].view(-1)[0] = float("nan")
            elif self.mode == "inf":
                payload[k] = torch.full_like(payload[k], math.inf)
            elif self.mode == "shape":
                payload[k] = torch.zeros(3, 3)
            elif self.mode == "dtype":
                payload[k] = payload[k].double()
            elif self.mode == "missing":
                del payload[k]
        return Fit(payload=payload, num_examples=len(data))


class SaboteurAlgorithm(Saboteur):
    pass


registry.register(
    "clients",
    "test-saboteur",
    dataclasses.dataclass(frozen=True, kw_only=True)(
        type("SaboteurClient", (Saboteur, __import__("fedlab").ClientAlgorithm), {})
    ),
)


@pytest.mark.parametrize("mode", ["nan", "inf", "shape", "dtype", "missing"])
def test_bad_updates_are_rejected_counted_and_the_run_continues(mode: str) -> None:
    config = small_config(client="test-saboteur", client_options={"mode": mode}, fraction=0.5)
    engine, rows = run(config, 2)
    assert engine.counters.rejected > 0
    assert sum(r["rejected"] for r in rows) == engine.counters.rejected
    assert all(r["updates"] + r["rejected"] == 15 for r in rows)
    for v in engine.params.values():
        assert torch.isfinite(v).all()
    # Only good updates moved the model: every entry moved by exactly 0.01 per version.
    start = build_engine(config).params
    for k in engine.params:
        torch.testing.assert_close(engine.params[k], start[k] + 0.02)
    assert any(mode in " ".join(r.get("reject_reasons", [])).lower() or r["rejected"] for r in rows)


class ScriptedTransport:
    """Delivers a fixed list of updates, whatever tasks were submitted."""

    def __init__(self, script: list[Update]) -> None:
        self.script = list(script)
        self.submitted: list[int] = []

    def clients(self) -> int:
        return 4

    def submit(self, client_id: int, task: Task) -> None:
        self.submitted.append(client_id)

    def next_update(self, timeout: float | None) -> Update | None:
        return self.script.pop(0) if self.script else None

    def now(self) -> float:
        return 0.0

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        pass

    def close(self) -> None:
        pass


def test_unknown_client_wrong_version_and_replay_are_rejected() -> None:
    params = {"w": torch.zeros(2)}
    good = {"w": torch.ones(2)}
    script = [
        Update(client_id=9, version=0, payload=good, num_examples=1),  # unknown client
        Update(client_id=0, version=7, payload=good, num_examples=1),  # no such version
        Update(client_id=0, version=0, payload=good, num_examples=1),  # accepted
        Update(client_id=0, version=0, payload=good, num_examples=1),  # replay
        Update(client_id=1, version=0, payload=good, num_examples=-5),  # negative count
    ]
    transport = ScriptedTransport(script)
    engine = Engine(strategy=FedAvg(), transport=transport, params=params, seed=0, fraction=1.0)
    reasons: list[str] = []
    engine.on_reject = lambda u, r: reasons.append(r)
    engine.step()
    assert engine.counters.rejected == 4
    assert "holds no task" in reasons[0] and "version 7" in reasons[1]
    assert "holds no task" in reasons[2] and "negative" in reasons[3]
    torch.testing.assert_close(engine.params["w"], torch.ones(2))
    assert engine.counters.failed == 2  # clients 2 and 3 never answered; the version ended
    assert engine.version == 1


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("strategy", ["fedavg", "test-buffered", "test-periodic"])
def test_resume_is_bit_identical(strategy: str, tmp_path: Path) -> None:
    assert_resume_bit_identical(small_config(strategy=strategy, concurrency=6), tmp_path)


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path: Path) -> None:
    config = small_config()
    engine = build_engine(config, run_dir=tmp_path)
    engine.run(3)
    (tmp_path / CHECKPOINT).write_bytes((tmp_path / CHECKPOINT).read_bytes()[:-10])
    resumed = build_engine(config, run_dir=tmp_path)
    resumed.resume()
    assert resumed.version == 2
    assert resumed.resumed_from == tmp_path / PREVIOUS
    assert "corrupt" in resumed.resume_warnings[0]


def test_unusable_checkpoints_give_a_clear_error_and_are_left_alone(tmp_path: Path) -> None:
    config = small_config()
    engine = build_engine(config, run_dir=tmp_path)
    engine.run(2)
    for name in (CHECKPOINT, PREVIOUS):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        build_engine(config, run_dir=tmp_path).resume()
    assert (tmp_path / CHECKPOINT).read_bytes() == b"garbage"


def test_checkpoint_of_another_configuration_is_refused(tmp_path: Path) -> None:
    build_engine(small_config(), run_dir=tmp_path).run(1)
    with pytest.raises(CheckpointError, match="different run configuration"):
        build_engine(small_config(lr=0.5), run_dir=tmp_path).resume()


def test_checkpoint_holds_no_pickle(tmp_path: Path) -> None:
    build_engine(small_config(), run_dir=tmp_path).run(1)
    raw = (tmp_path / CHECKPOINT).read_bytes()
    assert raw.startswith(tensorio.MAGIC)
    assert b"\x80\x04" not in raw[:64]  # no pickle protocol header
    ckpt = tensorio.load(tmp_path / CHECKPOINT)
    assert ckpt["version"] == 1 and set(ckpt["params"]) == {"weight", "bias"}


def test_unserializable_strategy_state_fails_with_a_checkpoint_error(tmp_path: Path) -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Leaky(FedAvg):
        def init(self, params: Any) -> State:
            return {"history": [object()]}

    registry.register("strategies", "test-leaky", Leaky)
    engine = build_engine(small_config(strategy="test-leaky"), run_dir=tmp_path)
    with pytest.raises(CheckpointError, match=r"cannot serialize object at /strategy/history/0"):
        engine.run(1)


def test_simulated_time_counts_epochs_when_training_by_epochs() -> None:
    _, steps = run(small_config(local_steps=3, speed="constant"), 1)
    _, epochs = run(small_config(local_epochs=5.0, speed="constant"), 1)
    assert steps[0]["time"] == pytest.approx(3.0)
    assert epochs[0]["time"] == pytest.approx(5.0)


@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_streamed_fedavg_matches_the_buffered_one(weighting: str) -> None:
    """A deployed server folds FedAvg updates into a running mean as they arrive: the model
    equals the one aggregated from every kept update (up to the order of float sums), and no
    payload is kept between arrival and aggregation."""
    config = small_config(strategy_options={"weighting": weighting}, rounds=3)
    kept = build_engine(config)
    kept.run(3)
    streamed = build_engine(config, stream=True)
    seen: list[int] = []
    receive = streamed._receive

    def watch(update: Update) -> None:
        receive(update)
        seen.extend(sum(t.numel() for t in u.payload.values()) for u in streamed.buffer)

    streamed._receive = watch  # type: ignore[method-assign]
    streamed.run(3)
    assert seen and set(seen) == {0}
    for name in kept.params:
        torch.testing.assert_close(streamed.params[name], kept.params[name])
    assert streamed.counters.received == kept.counters.received


def test_streaming_is_off_for_strategies_that_need_every_update() -> None:
    config = small_config(strategy="median", rounds=2)
    kept = build_engine(config)
    kept.run(2)
    streamed = build_engine(config, stream=True)
    streamed.run(2)
    assert_params_equal(streamed.params, kept.params)
    attacked = build_engine(small_config(rounds=1, byzantine=0.2, attack="sign-flip"), stream=True)
    assert not attacked.stream
