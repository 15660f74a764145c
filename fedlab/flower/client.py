"""fedlab client runtimes as Flower ClientApps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedlab import tensorio
from fedlab.client import ClientRuntime, load_params
from fedlab.config import RunConfig, from_mapping
from fedlab.flower.records import (
    ARRAYS,
    CONFIG,
    META,
    METRICS,
    NUM_EXAMPLES,
    PAYLOAD,
    STATE,
    meta_of,
    params_from_record,
    params_to_record,
    scalars,
    widened_names,
)
from fedlab.run import build_runtime
from fedlab.types import Task


def partition_id(context: Context) -> int:
    """The fedlab client id of a node: its ``partition-id`` node config (Flower's simulation
    sets it; a deployed SuperNode gets it from ``--node-config "partition-id=3"``)."""
    value = context.node_config.get("partition-id")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(
            "a fedlab ClientApp needs an integer node config 'partition-id' "
            '(flower-supernode --node-config "partition-id=0")'
        )
    return value


def make_client_app(
    runtime: Callable[[Context], ClientRuntime],
    *,
    client_id: Callable[[Context], int] = partition_id,
) -> ClientApp:
    """A Flower ``ClientApp`` that runs a fedlab client runtime.

    ``runtime(context)`` builds the :class:`~fedlab.client.ClientRuntime` (workload, client
    half, update pipeline) once per process; each ``train`` message is one task for client
    ``client_id(context)``, its per-client state (momenta, error feedback) kept in the node's
    ``context.state`` between messages. ``evaluate`` reports loss and accuracy of the sent
    params on the client's data.
    """
    cache: dict[str, ClientRuntime] = {}

    def get(context: Context) -> ClientRuntime:
        if "runtime" not in cache:
            cache["runtime"] = runtime(context)
        return cache["runtime"]

    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        rt, cid = get(context), client_id(context)
        content = message.content
        config: dict[str, Any] = dict(content.config_records.get(CONFIG, ConfigRecord()))
        server_round = config.pop("server-round", 1)
        version = meta_of(content).get("version", int(server_round) - 1)
        params = params_from_record(content.array_records[ARRAYS], widened_names(content))
        stored = context.state.config_records.get(STATE)
        raw = stored.get("state") if stored is not None else None
        state = tensorio.loads(raw) if isinstance(raw, bytes) else None
        update, new_state = rt.run(cid, Task(int(version), params, config), state)
        context.state[STATE] = ConfigRecord({"state": tensorio.dumps(new_state)})
        payload, widened = params_to_record(update.payload)
        metrics = MetricRecord({NUM_EXAMPLES: update.num_examples, **scalars(update.metrics)})
        meta_out = ConfigRecord({"client-id": cid, "bfloat16": widened})
        reply = RecordDict({PAYLOAD: payload, METRICS: metrics, META: meta_out})
        return Message(reply, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        rt, cid = get(context), client_id(context)
        params = params_from_record(
            message.content.array_records[ARRAYS], widened_names(message.content)
        )
        model = rt.model
        load_params(dict(model.state_dict()), params)
        data = rt.workload.client_data(cid)
        model.eval()
        with torch.no_grad():
            out = model(data.x.to(rt.device))
            y = data.y.to(rt.device)
            # The workload's declared loss and metrics (classification: cross-entropy, accuracy).
            loss = float(rt.objective.loss(out, y))
            scores = {k: float(v.mean()) for k, v in rt.objective.example_scores(out, y).items()}
        metrics = MetricRecord({NUM_EXAMPLES: len(data), "loss": loss, **scores})
        return Message(RecordDict({METRICS: metrics}), reply_to=message)

    @app.query("fedlab")
    def query(message: Message, context: Context) -> Message:
        meta = ConfigRecord({"client-id": client_id(context)})
        return Message(RecordDict({META: meta}), reply_to=message)

    return app


def config_client_app(
    config: RunConfig | Mapping[str, Any] | None = None, **options: Any
) -> ClientApp:
    """The ClientApp of a fedlab run configuration: its workload (built-in, or the user's model
    and data functions), client half (the strategy's, or ``client``) and update pipeline
    (``dp = "sample"`` DP-SGD, ``dp = "client"`` clipping, ``compress = "fedzip"``...), built
    as ``fedlab simulate`` builds them.

    ``config`` is a :class:`~fedlab.config.RunConfig` or a mapping of its keys; ``None`` reads
    it from each node's Flower run config (:func:`run_config`), so a Flower app's
    ``pyproject.toml`` configures server and clients alike. ``options`` go to
    :func:`make_client_app`.
    """
    fixed = None if config is None else as_config(config)

    def runtime(context: Context) -> ClientRuntime:
        return build_runtime(fixed if fixed is not None else run_config(context.run_config))

    return make_client_app(runtime, **options)


def as_config(config: RunConfig | Mapping[str, Any]) -> RunConfig:
    """``config`` checked as a :class:`~fedlab.config.RunConfig`."""
    return config if isinstance(config, RunConfig) else from_mapping(config)


def run_config(values: Mapping[str, Any], *, prefix: str = "fedlab.") -> RunConfig:
    """The fedlab :class:`~fedlab.config.RunConfig` in a Flower run config.

    Flower flattens ``[tool.flwr.app.config]`` tables to dotted keys, so a ``fedlab`` table
    (``fedlab.strategy = "fedau"``, ``fedlab.strategy_options.cutoff = 50``) arrives as keys
    under ``prefix``; they are nested again and checked like a ``--config`` TOML file.
    Flower's ``num-server-rounds``, when present, is the run's ``rounds`` unless the table
    sets them (DP-SGD plans its noise and the accountant its budget over them).
    """
    tree: dict[str, Any] = {}
    for key, value in values.items():
        if not key.startswith(prefix):
            continue
        *parents, leaf = key[len(prefix) :].split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    rounds = values.get("num-server-rounds")
    if isinstance(rounds, int) and not isinstance(rounds, bool):
        tree.setdefault("rounds", rounds)
    return from_mapping(tree)
