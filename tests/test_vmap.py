"""The vectorised backend: batched local SGD equals the sequential loop, client by client and
run by run (FedAvg and FedBuff, synthetic and digits, resumed in the middle).

Tolerance. Batched kernels (a ``vmap``-ed matmul or convolution, a masked sum in place of a
mean) add in another order than the sequential ones, so results agree to rounding, not bit for
bit: one task's delta, and one version of the digits CNN started from the same checkpoint, to
``rtol=1e-5, atol=1e-6``; a run's params after 20 versions on the synthetic (logistic) workload,
where each version's rounding feeds the next, to ``rtol=1e-5, atol=1e-5``. Measured: at most
1.2e-7 apart after 20 versions on these runs, so the bounds leave two orders of magnitude of
slack. A CNN is compared version by version: see the test that does it for why.
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
from fedlab.run import build_engine, build_runtime, build_workload
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
    from fedlab.clients.sgd_vmap import BatchItem, fit_batched

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
    from fedlab.clients.sgd_vmap import BatchItem, fit_batched

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
    ],
)
def test_vmap_backend_equals_sequential_after_20_versions_with_resume(
    workload: str, strategy: str, tmp_path: Path
) -> None:
    extra: dict[str, Any] = {"buffer": 3, "concurrency": 6} if strategy == "fedbuff" else {}
    # The reference is the sequential loop, named: auto would pick vmap for FedAvg.
    config = small_config(
        backend="inprocess",
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


@pytest.mark.parametrize("strategy", ["fedavg", "fedbuff"])
def test_vmap_backend_equals_sequential_version_by_version_on_the_digits_cnn(
    strategy: str, tmp_path: Path
) -> None:
    """Each of 20 versions of the CNN, resumed by the vmap backend from the sequential run's
    checkpoint, lands where the sequential version does.

    A run-level comparison after 20 versions does not hold for a ReLU/max-pool CNN: a rounding
    difference of 1e-8 eventually flips one activation or pooling decision, a discrete event
    that later versions amplify (measured on this run: 3e-8 apart through version 7, 1.4e-6
    after a flip at version 8, 1e-3 by version 19). Starting every version from the same
    checkpoint keeps the comparison to what the backend controls: one version's training and
    aggregation, including the tasks a FedBuff version carries over.
    """
    import shutil

    extra: dict[str, Any] = {"buffer": 3, "concurrency": 6} if strategy == "fedbuff" else {}
    config = small_config(
        backend="inprocess",
        workload="digits",
        strategy=strategy,
        clients=24,
        fraction=0.25,
        local_epochs=1.0,
        batch_size=10,
        lr=0.05,
        **extra,
    )
    sequential = build_engine(config, run_dir=tmp_path / "sequential")
    sequential.save_checkpoint()
    batched_config = config.replace(backend="vmap", vmap_chunk=4)
    for version in range(20):
        start = tmp_path / f"from-{version}"
        shutil.copytree(tmp_path / "sequential", start)
        sequential.run(version + 1)
        batched = build_engine(batched_config, run_dir=start)
        batched.resume()
        assert batched.version == version
        batched.run(version + 1)
        batched.transport.close()
        _close(dict(batched.params), dict(sequential.params), **TASK_TOL)
        shutil.rmtree(start)
    sequential.transport.close()


def test_any_chunk_size_gives_the_same_run_and_runs_repeat_exactly() -> None:
    """Chunks change which kernels add up a step (a batch of one client or of many), so
    chunk sizes agree to rounding; the same configuration repeats bit for bit."""
    config = small_config(backend="vmap", local_epochs=1.0, batch_size=8, rounds=3)
    whole = _run(config.replace(vmap_chunk=0), 3)["params"]
    again = _run(config.replace(vmap_chunk=0), 3)["params"]
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    for chunk in (1, 5):
        _close(_run(config.replace(vmap_chunk=chunk), 3)["params"], whole, **TASK_TOL)


def test_unbatched_client_halves_fall_back_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FRL's client half trains scores with its own fit: every job is trained by the
    sequential loop, announced once, with exactly the in-process backend's numbers."""
    config = small_config(backend="inprocess", strategy="frl", model="mlp", rounds=2)
    with caplog.at_level(logging.WARNING, logger="fedlab.sim.vmap"):
        batched = _run(config.replace(backend="vmap"), 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "fedlab.sim.vmap"]
    assert len(lines) == 1 and "FRLClient" in lines[0]
    sequential = _run(config, 2)
    for k, v in sequential["params"].items():
        assert torch.equal(batched["params"][k], v), k


DP = {"dp": True, "noise_multiplier": 0.7, "max_grad_norm": 0.5}


