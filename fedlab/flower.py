"""The bridge to Flower: fedlab strategies inside Flower apps, fedlab clients as ClientApps.

Server side, :class:`FlowerStrategy` is a Flower message-API strategy that runs any fedlab
:class:`~fedlab.strategy.Strategy`. It does not re-implement fedlab's rules inside Flower's round
loop: ``start`` drives fedlab's one :class:`~fedlab.engine.Engine` over a :class:`GridTransport`,
a :class:`~fedlab.transport.Transport` whose tasks are Flower messages pushed through the
``Grid`` and whose updates are the replies pulled as they arrive. Selection (``configure``),
task-config merging, decoding (the update pipeline), validation, triggers (``Buffer(k)``,
``Period(t)`` included), aggregation, checkpoints and metrics are the engine's.

Client side, :func:`make_client_app` and :func:`config_client_app` turn a fedlab
:class:`~fedlab.client.ClientRuntime` (workload, client half, update pipeline) into a Flower
``ClientApp``.

What travels, in each message's ``RecordDict``:

- a task (``train``): ``"arrays"`` (ArrayRecord, the params to start from), ``"config"``
  (ConfigRecord, the task config plus Flower's ``server-round``) and ``"fedlab"``
  (ConfigRecord: ``version``, ``client-id``, ``bfloat16``);
- a fedlab client's reply: ``"fedlab.payload"`` (ArrayRecord, the encoded payload: a delta,
  FRL rankings, Fed-SB R matrices, FedZip codes...), ``"metrics"`` (MetricRecord with
  ``num-examples``) and ``"fedlab"``;
- a plain Flower client's reply (Flower's convention): one ArrayRecord of trained weights and
  a MetricRecord with ``num-examples``; the transport turns the weights into the delta
  against the task's params, for strategies whose client half sends deltas.

Tensors travel as NumPy arrays (Flower's ``Array``, loaded without pickle); bfloat16, which
NumPy lacks, travels widened to float32, which is exact, and is narrowed back on arrival.

This is the only fedlab module that imports ``flwr``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result
    from flwr.serverapp.strategy import Strategy as _Strategy
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fedlab.flower needs Flower; install it with: pip install 'fedlab[flower]'"
    ) from e

from fedlab import seeding, tensorio
from fedlab.client import ClientRuntime, load_params
from fedlab.engine import Callback, Engine
from fedlab.strategy import EveryRound, Strategy, floating
from fedlab.transforms import Pipeline
from fedlab.transport import Failure, Transport
from fedlab.types import ClientId, Params, State, Task, Update

__all__ = [
    "FlowerStrategy",
    "GridTransport",
    "config_client_app",
    "make_client_app",
    "params_from_record",
    "params_to_record",
    "run_config",
]

log = logging.getLogger("flwr")

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
META = "fedlab"
PAYLOAD = "fedlab.payload"
STATE = "fedlab.state"
NUM_EXAMPLES = "num-examples"
QUERY = f"{MessageType.QUERY}.fedlab"
# Flower's error code for a message whose node is offline (flwr.common.constant.ErrorCode).
NODE_UNAVAILABLE = 5


# --------------------------------------------------------------------------- records


def params_to_record(params: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, list[str]]:
    """Named tensors as an ArrayRecord, and the names of those widened from bfloat16."""
    record = ArrayRecord()
    widened: list[str] = []
    for name, t in params.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # exact: every bfloat16 is a float32
            widened.append(name)
        record[name] = Array(np.ascontiguousarray(t.numpy()))
    return record, widened


def params_from_record(record: ArrayRecord, widened: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors of ``record``; raises ValueError on anything that is not a plain array."""
    narrow = set(widened)
    out: dict[str, torch.Tensor] = {}
    for name, array in record.items():
        try:
            a = array.numpy()  # np.load(allow_pickle=False): no code runs
        except (TypeError, ValueError) as e:
            raise ValueError(f"array {name!r} cannot be read: {e}") from e
        if a.dtype.kind not in "biuf":
            raise ValueError(f"array {name!r} has dtype {a.dtype}, not a tensor dtype")
        t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
        out[name] = t.to(torch.bfloat16) if name in narrow else t
    return out


def _config_record(values: Mapping[str, Any]) -> ConfigRecord:
    try:
        return ConfigRecord(dict(values))
    except TypeError as e:
        raise ValueError(
            f"a Flower ConfigRecord cannot carry {dict(values)!r} ({e}); task config values "
            "must be numbers, strings, booleans or lists of one of them"
        ) from e


