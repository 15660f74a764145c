"""The Ray backend gives bit-identical results to the in-process one and surfaces actor errors."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlab import registry
from fedlab.client import ClientAlgorithm, ClientContext, Fit, TrainingError
from fedlab.config import RunConfig
from fedlab.data import ClientData
from fedlab.run import build_engine
from fedlab.strategies import FedAvg
from fedlab.strategy import Buffer, Trigger
from fedlab.types import Params, State, Task

# fedlab itself does not need Ray; only this module does.
ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

BOOM_MODULE = "fedlab_test_ray_boom"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedBuff3(FedAvg):
    """FedAvg aggregated every 3 updates: an asynchronous trigger registered in-process."""

    @property
    def trigger(self) -> Trigger:
        return Buffer(3)


class BoomClient(ClientAlgorithm):
    """A client half that always fails, registered in-process."""

    def fit(
        self, model: torch.nn.Module, data: ClientData, task: Task, state: State | None,
        ctx: ClientContext,
    ) -> Fit:  # fmt: skip
        raise ValueError(f"boom at client {ctx.client_id}")


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One local Ray session for the module; yields a directory on the workers' path."""
    mod_dir = tmp_path_factory.mktemp("raymods")
    (mod_dir / f"{BOOM_MODULE}.py").write_text(
        textwrap.dedent(
            """
            from fedlab.client import ClientAlgorithm


            class Boom(ClientAlgorithm):
                def fit(self, model, data, task, state, ctx):
                    raise KeyError(f"dotted boom at client {ctx.client_id}")
            """
        )
    )
    # The driver resolves the dotted path too (build_engine checks the client name), and
    # Ray workers import it through their PYTHONPATH (the conftest adds tests/ there).
    sys.path.insert(0, str(mod_dir))
    pythonpath = os.pathsep.join([str(mod_dir), *filter(None, [os.environ.get("PYTHONPATH")])])
    # Ray's own start-up deadlines (a minute or less) are too short on a loaded machine; its
    # processes read these from the environment.
    slow = {"RAY_worker_register_timeout_seconds": "300", "RAY_raylet_start_wait_time_s": "300"}
    saved = {k: os.environ.get(k) for k in slow}
    os.environ.update({k: os.environ.get(k) or v for k, v in slow.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about a future default
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )  # fmt: skip
    try:
        yield mod_dir
    finally:
        ray.shutdown()
        sys.path.remove(str(mod_dir))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _config(**changes: Any) -> RunConfig:
    # The sequential backend unless a test names another: Ray actors run its code bit for bit.
    base: dict[str, Any] = dict(clients=40, fraction=0.25, rounds=3, seed=7, backend="inprocess")
    return RunConfig(**{**base, **changes})


def _final_params(config: RunConfig) -> Params:
    engine = build_engine(config)
    try:
        engine.run(3)
    finally:
        engine.transport.close()
    return engine.params


def _assert_identical(a: Params, b: Params) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_ray_matches_inprocess(ray_session: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _final_params(_config())
    puts: list[int] = []
    real_put = ray.put

    def counting_put(value: Any, **kwargs: Any) -> Any:
        puts.append(len(value))
        return real_put(value, **kwargs)

    monkeypatch.setattr(ray, "put", counting_put)
    for workers in (1, 2):
        engine = build_engine(_config(backend="ray", workers=workers))
        try:
            engine.run(3)
            executor = getattr(engine.transport, "executor")  # noqa: B009 - SimTransport only
            assert executor._params == {}, "params of finished versions are still cached"
        finally:
            engine.transport.close()
        _assert_identical(expected, engine.params)
    # Params go to the object store once per version, not once per job.
    assert len(puts) == 2 * 3


def test_ray_async_trigger_matches_inprocess(ray_session: Path) -> None:
    registry.register("strategies", "test-fedbuff", FedBuff3)
    config = _config(strategy="test-fedbuff", concurrency=6)
    expected = _final_params(config)
    _assert_identical(expected, _final_params(config.replace(backend="ray", workers=2)))


def test_vectorized_actors_match_the_vmap_backend(ray_session: Path) -> None:
    """--vectorize: each actor trains its share of the queued jobs with the batched loop;
    shares change which kernels add up a step, so results equal to rounding."""
    registry.register("strategies", "test-fedbuff", FedBuff3)
    for config in (_config(), _config(strategy="test-fedbuff", concurrency=6)):
        expected = _final_params(config.replace(backend="vmap"))
        engine = build_engine(config.replace(backend="ray", workers=2, vectorize=True))
        try:
            engine.run(3)
            calls = getattr(engine.transport, "executor").batched_calls  # noqa: B009
        finally:
            engine.transport.close()
        got = engine.params
        # FedAvg: one call per actor per version; FedBuff: a call whenever a result is asked
        # for that went out after the last call, far fewer than its jobs
        assert 2 <= calls <= 2 * 3 * 4
        assert list(got) == list(expected)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-5)


def test_vectorized_actors_say_once_why_they_train_sequentially(
    ray_session: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Actor logs do not reach the driver: the actors hand their batched executor's fallback
    line back with the results, and the driver logs it once for all actors and versions
    (each actor keeps one batched executor, so it decides once too)."""
    config = _config(strategy="frl", model="mlp")
    expected = _final_params(config)
    with caplog.at_level(logging.WARNING):
        got = _final_params(config.replace(backend="ray", workers=2, vectorize=True))
    _assert_identical(expected, got)  # trained one by one, as in-process
    lines = [r.getMessage() for r in caplog.records if "vmap backend trains" in r.getMessage()]
    assert lines == [
        "fedlab: vmap backend trains sequentially: client half FRLClient trains with its own "
        "fit(), which is not batched"
    ]


@pytest.mark.parametrize(
    ("client", "message"),
    [("test-boom", r"ValueError: boom at client \1 \(at test_ray\.py:\d+ in fit\)"),
     (f"{BOOM_MODULE}:Boom",
      rf"KeyError: 'dotted boom at client \1' \(at {BOOM_MODULE}\.py:\d+ in fit\)")],
    ids=["registered", "dotted"],
)  # fmt: skip
def test_actor_error_is_the_in_process_training_error(
    ray_session: Path, client: str, message: str
) -> None:
    registry.register("clients", "test-boom", BoomClient)
    errors = []
    for backend in ("inprocess", "ray"):
        engine = build_engine(_config(backend=backend, workers=1, client=client))
        try:
            with pytest.raises(TrainingError) as info:
                engine.run(1)
        finally:
            engine.transport.close()
        errors.append(str(info.value))
    # One line with the client, the version and the user's file:line, whatever the backend.
    assert errors[1] == errors[0]
    assert re.fullmatch(rf"client (\d+) failed training version 0: {message}", errors[1])


def test_fedlab_simulate_on_ray_prints_the_training_error_in_one_line(
    ray_session: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlab.cli import main

    argv = ["simulate", "--backend", "ray", "--client", f"{BOOM_MODULE}:Boom", "--rounds", "1"]
    assert main([*argv, "--clients", "4", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        rf"fedlab: error: client \d+ failed training version 0: KeyError: 'dotted boom at "
        rf"client \d+' \(at {BOOM_MODULE}\.py:\d+ in fit\)",
        lines[0],
    ), err
