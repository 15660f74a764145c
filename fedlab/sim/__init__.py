"""Simulation: build an engine over a virtual-clock transport from a :class:`RunConfig`.

The backend only decides who computes client updates (this process, or a Ray actor pool);
timing, sampling and results are the same for every backend and worker count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from fedlab import registry
from fedlab.attacks import Adversary, PoisonedWorkload, build_adversary
from fedlab.client import ClientAlgorithm, ClientRuntime
from fedlab.config import RunConfig
from fedlab.data import PublicSample, Workload, make_workload
from fedlab.engine import Callback, Engine
from fedlab.participation import build_participation
from fedlab.sim.clock import LatencyModel, SpeedModel
from fedlab.sim.inprocess import InProcessExecutor
from fedlab.sim.transport import Executor, SimTransport
from fedlab.store import ClientStore, MemoryStore
from fedlab.strategy import Strategy
from fedlab.transforms import Pipeline

__all__ = ["SimTransport", "SpeedModel", "build_engine", "build_runtime", "build_workload"]


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
    )


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
    return strategy


def build_algorithm(config: RunConfig, strategy: Strategy) -> ClientAlgorithm:
    """The client half: ``config.client`` or the strategy's paired client."""
    algorithm = registry.create("clients", config.client or strategy.client, config.client_options)
    if not isinstance(algorithm, ClientAlgorithm):
        raise ValueError(f"{config.client or strategy.client!r} is not a fedlab ClientAlgorithm")
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
    return ClientRuntime(
        workload=workload,
        algorithm=build_algorithm(config, build_strategy(config)),
        pipeline=Pipeline(),
        seed=config.seed,
        device=config.device,
        cache_mb=config.cache_mb,
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


def build_executor(config: RunConfig, workload: Workload) -> Executor:
    """The backend that trains clients."""
    if config.backend == "ray":
        from fedlab.sim.ray import RayExecutor

        return RayExecutor(config)
    return InProcessExecutor(build_runtime(config, workload))


def build_engine(
    config: RunConfig,
    *,
    run_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
    workload: Workload | None = None,
) -> Engine:
    """A ready-to-run engine for ``config``; call ``engine.resume()`` to continue a run."""
    workload = workload or build_workload(config)
    strategy = build_strategy(config)
    build_algorithm(config, strategy)  # fail on a bad client name before starting workers
    adversary = build_attack(config)  # and on a bad attack
    speeds = SpeedModel(
        distribution=config.speed,
        mean=config.speed_mean,
        spread=config.speed_spread,
        seed=config.seed,
        num_clients=config.clients,
    )
    latency = LatencyModel(
        distribution=config.latency,
        mean=config.latency_mean,
        spread=config.latency_spread,
        seed=config.seed,
    )
    transport = SimTransport(
        executor=build_executor(config, workload),
        num_clients=config.clients,
        speeds=speeds,
        latency=latency,
    )
    params = {k: v.detach().clone() for k, v in workload.make_model().state_dict().items()}
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
                f"participation {config.participation!r} defines none"
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
            strategy, public=PublicSample(model=workload.make_model(), data=public())
        )
    return Engine(
        strategy=strategy,
        transport=transport,
        params=params,
        seed=config.seed,
        fraction=config.fraction,
        min_clients=config.min_clients,
        concurrency=config.concurrency or None,
        run_dir=run_dir,
        fingerprint=config.fingerprint(),
        callbacks=callbacks,
        task_config=config.task_config,
        participation=participation,
        memory=build_memory(config, run_dir),
        adversary=adversary,
    )


def build_memory(config: RunConfig, run_dir: str | Path | None) -> ClientStore:
    """The server's per-client store: in memory, or files under ``RUN_DIR/memory``."""
    if config.memory == "memory":
        return MemoryStore()
    if run_dir is None:
        raise ValueError("memory = 'disk' needs a run directory (--out)")
    from fedlab.store import DiskStore

    return DiskStore(Path(run_dir) / "memory")