def _meta(content: RecordDict) -> Mapping[str, Any]:
    return content.config_records.get(META, ConfigRecord())


def _widened(content: RecordDict) -> list[str]:
    names = _meta(content).get("bfloat16", [])
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _task_content(cid: ClientId, task: Task) -> RecordDict:
    arrays, widened = params_to_record(task.params)
    config = _config_record({**task.config, "server-round": task.version + 1})
    meta = ConfigRecord({"version": task.version, "client-id": cid, "bfloat16": widened})
    return RecordDict({ARRAYS: arrays, CONFIG: config, META: meta})


def _scalars(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _examples(content: RecordDict) -> tuple[int, dict[str, float]]:
    """``num-examples`` and the other scalar metrics of a reply."""
    for record in content.metric_records.values():
        if NUM_EXAMPLES in record:
            metrics = _scalars(record)
            n = metrics.pop(NUM_EXAMPLES)
            if n != int(n):
                raise ValueError(f"{NUM_EXAMPLES} must be a whole number, got {n}")
            return int(n), metrics
    raise ValueError(f"the reply has no MetricRecord with {NUM_EXAMPLES!r}")


# --------------------------------------------------------------------------- transport


class GridTransport:
    """A :class:`~fedlab.transport.Transport` over a Flower ``Grid``, on the wall clock.

    ``submit`` queues a ``train`` message; ``next_update`` pushes what is queued, then pulls
    replies of every outstanding message as they arrive, so the engine's asynchronous
    triggers work as in any deployment. An error reply (the ClientApp raised, the message's
    TTL expired, the node went offline) is a :class:`~fedlab.transport.Failure`.

    Args:
        grid: the ServerApp's grid.
        nodes: the node id of each client id (``nodes[cid]``).
        deltas: turn replies that carry trained weights (Flower's convention) into deltas
            against the task's params; otherwise only fedlab payloads are accepted.
        ttl: each message's time to live in seconds (``None``: Flower's default, 12 hours).
        poll_interval: seconds between pulls while waiting.
        retry_after: a failure because the node is offline is reported this many seconds
            late, so that an asynchronous engine does not re-task an offline node in a loop.
    """

    def __init__(
        self,
        grid: Grid,
        nodes: Sequence[int],
        *,
        deltas: bool = False,
        ttl: float | None = None,
        poll_interval: float = 0.1,
        retry_after: float = 5.0,
    ) -> None:
        self.grid = grid
        self.nodes = list(nodes)
        self.deltas = deltas
        self.ttl = ttl
        self.poll_interval = poll_interval
        self.retry_after = retry_after
        self._start = time.monotonic()
        self._offset = 0.0
        self._queued: list[tuple[Message, ClientId, Task]] = []
        self._outstanding: dict[str, tuple[ClientId, Task]] = {}
        self._ready: deque[Update | Failure] = deque()
        self._held: list[tuple[float, Failure]] = []

    def clients(self) -> int:
        return len(self.nodes)

    def now(self) -> float:
        return self._offset + time.monotonic() - self._start

    def submit(self, client_id: ClientId, task: Task) -> None:
        message = Message(
            _task_content(client_id, task),
            dst_node_id=self.nodes[client_id],
            message_type=MessageType.TRAIN,
            ttl=self.ttl,
            group_id=str(task.version),
        )
        self._queued.append((message, client_id, task))

    def _flush(self) -> None:
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        pushed = set(self.grid.push_messages([m for m, _, _ in queued]))
        for message, cid, task in queued:
            mid = message.metadata.message_id
            if mid and mid in pushed:
                self._outstanding[mid] = (cid, task)
            else:
                self._ready.append(Failure(cid, task.version, "the SuperLink refused the task"))

    def _event(self, reply: Message) -> Update | Failure | None:
        entry = self._outstanding.pop(reply.metadata.reply_to_message_id, None)
        if entry is None:
            return None
        cid, task = entry
        if reply.has_error():
            failure = Failure(cid, task.version, f"Flower error {reply.error.code}: "
                              f"{reply.error.reason}")  # fmt: skip
            if reply.error.code == NODE_UNAVAILABLE and self.retry_after > 0:
                self._held.append((self.now() + self.retry_after, failure))
                return None
            return failure
        try:
            return self._update(cid, task, reply.content)
        except ValueError as e:
            log.warning("fedlab: malformed reply from client %d: %s", cid, e)
            return Failure(cid, task.version, f"malformed reply: {e}")

    def _update(self, cid: ClientId, task: Task, content: RecordDict) -> Update:
        n, metrics = _examples(content)
        records = content.array_records
        if PAYLOAD in records:
            payload = params_from_record(records[PAYLOAD], _widened(content))
        elif self.deltas and len(records) == 1:
            weights = params_from_record(next(iter(records.values())))
            base = floating(task.params)
            # Entries the model does not train (integer buffers) are not part of a delta;
            # anything else unexpected stays in, for validation to name it.
            payload = {
                k: (v.to(base[k].dtype) - base[k]) if k in base and v.shape == base[k].shape
                else v
                for k, v in weights.items()
                if k in base or k not in task.params
            }  # fmt: skip
        else:
            raise ValueError(
                f"expected an ArrayRecord {PAYLOAD!r} (a fedlab ClientApp)"
                + (" or one ArrayRecord of trained weights" if self.deltas else "")
                + f", got {sorted(records)}"
            )
        return Update(cid, task.version, payload, n, metrics)

    def _release(self) -> None:
        now = self.now()
        due = [f for t, f in self._held if t <= now]
        self._held = [(t, f) for t, f in self._held if t > now]
        self._ready.extend(due)

    def next_update(self, timeout: float | None) -> Update | Failure | None:
        self._flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._release()
            if self._ready:
                return self._ready.popleft()
            if not self._outstanding and not self._held:
                if deadline is not None:
                    time.sleep(max(0.0, deadline - time.monotonic()))  # a Period's window
                return None
            if self._outstanding:
                replies = list(self.grid.pull_messages(list(self._outstanding)))
                events = [e for e in map(self._event, replies) if e is not None]
                # One pull may bring several replies: order them the same way every time.
                self._ready.extend(sorted(events, key=lambda e: e.client_id))
                if self._ready:
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                return None
            wait = self.poll_interval
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            time.sleep(wait)

    def state_dict(self) -> State:
        return {"now": self.now()}

    def load_state_dict(self, state: State) -> None:
        # The clock goes on from the checkpoint, so a Period's deadline still lies ahead.
        self._offset = float(state["now"])
        self._start = time.monotonic()

    def close(self) -> None:
        self._queued = []
        self._outstanding = {}


# --------------------------------------------------------------------------- server


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
            version (0: none).
        message_ttl: each message's time to live in seconds (``None``: Flower's 12 hours).
        poll_interval: seconds between pulls for replies.
        engine: builds the engine instead (see :meth:`from_config`); the settings above
            that the engine holds are then ignored.
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
        cls, config: Any, *, run_dir: str | Path | None = None, **options: Any
    ) -> FlowerStrategy:
        """The run ``config`` describes (a :class:`~fedlab.config.RunConfig` or a mapping of
        its keys), built as ``fedlab simulate`` builds it: strategy and options, update
        pipeline, client-level DP, participation, task config and sampling. ``options`` are
        the Flower-side settings of :class:`FlowerStrategy`; ``min_nodes`` defaults to
        ``config.clients``, the population every node's partition id must fall in.
        """
        from fedlab.config import RunConfig, from_mapping
        from fedlab.sim import build_engine, build_pipeline, build_strategy

        cfg = config if isinstance(config, RunConfig) else from_mapping(config)

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
        if engine.round_timeout is None and isinstance(self.strategy.trigger, EveryRound):
            engine.round_timeout = timeout
        if self._restore is not None:
            engine.load_state_dict(self._restore)
            self._restore = None
        elif engine.run_dir is not None and (engine.run_dir / "checkpoint.fl").exists():
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
            cid = _meta(reply.content).get("client-id") if reply.has_content() else None
            if isinstance(cid, int) and not isinstance(cid, bool):
                told[reply.metadata.src_node_id] = cid
        if set(told) == set(ids) and sorted(told.values()) == list(range(len(ids))):
            return sorted(ids, key=lambda n: told[n])
        if told:
            log.warning(
                "fedlab: the nodes' client ids %s are not 0..%d; numbering nodes by node id",
                sorted(told.values()), len(ids) - 1,
            )  # fmt: skip
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
                RecordDict({ARRAYS: arrays, CONFIG: _config_record(content)}),
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
                n, metrics = _examples(reply.content)
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
        self.result.train_metrics_clientapp[v] = MetricRecord(dict(_scalars(row)))
        arrays = params_to_record(engine.params)[0]
        if self.owner.fraction_evaluate > 0:
            messages = self.owner.configure_evaluate(v, arrays, self.evaluate_config, self.grid)
            replies = self.grid.send_and_receive(messages, timeout=self.timeout)
            metrics = self.owner.aggregate_evaluate(v, replies)
            if metrics is not None:
                self.result.evaluate_metrics_clientapp[v] = metrics
                row.update({f"federated_{k}": float(x) for k, x in _scalars(metrics).items()})
        if self.evaluate_fn is not None:
            res = self.evaluate_fn(v, arrays)
            if res is not None:
                self.result.evaluate_metrics_serverapp[v] = res
                row.update({f"server_{k}": float(x) for k, x in _scalars(res).items()})
        log.info("fedlab: version %d: %s", v, {k: row[k] for k in row if k != "reject_reasons"})


