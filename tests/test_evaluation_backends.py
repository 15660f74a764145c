"""Federated evaluation on the run's executor: in-process exactly as in the driver, vmap equal
to it up to floating-point rounding (batched, chunked, personalised), fallbacks announced."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fedlab
from fedlab.attacks import PoisonedWorkload
from fedlab.config import RunConfig
from fedlab.data import ClientData, Workload
from fedlab.evaluation import ClientScore, EvalTask, FederatedEvaluator, Scores
from fedlab.run import build_runtime, build_workload
from fedlab.sim.inprocess import InProcessExecutor
from fedlab.sim.vmap import VmapExecutor

# Batched kernels sum in another order than one client's forward, and a personalised model is
# rebuilt as start + (trained - start): the figures agree to float32 rounding (measured: at
# most 5e-7 relative on synthetic and digits), asserted with room to spare.
REL, ABS = 1e-5, 1e-6


class Holes:
    """A workload whose client 1 has no test data and client 2 no training data."""

    def __init__(self, inner: Workload, model: nn.Module | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.num_clients = inner.num_clients
        self.num_classes = inner.num_classes
        self._model = model

    def make_model(self) -> nn.Module:
        return self.inner.make_model() if self._model is None else self._model

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        data = self.inner.client_data(client_id, split)
        if (client_id, split) in ((1, "test"), (2, "train")):
            return ClientData(data.x[:0], data.y[:0])
        return data

    def test_data(self) -> ClientData:
        return self.inner.test_data()


def _setup(workload: str, **changes: Any) -> tuple[RunConfig, Holes, dict[str, torch.Tensor]]:
    config = RunConfig(workload=workload, clients=12, seed=4, **changes)
    holes = Holes(build_workload(config))
    torch.manual_seed(0)  # params away from the initialisation, whose predictions are alike
    params = {k: v + 0.05 * torch.randn_like(v) for k, v in holes.make_model().state_dict().items()}
    return config, holes, params


def _task(workload: Any, params: dict[str, torch.Tensor], personalize: int) -> EvalTask:
    evaluator = FederatedEvaluator(
        workload, clients=workload.num_clients, seed=4, personalize=personalize, batch_size=8
    )
    return evaluator.task(params, 3)


def _flat(scores: Scores) -> list[ClientScore]:
    return [*scores[0], *scores[1]]


def _assert_close(expected: Scores, got: Scores) -> None:
    assert [len(part) for part in got] == [len(part) for part in expected]
    for a, b in zip(_flat(expected), _flat(got), strict=True):
        assert (a.client_id, a.examples, list(a.values)) == (
            b.client_id,
            b.examples,
            list(b.values),
        )
        assert dict(b.values) == pytest.approx(dict(a.values), rel=REL, abs=ABS), a.client_id


@pytest.mark.parametrize("workload", ["synthetic", "digits"])
@pytest.mark.parametrize("personalize", [0, 4])
def test_vmap_equals_inprocess_for_any_chunk(
    workload: str, personalize: int, caplog: pytest.LogCaptureFixture
) -> None:
    config, holes, params = _setup(workload)
    task = _task(holes, params, personalize)
    expected = InProcessExecutor(build_runtime(config, holes)).evaluate(task)
    # The in-process executor is the driver's loop: the very same figures.
    driver = FederatedEvaluator(holes, clients=12, seed=4, personalize=personalize, batch_size=8)
    assert _flat(expected) == _flat(driver.scores(params, 3))
    # A client without test data is reported with 0 examples (summarize leaves it out); one
    # without training data is tested with the global params after "personalisation".
    assert [s.examples for s in expected[0]][1] == 0
    if personalize:
        assert expected[1][2].values == expected[0][2].values
        assert expected[1][0].values != expected[0][0].values
    with caplog.at_level(logging.WARNING, logger="fedlab.sim.vmap"):
        for chunk in (0, 1, 5):  # 5: a partial last chunk
            _assert_close(
                expected, VmapExecutor(build_runtime(config, holes), chunk).evaluate(task)
            )
    assert "one by one" not in caplog.text  # batched, not the fallback


def test_a_model_the_batched_loop_cannot_train_is_personalised_one_by_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, holes, params = _setup("synthetic")
    # Dropout draws from the global random stream: no batched equivalent with the same numbers.
    model = nn.Sequential(holes.inner.make_model(), nn.Dropout(0.0))
    dropout = Holes(holes.inner, model)
    params = {f"0.{k}": v for k, v in params.items()}
    runtime = build_runtime(config, dropout)
    task = _task(dropout, params, 2)
    expected = InProcessExecutor(build_runtime(config, dropout)).evaluate(task)
    executor = VmapExecutor(runtime)
    with caplog.at_level(logging.WARNING, logger="fedlab.sim.vmap"):
        got = executor.evaluate(task)
        executor.evaluate(task)
    assert _flat(got) == _flat(expected)  # the sequential loop itself: exact
    lines = [r.message for r in caplog.records if "evaluates clients one by one" in r.message]
    assert lines == ["fedlab: vmap backend evaluates clients one by one: model Sequential "
                     "cannot be batched: it uses Dropout"]  # fmt: skip
    # Without personalisation one model tests everybody: batched whatever the model.
    plain = _task(dropout, params, 0)
    _assert_close(InProcessExecutor(runtime).evaluate(plain), executor.evaluate(plain))


def _rows(history: fedlab.History) -> list[dict[str, float]]:
    return [{k: v for k, v in r.items() if k.startswith(("client", "personalized"))}
            for r in history.rows]  # fmt: skip


def test_a_run_evaluates_on_its_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    for cls in (InProcessExecutor, VmapExecutor):
        real = cls.evaluate

        def spy(self: Any, task: EvalTask, real: Any = real) -> Scores:
            calls.append((type(self).__name__, task.version, len(task.clients)))
            result: Scores = real(self, task)
            return result

        monkeypatch.setattr(cls, "evaluate", spy)
    settings: dict[str, Any] = dict(
        rounds=2, clients=8, fraction=0.5, local_steps=3, seed=5, eval_clients="all",
        personalize=3,
    )  # fmt: skip
    inprocess = fedlab.simulate(out=str(tmp_path / "i"), backend="inprocess", **settings)
    vmap = fedlab.simulate(out=str(tmp_path / "v"), backend="vmap", vmap_chunk=3, **settings)
    assert calls == [("InProcessExecutor", 1, 8), ("InProcessExecutor", 2, 8),
                     ("VmapExecutor", 1, 8), ("VmapExecutor", 2, 8)]  # fmt: skip
    # The summary takes the last evaluation's figures, not a second evaluation.
    assert inprocess.summary["client_accuracy_mean"] == inprocess.rows[-1]["client_accuracy_mean"]
    # The vmap run also trains in batches: its params, and so its figures, differ by rounding.
    for a, b in zip(_rows(inprocess), _rows(vmap), strict=True):
        assert set(a) == set(b) and len(a) == 22
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_malicious_clients_are_evaluated_on_their_own_data() -> None:
    """A label-flipping client trains on flipped labels; evaluation, on the backend as in the
    driver, tests and personalises it on its own data."""
    config, holes, params = _setup("synthetic", attack="label-flip", byzantine=0.4)
    runtime = build_runtime(config, holes.inner)
    assert isinstance(runtime.workload, PoisonedWorkload)
    task = _task(holes.inner, params, 2)
    driver = FederatedEvaluator(holes.inner, clients=12, seed=4, personalize=2, batch_size=8)
    assert _flat(InProcessExecutor(runtime).evaluate(task)) == _flat(driver.scores(params, 3))


class Regression(Holes):
    """Synthetic features with a float target (the label as a number): MSE and MAE."""

    objective = "regression"

    def make_model(self) -> nn.Module:
        torch.manual_seed(1)
        return nn.Linear(60, 1)

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        data = super().client_data(client_id, split)
        return ClientData(data.x, data.y.float())


def test_another_objective_is_tested_in_batches_and_personalised_one_by_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, holes, _ = _setup("synthetic")
    workload = Regression(holes.inner)
    params = dict(workload.make_model().state_dict())
    runtime = build_runtime(config, workload)
    for personalize in (0, 2):
        task = _task(workload, params, personalize)
        expected = InProcessExecutor(runtime).evaluate(task)
        assert list(expected[0][0].values) == ["mae", "loss"]
        with caplog.at_level(logging.WARNING, logger="fedlab.sim.vmap"):
            got = VmapExecutor(runtime, chunk=4).evaluate(task)
        if personalize:  # the batched loop trains classification only
            assert _flat(got) == _flat(expected)
            assert "evaluates clients one by one: the workload's objective is" in caplog.text
        else:
            _assert_close(expected, got)
            assert "one by one" not in caplog.text
