"""A workload declares its loss and metrics: regression data runs without a client half."""

from __future__ import annotations

import logging
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedlab
from fedlab.client import ClientContext, load_params
from fedlab.clients.sgd import LocalSGD
from fedlab.data import ClientData
from fedlab.objectives import (
    CLASSIFICATION,
    NextToken,
    Regression,
    objective_of,
)
from fedlab.run import build_workload
from fedlab.types import Task

# Five clients, each with its own linear map y = x w_k + 0.1 noise (three features, two
# targets): a regression federation whose clients differ, as heterogeneous clients do.
REGRESSION = textwrap.dedent(
    """\
    import torch

    objective = "regression"


    def load_client(client_id, num_clients, seed):
        g = torch.Generator().manual_seed(1000 * seed + client_id)
        w = torch.randn(3, 2, generator=g) + 2.0  # each client's own linear map
        x = torch.randn(40, 3, generator=g)
        return x, x @ w + 0.1 * torch.randn(40, 2, generator=g)
    """
)
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "how-to-use-your-own-model-and-data.md"


def test_the_guide_shows_this_module() -> None:
    assert f"```python\n{REGRESSION}```" in GUIDE.read_text()


@pytest.fixture
def regression_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "fedlab_test_regression.py").write_text(REGRESSION)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "fedlab_test_regression:load_client"


def test_objectives_by_hand() -> None:
    out = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    reg = Regression()
    assert torch.allclose(reg.example_losses(out, y), torch.tensor([0.5, 2.0]))
    assert torch.allclose(reg.example_scores(out, y)["mae"], torch.tensor([0.5, 1.0]))
    assert float(reg.loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0]))) == 2.5
    with pytest.raises(ValueError, match="does not match the targets"):
        reg.loss(torch.zeros(2, 3), torch.zeros(2, 2))
    logits = torch.randn(2, 4, 5)
    tokens = torch.randint(0, 5, (2, 4))
    nt = NextToken()
    expected = F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none")
    assert torch.allclose(nt.example_losses(logits, tokens), expected.view(2, 4).mean(1))
    hits = (logits.argmax(-1) == tokens).float().mean(1)
    assert torch.equal(nt.example_scores(logits, tokens)["accuracy"], hits)
    assert objective_of(object()) is CLASSIFICATION
    with pytest.raises(ValueError, match="unknown objective 'regresion'"):
        objective_of(type("W", (), {"objective": "regresion"})())


def test_regression_data_runs_without_a_client_half(tmp_path: Path, regression_data: str) -> None:
    history = fedlab.simulate(
        workload="custom",
        data=regression_data,
        clients=5,
        fraction=1.0,
        rounds=6,
        lr=0.05,
        local_steps=5,
        out=str(tmp_path / "r"),
        eval_clients="all",
        personalize=10,
    )
    assert "accuracy" not in history.summary
    losses = history["loss"]
    assert losses[-1] < 0.5 * losses[0]  # MSE falls: the declared loss is what is trained
    assert all(row["train_mae"] > 0 for row in history.rows)  # the clients' own metric
    # The global evaluation is the MSE and MAE of the final model on the test set, by hand.
    workload = build_workload(history.config)
    model = workload.make_model()
    load_params(dict(model.state_dict()), history.params)
    test = workload.test_data()
    with torch.no_grad():
        err = model(test.x) - test.y
    assert history.summary["loss"] == pytest.approx(float(err.pow(2).mean()), rel=1e-5)
    assert history.summary["mae"] == pytest.approx(float(err.abs().mean()), rel=1e-5)
    # Federated evaluation reports the objective's metric, its bad tail on the high side.
    last = history.rows[-1]
    assert {"client_mae_mean", "client_mae_p90", "client_mae_max", "client_loss_p90"} <= set(last)
    # Five clients: the 90th percentile is the ceil(4.5) = 5th smallest, the worst.
    assert last["client_mae_max"] == last["client_mae_p90"] >= last["client_mae_mean"]
    # Clients with their own linear maps: ten local steps fit each one's own test data better.
    assert last["personalized_client_loss_mean"] < last["client_loss_mean"]


