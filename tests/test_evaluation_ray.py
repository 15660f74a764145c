"""Federated evaluation on Ray actors: an equal share of the clients per actor, in one call each;
the same figures as in-process (bit-identical for sequential actors, to rounding with
``--vectorize``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import fedlab
from fedlab.config import RunConfig
from fedlab.evaluation import FederatedEvaluator
from fedlab.run import build_runtime, build_workload
from fedlab.sim.inprocess import InProcessExecutor

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray for the module, with start-up deadlines for a loaded machine."""
    slow = {"RAY_worker_register_timeout_seconds": "300", "RAY_raylet_start_wait_time_s": "300"}
    saved = {k: os.environ.get(k) for k in slow}
    os.environ.update({k: os.environ.get(k) or v for k, v in slow.items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about a future default
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_actors_evaluate_shares_like_inprocess(ray_session: None) -> None:
    from fedlab.sim.ray import RayExecutor

    config = RunConfig(clients=9, seed=3, workers=2, backend="ray")
    workload = build_workload(config)
    torch.manual_seed(0)
    params = {
        k: v + 0.05 * torch.randn_like(v) for k, v in workload.make_model().state_dict().items()
    }
    for personalize in (0, 3):
        task = FederatedEvaluator(workload, clients=9, seed=3, personalize=personalize).task(
            params, 2
        )
        expected = InProcessExecutor(build_runtime(config, workload)).evaluate(task)
        for vectorize in (False, True):
            executor = RayExecutor(
                config.replace(vectorize=vectorize), build=build_runtime, client="sgd"
            )
            try:
                got = executor.evaluate(task)
            finally:
                executor.close()
            assert [s.client_id for s in got[0]] == list(range(9))
            if not vectorize:
                assert got == expected  # tensorio carries params exactly; the same loop
                continue
            for a, b in zip([*expected[0], *expected[1]], [*got[0], *got[1]], strict=True):
                assert (a.client_id, a.examples) == (b.client_id, b.examples)
                assert dict(b.values) == pytest.approx(dict(a.values), rel=1e-5, abs=1e-6)
        with pytest.raises(RuntimeError, match="closed"):
            executor.evaluate(task)


def test_a_ray_run_reports_the_inprocess_figures(ray_session: None, tmp_path: Path) -> None:
    settings: dict[str, Any] = dict(
        rounds=2, clients=10, fraction=0.4, local_steps=3, seed=6, eval_clients=7, personalize=2
    )
    expected = fedlab.simulate(out=str(tmp_path / "i"), backend="inprocess", **settings)
    got = fedlab.simulate(out=str(tmp_path / "r"), backend="ray", workers=2, **settings)
    columns = [k for k in expected.rows[-1] if k.startswith(("client", "personalized"))]
    assert len(columns) == 22
    for a, b in zip(expected.rows, got.rows, strict=True):
        assert {k: b[k] for k in columns} == {k: a[k] for k in columns}
    lines = [(tmp_path / d / "client_metrics.jsonl").read_text() for d in ("i", "r")]
    assert lines[0] == lines[1]
