"""fedlab strategies inside Flower apps, and fedlab clients as Flower ClientApps.

Most tests drive the bridge over :class:`LocalGrid`, a Flower ``Grid`` that runs ClientApps in
this process. The last ones run Flower's own simulation runtime (``run_simulation``, on Ray)
once, with FedAvg, FedAU and FedBuff in one ServerApp, and compare FedAvg with ``build_engine``
on the same data, seed and sampling.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="needs the flower extra: pip install 'fedlab[flower]'")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from conftest import REPO  # noqa: E402
from fedlab.callbacks import Evaluator  # noqa: E402
from fedlab.config import RunConfig  # noqa: E402
from fedlab.flower import (  # noqa: E402
    FlowerStrategy,
    GridTransport,
    config_client_app,
    params_from_record,
    params_to_record,
    run_config,
)
from fedlab.run import build_engine, build_workload  # noqa: E402
from fedlab.strategies import FedAvg  # noqa: E402
from fedlab.transport import Failure  # noqa: E402
from fedlab.types import Task, Update  # noqa: E402

Handler = Callable[[Message, Context], Message]


@pytest.fixture(autouse=True)
def server_identity() -> None:
    """Messages are stamped with the sending task's identity, which Flower's runtimes set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class LocalGrid(Grid):
    """A Flower ``Grid`` whose nodes run a ClientApp in this process when replies are pulled.

    Node ids are random, as in Flower, and partition ids are handed out in a shuffled order,
    so the client-id handshake is exercised. Nodes in ``offline`` answer with Flower's
    node-unavailable error, as the SuperLink does.
    """

    def __init__(
        self, app: Handler, num_nodes: int, seed: int = 0, run_config: dict[str, Any] | None = None
    ) -> None:
        rng = random.Random(seed)
        self.app = app
        self.contexts: dict[int, Context] = {}
        partitions = list(range(num_nodes))
        rng.shuffle(partitions)
        for pid in partitions:
            node = rng.randrange(1, 2**63)
            config = {"partition-id": pid, "num-partitions": num_nodes}
            self.contexts[node] = Context(0, node, config, RecordDict(), dict(run_config or {}))
        self.offline: set[int] = set()
        self.pending: dict[str, Message] = {}
        self.pushed = 0

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:  # fmt: skip
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.pending[m.metadata.message_id] = m
            ids.append(m.metadata.message_id)
        self.pushed += len(ids)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in list(message_ids):
            m = self.pending.pop(mid, None)
            if m is None:
                continue
            node = m.metadata.dst_node_id
            if node in self.offline:
                replies.append(Message(Error(5, "node offline"), reply_to=m))
                continue
            try:
                replies.append(self.app(m, self.contexts[node]))
            except Exception as e:
                replies.append(Message(Error(2, repr(e)), reply_to=m))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def digits(**changes: Any) -> RunConfig:
    base: dict[str, Any] = dict(
        workload="digits", model="mlp", clients=4, fraction=0.5, rounds=3, seed=5,
        local_steps=4, threads=1,
    )  # fmt: skip
    return RunConfig(**{**base, **changes})


def initial(config: RunConfig) -> ArrayRecord:
    model = build_workload(config).make_model()
    return params_to_record({k: v.detach().clone() for k, v in model.state_dict().items()})[0]


def simulated(config: RunConfig) -> dict[str, torch.Tensor]:
    # The sequential backend: Flower's ClientApps train one client at a time with the same
    # code, so the runs agree bit for bit (the tolerance is for platforms, not for vmap).
    engine = build_engine(config.replace(backend="inprocess"))
    engine.run(config.rounds)
    engine.transport.close()
    return dict(engine.params)


def over_grid(config: RunConfig, **options: Any) -> tuple[FlowerStrategy, dict[str, torch.Tensor]]:
    grid = LocalGrid(config_client_app(config), config.clients)
    strategy = FlowerStrategy.from_config(config, **options)
    result = strategy.start(grid=grid, initial_arrays=initial(config), num_rounds=config.rounds)
    return strategy, params_from_record(result.arrays)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- records