@pytest.mark.parametrize(
    "configs",
    [
        # Poisson batches (some empty), noise, clipping; settings that differ per client
        [
            {**DP, "local_steps": 4, "batch_size": 6},
            {**DP, "local_steps": 2, "batch_size": 20, "momentum": 0.9, "max_grad_norm": 2.0},
            {**DP, "local_epochs": 1.0, "batch_size": 1, "noise_multiplier": 0.0},
        ],
        # shuffled fixed-size batches with a partial last one; sigma solved for an epsilon
        [
            {**DP, "poisson": False, "local_epochs": 1.0, "batch_size": 16},
            {
                **DP,
                "poisson": False,
                "local_steps": 3,
                "batch_size": 8,
                "noise_multiplier": 0.0,
                "target_epsilon": 4.0,
                "dp_versions": 5,
            },
        ],
    ],
)
def test_batched_dp_sgd_equals_the_sequential_dp_sgd(configs: list[dict[str, Any]]) -> None:
    """Per-record gradients nested in the per-client vmap: the same Poisson batches, clipping,
    noise and accountant as LocalSGD.train."""
    from fedlab.clients.sgd_vmap import BatchItem, fit_batched

    config = small_config(clients=8)
    workload = build_workload(config)
    model = workload.make_model()
    algorithm = LocalSGD()
    items, expected = [], []
    for cid, cfg in enumerate(configs):
        start = {k: v + 0.01 * cid for k, v in model.state_dict().items()}
        task, data = Task(2, start, cfg), workload.client_data(cid)
        state = {"dp": {"history": [[0.7, 0.1, 3.0]]}} if cid == 0 else None
        ctx = ClientContext(client_id=cid, seed=config.seed)
        items.append(BatchItem(data=data, task=task, state=state, ctx=ctx))
        own = workload.make_model()
        own.load_state_dict(start)
        expected.append(algorithm.fit(own, data, task, state, ctx))
    got = fit_batched(algorithm, workload.make_model(), items)
    for fit, ref in zip(got, expected, strict=True):
        _close(dict(fit.payload), dict(ref.payload), **TASK_TOL)
        assert fit.state == ref.state
        assert set(fit.metrics) == set(ref.metrics)
        for key, value in ref.metrics.items():
            assert fit.metrics[key] == pytest.approx(value, rel=1e-5), key


def test_vmap_backend_equals_sequential_with_dp_sgd_and_fedzip(tmp_path: Path) -> None:
    config = small_config(
        backend="inprocess",
        dp="sample",
        noise_multiplier=0.8,
        max_grad_norm=1.0,
        compress="fedzip",
        clients=24,
        fraction=0.25,
        local_steps=3,
        batch_size=10,
    )
    sequential = _run(config, 20)
    batched = _resumed(config.replace(backend="vmap", vmap_chunk=4), tmp_path, 10, 20)
    _close(batched["params"], sequential["params"], **RUN_TOL)


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


def test_the_default_cpu_chunk_does_not_follow_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run and its resume pick the same chunk on one machine, however busy it is: the CPU
    budget comes from the machine's memory, not from what is free at the time."""
    import os

    from fedlab.sim.vmap import auto_chunk

    model = build_workload(small_config(workload="digits", clients=4)).make_model()
    example = torch.zeros(1, 1, 8, 8)
    real = os.sysconf
    chunks = []
    for free_pages in (1 << 30, 1 << 10):  # plenty free, then almost nothing free
        def sysconf(name: str | int, free: int = free_pages) -> int:
            return free if name == "SC_AVPHYS_PAGES" else real(name)

        monkeypatch.setattr(os, "sysconf", sysconf)
        chunks.append(auto_chunk(model, example, batch=10))
    assert chunks[0] == chunks[1] > 1


def test_vmap_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="vmap_chunk"):
        RunConfig(vmap_chunk=-1)
    with pytest.raises(ConfigError, match="backend"):
        RunConfig(backend="vmapp")
    with pytest.raises(ConfigError, match=r"vectorize .* needs backend = 'ray'"):
        RunConfig(backend="vmap", vectorize=True)


class _Branchy(torch.nn.Module):
    """A model with data-dependent control flow, which ``vmap`` refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(60, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.lin(x)
        return out * 2 if bool(out.sum() > 0) else out


class _BranchyWorkload:
    def __init__(self, base: Any) -> None:
        self.base, self.name = base, "branchy"
        self.num_clients, self.num_classes = base.num_clients, base.num_classes

    def make_model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return _Branchy()

    def client_data(self, client_id: int) -> ClientData:
        return self.base.client_data(client_id)  # type: ignore[no-any-return]

    def test_data(self) -> ClientData:
        return self.base.test_data()  # type: ignore[no-any-return]


def test_a_model_vmap_cannot_batch_falls_back_with_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fedlab.client import ClientRuntime
    from fedlab.sim.vmap import VmapExecutor

    workload = _BranchyWorkload(build_workload(small_config(clients=6)))

    def runtime() -> ClientRuntime:
        return ClientRuntime(workload=workload, algorithm=LocalSGD(), seed=3)  # type: ignore[arg-type]

    executor, ref = VmapExecutor(runtime(), chunk=2), runtime()
    params = {k: v.clone() for k, v in ref.model.state_dict().items()}
    task = Task(0, params, {"local_steps": 3, "batch_size": 8})
    with caplog.at_level(logging.WARNING, logger="fedlab.sim.vmap"):
        for cid in range(5):
            executor.submit(Job(cid, task, None))
        got = [executor.result(cid)[0] for cid in range(5)]
    lines = [r.getMessage() for r in caplog.records if r.name == "fedlab.sim.vmap"]
    assert len(lines) == 1 and "batched training of this model failed" in lines[0]
    for cid, update in enumerate(got):
        expected, _ = ref.run(cid, task, None)
        for k, v in expected.payload.items():
            assert torch.equal(update.payload[k], v), k


class _Picky(torch.nn.Module):
    """Refuses its input the way a user's model with a wrong assumption would."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(60, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("expected 3 input channels")