def test_regression_client_splits_are_disjoint_fifths(regression_data: str) -> None:
    workload = fedlab.run.build_workload(
        fedlab.RunConfig(workload="custom", data=regression_data, clients=3)
    )
    train, test = workload.client_data(1), workload.client_data(1, "test")
    assert (len(train), len(test)) == (32, 8)
    rows = {tuple(r.tolist()) for r in train.x} | {tuple(r.tolist()) for r in test.x}
    assert len(rows) == 40  # together, exactly the client's examples
    assert workload.num_classes == 2  # two targets: the default model outputs two values
    assert torch.equal(test.x, workload.client_data(1, "test").x)  # deterministic


def test_the_vmap_backend_falls_back_with_one_line(
    tmp_path: Path, regression_data: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = dict(workload="custom", data=regression_data, clients=5, rounds=2, local_steps=3)
    with caplog.at_level(logging.WARNING, logger="fedlab"):
        vmap = fedlab.simulate(out=str(tmp_path / "v"), backend="vmap", **settings)
    lines = [r.getMessage() for r in caplog.records if "sequentially" in r.getMessage()]
    assert lines == [
        "fedlab: vmap backend trains sequentially: the workload's objective is 'regression'; "
        "the batched loop trains classification only"
    ]
    plain = fedlab.simulate(out=str(tmp_path / "p"), **settings)
    assert all(torch.equal(vmap.params[k], plain.params[k]) for k in plain.params)


def test_next_token_trains_through_the_client_loop() -> None:
    """LocalSGD minimises the declared per-token cross-entropy of a tiny sequence model."""
    torch.manual_seed(0)
    vocabulary, length = 7, 5
    model = nn.Sequential(nn.Embedding(vocabulary, 16), nn.Linear(16, vocabulary))
    x = torch.randint(0, vocabulary, (64, length))
    y = (x + 1) % vocabulary  # the next token is the current one plus one
    data = ClientData(x, y)
    ctx = ClientContext(client_id=0, seed=0, objective=NextToken())
    sgd = LocalSGD(lr=0.5, local_steps=60, batch_size=16)

    def task(version: int) -> Task:
        return Task(version, {k: v.clone() for k, v in model.state_dict().items()})

    first = sgd.fit(model, data, task(0), None, ctx).metrics
    second = sgd.fit(model, data, task(1), None, ctx).metrics
    assert set(first) == {"loss", "accuracy"}
    assert second["loss"] < first["loss"] and second["accuracy"] > 0.9
    assert math.isfinite(second["loss"])


def test_a_bad_declaration_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fedlab_test_badobj.py").write_text(
        REGRESSION.replace('objective = "regression"', 'objective = "ranking"')
    )
    (tmp_path / "fedlab_test_inty.py").write_text(
        REGRESSION.replace("x @ w + 0.1 * torch.randn(40, 2, generator=g)", "(x @ w).long()")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown objective of module .* 'ranking'"):
        build_workload(fedlab.RunConfig(workload="custom", data="fedlab_test_badobj:load_client"))
    with pytest.raises(ValueError, match="regression expects float targets"):
        build_workload(fedlab.RunConfig(workload="custom", data="fedlab_test_inty:load_client"))


def test_global_evaluation_of_a_classifier_is_the_mean_loss_and_accuracy() -> None:
    from fedlab.callbacks import evaluate_model

    torch.manual_seed(0)
    model = nn.Linear(6, 10)
    x, y = torch.randn(1000, 6), torch.randint(0, 10, (1000,))
    with torch.no_grad():
        out = model(x)
    got = evaluate_model(model, x, y, CLASSIFICATION, batch_size=300)  # a partial last batch
    assert got["accuracy"] == (out.argmax(1) == y).sum().item() / 1000
    assert got["loss"] == pytest.approx(F.cross_entropy(out.double(), y).item(), rel=1e-6)