def test_records_round_trip_every_dtype_bfloat16_included() -> None:
    params = {
        "w": torch.randn(3, 4),
        "h": torch.randn(5).half(),
        "b": torch.randn(2, 2).to(torch.bfloat16),
        "i": torch.arange(6).reshape(2, 3),
        "u": torch.tensor([1, 255], dtype=torch.uint8),
    }
    record, widened = params_to_record(params)
    assert widened == ["b"]
    back = params_from_record(record, widened)
    for k, v in params.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_records_refuse_arrays_that_are_not_plain_numpy() -> None:
    record = ArrayRecord()
    record["x"] = Array(dtype="float32", shape=(1,), stype="custom", data=b"\0\0\0\0")
    with pytest.raises(ValueError, match="'x' cannot be read"):
        params_from_record(record)


# --------------------------------------------------------------------------- server over a grid


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"strategy": "frl", "model": "mlp"},  # rankings in the payload
        {"strategy": "fed-sb", "strategy_options": {"rank": 4}},  # R matrices
        {"dp": "sample", "noise_multiplier": 1.0, "compress": "fedzip"},  # DP-SGD + FedZip
    ],
    ids=["fedavg", "frl", "fed-sb", "dp-sgd+fedzip"],
)
def test_a_run_over_the_grid_equals_the_simulation(changes: dict[str, Any]) -> None:
    config = digits(**changes)
    strategy, params = over_grid(config)
    assert strategy.engine is not None and strategy.engine.counters.rejected == 0
    assert_same(params, simulated(config))


class Rows:
    """An engine callback that keeps every metrics row."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def on_version(self, engine: Any, row: dict[str, Any]) -> None:
        self.rows.append(dict(row))


def test_asynchronous_buffer_trigger_over_the_grid() -> None:
    config = digits(strategy="fedbuff", buffer=2, concurrency=3, rounds=4)
    rows = Rows()
    strategy, _ = over_grid(config, callbacks=[rows])
    engine = strategy.engine
    assert engine is not None and engine.version == 4
    assert [r["updates"] for r in rows.rows] == [2, 2, 2, 2]
    assert engine.counters.rejected == 0
    # A third client kept training while two filled the buffer: its update arrived stale.
    assert any(r["staleness"] > 0 for r in rows.rows)


def test_period_trigger_over_the_grid_finishes() -> None:
    config = digits(strategy="fedfix", period=0.2, concurrency=2, rounds=3)
    strategy, _ = over_grid(config)
    assert strategy.engine is not None and strategy.engine.version == 3


def plain_flower_app(shift: Callable[[int], float]) -> ClientApp:
    """A client written for Flower alone: it returns trained *weights* and num-examples."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        weights = message.content["arrays"].to_torch_state_dict()
        trained = {k: v + shift(pid) for k, v in weights.items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord(trained),
                "metrics": MetricRecord({"num-examples": 10 * (pid + 1)}),
            }
        )
        return Message(content, reply_to=message)

    return app


def test_plain_flower_clients_send_weights_that_become_deltas() -> None:
    grid = LocalGrid(plain_flower_app(lambda pid: float(pid)), 3)
    strategy = FlowerStrategy(FedAvg(), fraction=1.0, min_nodes=3)
    start = {"w": torch.zeros(2, 2), "n": torch.tensor(7)}
    result = strategy.start(grid=grid, initial_arrays=params_to_record(start)[0], num_rounds=2)
    out = params_from_record(result.arrays)
    # Each version moves w by the example-weighted mean shift: (0*10 + 1*20 + 2*30) / 60.
    torch.testing.assert_close(out["w"], torch.full((2, 2), 2 * 80 / 60))
    assert int(out["n"]) == 7
    assert 2 in result.train_metrics_clientapp


def test_bad_replies_are_rejected_or_failed_and_the_run_goes_on() -> None:
    def shift(pid: int) -> float:
        if pid == 1:
            return float("nan")
        if pid == 2:
            raise RuntimeError("client crashed")
        return 1.0

    grid = LocalGrid(plain_flower_app(shift), 4)
    strategy = FlowerStrategy(FedAvg(), fraction=1.0, min_nodes=4)
    start = {"w": torch.zeros(3)}
    result = strategy.start(grid=grid, initial_arrays=params_to_record(start)[0], num_rounds=2)
    engine = strategy.engine
    assert engine is not None
    assert engine.counters.rejected == 2 and engine.counters.failed == 2
    assert result.train_metrics_clientapp[2]["updates"] == 2
    torch.testing.assert_close(params_from_record(result.arrays)["w"], torch.full((3,), 2.0))


