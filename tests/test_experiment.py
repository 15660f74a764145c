"""``fedlab.simulate`` returns a History from the same run path as ``fedlab simulate``."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import fedlab
from fedlab import experiment, tensorio
from fedlab.cli import main
from fedlab.config import ConfigError, RunConfig
from fedlab.engine import Engine

FAST: dict[str, Any] = dict(clients=20, fraction=0.2, local_steps=2, seed=3)
FAST_FLAGS = ["--clients", "20", "--fraction", "0.2", "--local-steps", "2", "--seed", "3"]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_simulate_returns_the_history_of_its_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    history = fedlab.simulate(rounds=3, out=str(out), **FAST)
    assert isinstance(history, fedlab.History)
    assert history.run_dir == out
    assert history.versions == [1, 2, 3]
    assert history.rows == _rows(out)
    assert history["accuracy"] == [r["accuracy"] for r in _rows(out)]
    assert history.metrics["version"] == [1, 2, 3]
    assert set(history.metrics) == set(history.names) >= {"version", "accuracy", "bytes_up"}
    assert history.summary == json.loads((out / "summary.json").read_text())
    assert history.summary["versions"] == 3
    saved = tensorio.load(out / "model.fl")
    assert set(history.params) == set(saved)
    assert all(torch.equal(history.params[k], saved[k]) for k in saved)
    assert history.config == RunConfig(rounds=3, out=str(out), **FAST)
    assert "versions=3" in repr(history)
    with pytest.raises(KeyError, match="no metric 'acuracy'"):
        history["acuracy"]


def test_api_and_cli_write_the_same_run(tmp_path: Path) -> None:
    """One run path: identical metrics (but wall times), summary numbers and final model."""
    api = fedlab.simulate(rounds=2, out=str(tmp_path / "api"), **FAST)
    cli = tmp_path / "cli"
    assert main(["simulate", *FAST_FLAGS, "--rounds", "2", "--out", str(cli), "--no-progress"]) == 0
    wall = {"wall", "wall_seconds"}
    strip = [{k: v for k, v in r.items() if k not in wall} for r in api.rows]
    assert strip == [{k: v for k, v in r.items() if k not in wall} for r in _rows(cli)]
    summary = json.loads((cli / "summary.json").read_text())
    assert {k: v for k, v in api.summary.items() if k not in wall} == {
        k: v for k, v in summary.items() if k not in wall
    }
    files = {p.name for p in (tmp_path / "api").iterdir()}
    assert files == {p.name for p in cli.iterdir()}
    assert {"model.fl", "model.safetensors", "summary.json", "config.toml"} <= files
    model = tensorio.load(cli / "model.fl")
    assert all(torch.equal(api.params[k], model[k]) for k in model)


def test_config_mapping_toml_and_keywords_merge(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('strategy = "fedavg"\nrounds = 1\n[strategy_options]\nserver_lr = 0.5\n')
    history = fedlab.simulate(
        toml, out=str(tmp_path / "a"), strategy_options={"server_momentum": 0.1}, **FAST
    )
    assert dict(history.config.strategy_options) == {"server_lr": 0.5, "server_momentum": 0.1}
    assert history.config.rounds == 1
    base = RunConfig(rounds=1, **FAST)
    again = fedlab.simulate(base, out=tmp_path / "b", lr=0.05)  # a Path is fine
    assert (again.config.lr, again.config.clients) == (0.05, 20)
    with pytest.raises(ConfigError, match="unknown configuration key 'clinets'"):
        fedlab.simulate(clinets=3)
    with pytest.raises(ConfigError, match="config must be"):
        fedlab.simulate(42)  # type: ignore[arg-type]


def test_resume_continues_and_returns_the_whole_history(tmp_path: Path) -> None:
    out = tmp_path / "run"
    fedlab.simulate(rounds=2, out=str(out), **FAST)
    with pytest.raises(FileExistsError, match="already holds a run"):
        fedlab.simulate(rounds=2, out=str(out), **FAST)
    with pytest.raises(ConfigError, match="cannot change lr on resume"):
        fedlab.simulate(resume=out, lr=0.9)
    resumed = fedlab.simulate(resume=out, rounds=4)
    assert resumed.versions == [1, 2, 3, 4]
    straight = fedlab.simulate(rounds=4, out=str(tmp_path / "straight"), **FAST)
    assert resumed["accuracy"] == straight["accuracy"]
    assert all(torch.equal(resumed.params[k], straight.params[k]) for k in straight.params)
    loaded = fedlab.History.load(out)
    assert loaded.rows == resumed.rows and loaded.summary == resumed.summary


def test_own_callbacks_see_every_version_and_their_additions_are_logged(tmp_path: Path) -> None:
    seen: list[int] = []

    class Marker:
        def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
            assert "accuracy" in row  # called after evaluation
            seen.append(engine.version)
            row["marker"] = engine.version * 10

    history = fedlab.simulate(rounds=3, out=str(tmp_path / "r"), callbacks=[Marker()], **FAST)
    assert seen == [1, 2, 3]
    assert history["marker"] == [10, 20, 30]
    assert [r["marker"] for r in _rows(tmp_path / "r")] == [10, 20, 30]


def test_quiet_by_default_and_progress_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fedlab.simulate(rounds=1, out=str(tmp_path / "q"), **FAST)
    quiet = capsys.readouterr()
    assert quiet.out == "" and quiet.err == ""
    fedlab.simulate(rounds=1, out=str(tmp_path / "p"), progress=True, **FAST)
    assert "simulate" in capsys.readouterr().out  # the progress bar's description


def test_to_dataframe_has_one_row_per_version(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    history = fedlab.simulate(rounds=2, out=str(tmp_path / "r"), eval_every=2, **FAST)
    frame = history.to_dataframe()
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.index) == [1, 2] and frame.index.name == "version"
    assert math.isnan(frame.loc[1, "accuracy"])  # not evaluated at version 1
    assert frame.loc[2, "accuracy"] == history["accuracy"][1]


def test_to_dataframe_without_pandas_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = fedlab.simulate(rounds=1, out=str(tmp_path / "r"), **FAST)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ImportError, match=r"needs pandas.*pip install pandas") as e:
        history.to_dataframe()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("suffix", ["png", "svg", "pdf"])
def test_history_plots_to_a_figure_and_a_file(tmp_path: Path, suffix: str) -> None:
    history = fedlab.simulate(rounds=2, out=str(tmp_path / "r"), **FAST)
    path = tmp_path / f"fig.{suffix}"
    figure = history.plot(["accuracy", "bytes_up"], x=["version", "time"], path=path)
    assert len(figure.axes) == 4
    assert path.stat().st_size > 1000
    with pytest.raises(KeyError, match="no metric"):
        history.plot(["acc"])


def test_history_load_refuses_a_directory_that_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.toml does not exist"):
        fedlab.History.load(tmp_path)


def test_resume_of_a_missing_run_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        fedlab.simulate(resume=tmp_path / "nothing")
    with pytest.raises(ConfigError, match="cannot be combined"):
        fedlab.simulate({"rounds": 1}, resume=tmp_path / "nothing")


def test_cli_and_api_call_the_one_run_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fedlab simulate`` and ``fedlab.simulate`` both go through ``experiment.run``."""
    calls: list[str] = []
    real = experiment.run

    def spy(config: RunConfig, **kw: Any) -> experiment.History:
        calls.append(kw.get("command", "simulate"))
        return real(config, **kw)

    monkeypatch.setattr(experiment, "run", spy)
    fedlab.simulate(rounds=1, out=str(tmp_path / "a"), **FAST)
    assert main(["simulate", *FAST_FLAGS, "--rounds", "1", "--out", str(tmp_path / "b")]) == 0
    assert calls == ["simulate", "simulate"]


NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "examples" / "notebook_quickstart.py"


@pytest.mark.slow
def test_notebook_quickstart_runs(tmp_path: Path) -> None:
    """The percent-format notebook's cells, run in order in one namespace, as a kernel would."""
    text = NOTEBOOK.read_text()
    cells = re.split(r"^# %%.*$", text, flags=re.MULTILINE)[1:]
    code = [c for c in cells if c.strip() and not c.lstrip().startswith("#")]
    assert len(cells) >= 10 and len(code) >= 6
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(NOTEBOOK)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[1, 2, 3, 4, 5, 6, 7, 8, 9]" in proc.stdout  # the resumed run's versions
    assert (tmp_path / "notebook-fedavg.png").stat().st_size > 1000
    history = fedlab.History.load(tmp_path / "runs" / "notebook" / "fedavg")
    assert history.versions == list(range(1, 10))