class _PickyWorkload(_BranchyWorkload):
    def make_model(self) -> torch.nn.Module:
        return _Picky()


@pytest.mark.parametrize(
    ("model", "config", "detail"),
    [
        ("picky", {"local_steps": 2}, "ValueError: expected 3 input channels"),
        ("linear", {"dp": True, "target_epsilon": 1.0, "dp_versions": 0}, "dp_versions >= 1"),
    ],
)
def test_a_training_error_names_client_and_version_as_the_sequential_backend_does(
    model: str, config: dict[str, Any], detail: str
) -> None:
    from fedlab.client import ClientRuntime, TrainingError
    from fedlab.sim.vmap import VmapExecutor

    base = build_workload(small_config(clients=4))
    workload = _PickyWorkload(base) if model == "picky" else base
    runtime = ClientRuntime(workload=workload, algorithm=LocalSGD(), seed=3)  # type: ignore[arg-type]
    executor = VmapExecutor(runtime)
    params = {k: v.clone() for k, v in runtime.model.state_dict().items()}
    for cid in (2, 3):
        executor.submit(Job(cid, Task(5, params, config), None))
    with pytest.raises(TrainingError) as caught:
        executor.result(3)
    assert (caught.value.client_id, caught.value.version) == (2, 5)
    assert detail in str(caught.value) and "\n" not in str(caught.value)


def test_models_with_buffers_or_dropout_are_not_batched() -> None:
    from fedlab.clients.sgd_vmap import unbatchable_model

    assert unbatchable_model(torch.nn.Linear(3, 2)) == ""
    bn = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    assert "buffers" in unbatchable_model(bn)
    assert "Dropout" in unbatchable_model(torch.nn.Sequential(torch.nn.Dropout(0.1)))
    tied = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    tied[1].weight = tied[0].weight
    assert "tied" in unbatchable_model(tied)


@pytest.mark.parametrize(
    ("changes", "picked"),
    [
        ({}, "vmap"),
        ({"strategy": "frl", "model": "mlp"}, "inprocess (client half FRLClient"),
        # Asynchronous: the default keeps a resume bit-identical (tests/test_cli.py kills one).
        ({"strategy": "fedbuff"}, "inprocess (Buffer is asynchronous"),
        ({"strategy": "fedfix"}, "inprocess (Period is asynchronous"),
    ],
)
def test_auto_backend_picks_vmap_where_it_batches_and_says_which(
    changes: dict[str, Any], picked: str, caplog: pytest.LogCaptureFixture
) -> None:
    from fedlab.run import Announced
    from fedlab.sim.inprocess import InProcessExecutor
    from fedlab.sim.vmap import VmapExecutor

    config = small_config(backend="auto", **changes)
    with caplog.at_level(logging.INFO, logger="fedlab.sim"):
        engine = build_engine(config)
        assert not any("--backend auto" in r.getMessage() for r in caplog.records)
        engine.run(2)  # said once, when the first job arrives
    lines = [r for r in caplog.records if "--backend auto" in r.getMessage()]
    assert len(lines) == 1 and f"picked {picked}" in lines[0].getMessage()
    assert lines[0].levelno == logging.INFO  # news, not a warning
    executor = engine.transport.executor  # type: ignore[attr-defined]
    assert isinstance(executor, Announced)
    assert isinstance(executor.inner, VmapExecutor if picked == "vmap" else InProcessExecutor)


def test_auto_is_the_default_and_keeps_large_models_sequential_on_the_cpu() -> None:
    from fedlab.run import CPU_BATCHED_MAX_PARAMS, auto_backend

    assert RunConfig().backend == "auto"
    runtime = build_runtime(small_config())
    assert auto_backend(runtime) == ""  # the synthetic logistic model: batched
    # The LEAF FEMNIST CNN's size class (6.6 M parameters): sequential on the CPU, with why.
    features = runtime.data(0).x.shape[1]
    runtime.model = torch.nn.Linear(features, CPU_BATCHED_MAX_PARAMS // features + 1)
    assert "M parameters: on the CPU" in auto_backend(runtime)
    # An LSTM (Shakespeare's model) has no batching rule: auto knows before training.
    runtime.model = Recurrent(features)
    assert "cannot be batched: Batching rule not implemented for aten::lstm" in (
        auto_backend(runtime)
    )


class Recurrent(torch.nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(features, 4, batch_first=True)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.unsqueeze(1))
        return self.head(out[:, -1])  # type: ignore[no-any-return]
