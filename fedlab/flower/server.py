"""Any fedlab strategy as a Flower message-API strategy, run by fedlab's engine."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.serverapp.strategy import Strategy as _Strategy

from fedlab import seeding
from fedlab.checkpoint import CHECKPOINT
from fedlab.config import RunConfig
from fedlab.engine import Callback, Engine
from fedlab.flower.client import as_config
from fedlab.flower.records import (
    ARRAYS,
    CONFIG,
    NUM_EXAMPLES,
    QUERY,
    config_record,
    examples_of,
    log,
    meta_of,
    params_from_record,
    params_to_record,
    scalars,
)
from fedlab.flower.transport import GridTransport
from fedlab.run import build_engine, build_pipeline, build_strategy
from fedlab.strategy import EveryRound, Strategy
from fedlab.transforms import Pipeline
from fedlab.transport import Transport
from fedlab.types import Params, State

_ROUND_LOOP = (
    "FlowerStrategy runs through start(): fedlab's engine hands out tasks and aggregates as "
    "updates arrive (asynchronous triggers need that), which Flower's round-by-round "
    "configure_train/aggregate_train cannot express"
)

EngineFactory = Callable[[Transport, Params, Sequence[Callback]], Engine]
"""Builds the engine for a run: ``(transport, initial params, callbacks) -> Engine``."""


class FlowerStrategy(_Strategy):
    """Any fedlab strategy as a Flower message-API strategy.

    ``start(grid=..., initial_arrays=..., num_rounds=...)`` runs ``num_rounds`` versions (one
    version per aggregation: for ``Buffer(k)`` and ``Period(t)`` strategies, a version is one
    buffer or one window, not one synchronous round) and returns Flower's ``Result``.

    Args:
        strategy: the fedlab strategy.
        seed: the run seed every sampling stream derives from.
        fraction: share of clients given a task per version (synchronous), or kept in flight
            (asynchronous) unless ``concurrency`` says otherwise.
        min_clients: fewest tasks per version.
        concurrency: clients in flight under an asynchronous trigger.
        round_timeout: seconds a synchronous version waits (default: ``start``'s ``timeout``).
        min_updates: fewest updates a timed-out synchronous version aggregates.
        pipeline: the update transforms the clients apply (decoded here in reverse).
        task_config: settings every task carries (``lr``, ``local_steps``...); ``start``'s
            ``train_config`` is merged over it, a strategy's own task config over both.
        run_dir: checkpoint directory; a run whose checkpoint is there resumes from it.
        callbacks: more engine callbacks (``on_version(engine, row)``).
        min_nodes: nodes to wait for before starting (the population is the nodes connected
            then).
        fraction_evaluate: share of nodes asked for a federated evaluation after every
            version (0: none); the engine waits for their replies before going on.
        message_ttl: each message's time to live in seconds (``None``: Flower's 12 hours).
        poll_interval: seconds between pulls for replies.
        engine: builds the engine instead (see :meth:`from_config`); the settings above
            that the engine holds are then ignored.
        deltas: accept replies that carry trained weights (a plain Flower ClientApp) and
            turn them into deltas; default: when the client half is local SGD and the
            pipeline is empty.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        seed: int = 0,
        fraction: float = 0.1,
        min_clients: int = 1,
        concurrency: int | None = None,
        round_timeout: float | None = None,
        min_updates: int = 1,
        pipeline: Pipeline | None = None,
        task_config: Mapping[str, Any] | None = None,
        run_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        min_nodes: int = 2,
        fraction_evaluate: float = 0.0,
        message_ttl: float | None = None,
        poll_interval: float = 0.1,
        engine: EngineFactory | None = None,
        deltas: bool | None = None,
    ) -> None:
        if not 0 <= fraction_evaluate <= 1:
            raise ValueError(f"fraction_evaluate must be in [0, 1], got {fraction_evaluate}")
        self.strategy = strategy
        self.seed = seed
        self.pipeline = pipeline or Pipeline()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.callbacks = list(callbacks)
        self.min_nodes = min_nodes
        self.fraction_evaluate = fraction_evaluate
        self.message_ttl = message_ttl
        self.poll_interval = poll_interval
        # Weights from a plain Flower client become deltas only for a delta-sending client
        # half whose payloads no transform has to decode.
        self.deltas = (
            deltas
            if deltas is not None
            else strategy.client == "sgd" and not self.pipeline.transforms
        )
        self.engine: Engine | None = None
        self.nodes: list[int] = []
        self._restore: State | None = None
        if engine is None:

            def engine(transport: Transport, params: Params, cbs: Sequence[Callback]) -> Engine:
                return Engine(
                    strategy=strategy,
                    transport=transport,
                    params=params,
                    seed=seed,
                    fraction=fraction,
                    min_clients=min_clients,
                    concurrency=concurrency,
                    round_timeout=round_timeout,
                    min_updates=min_updates,
                    pipeline=self.pipeline,
                    run_dir=self.run_dir,
                    callbacks=cbs,
                    task_config=task_config,
                )

        self._engine = engine

    @classmethod
    def from_config(
        cls,
        config: RunConfig | Mapping[str, Any],
        *,
        run_dir: str | Path | None = None,
        **options: Any,
    ) -> FlowerStrategy:
        """The run ``config`` describes (a :class:`~fedlab.config.RunConfig` or a mapping of
        its keys), built as ``fedlab simulate`` builds it: strategy and options, update
        pipeline, client-level DP, participation, task config and sampling. ``options`` are
        the Flower-side settings of :class:`FlowerStrategy`; ``min_nodes`` defaults to
        ``config.clients``, the population every node's partition id must fall in.
        """
        cfg = as_config(config)

        def engine(transport: Transport, params: Params, cbs: Sequence[Callback]) -> Engine:
            if transport.clients() != cfg.clients:
                raise ValueError(
                    f"the federation has {transport.clients()} nodes and the fedlab config "
                    f"says clients = {cfg.clients}; make them equal"
                )
            return build_engine(
                cfg, run_dir=run_dir, callbacks=cbs, transport=transport, params=params
            )

        options.setdefault("min_nodes", cfg.clients)
        return cls(
            build_strategy(cfg),
            seed=cfg.seed,
            pipeline=build_pipeline(cfg),
            run_dir=run_dir,
            engine=engine,
            **options,
        )

    # ------------------------------------------------------------------ the run

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the fedlab engine over ``grid`` until version ``num_rounds``.

        ``timeout`` bounds the wait for nodes to connect and answer, and is a synchronous
        version's round timeout unless one was set. ``evaluate_fn(version, arrays)`` is
        called before the first version and after each one, as in Flower's strategies.
        """
        log.info("fedlab %s on Flower (trigger %s)", self.strategy, self.strategy.trigger)
        self.nodes = self._discover(grid, timeout)
        transport = GridTransport(
            grid,
            self.nodes,
            deltas=self.deltas,
            ttl=self.message_ttl,
            poll_interval=self.poll_interval,
        )
        result = Result()
        recorder = _Recorder(self, grid, result, evaluate_config, evaluate_fn, timeout)
        engine = self._engine(
            transport, params_from_record(initial_arrays), [*self.callbacks, recorder]
        )
        if train_config:
            engine.task_config = {**engine.task_config, **train_config}
        if engine.round_timeout is None and isinstance(engine.strategy.trigger, EveryRound):
            engine.round_timeout = timeout
        if self._restore is not None:
            engine.load_state_dict(self._restore)
            self._restore = None
        elif engine.run_dir is not None and (engine.run_dir / CHECKPOINT).exists():
            engine.resume()
            log.info("fedlab: resumed at version %d from %s", engine.version, engine.resumed_from)
        else:
            engine.save_checkpoint()
        self.engine = engine
        if evaluate_fn is not None and engine.version == 0:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        try:
            engine.run(num_rounds)
        finally:
            transport.close()
        result.arrays = params_to_record(engine.params)[0]
        return result

    def _discover(self, grid: Grid, timeout: float) -> list[int]:
        """The population: every connected node, in client-id order.

        Each node is asked for its fedlab client id (a fedlab ClientApp answers with its
        partition id); when the answers are not exactly ``0 .. N-1`` (plain Flower ClientApps
        do not answer), nodes are numbered in the order of their node ids.
        """
        deadline = time.monotonic() + timeout
        while len(ids := sorted(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(ids)} of the {self.min_nodes} nodes needed connected within "
                    f"{timeout:g} s"
                )
            time.sleep(0.2)
        query = [
            Message(RecordDict(), dst_node_id=n, message_type=QUERY, ttl=self.message_ttl)
            for n in ids
        ]
        told: dict[int, int] = {}
        for reply in grid.send_and_receive(query, timeout=timeout):
            cid = meta_of(reply.content).get("client-id") if reply.has_content() else None
            if isinstance(cid, int) and not isinstance(cid, bool):
                told[reply.metadata.src_node_id] = cid
        if set(told) == set(ids) and sorted(told.values()) == list(range(len(ids))):
            return sorted(ids, key=lambda n: told[n])
        if told:
            log.warning(
                "fedlab: the nodes' client ids %s are not 0..%d; numbering nodes by node id",
                sorted(told.values()),
                len(ids) - 1,
            )
        return ids

    # ------------------------------------------------------------------ Flower's hooks

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Not mapped: the fedlab engine, not Flower's round loop, drives training."""
        raise TypeError(_ROUND_LOOP)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not mapped: see :meth:`configure_train`."""
        raise TypeError(_ROUND_LOOP)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages for ``fraction_evaluate`` of the nodes, sampled reproducibly."""
        nodes = self.nodes or sorted(grid.get_node_ids())
        k = min(len(nodes), math.ceil(self.fraction_evaluate * len(nodes)))
        if k == 0:
            return []
        rng = seeding.numpy_rng(self.seed, seeding.SAMPLE, server_round, 1 << 31)
        picked = sorted(int(i) for i in rng.choice(len(nodes), size=k, replace=False))
        content = {**config, "server-round": server_round}
        return [
            Message(
                RecordDict({ARRAYS: arrays, CONFIG: config_record(content)}),
                dst_node_id=nodes[i],
                message_type=MessageType.EVALUATE,
                ttl=self.message_ttl,
                group_id=str(server_round),
            )
            for i in picked
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Every scalar metric averaged, weighted by ``num-examples``; error replies skipped."""
        sums: dict[str, float] = {}
        total = 0
        for reply in replies:
            if not reply.has_content():
                continue
            try:
                n, metrics = examples_of(reply.content)
            except ValueError:
                continue
            total += n
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * n
        if total <= 0:
            return None
        return MetricRecord({NUM_EXAMPLES: total, **{k: v / total for k, v in sums.items()}})

    def summary(self) -> None:
        """Log the fedlab strategy and its trigger."""
        log.info("\t├──> fedlab strategy: %s", self.strategy)
        log.info("\t└──> trigger: %s", self.strategy.trigger)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> State:
        """The engine's checkpoint of the last :meth:`start` (strategy state included)."""
        if self.engine is None:
            raise RuntimeError("nothing to save: start() has not run")
        return self.engine.state_dict()

    def load_state_dict(self, state: State) -> None:
        """Continue from ``state`` (a :meth:`state_dict`) at the next :meth:`start`."""
        self._restore = state


class _Recorder:
    """Fills Flower's ``Result`` after each version, with federated and central evaluation."""

    def __init__(
        self,
        owner: FlowerStrategy,
        grid: Grid,
        result: Result,
        evaluate_config: ConfigRecord | None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
        timeout: float,
    ) -> None:
        self.owner = owner
        self.grid = grid
        self.result = result
        self.evaluate_config = evaluate_config or ConfigRecord()
        self.evaluate_fn = evaluate_fn
        self.timeout = timeout

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        v = engine.version
        self.result.train_metrics_clientapp[v] = MetricRecord(dict(scalars(row)))
        arrays = params_to_record(engine.params)[0]
        if self.owner.fraction_evaluate > 0:
            messages = self.owner.configure_evaluate(v, arrays, self.evaluate_config, self.grid)
            replies = self.grid.send_and_receive(messages, timeout=self.timeout)
            metrics = self.owner.aggregate_evaluate(v, replies)
            if metrics is not None:
                self.result.evaluate_metrics_clientapp[v] = metrics
                row.update({f"federated_{k}": float(x) for k, x in scalars(metrics).items()})
        if self.evaluate_fn is not None:
            res = self.evaluate_fn(v, arrays)
            if res is not None:
                self.result.evaluate_metrics_serverapp[v] = res
                row.update({f"server_{k}": float(x) for k, x in scalars(res).items()})
        log.info("fedlab: version %d: %s", v, {k: row[k] for k in row if k != "reject_reasons"})