def test_offline_nodes_fail_late_enough_not_to_spin() -> None:
    grid = LocalGrid(plain_flower_app(lambda pid: 1.0), 2)
    nodes = sorted(grid.contexts)
    grid.offline.add(nodes[0])
    transport = GridTransport(grid, nodes, deltas=True, retry_after=0.3)
    task = Task(0, {"w": torch.zeros(1)})
    transport.submit(0, task)
    transport.submit(1, task)
    first = transport.next_update(None)
    assert isinstance(first, Update) and first.client_id == 1
    assert transport.next_update(0.0) is None  # the failure is held back...
    late = transport.next_update(None)  # ...and reported after retry_after
    assert isinstance(late, Failure) and late.client_id == 0 and "offline" in late.reason
    assert grid.pushed == 2


def test_a_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    config = digits(rounds=4)
    strategy, _ = over_grid(config.replace(rounds=2), run_dir=tmp_path)
    assert strategy.engine is not None and strategy.engine.version == 2
    again, params = over_grid(config, run_dir=tmp_path)
    assert again.engine is not None and again.engine.resumed_from is not None
    assert_same(params, simulated(config))


def test_state_dict_continues_a_run_in_a_new_strategy() -> None:
    config = digits(strategy="fedau", rounds=2)
    first, _ = over_grid(config)
    state = first.state_dict()
    assert "strategy" in state and state["version"] == 2
    second = FlowerStrategy.from_config(config.replace(rounds=4))
    second.load_state_dict(state)
    grid = LocalGrid(config_client_app(config), config.clients)
    result = second.start(grid=grid, initial_arrays=initial(config), num_rounds=4)
    assert_same(params_from_record(result.arrays), simulated(config.replace(rounds=4)))


