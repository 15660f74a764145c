"""One enrolled client cannot destroy the global model (issue 10, item 2).

Finite but hostile updates (every entry ``3e38``, or ``1e20`` claiming ``2**62`` examples) pass
the NaN/Inf check. These tests send them through the engine for each strategy family and check
that the committed params and state stay finite: sums are taken in float64, example counts and
(optionally) update norms are bounded, and an aggregate that still holds NaN or Inf is dropped
with the previous model kept.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import BufferedFedAvg, PeriodicFedAvg, Rows, small_config
from fedlab import registry
from fedlab.config import ConfigError, RunConfig
from fedlab.engine import Engine
from fedlab.guard import StagedStore, non_finite
from fedlab.lora import A_KEY, B_KEY, R_KEY
from fedlab.run import build_engine
from fedlab.store import MemoryStore
from fedlab.strategies import (
    FRL,
    CenteredClipping,
    FedAvg,
    FedBuff,
    FedSB,
    FedStale,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
)
from fedlab.strategy import Strategy
from fedlab.types import Params, Round, State, Task, Update

registry.register("strategies", "test-buffered", BufferedFedAvg)
registry.register("strategies", "test-periodic", PeriodicFedAvg)

HUGE = 3e38  # finite in float32 (max 3.4e38); twice it is not

Answer = Callable[[int, Task], Update]


class Answering:
    """A transport whose clients answer every task at once with ``answer(client, task)``."""

    def __init__(self, clients: int, answer: Answer) -> None:
        self.n = clients
        self.answer = answer
        self.queue: deque[Update] = deque()

    def clients(self) -> int:
        return self.n

    def submit(self, client_id: int, task: Task) -> None:
        self.queue.append(self.answer(client_id, task))

    def next_update(self, timeout: float | None) -> Update | None:
        return self.queue.popleft() if self.queue else None

    def now(self) -> float:
        return 0.0

    def state_dict(self) -> State:
        return {}

    def load_state_dict(self, state: State) -> None:
        pass

    def close(self) -> None:
        pass


class Versions:
    """A callback keeping a copy of the params and the row of every version."""

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.rows: list[dict[str, Any]] = []

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        self.params.append({k: v.clone() for k, v in engine.params.items()})
        self.rows.append(row)


def deltas(
    hostile: int = 0,
    value: float = HUGE,
    n: int = 100,
    hostile_n: int = 100,
    when: Callable[[int], bool] = lambda version: True,
) -> Answer:
    """Honest clients send 0.01 everywhere; client ``hostile`` sends ``value`` everywhere,
    claiming ``hostile_n`` examples, at the versions ``when`` accepts."""

    def answer(cid: int, task: Task) -> Update:
        bad = cid == hostile and when(task.version)
        fill = value if bad else 0.01
        payload = {k: torch.full_like(v, fill) for k, v in task.params.items()}
        return Update(cid, task.version, payload, hostile_n if bad else n)

    return answer


def engine_for(
    strategy: Strategy,
    answer: Answer,
    params: Params | None = None,
    clients: int = 4,
    **kw: Any,
) -> tuple[Engine, Versions]:
    seen = Versions()
    engine = Engine(
        strategy=strategy,
        transport=Answering(clients, answer),
        params=params if params is not None else {"w": torch.zeros(3, 2), "b": torch.zeros(3)},
        seed=0,
        fraction=1.0,
        callbacks=[seen],
        **kw,
    )
    return engine, seen


def assert_finite(engine: Engine) -> None:
    assert non_finite(engine.params) is None, non_finite(engine.params)
    assert non_finite(engine.state) is None, non_finite(engine.state)


# --------------------------------------------------------------------------- FedAvg (linear)


def test_fedavg_streamed_sum_of_huge_finite_updates_stays_finite() -> None:
    """The deployed server folds ``n_i * delta_i`` as updates arrive: ``3e38 * 100`` used to
    overflow float32 and make the checkpointed model Inf. The fold is float64 now."""
    engine, _ = engine_for(FedAvg(), deltas(value=HUGE), stream=True)
    engine.run(1)
    assert_finite(engine)
    expected = (HUGE * 100 + 3 * 0.01 * 100) / 400  # the exact weighted mean, cast to float32
    torch.testing.assert_close(engine.params["w"], torch.full((3, 2), expected))


@pytest.mark.parametrize("stream", [False, True])
def test_fedavg_refuses_a_claim_of_two_to_the_62_examples(stream: bool) -> None:
    reasons: list[str] = []
    engine, _ = engine_for(FedAvg(), deltas(value=1e20, hostile_n=2**62), stream=stream)
    engine.on_reject = lambda u, r: reasons.append(r)
    engine.run(1)
    assert engine.counters.rejected == 1
    assert "num_examples" in reasons[0] and "max_num_examples" in reasons[0]
    # Only the three honest updates moved the model.
    torch.testing.assert_close(engine.params["w"], torch.full((3, 2), 0.01))


def test_fedavg_aggregate_with_inf_state_is_dropped_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FedAdam squares the mean delta: ``(3e38 / 4)**2`` is Inf in float32, which used to be
    committed as the optimizer state (freezing the model for good). Now version 1 keeps
    version 0's model and state, names the updates, and version 2 proceeds normally."""
    strategy = FedAvg(server_optimizer="adam", server_lr=0.1)
    engine, seen = engine_for(strategy, deltas(value=HUGE, when=lambda v: v == 0))
    before = {k: v.clone() for k, v in engine.params.items()}
    state0 = engine.state
    with caplog.at_level(logging.WARNING, logger="fedlab.engine"):
        engine.run(1)
    assert_finite(engine)
    assert engine.version == 1
    assert engine.state is state0
    for k in before:
        assert torch.equal(engine.params[k], before[k])
    assert engine.counters.aggregates_dropped == 1
    row = seen.rows[0]
    assert "state" in row["aggregate_dropped"] and "'v'" in row["aggregate_dropped"]
    assert row["dropped_updates"] == [[0, 0], [1, 0], [2, 0], [3, 0]]
    assert row["updates"] == 4
    [line] = [r.getMessage() for r in caplog.records]
    assert "version 1 not committed" in line and "client 0 (version 0)" in line
    engine.run(2)  # the next version aggregates the honest updates as usual
    assert_finite(engine)
    assert engine.counters.aggregates_dropped == 1
    assert not torch.equal(engine.params["w"], before["w"])


