"""The vectorised backend: batched local SGD equals the sequential loop, client by client and
run by run (FedAvg and FedBuff, synthetic and digits, resumed in the middle).

Tolerance. Batched kernels (a ``vmap``-ed matmul or convolution, a masked sum in place of a
mean) add in another order than the sequential ones, so results agree to rounding, not bit for
bit: one task's delta to ``rtol=1e-5, atol=1e-6``, and a run's params after 20 versions (where
each version's rounding feeds the next) to ``rtol=1e-5, atol=1e-5``. Measured: at most 1.2e-7
apart after 20 versions on these runs, so the bounds leave two orders of magnitude of slack.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import small_config
from fedlab.client import ClientContext
from fedlab.clients import LocalSGD
from fedlab.config import ConfigError, RunConfig
from fedlab.data import ClientData
from fedlab.sim import build_engine, build_runtime, build_workload
from fedlab.sim.transport import Job
from fedlab.types import Task

TASK_TOL = {"rtol": 1e-5, "atol": 1e-6}
RUN_TOL = {"rtol": 1e-5, "atol": 1e-5}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: Any) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


@pytest.mark.parametrize(
    "configs",
    [
        # uniform settings: the scalar update path
        [{"local_epochs": 1.0, "batch_size": 10}] * 3,
        # per-client settings: step counts, batch sizes, momentum and weight decay all differ
        [
            {"local_epochs": 1.0, "batch_size": 7, "momentum": 0.9},
            {"local_steps": 4, "batch_size": 0, "weight_decay": 0.01},
            {"local_epochs": 2.0, "batch_size": 32, "momentum": 0.5, "lr": 0.2},
            {"local_epochs": 1.0, "batch_size": 10, "drop_last": True},
        ],
    ],
)
def test_batched_fit_equals_sequential_fit_client_by_client(configs: list[dict[str, Any]]) -> None:
    from fedlab.clients.sgd import BatchItem, fit_batched

    config = small_config(clients=8)
    workload = build_workload(config)
    model = workload.make_model()
    algorithm = LocalSGD()
    items, expected = [], []
    for cid, cfg in enumerate(configs):
        # tasks of different versions: every client starts from its own params
        start = {k: v + 0.01 * cid for k, v in model.state_dict().items()}
        task = Task(cid, start, cfg)
        data = workload.client_data(cid)
        ctx = ClientContext(client_id=cid, seed=config.seed)
        items.append(BatchItem(data=data, task=task, state=None, ctx=ctx))
        own = workload.make_model()
        own.load_state_dict(start)
        expected.append(algorithm.fit(own, data, task, None, ctx))
    got = fit_batched(algorithm, workload.make_model(), items)
    for fit, ref in zip(got, expected, strict=True):
        _close(dict(fit.payload), dict(ref.payload), **TASK_TOL)
        assert fit.num_examples == ref.num_examples
        assert fit.metrics["accuracy"] == pytest.approx(ref.metrics["accuracy"])
        assert fit.metrics["loss"] == pytest.approx(ref.metrics["loss"], rel=1e-5)


def test_a_client_without_data_gets_a_zero_delta_and_no_metrics() -> None:
    from fedlab.clients.sgd import BatchItem, fit_batched

    workload = build_workload(small_config(clients=4))
    model = workload.make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    empty = ClientData(x=torch.zeros(0, 60), y=torch.zeros(0, dtype=torch.long))
    items = [
        BatchItem(empty, Task(0, start, {}), None, ClientContext(0, seed=0)),
        BatchItem(workload.client_data(1), Task(0, start, {}), None, ClientContext(1, seed=0)),
    ]
    fits = fit_batched(LocalSGD(), model, items)
    assert fits[0].num_examples == 0 and fits[0].metrics == {}
    assert all(torch.count_nonzero(v) == 0 for v in fits[0].payload.values())
    assert fits[1].num_examples == len(workload.client_data(1))
    assert any(torch.count_nonzero(v) > 0 for v in fits[1].payload.values())


def _run(config: RunConfig, versions: int, run_dir: Path | None = None) -> dict[str, Any]:
    engine = build_engine(config, run_dir=run_dir)
    engine.run(versions)
    engine.transport.close()
    return {"params": engine.params, "now": engine.transport.now()}


def _resumed(config: RunConfig, run_dir: Path, stop: int, end: int) -> dict[str, Any]:
    _run(config, stop, run_dir)
    engine = build_engine(config, run_dir=run_dir)
    engine.resume()
    assert engine.version == stop
    engine.run(end)
    engine.transport.close()
    return {"params": engine.params, "now": engine.transport.now()}


@pytest.mark.parametrize(
    ("workload", "strategy"),
    [
        ("synthetic", "fedavg"),
        ("synthetic", "fedbuff"),
        ("digits", "fedavg"),
        ("digits", "fedbuff"),
    ],
)
def test_vmap_backend_equals_sequential_after_20_versions_with_resume(
    workload: str, strategy: str, tmp_path: Path
) -> None:
    extra: dict[str, Any] = {"buffer": 3, "concurrency": 6} if strategy == "fedbuff" else {}
    config = small_config(
        workload=workload,
        strategy=strategy,
        clients=24,
        fraction=0.25,
        local_epochs=1.0,
        batch_size=10,
        lr=0.05,
        **extra,
    )
    sequential = _run(config, 20)
    batched = _resumed(config.replace(backend="vmap", vmap_chunk=4), tmp_path, 10, 20)
    _close(batched["params"], sequential["params"], **RUN_TOL)
    assert batched["now"] == sequential["now"]  # the virtual clock is the backend's business


def test_any_chunk_size_gives_the_same_run() -> None:
    config = small_config(backend="vmap", local_epochs=1.0, batch_size=8, rounds=3)
    whole = _run(config.replace(vmap_chunk=0), 3)["params"]
    for chunk in (1, 5):
        _close(_run(config.replace(vmap_chunk=chunk), 3)["params"], whole, **TASK_TOL)


def test_unbatched_client_halves_fall_back_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sample-level DP-SGD is not batched: every job is trained by the sequential loop,
    announced once, with exactly the in-process backend's numbers."""
    config = small_config(dp="sample", noise_multiplier=0.5, rounds=2)
    with caplog.at_level(logging.WARNING, logger="fedlab.sim.vmap"):
        batched = _run(config.replace(backend="vmap"), 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedlab.sim.vmap"]
    assert len(lines) == 1 and "LocalSGD with sample-level DP-SGD" in lines[0]
    sequential = _run(config, 2)
    for k, v in sequential["params"].items():
        assert torch.equal(batched["params"][k], v), k


def test_executor_hands_results_back_one_by_one_and_refuses_unknown_clients() -> None:
    from fedlab.sim.vmap import VmapExecutor

    config = small_config(clients=6)
    runtime = build_runtime(config)
    executor = VmapExecutor(runtime, chunk=2)
    params = {k: v.clone() for k, v in runtime.model.state_dict().items()}
    for cid in (4, 1, 3):
        executor.submit(Job(cid, Task(0, params, config.task_config), None))
    with pytest.raises(RuntimeError, match="already has a job"):
        executor.submit(Job(1, Task(0, params, config.task_config), None))
    ref = build_runtime(config)
    for cid in (3, 4, 1):
        update, _ = executor.result(cid)
        expected, _ = ref.run(cid, Task(0, params, config.task_config), None)
        assert update.client_id == cid
        _close(dict(update.payload), dict(expected.payload), **TASK_TOL)
    with pytest.raises(RuntimeError, match="has no job"):
        executor.result(1)


def test_auto_chunk_follows_the_memory_budget() -> None:
    from fedlab.sim.vmap import auto_chunk

    model = build_workload(small_config(workload="digits", clients=4)).make_model()
    example = torch.zeros(1, 1, 8, 8)
    small = auto_chunk(model, example, batch=10, budget=10 * 2**20)
    large = auto_chunk(model, example, batch=10, budget=100 * 2**20)
    assert 1 <= small < large
    assert auto_chunk(model, example, batch=10, budget=1) == 1


def test_vmap_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="vmap_chunk"):
        RunConfig(vmap_chunk=-1)
    with pytest.raises(ConfigError, match="backend"):
        RunConfig(backend="vmapp")
