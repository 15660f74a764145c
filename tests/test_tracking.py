"""``--log tensorboard,mlflow``: each artefact read back by TensorBoard's and MLflow's readers."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

import fedlab
from fedlab.cli import main
from fedlab.config import ConfigError, RunConfig

FAST = ["--clients", "20", "--fraction", "0.2", "--local-steps", "2", "--seed", "5"]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _events(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_rows_config_summary_and_model(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = ["simulate", *FAST, "--rounds", "3", "--out", str(out), "--no-progress"]
    assert main([*args, "--log", "tensorboard", "--strategy-opt", "server_lr=0.5"]) == 0
    acc = _events(out)
    rows = _rows(out)
    scalars = acc.Tags()["scalars"]
    for key in ("accuracy", "loss", "bytes_up", "train_loss"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert acc.Scalars("summary/accuracy")[0].value == pytest.approx(summary["accuracy"])
    assert acc.Scalars("summary/accuracy")[0].step == 3
    assert "summary/updates_received" in scalars
    # The final model: one histogram per tensor.
    model = fedlab.History.load(out).params
    assert {f"model/{k}" for k in model} <= set(acc.Tags()["histograms"])
    # The configuration: as text, and in the HParams plugin with the option tables flattened.
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = next(
        plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
        for c in content.values()
        if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info")
    )
    assert start.hparams["clients"].number_value == 20
    assert start.hparams["strategy"].string_value == "fedavg"
    assert start.hparams["strategy_options.server_lr"].number_value == 0.5
    text = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    assert text, acc.Tags()


def test_tensorboard_resume_keeps_one_point_per_version(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    base = ["simulate", *FAST, "--out", str(out), "--no-progress", "--log", "tensorboard"]
    assert main([*base, "--rounds", "2"]) == 0
    assert main(["simulate", "--resume", str(out), "--rounds", "4", "--no-progress"]) == 0
    events = _events(out).Scalars("accuracy")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert [e.value for e in events] == pytest.approx([r["accuracy"] for r in _rows(out)])


def test_mlflow_run_holds_params_metrics_summary_and_artifacts(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    history = fedlab.simulate(
        clients=20, fraction=0.2, local_steps=2, seed=5, rounds=2, out=str(out), log="mlflow"
    )
    saved = json.loads((out / "mlflow_run.json").read_text())
    assert saved["tracking_uri"].startswith("sqlite:///")
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    run = client.get_run(saved["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    params = run.data.params
    assert params["clients"] == "20" and params["strategy"] == "fedavg"
    assert params["log"] == "mlflow"
    assert len(params) >= len(RunConfig().to_dict()) - 5  # option tables are empty here
    for key in ("accuracy", "loss", "bytes_up"):
        points = client.get_metric_history(run.info.run_id, key)
        assert [p.step for p in points] == [1, 2]
        assert [p.value for p in points] == pytest.approx(history[key])
    assert run.data.metrics["summary.accuracy"] == pytest.approx(history.summary["accuracy"])
    assert run.data.tags["summary.strategy"] == "fedavg"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.toml", "summary.json", "model"} <= top
    models = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert models == {"model/model.safetensors", "model/model.fl"}
    # The artifact is the model: download it and read it with the safetensors package.
    st = pytest.importorskip("safetensors.torch")
    local = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path))
    tensors = st.load_file(local)
    assert set(tensors) == set(history.params)
    assert all((tensors[k] == history.params[k]).all() for k in tensors)


def test_mlflow_resume_continues_the_same_run(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    fast = dict(clients=20, fraction=0.2, local_steps=2, seed=5, log="mlflow")
    fedlab.simulate(rounds=2, out=str(out), **fast)
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    fedlab.simulate(resume=out, rounds=3)
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("fedlab").experiment_id])) == 1
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [p.step for p in client.get_metric_history(run_id, "accuracy")] == [1, 2, 3]
    assert run.data.params["rounds"] == "2"  # params are immutable in MLflow; config.toml has 3


@pytest.mark.parametrize(
    ("tracker", "modules"),
    [("tensorboard", ["torch.utils.tensorboard"]), ("mlflow", ["mlflow", "mlflow.tracking"])],
)
def test_missing_extra_is_one_line_and_nothing_is_written(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tracker: str,
    modules: list[str],
) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out), "--log", tracker]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedlab: error: ")
    assert f"pip install 'fedlab[{tracker}]'" in err
    assert not out.exists()


def test_missing_extra_on_resume_leaves_the_run_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    resume = ["simulate", "--resume", str(out), "--rounds", "2", "--log", "tensorboard"]
    assert main(resume) == 2
    assert "fedlab[tensorboard]" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_log_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="log takes a comma-separated list"):
        RunConfig(log="tensorbord")
    with pytest.raises(ConfigError, match="mlflow_uri given without mlflow"):
        RunConfig(mlflow_uri="http://127.0.0.1:5000")
    assert RunConfig(log="mlflow, tensorboard,mlflow").trackers == ("mlflow", "tensorboard")
    # Tracking does not change the numbers: a run may add or drop it on resume.
    assert RunConfig(log="mlflow").fingerprint() == RunConfig().fingerprint()


def test_unusable_mlflow_store_stops_before_the_run_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow")
    out = tmp_path / "run"
    args = ["simulate", *FAST, "--rounds", "1", "--out", str(out), "--no-progress"]
    assert main([*args, "--log", "mlflow", "--mlflow-uri", "bogus://nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedlab: error: MLflow at bogus://nowhere")
    assert not (out / "checkpoint.fl").exists()
    assert main(args) == 0  # the same --out starts afresh: no half-made run is in the way