# --------------------------------------------------------------------------- client


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
        version = _meta(content).get("version", int(server_round) - 1)
        params = params_from_record(content.array_records[ARRAYS], _widened(content))
        stored = context.state.config_records.get(STATE)
        raw = stored.get("state") if stored is not None else None
        state = tensorio.loads(raw) if isinstance(raw, bytes) else None
        update, new_state = rt.run(cid, Task(int(version), params, config), state)
        context.state[STATE] = ConfigRecord({"state": tensorio.dumps(new_state)})
        payload, widened = params_to_record(update.payload)
        metrics = MetricRecord({NUM_EXAMPLES: update.num_examples, **_scalars(update.metrics)})
        meta_out = ConfigRecord({"client-id": cid, "bfloat16": widened})
        return Message(RecordDict({PAYLOAD: payload, METRICS: metrics, META: meta_out}),
                       reply_to=message)  # fmt: skip

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        rt, cid = get(context), client_id(context)
        params = params_from_record(
            message.content.array_records[ARRAYS], _widened(message.content)
        )
        model = rt.model
        load_params(dict(model.state_dict()), params)
        data = rt.workload.client_data(cid)
        model.eval()
        with torch.no_grad():
            out = model(data.x.to(rt.device))
            y = data.y.to(rt.device)
            loss = float(F.cross_entropy(out, y))
            accuracy = float((out.argmax(1) == y).float().mean())
        metrics = MetricRecord({NUM_EXAMPLES: len(data), "loss": loss, "accuracy": accuracy})
        return Message(RecordDict({METRICS: metrics}), reply_to=message)

    @app.query("fedlab")
    def query(message: Message, context: Context) -> Message:
        meta = ConfigRecord({"client-id": client_id(context)})
        return Message(RecordDict({META: meta}), reply_to=message)

    return app