@pytest.mark.parametrize("trigger", ["sync", "buffer", "period"])
def test_a_dropped_version_checkpoints_and_resumes_bit_identically(
    trigger: str, tmp_path: Path
) -> None:
    """Drop version 1 (hostile), stop, resume: the resumed run equals the uninterrupted one,
    with sync, Buffer(k) and Period triggers alike."""
    options: dict[str, Any] = {
        "sync": {},
        "buffer": {"strategy": "test-buffered", "strategy_options": {"k": 2}},
        "period": {"strategy": "test-periodic", "strategy_options": {"seconds": 3.0}},
    }[trigger]
    config = small_config(**options, concurrency=4, client=registered_hostile_client())
    rows = Rows()
    whole = build_engine(config, callbacks=[rows])
    whole.run(6)
    assert_finite(whole)
    dropped = [r["version"] for r in rows.rows if "aggregate_dropped" in r]
    assert dropped and dropped[0] < 6, [r.get("strategy_step_norm") for r in rows.rows]
    assert whole.counters.aggregates_dropped == len(dropped)
    first = build_engine(config, run_dir=tmp_path)
    first.run(dropped[0])  # the last checkpoint is the dropped version's
    resumed = build_engine(config, run_dir=tmp_path)
    resumed.resume()
    assert resumed.version == dropped[0]
    resumed.run(6)
    for k in whole.params:
        assert torch.equal(resumed.params[k], whole.params[k])
    assert resumed.counters == whole.counters


