"""The Ray backend: a pool of actors that train clients, each on one persistent model.

Actors are workers, not clients. Each builds one :class:`~fedlab.client.ClientRuntime` with
:func:`fedlab.run.build_runtime` and serves whichever client a job names, loading the job's
params into its model in place, so a pool of 2 actors trains 1000 clients with 2 models.

Everything fedlab sends across the process boundary is :mod:`fedlab.tensorio` bytes: params,
client state, task settings, update payloads and metrics are never pickled. A version's params
are serialized and put into the object store once, and every job of that version refers to
the same object; each actor decodes it once and keeps it for the jobs that follow.

Results are bit-identical to the in-process backend: an actor runs exactly
``runtime.run(client_id, task, state)`` with the same seed, tensorio keeps dtypes and bytes
exactly, and the virtual clock in front of the executor decides the order results are used.

Federated evaluation (``--eval-clients``, :meth:`RayExecutor.evaluate`) goes to the same
actors: each gets an equal share of the clients in one call and evaluates it as the
in-process backend does (bit-identical figures), or batched with ``--vectorize``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray

from fedlab import registry, tensorio
from fedlab.client import TrainingError
from fedlab.config import RunConfig, from_mapping
from fedlab.registry import Group
from fedlab.sim.transport import Job
from fedlab.types import ClientId, Params, State, Task, Update

if TYPE_CHECKING:
    from fedlab.client import ClientRuntime
    from fedlab.evaluation import EvalTask, Scores
    from fedlab.sim.transport import Executor
    from fedlab.sim.vmap import VmapExecutor

__all__ = ["RayExecutor"]

log = logging.getLogger(__name__)

# How long close() waits for the actors' node ids (asked for when they start; an actor that
# trained a job has answered long before, so this only bounds the wait on one that never ran).
_NODE_ID_WAIT_S = 10.0

# How long the probe of --ray-address waits for a TCP connection: a listening head accepts in
# milliseconds even across continents, where ray.init would retry a dead address for minutes.
_PROBE_TIMEOUT_S = 5.0

# Decoded params an actor keeps: asynchronous strategies interleave jobs of a few versions,
# and re-decoding a large model for every job would cost more than the training.
_ACTOR_PARAMS_CACHE = 4


class _Worker:
    """The body of one Ray actor: a client runtime serving any client.

    Args:
        config_json: the run configuration as JSON (``RunConfig.to_dict``).
        registered: ``(group, name, object)`` entries to register before building the
            runtime: names registered in the driver with :func:`fedlab.registry.register`
            do not exist in a fresh actor process otherwise.
        build: makes the runtime from the configuration (the composition root's
            :func:`fedlab.run.build_runtime`, which travels by reference).
    """

    def __init__(
        self,
        config_json: str,
        registered: list[tuple[Group, str, Any]],
        build: Callable[[RunConfig], ClientRuntime],
    ) -> None:
        for group, name, obj in registered:
            registry.register(group, name, obj)
        self.config = from_mapping(json.loads(config_json))
        self.runtime = build(self.config)
        self._params: OrderedDict[int, Params] = OrderedDict()
        self._evaluator: Executor | None = None
        # --vectorize: one batched executor for the actor's life, so its chunk size (measured
        # once) and a verdict that the model cannot be batched carry from call to call.
        self._vmap: VmapExecutor | None = None
        self._sent = 0  # notices of self._vmap already sent to the driver

    def node_id(self) -> str:
        """The id of the Ray node this actor runs on (hex), for the run's summary."""
        return str(ray.get_runtime_context().get_node_id())

    def _version(self, token: int, params_ref: list[Any]) -> Params:
        """The params of ``token``, fetched from the object store once and then cached.

        ``params_ref`` is a one-element list so that Ray hands over the reference instead of
        fetching and copying the object for every call.
        """
        params = self._params.get(token)
        if params is None:
            params = tensorio.loads(ray.get(params_ref[0]))
            self._params[token] = params
            while len(self._params) > _ACTOR_PARAMS_CACHE:
                self._params.popitem(last=False)
        else:
            self._params.move_to_end(token)
        return params

    def run(self, token: int, params_ref: list[Any], job: bytes) -> bytes:
        """Train the client that ``job`` names; return its update and state as tensorio bytes."""
        spec = tensorio.loads(job)
        task = Task(spec["version"], self._version(token, params_ref), spec["config"])
        update, state = self.runtime.run(spec["client_id"], task, spec["state"])
        return tensorio.dumps(_result(update, state))

    def run_many(self, tokens: list[int], params_refs: list[list[Any]], jobs: list[bytes]) -> bytes:
        """Train every job at once with the vmap backend's batched loop (``--vectorize``);
        return their updates and states, in order, as one tensorio blob."""
        executor = self._batched()
        specs = [tensorio.loads(job) for job in jobs]
        for token, ref, spec in zip(tokens, params_refs, specs, strict=True):
            task = Task(spec["version"], self._version(token, ref), spec["config"])
            executor.submit(Job(spec["client_id"], task, spec["state"]))
        results = [_result(*executor.result(spec["client_id"])) for spec in specs]
        return tensorio.dumps({"results": results, "notices": self._notices()})

    def _batched(self) -> VmapExecutor:
        from fedlab.sim.vmap import VmapExecutor

        if self._vmap is None:
            self._vmap = VmapExecutor(self.runtime, chunk=self.config.vmap_chunk)
        return self._vmap

    def _notices(self) -> list[str]:
        """The batched executor's log lines not sent yet (actor logs do not reach the driver)."""
        if self._vmap is None:
            return []
        new = self._vmap.notices[self._sent :]
        self._sent = len(self._vmap.notices)
        return new

    def evaluate(self, params_ref: list[Any], settings: bytes) -> bytes:
        """Evaluate a share of a federated evaluation's clients (:class:`EvalTask` settings
        as tensorio bytes, the params in the object store), one after another or, with
        ``--vectorize``, batched as the vmap backend does; return the scores as tensorio."""
        from fedlab.evaluation import EvalTask, scores_tree
        from fedlab.sim.inprocess import InProcessExecutor

        if self._evaluator is None:
            # Kept, so the evaluation model and its data cache serve every evaluation.
            self._evaluator = (
                self._batched() if self.config.vectorize else InProcessExecutor(self.runtime)
            )
        params = tensorio.loads(ray.get(params_ref[0]))
        task = EvalTask.from_settings(tensorio.loads(settings), params)
        scores = scores_tree(self._evaluator.evaluate(task))
        return tensorio.dumps({"scores": scores, "notices": self._notices()})


