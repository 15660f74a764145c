"""The engine: the one loop that drives every strategy, synchronous or asynchronous.

It owns the global params and the version counter. It hands out tasks while clients are idle,
decodes and validates what comes back, buffers it, calls ``Strategy.aggregate`` when the
strategy's trigger fires, bumps the version, and checkpoints everything (atomically, on a
background thread: :mod:`fedlab.checkpoint`). It never knows whether the transport is a
simulation or a network.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time as _time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedlab import checkpoint, seeding
from fedlab.guard import MAX_NUM_EXAMPLES, StagedStore, check_update, non_finite
from fedlab.participation import Participation, Uniform
from fedlab.store import ClientStore, MemoryStore
from fedlab.strategy import Buffer, EveryRound, Fold, Period, Strategy, UpdateRejected
from fedlab.transforms import Pipeline, TransformContext, payload_bytes
from fedlab.transport import Checked, Failure, Transport
from fedlab.types import ClientId, Params, Round, State, Task, Update
from fedlab.versionlog import Counters, VersionLog, warn_dropped

if TYPE_CHECKING:
    from fedlab.attacks import Adversary

_LOG = logging.getLogger("fedlab.engine")


class Callback(Protocol):
    """Observes the run; evaluation, logging and progress are callbacks, never strategy code."""

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        """Called after each aggregation with the version's metrics row (may add to it)."""