def registered_hostile_client() -> str:
    """A client half (registered once) whose even clients push every entry to ``3e38``
    in the direction it already has, claiming 1000 times their examples: one version moves
    the model near the float32 limit, the next one with a hostile client would overflow."""
    import dataclasses

    from fedlab import ClientAlgorithm, registry
    from fedlab.client import ClientContext, Fit
    from fedlab.data import ClientData

    name = "test-hostile-huge"
    if name in registry.names("clients"):
        return name

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class HostileHuge(ClientAlgorithm):
        def setup(self, model: torch.nn.Module, task: Task) -> torch.nn.Module:
            return model

        def fit(
            self,
            model: torch.nn.Module,
            data: ClientData,
            task: Task,
            state: State | None,
            ctx: ClientContext,
        ) -> Fit:
            hostile = ctx.client_id % 2 == 0
            payload = {
                k: (torch.where(v >= 0, HUGE, -HUGE) if hostile else torch.full_like(v, 0.01))
                for k, v in task.params.items()
            }
            return Fit(payload=payload, num_examples=len(data) * (1000 if hostile else 1))

    registry.register("clients", name, HostileHuge)
    return name


# --------------------------------------------------------------------------- FedBuff (async)


def test_fedbuff_never_commits_an_inf_model_and_keeps_the_previous_one() -> None:
    """FedBuff with K=2: each buffered step adds about ``3e38 / 2``; on old main the third step
    overflowed to Inf and was committed. Now such a step is dropped and the model is kept."""
    strategy = FedBuff(buffer=2, weighting="examples")
    engine, seen = engine_for(strategy, deltas(value=HUGE, hostile_n=1000), concurrency=4)
    engine.run(8)
    assert_finite(engine)
    dropped = [i for i, r in enumerate(seen.rows) if "aggregate_dropped" in r]
    assert dropped, [r.get("strategy_step_norm") for r in seen.rows]
    assert engine.counters.aggregates_dropped == len(dropped)
    for i in dropped:
        previous = seen.params[i - 1] if i else {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
        for k in previous:
            assert torch.equal(seen.params[i][k], previous[k])
    for p in seen.params:
        assert non_finite(p) is None


# --------------------------------------------------------------------------- robust


@pytest.mark.parametrize(
    "strategy",
    [Median(), TrimmedMean(trim=0.25), Krum(f=1), CenteredClipping(tau=1.0)],
    ids=["median", "trimmed-mean", "krum", "centered-clipping"],
)
@pytest.mark.parametrize("value, claimed", [(HUGE, 100), (1e20, 2**62)])
def test_robust_strategies_survive_one_hostile_client(
    strategy: Strategy, value: float, claimed: int
) -> None:
    """A robust rule ignores one outlier among six: the model stays finite and near the
    honest mean. The absurd example count is refused outright (the weight a robust rule
    ignores, but the metrics row and every linear strategy would not)."""
    engine, _ = engine_for(strategy, deltas(value=value, hostile_n=claimed), clients=6)
    engine.run(3)
    assert_finite(engine)
    for v in engine.params.values():
        assert float(v.abs().max()) <= 1.0  # honest clients move it by 0.01 per version
    assert engine.counters.rejected == (3 if claimed > 2**31 else 0)


@pytest.mark.parametrize(
    "strategy",
    [TrimmedMean(trim=0.0), Median(), MultiKrum(f=0), CenteredClipping(tau=math.inf)],
    ids=["trimmed-mean", "median", "krum", "centered-clipping"],
)
def test_robust_means_are_summed_in_float64(strategy: Strategy) -> None:
    """Where huge values survive the robust rule (here two of three, or every one: trim 0,
    an even median's two middle values, Multi-Krum's plain mean, clipping at inf), their
    sum ``6e38`` used to be Inf in float32; summed in float64 their mean is finite."""
    params = {"w": torch.zeros(4)}
    values = [HUGE, HUGE, 0.0] if not isinstance(strategy, Median) else [HUGE, HUGE]
    updates = [Update(i, 0, {"w": torch.full((4,), v)}, 1) for i, v in enumerate(values)]
    new, state, _ = strategy.aggregate(strategy.init(params), params, updates, Round(0, 0.0, 3))
    assert non_finite(new) is None and non_finite(state) is None
    assert float(new["w"][0]) == pytest.approx(sum(values) / len(values), rel=1e-6)


# --------------------------------------------------------------------------- Fed-SB


def test_fed_sb_never_commits_an_inf_model() -> None:
    """Fed-SB averages the clients' ``R``; a hostile ``R`` of entries ``±3e38`` is finite,
    but with signs matched to the ``B`` and ``A`` it was sent, the effective weight
    ``W0 + B R A`` overflows. The version is dropped and the model kept."""
    g = torch.Generator().manual_seed(0)
    params = {"fc.weight": torch.randn(8, 6, generator=g), "fc.bias": torch.zeros(8)}

    def answer(cid: int, task: Task) -> Update:
        key = R_KEY + "fc.weight"
        r = task.params[key]
        if cid:
            return Update(cid, task.version, {key: torch.full_like(r, 0.01)}, 100)
        b, a = task.params[B_KEY + "fc.weight"], task.params[A_KEY + "fc.weight"]
        row = b[int(b.abs().sum(1).argmax())]
        col = a[:, int(a.abs().sum(0).argmax())]
        hostile = HUGE * torch.outer(torch.sign(row), torch.sign(col))
        return Update(cid, task.version, {key: hostile}, 10**6)

    engine, seen = engine_for(FedSB(rank=3), answer, params=params)
    before = {k: v.clone() for k, v in engine.params.items()}
    engine.run(1)
    assert_finite(engine)
    assert engine.counters.aggregates_dropped == 1
    assert "params['fc.weight']" in seen.rows[0]["aggregate_dropped"]
    for k in before:
        assert torch.equal(engine.params[k], before[k])


# --------------------------------------------------------------------------- FRL


def test_frl_refuses_the_absurd_count_and_its_model_stays_finite() -> None:
    """FRL's payload is a permutation: a hostile client can only vote (reversed here) and
    claim a huge count, which is refused; the masked model stays finite and keeps its
    sparsity."""
    params = {"fc.weight": torch.zeros(4, 5), "fc.bias": torch.zeros(4)}

    def answer(cid: int, task: Task) -> Update:
        order = torch.argsort(task.params["fc.weight"].flatten(), stable=True)
        vote = order.flip(0) if cid == 0 else order
        return Update(cid, task.version, {"fc.weight": vote}, 2**62 if cid == 0 else 10)

    engine, _ = engine_for(FRL(sparsity=0.5), answer, params=params)
    engine.run(2)
    assert_finite(engine)
    assert engine.counters.rejected == 2
    assert int((engine.params["fc.weight"] != 0).sum()) == 10


# --------------------------------------------------------------------------- store staging


def test_a_dropped_aggregate_leaves_the_per_client_store_untouched() -> None:
    """FedStale remembers each client's last delta in the server's store; when its aggregate
    is dropped, those writes are dropped with it, so store and state stay consistent."""
    memory = MemoryStore()
    strategy = FedStale(beta=0.5, server_lr=3.0)
    engine, seen = engine_for(strategy, deltas(value=HUGE, hostile_n=100), memory=memory)
    drops = 0
    for _ in range(3):
        before = {cid: memory.get(cid) for cid in range(4)}
        engine.step()
        assert_finite(engine)
        if "aggregate_dropped" in seen.rows[-1]:
            drops += 1
            assert {cid: memory.get(cid) for cid in range(4)} == before
        else:
            assert all(memory.get(cid) is not before[cid] for cid in range(4))
    assert drops >= 1


def test_staged_store_counts_and_commits_in_order() -> None:
    base = MemoryStore()
    base.put(1, {"h": torch.ones(1)})
    staged = StagedStore(base)
    staged.put(2, {"h": torch.zeros(1)})
    staged.put(1, None)
    assert len(staged) == 1 and 2 in staged and 1 not in staged and len(base) == 1
    assert staged.get(1) is None and base.get(1) is not None
    staged.commit()
    assert len(base) == 1 and 2 in base and 1 not in base


def test_non_finite_names_the_path_and_allows_an_inf_setting_from_init() -> None:
    old = {"clip": math.inf, "m": {"w": torch.zeros(2)}}
    assert non_finite({"clip": math.inf, "m": {"w": torch.ones(2)}}, old) is None
    assert non_finite({"clip": math.nan, "m": old["m"]}, old) == "['clip']"
    bad = {"clip": 1.0, "m": {"w": torch.tensor([1.0, math.inf])}}
    assert non_finite(bad, old, "state") == "state['m']['w']"
    assert non_finite([1, 2.0, torch.arange(3)]) is None


# --------------------------------------------------------------------------- the norm bound


def test_max_update_norm_refuses_a_larger_update_with_its_reason() -> None:
    reasons: list[str] = []
    engine, _ = engine_for(FedAvg(), deltas(value=1.0), max_update_norm=1.0)
    engine.on_reject = lambda u, r: reasons.append(r)
    engine.run(1)
    # The hostile update has norm sqrt(9) = 3; honest ones 0.01 * 3.
    assert engine.counters.rejected == 1
    assert "update norm 3" in reasons[0] and "max_update_norm 1" in reasons[0]
    torch.testing.assert_close(engine.params["w"], torch.full((3, 2), 0.01))


def test_run_config_bounds_reach_the_engine() -> None:
    engine = build_engine(small_config(max_update_norm=2.5, max_num_examples=1000))
    assert engine.max_update_norm == 2.5 and engine.max_num_examples == 1000
    engine = build_engine(small_config())
    assert engine.max_update_norm is None and engine.max_num_examples == 2**31 - 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"max_update_norm": -1.0}, "max_update_norm must be a finite number >= 0"),
        ({"max_update_norm": math.nan}, "max_update_norm must be a finite number >= 0"),
        ({"max_update_norm": math.inf}, "max_update_norm must be a finite number >= 0"),
        ({"max_num_examples": 0}, r"max_num_examples must be in \[1, 2\*\*53\]"),
        ({"max_num_examples": 2**60}, r"max_num_examples must be in \[1, 2\*\*53\]"),
    ],
)
def test_bad_bounds_are_refused_with_one_line(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes)