def config_client_app(config: Any, **options: Any) -> ClientApp:
    """The ClientApp of a fedlab run ``config`` (a RunConfig or a mapping of its keys): its
    workload (built-in, or the user's model and data functions), client half (the
    strategy's, or ``client``), and update pipeline (``dp = "sample"`` DP-SGD,
    ``dp = "client"`` clipping, ``compress = "fedzip"``...), built as ``fedlab simulate``
    builds them. ``options`` go to :func:`make_client_app`.
    """
    from fedlab.config import RunConfig, from_mapping

    cfg = config if isinstance(config, RunConfig) else from_mapping(config)

    def runtime(context: Context) -> ClientRuntime:
        from fedlab.sim import build_runtime

        return build_runtime(cfg)

    return make_client_app(runtime, **options)


def run_config(values: Mapping[str, Any], *, prefix: str = "fedlab.") -> Any:
    """The fedlab :class:`~fedlab.config.RunConfig` in a Flower run config.

    Flower flattens ``[tool.flwr.app.config]`` tables to dotted keys, so a ``fedlab`` table
    (``fedlab.strategy = "fedau"``, ``fedlab.strategy_options.x = 1``) becomes keys under
    ``prefix``; they are nested again and checked like a ``--config`` TOML file.
    """
    from fedlab.config import from_mapping

    tree: dict[str, Any] = {}
    for key, value in values.items():
        if not key.startswith(prefix):
            continue
        *parents, leaf = key[len(prefix) :].split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_mapping(tree)
