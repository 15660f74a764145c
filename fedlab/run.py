"""The composition root: a run's configuration becomes its workload, strategy, pipeline,
transport and engine.

Used by ``fedlab simulate`` and the Python API (:mod:`fedlab.experiment`), by the deployed
server and client (``fedlab server``, ``fedlab client``) and by the Flower bridge, so every way
of running fedlab builds the same objects from the same settings. Simulation backends and the
virtual clock live in :mod:`fedlab.sim`; the backend only decides who computes client updates,
and results are the same for every backend and worker count (to floating-point rounding for
``vmap``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedlab import precision, privacy, registry
from fedlab.attacks import Adversary, PoisonedWorkload, build_adversary
from fedlab.client import ClientAlgorithm, ClientRuntime
from fedlab.config import RunConfig
from fedlab.data import WORKLOADS, PublicSample, Workload, make_workload
from fedlab.engine import Callback, Engine
from fedlab.evaluation import EvalTask, FederatedEvaluator, Scores
from fedlab.objectives import objective_of
from fedlab.participation import build_participation
from fedlab.sim.clock import LatencyModel, SpeedModel
from fedlab.sim.inprocess import InProcessExecutor
from fedlab.sim.transport import Executor, Job, SimTransport
from fedlab.store import ClientStore, MemoryStore
from fedlab.strategy import Buffer, EveryRound, Strategy, Trigger
from fedlab.transforms import Pipeline, UpdateTransform
from fedlab.transport import Transport
from fedlab.types import ClientId, Params, State, Update

if TYPE_CHECKING:
    from fedlab.strategies.dp_fedavg import DPFedAvg

__all__ = [
    "build_engine",
    "build_pipeline",
    "build_runtime",
    "build_workload",
]


def build_workload(config: RunConfig) -> Workload:
    """The workload named by ``config`` (built-in or the user's dotted paths)."""
    return make_workload(
        config.workload,
        num_clients=config.clients,
        seed=config.seed,
        model=config.model,
        data=config.data or None,
        partition=config.partition,
        alpha=config.alpha,
        label_swap=config.label_swap,
        synthetic_alpha=config.synthetic_alpha,
        synthetic_beta=config.synthetic_beta,
        data_dir=config.data_dir,
        dataset=config.dataset,
        features=config.features,
        label=config.label,
        partition_by=config.partition_by,
        classes_per_client=config.classes_per_client,
    )


def check_requirements(config: RunConfig, model: torch.nn.Module, *, backend: bool = True) -> None:
    """Refuse at start-up what would otherwise fail mid-run with a raw traceback: an optional
    package the run needs and lacks, a model that ``--dp sample`` cannot train, or (on a
    worker) a device without the ``--precision`` asked for.

    ``backend=False`` for a worker that only trains (a deployed client, a Ray actor): the
    backend is the server's or driver's business.

    Raises:
        ValueError: one line saying what to install or to change.
    """
    if backend and config.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise ValueError(
            "--backend ray needs Ray, an optional extra this installation lacks: "
            "pip install 'fedlab[ray]' (or leave --backend at inprocess)"
        )
    if not backend:  # where clients train (a deployed server's own device trains nothing)
        why = precision.unsupported(config.precision, torch.device(config.device))
        if why:
            raise ValueError(
                f"--precision {config.precision} refused: {why}; train with --precision fp32"
            )
    if config.dp:
        privacy.require_opacus()
    if config.dp == "sample":
        privacy.check_model(model)


def strategy_defaults(strategy: str) -> dict[str, str]:
    """The run settings a strategy declares it needs (its ``run_defaults`` class attribute:
    ADMM-WLS's workload ``wls``, the known-probability oracle's participation ``bernoulli``);
    they become the run's defaults when the user names none. Empty for an unknown name."""
    try:
        cls = registry.resolve("strategies", strategy)
    except ValueError:
        return {}  # build_strategy reports the unknown name
    needed = getattr(cls, "run_defaults", None)
    if not isinstance(needed, Mapping):
        return {}
    return {str(k): str(v) for k, v in needed.items()}


def build_strategy(config: RunConfig) -> Strategy:
    """The strategy named by ``config`` with its options.

    ``--buffer`` and ``--period`` are shorthands for the strategy options ``buffer`` and
    ``period`` (FedBuff's K, FedFix's window); a strategy without such an option refuses them.
    """
    options = dict(config.strategy_options)
    for key in ("buffer", "period"):
        if getattr(config, key):
            options.setdefault(key, getattr(config, key))
    strategy = registry.create("strategies", config.strategy, options)
    if not isinstance(strategy, Strategy):
        raise ValueError(f"{config.strategy!r} is not a fedlab Strategy")
    needed = strategy_defaults(config.strategy).get("workload", "")
    builtin = (*WORKLOADS, "digits-shift", "wls")  # a custom workload may provide what it needs
    if needed and config.workload != needed and config.workload in builtin:
        raise ValueError(
            f"strategy {config.strategy!r} runs on workload {needed!r}, not "
            f"{config.workload!r}: pass --workload {needed} (its default when no workload is "
            "named)"
        )
    return strategy


def build_algorithm(config: RunConfig, strategy: Strategy) -> ClientAlgorithm:
    """The client half: ``config.client`` or the strategy's paired client."""
    name = config.client or strategy.client
    algorithm: object = registry.create("clients", name, config.client_options)
    if not isinstance(algorithm, ClientAlgorithm):
        raise ValueError(f"{name!r} is not a fedlab ClientAlgorithm")
    if config.dp == "sample":
        from fedlab.clients.sgd import LocalSGD

        if not isinstance(algorithm, LocalSGD):
            raise ValueError(
                f"dp = 'sample' trains with DP-SGD inside LocalSGD.train; client {name!r} does "
                "not train with it, so its records would not be protected"
            )
    return algorithm


def build_runtime(config: RunConfig, workload: Workload | None = None) -> ClientRuntime:
    """One worker's client runtime; Ray actors call this with the config they were given.

    Sets this process's torch thread count to ``config.threads``: small models train many
    times faster single-threaded than with threads fighting over busy cores.
    """
    torch.set_num_threads(config.threads)
    workload = workload or build_workload(config)
    adversary = build_attack(config)
    if adversary is not None and adversary.data_attack is not None:
        workload = PoisonedWorkload(
            workload, adversary.malicious, adversary.data_attack, config.seed
        )
    runtime = ClientRuntime(
        workload=workload,
        algorithm=build_algorithm(config, build_strategy(config)),
        pipeline=build_pipeline(config),
        seed=config.seed,
        device=config.device,
        cache_mb=config.cache_mb,
    )
    check_requirements(config, runtime.model, backend=False)
    return runtime


def build_pipeline(config: RunConfig) -> Pipeline:
    """The update transforms of ``config``, in the order clients apply them; the server
    decodes in reverse, so both halves must be built from the same configuration.

    Client-level DP clips (and, with local noise, noises) first: the codec after it encodes
    an update that is already private.
    """
    transforms: list[UpdateTransform] = []
    if config.dp == "client":
        from fedlab.clients.dp_fedavg import ClipUpdate

        local = config.dp_noise == "local"
        transforms.append(
            ClipUpdate(
                clip_norm=config.clip_norm,
                noise_multiplier=client_dp(config, build_strategy(config)).noise_multiplier
                if local
                else 0.0,
                local=local,
                send_norm=config.adaptive_clip,
            )
        )
    if config.compress:
        codec = registry.create("transforms", config.compress, config.compress_options)
        if not isinstance(codec, UpdateTransform):
            raise ValueError(f"{config.compress!r} is not a fedlab UpdateTransform")
        transforms.append(codec)
    return Pipeline(tuple(transforms))


def client_dp(config: RunConfig, strategy: Strategy) -> DPFedAvg:
    """``strategy`` wrapped in client-level DP as ``config`` asks (``config.dp == "client"``)."""
    from fedlab.strategies.dp_fedavg import DPFedAvg

    trigger = strategy.trigger
    per_version = (
        trigger.k
        if isinstance(trigger, Buffer)
        else min(
            config.clients, max(config.min_clients, math.ceil(config.fraction * config.clients))
        )
    )
    return DPFedAvg(
        inner=strategy,
        noise=config.dp_noise,
        noise_multiplier=config.noise_multiplier,
        clip_norm=config.clip_norm,
        delta=config.delta or 1 / (10 * config.clients),
        target_epsilon=config.target_epsilon,
        versions=config.rounds,
        sample_rate=per_version / config.clients,
        adaptive=config.adaptive_clip,
        target_quantile=config.clip_quantile,
        clip_lr=config.clip_lr,
        count_stddev=config.clip_count_stddev,
    )


def build_attack(config: RunConfig) -> Adversary | None:
    """The simulated malicious clients of ``config`` (``None`` without an attack)."""
    return build_adversary(
        config.attack,
        num_clients=config.clients,
        fraction=config.byzantine,
        seed=config.seed,
        options=config.attack_options,
    )


# ``--backend auto`` on the CPU: batching removes per-client, per-step Python and dispatch
# overhead, which dominates a small model's step; a large model's step is arithmetic, which the
# batched form does no faster on a CPU (a convolution with per-client weights becomes a grouped
# convolution, which CPU kernels run slowly) while it holds every client's params at once.
# Measured on 2 cores (benchmarks/README.md): the digits CNN (35 k parameters) and the synthetic
# logistic model train 2-5x faster batched, the LEAF FEMNIST CNN (6.6 M) 1.8-2.4x slower. On a
# GPU batching pays at every size.
CPU_BATCHED_MAX_PARAMS = 1_000_000


def auto_backend(runtime: ClientRuntime, trigger: Trigger | None = None) -> str:
    """Why ``--backend auto`` trains ``runtime``'s clients one after another ("" when it picks
    vmap): the strategy's ``trigger`` is asynchronous, the vmap backend would not batch them,
    the model has an operation ``vmap`` cannot batch (one forward of client 0's first example
    tells), or they train on the CPU and the model has more than
    :data:`CPU_BATCHED_MAX_PARAMS` parameters."""
    from fedlab.sim.vmap import why_not_batched

    if trigger is not None and not isinstance(trigger, EveryRound):
        # Asynchronously, the vmap backend batches whatever is queued when a result is due; a
        # resumed run re-queues its in-flight tasks in other company, and batched kernels add
        # up in another order: it would equal the uninterrupted run only to rounding, and the
        # default keeps resume bit-identical. --backend vmap trades that for speed.
        return (
            f"{type(trigger).__name__} is asynchronous: a resumed run is bit-identical only "
            "one client at a time (--backend vmap batches it, resuming to rounding)"
        )
    reason = why_not_batched(runtime) or _first_client_reason(runtime)
    if reason or runtime.device.type != "cpu":
        return reason
    size = sum(p.numel() for p in runtime.model.parameters())
    if size > CPU_BATCHED_MAX_PARAMS:
        return (
            f"{size / 1e6:.1f} M parameters: on the CPU, models over "
            f"{CPU_BATCHED_MAX_PARAMS / 1e6:g} M train faster one client after another"
        )
    return ""


def _first_client_reason(runtime: ClientRuntime) -> str:
    # The vmap backend finds this out at its first call too, and falls back with a warning;
    # auto asks first, so a default run on an LSTM (Shakespeare's) is not warned about.
    from torch.func import functional_call, vmap

    try:
        data = runtime.data(0)
    except Exception:  # the run reports it, naming the client and version; no probe then
        return ""
    if data.augment is not None:
        from fedlab.sim.vmap import AUGMENTED

        return AUGMENTED
    if len(data) == 0:
        return ""
    model = runtime.model
    stacked = {k: p.detach().unsqueeze(0) for k, p in model.named_parameters()}
    try:
        with torch.no_grad():
            vmap(lambda ps, x: functional_call(model, ps, (x,)))(stacked, data.x[:1].unsqueeze(0))
    except Exception as e:  # any failure: the sequential loop, which reports a model's errors
        first = (str(e).splitlines() or [type(e).__name__])[0]
        return f"model {type(model).__name__} cannot be batched: {first}"
    return ""


def build_executor(
    config: RunConfig, workload: Workload, trigger: Trigger | None = None
) -> Executor:
    """The backend that trains clients; ``auto`` (for a strategy aggregating on ``trigger``)
    says which it picked in one INFO line, when the first job arrives."""
    if config.backend == "ray":
        from fedlab.sim.ray import RayExecutor

        client = config.client or build_strategy(config).client
        return RayExecutor(config, build=build_runtime, client=client)
    runtime = build_runtime(config, workload)
    if config.backend == "auto":
        reason = auto_backend(runtime, trigger)
        picked = f"inprocess ({reason})" if reason else "vmap"
        chosen = (
            InProcessExecutor(runtime) if reason else _vmap_executor(runtime, config.vmap_chunk)
        )
        return Announced(chosen, f"fedlab: --backend auto picked {picked}")
    if config.backend == "vmap":
        return _vmap_executor(runtime, config.vmap_chunk)
    return InProcessExecutor(runtime)


def _vmap_executor(runtime: ClientRuntime, chunk: int) -> Executor:
    from fedlab.sim.vmap import VmapExecutor

    return VmapExecutor(runtime, chunk=chunk)


class Announced:
    """``executor``, which logs ``line`` (INFO, logger ``fedlab.sim``) when its first job
    arrives: a run that fails to start (a bad tracker URI, a resume refused) says only why.

    Attributes:
        inner: the executor doing the work (its other attributes read through).
    """

    def __init__(self, executor: Executor, line: str) -> None:
        self.inner = executor
        self._line = line

    def submit(self, job: Job) -> None:
        if self._line:
            logging.getLogger("fedlab.sim").info("%s", self._line)
            self._line = ""
        self.inner.submit(job)

    def result(self, client_id: ClientId) -> tuple[Update, State]:
        return self.inner.result(client_id)

    def evaluate(self, task: EvalTask) -> Scores:
        return self.inner.evaluate(task)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> object:
        # Called only for names this class lacks: an executor's own summary() and the like.
        return getattr(self.inner, name)


def build_speeds(config: RunConfig) -> SpeedModel:
    """The simulated clients' compute speeds of ``config``."""
    return SpeedModel(
        distribution=config.speed,
        mean=config.speed_mean,
        spread=config.speed_spread,
        seed=config.seed,
        num_clients=config.clients,
    )


def build_transport(
    config: RunConfig, workload: Workload, trigger: Trigger | None = None
) -> SimTransport:
    """The virtual-clock transport in front of ``config``'s backend (``trigger``: when the
    strategy aggregates, which ``--backend auto`` takes into account)."""
    speeds = build_speeds(config)
    latency = LatencyModel(
        distribution=config.latency,
        mean=config.latency_mean,
        spread=config.latency_spread,
        seed=config.seed,
    )
    return SimTransport(
        executor=build_executor(config, workload, trigger),
        num_clients=config.clients,
        speeds=speeds,
        latency=latency,
    )


def build_engine(
    config: RunConfig,
    *,
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    workload: Workload | None = None,
    transport: Transport | None = None,
    stream: bool = False,
    params: Params | None = None,
) -> Engine:
    """A ready-to-run engine for ``config``; call ``engine.resume()`` to continue a run.

    ``transport`` (default: a simulation over the virtual clock) is where tasks go: the
    deployed server passes its gRPC transport, and nothing else changes. ``stream`` folds
    updates into a running mean as they arrive where the strategy allows (see
    :class:`~fedlab.engine.Engine`). ``params`` (default: the workload's freshly initialised
    model) are the initial global params: a Flower ServerApp passes its ``initial_arrays``.
    """
    workload = workload or build_workload(config)
    model = workload.make_model()
    check_requirements(config, model)  # before any worker starts or the run directory exists
    strategy = build_strategy(config)
    build_algorithm(config, strategy)  # fail on a bad client name before starting workers
    adversary = build_attack(config)  # and on a bad attack
    pipeline = build_pipeline(config)  # and on a bad codec or codec option
    if transport is None:
        transport = build_transport(config, workload, strategy.trigger)
        # Federated evaluation runs on the workers that train (the simulation's executor);
        # a deployed server's transport has no executor, and evaluates in this process.
        for callback in callbacks:
            if isinstance(callback, FederatedEvaluator):
                callback.bind(transport.executor)
    if params is None:
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    participation = build_participation(
        config.participation,
        workload=workload,
        num_clients=config.clients,
        seed=config.seed,
        fraction=config.fraction,
        options=config.participation_options,
    )
    if getattr(strategy, "needs_probabilities", False):
        # The one place the true participation probabilities reach a strategy: baselines
        # that are defined by knowing them (``known-probability``) ask for them explicitly.
        probabilities = participation.probabilities()
        if probabilities is None:
            raise ValueError(
                f"strategy {config.strategy!r} needs true participation probabilities, and "
                f"participation {config.participation!r} defines none: use --participation "
                "bernoulli, cyclic or markov (bernoulli when none is named)"
            )
        strategy = dataclasses.replace(  # type: ignore[call-arg]
            strategy, probabilities=tuple(float(p) for p in probabilities)
        )
    if getattr(strategy, "needs_public_data", False):
        # The one place server-side data reaches a strategy (Fed-SB's gradient init): the
        # workload's public sample, disjoint from every client's data, never client data.
        public = getattr(workload, "public_data", None)
        if not callable(public):
            raise ValueError(
                f"strategy {config.strategy!r} needs a public sample (gradient "
                f"initialization), and workload {config.workload!r} has none; use a workload "
                "with one (digits-shift) or initialization='weights'"
            )
        strategy = dataclasses.replace(  # type: ignore[call-arg]
            strategy,
            public=PublicSample(
                model=workload.make_model(),
                data=public(),
                objective=objective_of(workload).name,
            ),
        )
    if config.dp == "client":
        strategy = client_dp(config, strategy)
    return Engine(
        strategy=strategy,
        transport=transport,
        params=params,
        seed=config.seed,
        fraction=config.fraction,
        min_clients=config.min_clients,
        concurrency=config.concurrency or None,
        round_timeout=config.round_timeout or None,
        min_updates=config.min_updates,
        over_selection=config.over_selection,
        run_dir=run_dir,
        checkpoint_every=config.checkpoint_every,
        fingerprint=config.fingerprint(),
        callbacks=callbacks,
        task_config=config.task_config,
        participation=participation,
        memory=build_memory(config, run_dir),
        adversary=adversary,
        pipeline=pipeline,
        stream=stream,
        max_update_norm=config.max_update_norm or None,
        max_num_examples=config.max_num_examples,
    )


def build_memory(config: RunConfig, run_dir: str | Path | None) -> ClientStore:
    """The server's per-client store: in memory, or files under ``RUN_DIR/memory``."""
    if config.memory == "memory":
        return MemoryStore()
    if run_dir is None:
        raise ValueError("memory = 'disk' needs a run directory (--out)")
    from fedlab.store import DiskStore

    return DiskStore(Path(run_dir) / "memory")