def test_cli_refuses_a_negative_norm_bound() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedlab", "simulate", "--max-update-norm", "-1", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "fedlab: error: max_update_norm must be a finite number >= 0 (0: no bound), got -1.0"
    ]


def test_the_deployed_server_applies_the_bounds_and_its_fold_does_not_overflow() -> None:
    """Over gRPC, with the deployed server's streaming fold: a 2**62-example claim and an
    update above --max-update-norm are refused, and the clients hear the engine's reasons;
    without the norm bound, every entry at 3e38 from 100 examples is folded in float64 and the
    model stays finite."""
    from fedlab.transport.client import Assigned, Connection
    from fedlab.transport.security import Policy
    from fedlab.transport.server import GrpcTransport

    def deployed(config: RunConfig) -> tuple[Engine, GrpcTransport]:
        t = GrpcTransport(
            num_clients=config.clients,
            address="127.0.0.1:0",
            policy=Policy(num_clients=config.clients),
            credentials=None,
            log=None,
            linger=0.0,
            run=config.fingerprint(),
            config_toml=config.to_toml(),
        )
        return build_engine(config, transport=t, stream=True), t

    reasons: list[str] = []

    def push_all(engine: Engine, t: GrpcTransport, answers: dict[int, tuple[float, int]]) -> None:
        engine._fill(engine.strategy.trigger)
        for cid, (fill, n) in answers.items():
            conn = Connection(f"127.0.0.1:{t.port}", cid)
            got = conn.pull(5.0)
            assert isinstance(got, Assigned)
            payload = {k: torch.full_like(v, fill) for k, v in got.task.params.items()}
            refused = conn.push(Update(cid, got.task.version, payload, n), got.task_id)
            if refused is not None:
                reasons.append(refused)
        engine.step()

    config = small_config(clients=3, fraction=1.0, rounds=1, max_update_norm=1.0)
    engine, t = deployed(config)
    try:
        push_all(engine, t, {0: (0.5, 100), 1: (0.01, 2**62), 2: (0.01, 100)})
    finally:
        t.close()
    assert engine.version == 1 and engine.counters.rejected == 2 and len(reasons) == 2
    assert any("max_update_norm" in r for r in reasons)
    assert any("max_num_examples" in r for r in reasons)
    start = build_engine(config).params
    for k, v in engine.params.items():
        torch.testing.assert_close(v, start[k] + 0.01)

    engine, t = deployed(small_config(clients=3, fraction=1.0, rounds=1))
    try:
        push_all(engine, t, {0: (HUGE, 100), 1: (0.01, 100), 2: (0.01, 100)})
    finally:
        t.close()
    assert engine.counters.rejected == 0 and len(reasons) == 2
    assert_finite(engine)