def _result(update: Update, state: State) -> dict[str, Any]:
    """One job's result as a tensorio tree."""
    return {
        "client_id": update.client_id,
        "version": update.version,
        "payload": dict(update.payload),
        "num_examples": update.num_examples,
        "metrics": dict(update.metrics),
        "state": state,
    }


@dataclass
class _CachedParams:
    """One params version in the object store, shared by every job that starts from it."""

    params: Params  # held so that id(params) cannot be reused while the entry lives
    ref: Any
    token: int
    users: int = 0


@dataclass
class _Pending:
    """A submitted job whose result has not been collected."""

    ref: Any
    actor: int
    key: tuple[int, int]
    index: int = -1  # position in a batched call's results (``--vectorize``); -1: one job


class RayExecutor:
    """Trains clients on a pool of ``config.workers`` Ray actors.

    Starts a light local Ray cluster unless Ray is already initialized, or joins the running
    cluster at ``config.ray_address`` (and then only disconnects from it on :meth:`close`).
    Actors are placed with Ray's ``SPREAD`` strategy, so on a cluster they go to different
    nodes before any node gets a second one. Jobs are dispatched as they are submitted, each
    to the actor with the fewest unfinished jobs (ties to the lowest index); :meth:`result`
    blocks on one client's job. :meth:`summary` says which node each actor ran on.

    Args:
        config: the run configuration; actors build their runtime from it.
        build: how an actor builds its runtime from ``config`` (a module-level function, sent
            by reference: :func:`fedlab.run.build_runtime`); passed in so that this backend
            does not import the composition root that imports it.
        client: the name of the client half ``config`` trains with (its own, or its
            strategy's), registered in each actor when the driver registered it by name.
    """

    def __init__(
        self, config: RunConfig, *, build: Callable[[RunConfig], ClientRuntime], client: str
    ) -> None:
        self.config = config
        self._build = build
        self._client = client
        self._started_ray = False
        self._actors: list[Any] = []
        self._running: list[list[Any]] = []  # per actor: refs of jobs that may not be done
        self._pending: dict[ClientId, _Pending] = {}
        self._params: dict[tuple[int, int], _CachedParams] = {}
        self._tokens = 0
        # --vectorize: jobs wait here until a result is asked for, then go out as one batched
        # call per actor; the decoded results of a call are kept until all are collected.
        self._waiting: dict[ClientId, tuple[tuple[int, int], _CachedParams, bytes]] = {}
        self._batches: dict[Any, tuple[list[dict[str, Any]], int]] = {}
        self.batched_calls = 0  # run_many calls sent (``--vectorize``)
        self._logged: set[str] = set()  # the actors' notices logged here
        self._jobs: list[int] = []  # per actor: jobs sent to it
        self._node_refs: list[Any] = []  # per actor: its node id, once it has started
        self._nodes: list[str] = []  # per actor: its node id ("" unknown), filled by close()
        if not ray.is_initialized():
            self._init_ray(config)
        try:
            self._start_actors(config)
        except BaseException:
            self.close()  # do not leave a cluster behind that nobody will shut down
            raise

    def _start_actors(self, config: RunConfig) -> None:
        needed = config.workers * config.cpus_per_worker
        available = float(ray.cluster_resources().get("CPU", 0.0))  # type: ignore[no-untyped-call]
        if needed > available:
            warnings.warn(
                f"{config.workers} Ray workers need {needed:g} CPUs but the cluster has "
                f"{available:g}; the ones that do not fit wait (lower cpus_per_worker)",
                RuntimeWarning, stacklevel=3,
            )  # fmt: skip
        # SPREAD rather than a custom resource per node: it needs no resource names from the
        # user, works on any cluster, and still honours num_cpus/num_gpus, so one actor per
        # GPU of a multi-GPU node still holds. Ray's default would fill the driver's node first.
        remote = ray.remote(_Worker).options(
            num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker,
            scheduling_strategy="SPREAD",
        )  # fmt: skip
        registered = _registrations(config, self._client)
        config_json = json.dumps(config.to_dict())
        self._actors = [
            remote.remote(config_json, registered, self._build) for _ in range(config.workers)
        ]
        self._running = [[] for _ in self._actors]
        self._jobs = [0 for _ in self._actors]
        # Asked now, answered once each actor is up (before its first job): never blocks here,
        # since actors that do not fit the cluster may wait for resources.
        self._node_refs = [actor.node_id.remote() for actor in self._actors]

    def _init_ray(self, config: RunConfig) -> None:
        kwargs: dict[str, Any] = {
            "address": config.ray_address or None,
            "include_dashboard": False,
            # Actor output would interleave with the progress bar; errors still reach the
            # driver as exceptions from result().
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        check_ray_address(config.ray_address)
        host = config.ray_address.rpartition(":")[0].strip("[]")
        if not config.ray_address or host in ("127.0.0.1", "localhost", "::1"):
            # A Ray that fedlab starts serves this machine only, and a driver joining a cluster
            # on loopback registers a loopback address: Ray would otherwise pick the first
            # network interface and open its ports there.
            kwargs["_node_ip_address"] = "127.0.0.1"
        if not config.ray_address:
            # Enough logical CPUs for every actor even on a small machine: the actors share
            # the cores anyway, and a pool that cannot be scheduled would wait forever.
            kwargs["num_cpus"] = max(2, math.ceil(config.workers * config.cpus_per_worker))
        with warnings.catch_warnings():
            # Ray warns about a future change of CUDA_VISIBLE_DEVICES handling on every start.
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(**kwargs)
        # With an address this process only joined the cluster: ray.shutdown() in close() then
        # disconnects the driver and leaves the cluster running.
        self._started_ray = True

    def submit(self, job: Job) -> None:
        """Send ``job`` to the least busy actor now; its params go to the object store once."""
        cid = job.client_id
        if cid in self._pending or cid in self._waiting:
            raise RuntimeError(f"client {cid} already has a job")
        params = job.task.params
        key = (job.task.version, id(params))
        cached = self._params.get(key)
        if cached is None:
            self._tokens += 1
            ref = ray.put(tensorio.dumps(dict(params)))
            cached = self._params[key] = _CachedParams(params, ref, self._tokens)
        cached.users += 1
        spec = tensorio.dumps(
            {"client_id": cid, "version": job.task.version, "config": dict(job.task.config),
             "state": job.state}
        )  # fmt: skip
        if self.config.vectorize:
            self._waiting[cid] = (key, cached, spec)
            return
        actor = self._least_busy()
        ref = self._actors[actor].run.remote(cached.token, [cached.ref], spec)
        self._running[actor].append(ref)
        self._jobs[actor] += 1
        self._pending[cid] = _Pending(ref, actor, key)

    def _dispatch_waiting(self) -> None:
        """Send every waiting job out: one batched call per actor, contiguous equal shares."""
        waiting = list(self._waiting.items())
        self._waiting.clear()
        share = math.ceil(len(waiting) / len(self._actors))
        for actor, start in enumerate(range(0, len(waiting), share)):
            part = waiting[start : start + share]
            ref = self._actors[actor].run_many.remote(
                [cached.token for _, (_, cached, _) in part],
                [[cached.ref] for _, (_, cached, _) in part],
                [spec for _, (_, _, spec) in part],
            )
            self._running[actor].append(ref)
            self._jobs[actor] += len(part)
            self.batched_calls += 1
            for index, (cid, (key, _, _)) in enumerate(part):
                self._pending[cid] = _Pending(ref, actor, key, index)

    def _least_busy(self) -> int:
        busy = [r for refs in self._running for r in refs]
        if busy:
            done, _ = ray.wait(busy, num_returns=len(busy), timeout=0, fetch_local=False)
            finished = set(done)
            self._running = [[r for r in refs if r not in finished] for refs in self._running]
        loads = [len(refs) for refs in self._running]
        return loads.index(min(loads))

    def result(self, client_id: ClientId) -> tuple[Update, State]:
        """Block until ``client_id``'s job is done.

        Raises:
            TrainingError: the client's training raised in its actor, as in-process.
            RuntimeError: the job failed otherwise in its actor (or the actor died); the
                message names the client and carries the remote error.
        """
        if client_id in self._waiting:
            self._dispatch_waiting()
        pending = self._pending.pop(client_id, None)
        if pending is None:
            raise RuntimeError(f"client {client_id} has no job")
        try:
            data = ray.get(pending.ref) if pending.index < 0 else self._batched(pending)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else None
            if isinstance(cause, TrainingError):
                # The user's model or data raised in the actor: the same one line as in-process
                # (client, version, error, the user's file:line), not Ray's remote traceback.
                c = cause
                raise TrainingError(c.client_id, c.version, c.detail, c.where) from e
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(e)
            raise RuntimeError(
                f"client {client_id} failed on Ray worker {pending.actor}: {detail}\n"
                f"remote traceback:\n{e}"
            ) from e
        except ray.exceptions.RayError as e:
            raise RuntimeError(f"client {client_id}: Ray worker {pending.actor} failed: {e}") from e
        finally:
            self._release(pending)
        out = tensorio.loads(data) if isinstance(data, bytes) else data
        update = Update(
            client_id=out["client_id"], version=out["version"], payload=out["payload"],
            num_examples=out["num_examples"], metrics=out["metrics"],
        )  # fmt: skip
        return update, out["state"]

    def _batched(self, pending: _Pending) -> dict[str, Any]:
        """This job's result from its batched call, decoded once for all of the call's jobs."""
        got = self._batches.get(pending.ref)
        if got is None:
            blob = tensorio.loads(ray.get(pending.ref))
            self._tell(blob["notices"])
            results = blob["results"]
            got = (results, len(results))
        results, left = got
        if left > 1:
            self._batches[pending.ref] = (results, left - 1)
        else:
            self._batches.pop(pending.ref, None)
        out: dict[str, Any] = results[pending.index]
        return out

    def _tell(self, notices: list[str]) -> None:
        # The actors' batched executors explain a fallback once each; the driver logs each
        # explanation once, however many actors send it.
        for line in notices:
            if line not in self._logged:
                self._logged.add(line)
                log.warning("%s", line)

    def _release(self, pending: _Pending) -> None:
        refs = self._running[pending.actor]
        if pending.ref in refs:
            refs.remove(pending.ref)
        cached = self._params[pending.key]
        cached.users -= 1
        if cached.users == 0:
            # No queued job starts from this version any more; the object store frees it
            # once the actors' borrowed references are gone.
            del self._params[pending.key]

    def evaluate(self, task: EvalTask) -> Scores:
        """``task``'s clients on the actors: contiguous equal shares, one call per actor (the
        params go to the object store once); figures in ``task``'s client order.

        Raises:
            RuntimeError: an actor failed (the message carries the remote error), or the
                executor is closed.
        """
        from fedlab.evaluation import scores_from_tree

        if not self._actors:
            raise RuntimeError("the Ray executor is closed: it evaluates no more clients")
        ref = ray.put(tensorio.dumps(dict(task.params)))
        settings = task.settings()
        clients = list(task.clients)
        share = max(1, math.ceil(len(clients) / len(self._actors)))
        calls = []
        for actor, start in enumerate(range(0, len(clients), share)):
            part = {**settings, "clients": clients[start : start + share]}
            calls.append((actor, self._actors[actor].evaluate.remote([ref], tensorio.dumps(part))))
        global_scores: Scores = ([], [])
        for actor, call in calls:
            try:
                blob = tensorio.loads(ray.get(call))
                got = scores_from_tree(blob["scores"])
                self._tell(blob["notices"])
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"federated evaluation failed on Ray worker {actor}: {e}") from e
            global_scores[0].extend(got[0])
            global_scores[1].extend(got[1])
        return global_scores

    def summary(self) -> dict[str, Any]:
        """Where the actors ran, for the run's ``summary.json``: ``ray_nodes`` maps each Ray
        node id to the number of actors placed on it and of jobs they were sent (node ids are
        known once :meth:`close` has run; an actor whose node never answered counts under
        ``"unknown"``)."""
        nodes: dict[str, dict[str, int]] = {}
        for actor, jobs in enumerate(self._jobs):
            node = (self._nodes[actor] if actor < len(self._nodes) else "") or "unknown"
            entry = nodes.setdefault(node, {"actors": 0, "jobs": 0})
            entry["actors"] += 1
            entry["jobs"] += jobs
        return {"ray_nodes": nodes}

    def _resolve_nodes(self) -> None:
        """Collect the actors' node ids, waiting a bounded time; failures count as unknown."""
        refs = self._node_refs
        self._node_refs = []
        if not refs or not ray.is_initialized():
            return
        nodes = ["" for _ in refs]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_NODE_ID_WAIT_S)
        done = set(ready)
        for actor, ref in enumerate(refs):
            if ref in done:
                with contextlib.suppress(ray.exceptions.RayError):  # a dead actor: unknown
                    nodes[actor] = str(ray.get(ref))
        self._nodes = nodes

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it (only disconnect from a
        cluster it joined). Safe to call twice."""
        if ray.is_initialized():  # whoever started Ray may have shut it down already
            self._resolve_nodes()
            for actor in self._actors:
                ray.kill(actor, no_restart=True)
        self._actors = []
        self._running = []
        self._pending.clear()
        self._params.clear()
        self._waiting.clear()
        self._batches.clear()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False


def _registrations(config: RunConfig, client: str) -> list[tuple[Group, str, Any]]:
    """The strategy and ``client`` objects ``config`` names, for actors to register by name.

    Dotted paths are left out: actors import those themselves (Ray gives workers the driver's
    ``sys.path``). Classes travel pickled by reference, so their modules must be importable
    in the workers, as Ray requires of any user code.
    """
    names: list[tuple[Group, str]] = [("strategies", config.strategy), ("clients", client)]
    return [(g, n, registry.resolve(g, n)) for g, n in names if ":" not in n]


def check_ray_address(address: str, timeout: float = _PROBE_TIMEOUT_S) -> None:
    """Fail in one line when nothing answers at ``--ray-address``.

    ``ray.init`` retries an address where nothing listens for minutes, logging as it goes;
    one TCP connect tells the same in milliseconds (or ``timeout`` seconds). Addresses that
    are not ``HOST:PORT`` (``auto``, ``local``) are left to Ray; ``ray://HOST:PORT`` is
    probed at that port.

    Raises:
        ValueError: no connection at the address, with what to do.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        why = f"no answer in {timeout:g} s" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise ValueError(
            f"cannot connect to --ray-address {address} ({why}): start the cluster's head "
            f"there first (ray start --head --port {port}), correct the address, or leave "
            "--ray-address out to start a local Ray"
        ) from None