class Engine:
    """Runs a strategy against a transport.

    Args:
        strategy: the aggregation strategy.
        transport: where tasks go and updates come from.
        params: the initial global params (version 0).
        seed: the run seed every random stream derives from.
        fraction: share of clients given a task per version (synchronous), or kept in flight
            (asynchronous) unless ``concurrency`` says otherwise.
        min_clients: lower bound on tasks per version.
        concurrency: clients in flight for asynchronous triggers.
        round_timeout: seconds a synchronous version waits before aggregating what it has
            (``None``: wait for every client).
        min_updates: fewest updates a timed-out synchronous version aggregates with.
        over_selection: a synchronous version (with the server sampling) tasks this extra
            share of clients and aggregates as soon as the planned number answered; the late
            ones are dropped as stale.
        pipeline: the update transforms, decoded here in reverse.
        run_dir: where checkpoints go (``None``: no checkpoints).
        checkpoint_every: checkpoint the versions that are multiples of this, and the last
            version of :meth:`run`; a resumed run repeats the versions after its checkpoint.
        fingerprint: identifies the run configuration; a checkpoint with another one is refused.
        callbacks: called after every version.
        task_config: settings sent with every task (``lr``, ``local_steps``...); a strategy's
            own task config wins over these.
        participation: which clients are available at each version (default: all, and the
            server samples ``fraction`` of them).
        memory: the server's per-client store handed to the strategy as ``Round.memory``.
        adversary: simulated Byzantine clients whose updates are replaced just before each
            aggregation (``None``: every client is honest).
        stream: fold each update into a running weighted sum as it arrives when the strategy
            allows it (:meth:`Strategy.stream_weight`), so memory does not grow with the number
            of clients: the deployed server's choice. Off in simulation, where summing in
            arrival order instead of by client id would change results in the last bits.
        max_update_norm: refuse an update whose payload has a larger L2 norm (``None``: no
            bound). One client's influence on a linear aggregate is bounded by it; robust
            strategies, not this bound, are the defence against many colluding clients.
        max_num_examples: refuse an update claiming more examples than this, so no client
            buys an arbitrary share of an example-weighted mean.

    An aggregate (params or strategy state) holding NaN or Inf is never committed: the
    version's updates are dropped, the previous model and state are kept as the next version
    (the version counter still moves on, so a hostile client cannot stall the run), one warning
    names the updates that took part, and the metrics row and :attr:`counters` record it.
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        transport: Transport,
        params: Params,
        seed: int,
        fraction: float = 0.1,
        min_clients: int = 1,
        concurrency: int | None = None,
        round_timeout: float | None = None,
        min_updates: int = 1,
        over_selection: float = 0.0,
        pipeline: Pipeline | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1,
        fingerprint: str = "",
        callbacks: Sequence[Callback] = (),
        task_config: Mapping[str, Any] | None = None,
        participation: Participation | None = None,
        memory: ClientStore | None = None,
        adversary: Adversary | None = None,
        stream: bool = False,
        max_update_norm: float | None = None,
        max_num_examples: int = MAX_NUM_EXAMPLES,
    ) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if max_update_norm is not None and not (max_update_norm > 0):
            raise ValueError(f"max_update_norm must be positive, got {max_update_norm}")
        if max_num_examples < 1:
            raise ValueError(f"max_num_examples must be at least 1, got {max_num_examples}")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
        self.max_update_norm = max_update_norm
        self.max_num_examples = max_num_examples
        self.strategy = strategy
        self.transport = transport
        self.num_clients = transport.clients()
        if self.num_clients < 1:
            raise ValueError("the transport has no clients")
        self.seed = seed
        self.slots = min(self.num_clients, max(min_clients, math.ceil(fraction * self.num_clients)))
        self.concurrency = min(self.num_clients, concurrency or self.slots)
        self.round_timeout = round_timeout
        self.min_updates = min_updates
        if over_selection < 0:
            raise ValueError(f"over_selection must be >= 0, got {over_selection}")
        self.over_selection = over_selection
        self.pipeline = pipeline or Pipeline()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self._writer: checkpoint.Writer | None = None
        if self.run_dir is not None:
            # Only once a checkpoint is on disk may the store forget files older ones need.
            self._writer = checkpoint.Writer(self.run_dir, lambda: self.memory.checkpointed())
        self._target: int | None = None  # the last version of the current run() call
        self.fingerprint = fingerprint
        self.callbacks = list(callbacks)
        self.task_config = dict(task_config or {})
        self.participation: Participation = participation or Uniform()
        self.memory: ClientStore = memory if memory is not None else MemoryStore()
        self.adversary = adversary
        # Omniscient attacks read every benign update, so an attacked run keeps them all.
        self.stream = stream and adversary is None
        self._folded: Fold | None = None
        self._available: tuple[ClientId, ...] | None = None

        self.params: Params = dict(params)
        self.version = 0
        self.state: State = strategy.init(self.params)
        self.counters = Counters()
        self.buffer: list[Update] = []
        self.inflight: dict[ClientId, int] = {}
        self._inflight_config: dict[ClientId, Mapping[str, Any]] = {}
        self._pending: set[ClientId] = set()  # synchronous: tasks of this version outstanding
        self._filled = False  # tasks handed out since the last aggregation (sync and Period)
        self._deadline: float | None = None
        self._configure_calls = 0
        self._task_params: dict[int, Params] = {0: self.params}
        # check() reads _task_params on the transport's threads; the engine thread writes it.
        self._task_params_lock = threading.Lock()
        self._log = VersionLog()
        self._wall_start = _time.perf_counter()
        self.on_reject: Callable[[Update, str], None] | None = None
        self.resumed_from: Path | None = None
        self.resume_warnings: list[str] = []
        # A transport that answers clients (gRPC) runs this engine's own update checks before
        # it replies, so a client hears "refused" for any reason the engine would reject for.
        install = getattr(transport, "check_updates", None)
        if callable(install):
            install(self.check)

    # ------------------------------------------------------------------ the loop

    def run(self, versions: int) -> None:
        """Aggregate until the global model reaches ``versions``; when this returns, the last
        version's checkpoint is on disk (an ``OSError`` says it could not be written)."""
        self._target = versions
        try:
            while self.version < versions:
                self.step()
        except BaseException:
            if self._writer is not None:
                self._writer.settle()  # the newest finished checkpoint is complete on disk
            raise
        if self._writer is not None:
            self._writer.wait()

    def step(self) -> None:
        """Drive the transport until the trigger fires once, then aggregate."""
        trigger = self.strategy.trigger
        if isinstance(trigger, Period) and self._deadline is None:
            self._deadline = self.transport.now() + trigger.seconds
        while True:
            if not self._filled or isinstance(trigger, Buffer):
                self._fill(trigger)
            timeout = self._timeout(trigger)
            if not self.inflight and timeout is None:
                if isinstance(trigger, EveryRound) and self._filled:
                    break  # every task of the version came back (or was rejected)
                raise RuntimeError(
                    "no update can arrive: no client holds a task and the strategy chose none"
                )
            event = self.transport.next_update(timeout)
            if event is None:
                if isinstance(trigger, Period):
                    break  # the period ended
                if timeout is None:
                    # The transport says nothing outstanding can arrive any more.
                    if not isinstance(trigger, EveryRound):
                        raise RuntimeError("the transport lost every outstanding task")
                    for cid in sorted(self._pending):
                        self._fail(Failure(cid, self.inflight[cid], "lost by the transport"))
                    break
                if len(self.buffer) >= self.min_updates:
                    break  # round timeout with enough updates
                continue
            self._handle(event)
            if isinstance(trigger, Buffer):
                # Take every update that has already arrived (on a virtual clock: finished at
                # this same instant) before refilling, so no client restarts on a model the
                # next aggregation is about to replace.
                while not self._fires(trigger):
                    queued = self.transport.next_update(0.0)
                    if queued is None:
                        break
                    self._handle(queued)
            if self._fires(trigger):
                break
        self._aggregate(trigger)

    def _handle(self, event: Update | Checked | Failure) -> None:
        if isinstance(event, Failure):
            self._fail(event)
        elif isinstance(event, Checked):
            self._receive(event.update, event.decoded)
        else:
            self._receive(event)

    def _timeout(self, trigger: object) -> float | None:
        if isinstance(trigger, Period):
            assert self._deadline is not None
            return max(0.0, self._deadline - self.transport.now())
        if isinstance(trigger, EveryRound):
            return self.round_timeout if self._pending else None
        return None

    def _fires(self, trigger: object) -> bool:
        if isinstance(trigger, Buffer):
            return len(self.buffer) >= trigger.k
        if isinstance(trigger, EveryRound):
            if self._filled and self._over_selected() and len(self.buffer) >= self.slots:
                return True
            return self._filled and not self._pending
        return False

    def _over_selected(self) -> bool:
        return self.over_selection > 0 and self._available is None

    def _fill(self, trigger: object) -> None:
        available = self.participation.participants(self.version)
        self._available = tuple(available) if available is not None else None
        if isinstance(trigger, EveryRound):
            # A participation model that decides participants sends a task to each of them.
            free = self.slots if available is None else len(available)
            if self._over_selected():
                free = math.ceil(self.slots * (1 + self.over_selection))
        else:
            free = self.concurrency - len(self.inflight)
        free = min(free, self.num_clients - len(self.inflight))
        self._filled = True
        if free <= 0:
            return
        rnd = Round(
            version=self.version,
            time=self.transport.now(),
            num_clients=self.num_clients,
            slots=free,
            busy=frozenset(self.inflight),
            seed=seeding.derive(self.seed, seeding.SAMPLE, self.version, self._configure_calls),
            available=self._available,
            memory=self.memory,
        )
        self._configure_calls += 1
        tasks = self.strategy.configure(self.state, self.params, rnd)
        for cid, task in sorted(tasks.items()):
            if cid in self.inflight or not 0 <= cid < self.num_clients:
                raise RuntimeError(f"strategy configured client {cid}, which is busy or unknown")
            self._submit(cid, task)

    def _submit(self, cid: ClientId, task: Task) -> None:
        if self.task_config:
            task = Task(task.version, task.params, {**self.task_config, **task.config})
        self.inflight[cid] = task.version
        self._inflight_config[cid] = task.config
        with self._task_params_lock:
            self._task_params.setdefault(task.version, task.params)
        self._log.bytes_down += payload_bytes(task.params)
        if isinstance(self.strategy.trigger, EveryRound):
            self._pending.add(cid)
        self.transport.submit(cid, task)

    # ------------------------------------------------------------------ receiving

    def _reject(self, update: Update, reason: str) -> None:
        self._count_rejected(reason)
        if self.on_reject is not None:
            self.on_reject(update, reason)

    def _count_rejected(self, reason: str) -> None:
        self.counters.rejected += 1
        self._log.reject(reason)

    def _receive(self, update: Update, decoded: Update | None = None) -> None:
        """Take ``update`` as received; ``decoded`` is its payload already decoded by
        :meth:`check` in the transport (it is validated again here all the same)."""
        self.counters.received += 1
        self._log.bytes_up += payload_bytes(update.payload)
        cid = update.client_id
        expected = self.inflight.get(cid)
        if expected is None:
            self._reject(update, f"client {cid} holds no task")
            return
        if update.version != expected:
            self._reject(
                update,
                f"client {cid} answered version {update.version}, "
                f"its task was for version {expected}",
            )
            return
        base = self._task_params[expected]
        self._finish(cid)
        if isinstance(self.strategy.trigger, EveryRound) and update.version != self.version:
            self.counters.stale_dropped += 1  # a straggler from a version already aggregated
            return
        try:
            if decoded is None:
                decoded = self.decode(update)
            self._log.decoded_bytes += payload_bytes(update.payload)
            self._log.decoded_entries += sum(t.numel() for t in decoded.payload.values())
            self.validate(decoded, base)
        except (UpdateRejected, ValueError) as e:
            self._reject(update, str(e))
            return
        weight = self.strategy.stream_weight(decoded) if self.stream else None
        if weight is None:
            self.buffer.append(decoded)
            return
        # Keep the running sum and a payload-free record (count, metrics, staleness).
        if self._folded is None:
            self._folded = Fold()
        self._folded.add(decoded, weight)
        self.buffer.append(dataclasses.replace(decoded, payload={}))

    def decode(self, update: Update) -> Update:
        """``update`` with its payload decoded through the pipeline (in reverse).

        Raises:
            ValueError: the pipeline could not decode it.
        """
        ctx = TransformContext(client_id=update.client_id, version=update.version, seed=self.seed)
        return dataclasses.replace(update, payload=self.pipeline.decode(update.payload, ctx))

    def validate(self, decoded: Update, base: Params) -> None:
        """Apply every check the engine makes to a decoded update.

        The one definition of what the engine accepts: :meth:`_receive` and :meth:`check`
        both call it (after :meth:`decode`). Like :meth:`decode` it reads only what never
        changes during a run (pipeline, strategy, bounds, seed) and ``base``, the params of
        the update's task, so any thread may call it.

        Raises:
            UpdateRejected: the strategy's validation or a server bound refused it.
        """
        self.strategy.validate(decoded, base)
        check_update(decoded, max_num_examples=self.max_num_examples, max_norm=self.max_update_norm)

    def check(self, update: Update) -> Update | str:
        """``update`` (as received) decoded, or why the engine would reject it.

        Installed into a transport that answers clients, which calls it on its own threads
        for an update that answers a task it holds, before telling the client whether the
        update was accepted, and hands the decoded update on (see
        :class:`~fedlab.transport.Checked`). Only the content is judged here; whether the
        client holds that task is the caller's question, and the engine's again when the
        update arrives. When the params of the update's version are already gone (its task
        expired meanwhile) it is only decoded: the engine judges it on arrival.
        """
        with self._task_params_lock:
            base = self._task_params.get(update.version)
        try:
            decoded = self.decode(update)
            if base is not None:
                self.validate(decoded, base)
        except (UpdateRejected, ValueError) as e:
            return str(e)
        return decoded

    def _fail(self, failure: Failure) -> None:
        if self.inflight.get(failure.client_id) != failure.version:
            return
        self._finish(failure.client_id)
        if failure.refused:  # the transport refused the update before the engine saw it
            self._count_rejected(failure.reason)
            return
        self.counters.failed += 1
        self._log.failed += 1

    def _finish(self, cid: ClientId) -> None:
        del self.inflight[cid]
        del self._inflight_config[cid]
        self._pending.discard(cid)
        self._prune()

    def _prune(self) -> None:
        keep = set(self.inflight.values()) | {self.version}
        with self._task_params_lock:
            for v in [v for v in self._task_params if v not in keep]:
                del self._task_params[v]

    # ------------------------------------------------------------------ aggregating

    def _aggregate(self, trigger: object) -> None:
        staged = StagedStore(self.memory)  # the strategy's writes wait for the check below
        rnd = Round(
            version=self.version,
            time=self.transport.now(),
            num_clients=self.num_clients,
            seed=seeding.derive(self.seed, seeding.SAMPLE, self.version, 1 << 30),
            available=self._available,
            memory=staged,
        )
        updates = sorted(self.buffer, key=lambda u: (u.client_id, u.version))
        if self.adversary is not None:
            updates = self.adversary.corrupt(updates, self.params, rnd)
        given: Sequence[Update] = updates
        if self._folded is not None:
            given = self._folded.mean(self.version)
            self._folded = None
        params, state, metrics = self.strategy.aggregate(self.state, self.params, given, rnd)
        # Finite updates can still sum to Inf (or a strategy can divide by zero): such an
        # aggregate would become every client's next model, so it is dropped here instead.
        bad = non_finite(params, self.params, "params") or non_finite(state, self.state, "state")
        if bad is None:
            staged.commit()
            self.params = dict(params)
            self.state = state
        else:
            metrics = {}
            self.counters.aggregates_dropped += 1
            warn_dropped(self.version + 1, bad, updates)
        self.version += 1
        self.buffer = []
        self._pending.clear()
        self._filled = False
        if isinstance(trigger, Period):
            assert self._deadline is not None
            self._deadline += trigger.seconds
        with self._task_params_lock:
            self._task_params[self.version] = self.params
        self._prune()
        row = self._log.row(self.version, self.transport.now(), self.wall, updates, metrics, bad)
        if self.adversary is not None:
            row["byzantine"] = self.adversary.count(updates)
        self._log = VersionLog()
        # Callbacks first: a crash between the metrics row and the checkpoint repeats the
        # version on resume (its row is rewritten), while the other order could lose the row.
        for cb in self.callbacks:
            cb.on_version(self, row)
        if self._writer is not None:
            self._writer.poll()  # a write that failed stops the run here
            if self.version % self.checkpoint_every == 0 or self.version == self._target:
                self.save_checkpoint(wait=False)

    # ------------------------------------------------------------------ checkpoints

    @property
    def wall(self) -> float:
        """Wall-clock seconds the run has trained, resumed runs included."""
        return _time.perf_counter() - self._wall_start

    def state_dict(self) -> State:
        """Everything needed to continue the run bit-identically."""
        return {
            "format": checkpoint.FORMAT,
            "fingerprint": self.fingerprint,
            "version": self.version,
            "params": dict(self.params),
            "strategy": self.state,
            "counters": vars(self.counters).copy(),
            "inflight": {
                cid: {"version": v, "config": dict(self._inflight_config[cid])}
                for cid, v in self.inflight.items()
            },
            "pending": sorted(self._pending),
            "filled": self._filled,
            "deadline": self._deadline,
            "configure_calls": self._configure_calls,
            "task_params": {v: dict(p) for v, p in self._task_params.items()},
            "buffer": [
                {**vars(u), "payload": dict(u.payload), "metrics": dict(u.metrics)}
                for u in self.buffer
            ],
            "wall": self.wall,
            "transport": self.transport.state_dict(),
            "memory": self.memory.state_dict(),
            "available": list(self._available) if self._available is not None else None,
        }

    def load_state_dict(self, ckpt: State) -> None:
        """Restore from :meth:`state_dict`; in-flight tasks are handed to the transport again."""
        checkpoint.check(ckpt, self.fingerprint)
        self.version = int(ckpt["version"])
        self.params = dict(ckpt["params"])
        self.state = ckpt["strategy"]
        self.counters = Counters(**ckpt["counters"])
        self._pending = set(ckpt["pending"])
        self._filled = bool(ckpt["filled"])
        self._deadline = ckpt["deadline"]
        self._configure_calls = int(ckpt["configure_calls"])
        task_params = {int(v): p for v, p in ckpt["task_params"].items()}
        task_params[self.version] = self.params
        with self._task_params_lock:
            self._task_params = task_params
        self.buffer = [Update(**u) for u in ckpt["buffer"]]
        self._wall_start = _time.perf_counter() - float(ckpt["wall"])
        self.transport.load_state_dict(ckpt["transport"])
        self.memory.load_state_dict(ckpt["memory"])
        available = ckpt["available"]
        self._available = tuple(int(c) for c in available) if available is not None else None
        self.inflight = {}
        self._inflight_config = {}
        for cid, entry in sorted(ckpt["inflight"].items()):
            v = int(entry["version"])
            self.inflight[int(cid)] = v
            self._inflight_config[int(cid)] = entry["config"]
            self.transport.submit(int(cid), Task(v, self._task_params[v], entry["config"]))

    @property
    def checkpointed_version(self) -> int | None:
        """The version of the newest checkpoint known to be on disk (``None``: none yet)."""
        return self._writer.written if self._writer is not None else None

    def save_checkpoint(self, *, wait: bool = True) -> None:
        """Checkpoint the current version (see :mod:`fedlab.checkpoint`).

        The write waits for the one before it, then runs on a background thread; with
        ``wait`` this returns once it is on disk. Errors of a background write are raised
        here or by the next call of :meth:`save_checkpoint`, :meth:`run` or :meth:`close`.

        Raises:
            CheckpointError: the state holds something a checkpoint cannot.
            OSError: the run directory cannot be written.
        """
        if self._writer is None:
            return
        self._writer.wait()
        shared = [t for p in self._task_params.values() for t in p.values()]
        self._writer.submit(checkpoint.snapshot(self.version, self.state_dict(), shared))
        if wait:
            self._writer.wait()

    def close(self) -> None:
        """Wait for the last checkpoint write (raising its error) and close the transport."""
        try:
            if self._writer is not None:
                self._writer.wait()
        finally:
            self.transport.close()

    def resume(self) -> None:
        """Load the newest intact checkpoint from ``run_dir``.

        Falls back to the previous checkpoint when the newest is missing or corrupt (a crash
        between the two renames, a truncated disk write) and says so.

        Raises:
            CheckpointError: no usable checkpoint, or one from another configuration.
        """
        if self.run_dir is None:
            raise checkpoint.CheckpointError("resume needs a run directory")
        ckpt, path, errors = checkpoint.read(self.run_dir)
        self.load_state_dict(ckpt)
        self.resumed_from, self.resume_warnings = path, errors
        if self._writer is not None:
            self._writer.written = self.version