def test_federated_and_central_evaluation_fill_the_result() -> None:
    config = digits(rounds=2)
    grid = LocalGrid(config_client_app(config), config.clients)
    strategy = FlowerStrategy.from_config(config, fraction_evaluate=0.5)
    evaluator = Evaluator(build_workload(config))

    def central(version: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(evaluator.evaluate(params_from_record(arrays)))

    result = strategy.start(
        grid=grid, initial_arrays=initial(config), num_rounds=2, evaluate_fn=central
    )
    assert sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert sorted(result.evaluate_metrics_clientapp) == [1, 2]
    assert result.evaluate_metrics_clientapp[2]["num-examples"] > 0
    assert 0 <= result.evaluate_metrics_clientapp[2]["accuracy"] <= 1


def test_round_by_round_hooks_say_to_use_start() -> None:
    strategy = FlowerStrategy(FedAvg())
    with pytest.raises(TypeError, match="start"):
        strategy.aggregate_train(1, [])


def test_population_size_must_match_the_config() -> None:
    config = digits()
    grid = LocalGrid(config_client_app(config), 3)
    strategy = FlowerStrategy.from_config(config, min_nodes=3)
    with pytest.raises(ValueError, match=r"3 nodes .* clients = 4"):
        strategy.start(grid=grid, initial_arrays=initial(config), num_rounds=1)


def test_a_node_without_partition_id_gets_a_clear_error() -> None:
    config = digits()
    app = config_client_app(config)
    context = Context(0, 1, {}, RecordDict(), {})
    message = Message(RecordDict(), 1, "query.fedlab")
    message.metadata.__dict__["_message_id"] = "m"
    with pytest.raises(ValueError, match="partition-id"):
        app(message, context)


def test_run_config_reads_the_fedlab_table_of_a_flower_run_config() -> None:
    config = run_config(
        {
            "num-server-rounds": 3,
            "fedlab.strategy": "fedau",
            "fedlab.strategy_options.cutoff": 50,
            "fedlab.local-steps": 7,
        }
    )
    assert config.strategy == "fedau" and config.local_steps == 7
    assert config.strategy_options == {"cutoff": 50}


def test_a_wrong_fedlab_key_in_the_run_config_is_named() -> None:
    from fedlab.config import ConfigError

    with pytest.raises(ConfigError, match=r"'strateg'.*Did you mean strategy"):
        run_config({"fedlab.strateg": "fedau"})


@pytest.mark.parametrize(
    "override",
    [{}, {"fedlab.strategy": "fedbuff", "fedlab.buffer": 2, "fedlab.concurrency": 3}],
    ids=["fedau", "fedbuff"],
)
def test_the_example_flower_app_runs(
    override: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib
    import sys

    from flwr.common.config import get_fused_config_from_dir

    app_dir = REPO / "docs" / "examples" / "flower_app"
    # Flower's own reading of [tool.flwr.app.config], with a --run-config style override.
    values = get_fused_config_from_dir(
        app_dir, {"num-server-rounds": 3, "fedlab.clients": 4, **override}
    )
    sys.path.insert(0, str(app_dir))
    try:
        server = importlib.import_module("fedlab_flower_app.server_app").app
        client = importlib.import_module("fedlab_flower_app.client_app").app
    finally:
        sys.path.remove(str(app_dir))
    grid = LocalGrid(client, 4, run_config=values)
    server(grid, Context(0, 0, {}, RecordDict(), dict(values)))
    assert "final test accuracy after 3 versions" in capsys.readouterr().out
    states = [c.state.config_records for c in grid.contexts.values()]
    # FedZip keeps error feedback (or DP-SGD its accountant) in the node's state.
    assert any("fedlab.state" in s for s in states)


def test_the_flower_guide_quotes_the_example_app() -> None:
    guide = (REPO / "docs" / "how-to-use-with-flower.md").read_text()
    app_dir = REPO / "docs" / "examples" / "flower_app"
    for path in [
        app_dir / "pyproject.toml",
        app_dir / "fedlab_flower_app" / "server_app.py",
        app_dir / "fedlab_flower_app" / "client_app.py",
    ]:
        assert path.read_text() in guide, f"the Flower guide quotes an old {path.name}"


# --------------------------------------------------------------------------- Flower's runtime


@dataclasses.dataclass
class SimulationRun:
    configs: dict[str, RunConfig]
    params: dict[str, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def flower_simulation() -> Iterator[SimulationRun]:
    """One run of Flower's simulation runtime (4 supernodes on 2 Ray CPUs): the ServerApp runs
    fedlab FedAvg, FedAU and FedBuff through the adapter, one after the other."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    base = digits(rounds=5, local_steps=20)
    configs = {
        "fedavg": base,
        "fedau": base.replace(strategy="fedau"),
        "fedbuff": base.replace(strategy="fedbuff", buffer=2, concurrency=3),
    }
    out: dict[str, dict[str, torch.Tensor]] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for name, config in configs.items():
            strategy = FlowerStrategy.from_config(config, message_ttl=600)
            result = strategy.start(
                grid=grid, initial_arrays=initial(config), num_rounds=config.rounds, timeout=300
            )
            out[name] = params_from_record(result.arrays)

    run_simulation(
        server,
        config_client_app(base),
        num_supernodes=base.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2},
        },
    )
    yield SimulationRun(configs, out)


@pytest.mark.slow
def test_flower_simulation_of_fedavg_equals_fedlab_simulate(
    flower_simulation: SimulationRun,
) -> None:
    assert "fedavg" in flower_simulation.params, "the ServerApp did not finish"
    config = flower_simulation.configs["fedavg"]
    assert_same(flower_simulation.params["fedavg"], simulated(config))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedau", "fedbuff"])
def test_flower_simulation_of_fedau_and_fedbuff_beats_chance(
    flower_simulation: SimulationRun, name: str
) -> None:
    assert name in flower_simulation.params, "the ServerApp did not finish"
    config = flower_simulation.configs[name]
    accuracy = Evaluator(build_workload(config)).evaluate(flower_simulation.params[name])
    assert accuracy["accuracy"] > 0.5  # ten classes: chance is 0.1
