"""Federated evaluation (``--eval-clients``) and the FedAvg+FT baseline (``--personalize``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import fedlab
from fedlab import experiment
from fedlab.cli import main
from fedlab.client import load_params
from fedlab.config import ConfigError, RunConfig
from fedlab.evaluation import (
    CLIENT_METRICS,
    ClientScore,
    FederatedEvaluator,
    quantile,
    sample_clients,
    summarize,
)
from fedlab.run import build_workload

TINY: dict[str, Any] = dict(clients=6, fraction=0.5, local_steps=3, seed=5)
COLUMNS = {
    "clients_evaluated",
    "client_accuracy_mean",
    "client_accuracy_wmean",
    "client_accuracy_p10",
    "client_accuracy_wp10",
    "client_accuracy_min",
    "client_loss_mean",
    "client_loss_wmean",
    "client_loss_p90",
    "client_loss_wp90",
    "client_loss_max",
}


def test_quantiles_are_the_inverted_cdf_by_hand() -> None:
    values = [0.5, 0.9, 0.7, 0.2]
    # Unweighted, four clients: the 10th percentile is the ceil(0.4) = 1st smallest, the
    # 90th the ceil(3.6) = 4th.
    assert quantile(values, [1, 1, 1, 1], 0.1) == 0.2
    assert quantile(values, [1, 1, 1, 1], 0.9) == 0.9
    # Weighted 10, 1, 1, 1 (sorted: 0.2 w1, 0.5 w10, 0.7 w1, 0.9 w1; cumulative 1, 11, 12, 13
    # of 13): 0.1 is first reached at 0.5, 0.9 (11.7 of 13) at 0.7.
    assert quantile(values, [10, 1, 1, 1], 0.1) == 0.5
    assert quantile(values, [10, 1, 1, 1], 0.9) == 0.7
    # Exactly 10% of ten equal weights is reached by the first value.
    assert quantile(list(range(10)), [1] * 10, 0.1) == 0


def test_summarize_by_hand() -> None:
    scores = [
        ClientScore(client_id=0, examples=10, values={"accuracy": 0.5, "loss": 1.0}),
        ClientScore(client_id=1, examples=1, values={"accuracy": 0.9, "loss": 0.2}),
        ClientScore(client_id=2, examples=1, values={"accuracy": 0.7, "loss": 0.4}),
        ClientScore(client_id=3, examples=1, values={"accuracy": 0.2, "loss": 2.0}),
        ClientScore(4, examples=0, values={"accuracy": math.nan, "loss": math.nan}),  # left out
    ]
    row = summarize(scores, prefix="personalized_")
    assert row == pytest.approx(
        {
            "personalized_clients_evaluated": 4,
            "personalized_client_accuracy_mean": (0.5 + 0.9 + 0.7 + 0.2) / 4,
            "personalized_client_accuracy_wmean": (5 + 0.9 + 0.7 + 0.2) / 13,
            "personalized_client_accuracy_p10": 0.2,
            "personalized_client_accuracy_wp10": 0.5,
            "personalized_client_accuracy_min": 0.2,
            "personalized_client_loss_mean": (1.0 + 0.2 + 0.4 + 2.0) / 4,
            "personalized_client_loss_wmean": (10 + 0.2 + 0.4 + 2.0) / 13,
            "personalized_client_loss_p90": 2.0,
            "personalized_client_loss_wp90": 1.0,  # sorted 0.2, 0.4, 1.0 (w10): 12 of 13
            "personalized_client_loss_max": 2.0,
        }
    )


def _by_hand(workload: Any, params: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every client's accuracy and loss on its own test split, and the figures, by hand."""
    model = workload.make_model()
    load_params(dict(model.state_dict()), params)
    model.eval()
    acc, loss, n = [], [], []
    with torch.no_grad():
        for cid in range(workload.num_clients):
            test = workload.client_data(cid, "test")
            out = model(test.x)
            acc.append(float((out.argmax(1) == test.y).float().mean()))
            loss.append(float(F.cross_entropy(out, test.y)))
            n.append(len(test))
    k = len(acc)
    order = sorted(range(k), key=lambda i: acc[i])
    total, cum, wp10 = sum(n), 0, None
    for i in order:
        cum += n[i]
        if wp10 is None and cum / total >= 0.1:
            wp10 = acc[i]
    return {
        "clients_evaluated": k,
        "client_accuracy_mean": sum(acc) / k,
        "client_accuracy_wmean": sum(a * m for a, m in zip(acc, n, strict=True)) / total,
        "client_accuracy_p10": sorted(acc)[math.ceil(0.1 * k) - 1],
        "client_accuracy_wp10": float(wp10 if wp10 is not None else math.nan),
        "client_accuracy_min": min(acc),
        "client_loss_mean": sum(loss) / k,
        "client_loss_wmean": sum(x * m for x, m in zip(loss, n, strict=True)) / total,
        "client_loss_p90": sorted(loss)[math.ceil(0.9 * k) - 1],
        "client_loss_max": max(loss),
    }


def test_a_tiny_run_reports_the_hand_computed_figures(tmp_path: Path) -> None:
    history = fedlab.simulate(rounds=2, out=str(tmp_path / "r"), eval_clients="all", **TINY)
    assert history.config.eval_clients == TINY["clients"]  # "all" is saved as the number
    last = history.rows[-1]
    assert set(last) >= COLUMNS
    assert all(set(row) >= COLUMNS for row in history.rows)  # eval_every = 1
    expected = _by_hand(build_workload(history.config), history.params)
    assert {k: last[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    # The summary carries the final version's figures.
    assert {k: history.summary[k] for k in expected} == pytest.approx(expected, rel=1e-6)
    assert not any(k.startswith("personalized_") for k in last)


def test_personalization_improves_clients_on_a_skewed_partition(tmp_path: Path) -> None:
    """Digits in shards: each client holds about two labels, so a few local steps from the
    global model fit each client's own (label-matched) test split far better: FedAvg+FT."""
    history = fedlab.simulate(
        workload="digits",
        partition="shards",
        rounds=3,
        out=str(tmp_path / "r"),
        eval_clients=10,
        personalize=10,
        clients=10,
        local_steps=5,
        seed=1,
    )
    last = history.rows[-1]
    assert last["personalized_clients_evaluated"] == last["clients_evaluated"] == 10
    for figure in ("mean", "wmean", "p10", "min"):
        personal = last[f"personalized_client_accuracy_{figure}"]
        assert personal > last[f"client_accuracy_{figure}"] + 0.2, figure
    assert last["personalized_client_loss_mean"] < last["client_loss_mean"]


def test_evaluation_is_deterministic_and_changes_no_trained_number(tmp_path: Path) -> None:
    settings = dict(rounds=3, eval_clients=4, personalize=2, clients=20, fraction=0.2, seed=2)
    a = fedlab.simulate(out=str(tmp_path / "a"), **settings)
    b = fedlab.simulate(out=str(tmp_path / "b"), **settings)
    plain = fedlab.simulate(
        out=str(tmp_path / "c"), **{**settings, "eval_clients": 0, "personalize": 0}
    )
    wall = {"wall"}
    assert [{k: v for k, v in r.items() if k not in wall} for r in a.rows] == [
        {k: v for k, v in r.items() if k not in wall} for r in b.rows
    ]
    assert a["accuracy"] == plain["accuracy"]
    assert all(torch.equal(a.params[k], plain.params[k]) for k in plain.params)
    # The sample is a function of (seed, version): reproducible, and different per version.
    assert sample_clients(2, 1, 20, 4) == sample_clients(2, 1, 20, 4)
    assert len({tuple(sample_clients(2, v, 20, 4)) for v in range(1, 6)}) > 1
    assert sample_clients(2, 1, 20, 20) == list(range(20))


def test_eval_every_applies_and_the_evaluator_alone_matches_the_run(tmp_path: Path) -> None:
    # The in-process backend: the evaluator alone evaluates sequentially, as it does.
    history = fedlab.simulate(
        rounds=3, out=str(tmp_path / "r"), eval_clients=3, eval_every=2, backend="inprocess",
        **TINY,
    )
    has = ["client_accuracy_mean" in row for row in history.rows]
    assert has == [False, True, True]  # version 2 and the last one
    evaluator = FederatedEvaluator(build_workload(history.config), clients=3, seed=TINY["seed"])
    again = evaluator.evaluate(history.params, 3)
    assert {k: history.rows[-1][k] for k in again} == again


def test_config_checks() -> None:
    assert RunConfig(clients=7, eval_clients="all").eval_clients == 7  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="eval_clients must be at most clients"):
        RunConfig(clients=7, eval_clients=8)
    with pytest.raises(ConfigError, match="personalize fine-tunes"):
        RunConfig(personalize=3)
    with pytest.raises(ConfigError, match="eval_clients must be int"):
        RunConfig(eval_clients="most")  # type: ignore[arg-type]
    # Changing them on resume is allowed: they change no trained number.
    assert RunConfig(eval_clients=3).fingerprint() == RunConfig().fingerprint()


def test_cli_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    flags = ["--clients", "6", "--fraction", "0.5", "--local-steps", "2", "--rounds", "1"]
    code = main(
        [
            "simulate",
            *flags,
            "--eval-clients",
            "all",
            "--personalize",
            "2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    row = fedlab.History.load(out).rows[-1]
    assert row["clients_evaluated"] == row["personalized_clients_evaluated"] == 6
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--eval-clients", "some", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "expected a number of clients or 'all'" in capsys.readouterr().err
    code = main(
        [
            "simulate",
            "--workload",
            "wls",
            "--strategy",
            "admm-wls",
            "--clients",
            "6",
            "--eval-clients",
            "2",
            "--rounds",
            "1",
            "--out",
            str(tmp_path / "w"),
        ]
    )
    assert code == 2
    assert "evaluates itself" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_deployed_server_refuses_it(tmp_path: Path) -> None:
    """The server holds no client's data: refused before the run directory is made."""
    config = RunConfig(clients=4, eval_clients=2, rounds=1, out=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="only a simulation holds"):
        experiment.run(config, command="server")
    assert not (tmp_path / "s").exists()


def test_each_clients_figures_are_kept_and_plotted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    history = fedlab.simulate(rounds=2, out=str(out), eval_clients=4, personalize=2, **TINY)
    lines = [json.loads(x) for x in (out / CLIENT_METRICS).read_text().splitlines()]
    assert [line["version"] for line in lines] == [1] * 4 + [2] * 4
    last = [line for line in lines if line["version"] == 2]
    assert [line["client"] for line in last] == sample_clients(TINY["seed"], 2, 6, 4)
    # The row's figures are those of the lines: the file is what the columns summarise.
    scores = [
        ClientScore(line["client"], line["examples"], {"accuracy": line["accuracy"],
                                                       "loss": line["loss"]})
        for line in last
    ]  # fmt: skip
    assert summarize(scores) == pytest.approx(
        {k: v for k, v in history.rows[-1].items() if k in summarize(scores)}
    )
    # A resumed run rewrites the lines past its checkpoint once, not twice.
    fedlab.simulate(resume=str(out), rounds=3)
    lines = [json.loads(x) for x in (out / CLIENT_METRICS).read_text().splitlines()]
    assert [line["version"] for line in lines] == [1] * 4 + [2] * 4 + [3] * 4
    figure = tmp_path / "clients.svg"
    assert main(["plot", str(out), "--clients", "accuracy", "-o", str(figure)]) == 0
    assert figure.read_text().startswith("<?xml")
    assert main(["plot", str(out), "--clients", "acuracy", "-o", str(figure)]) == 2
    assert "no run has the per-client metric 'acuracy'" in capsys.readouterr().err
    plain = fedlab.simulate(rounds=1, out=str(tmp_path / "p"), **TINY)
    assert main(["plot", str(plain.run_dir), "--clients", "accuracy", "-o", str(figure)]) == 2
    assert "made with --eval-clients" in capsys.readouterr().err
