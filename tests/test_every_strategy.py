"""Every registered strategy runs from ``fedlab simulate --strategy NAME`` alone.

A strategy either works on the default workload (a bare ``nn.Linear`` model is a layer like
any other), or declares the settings it needs (ADMM-WLS: workload ``wls``), which become the
run's defaults when the user names none.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedlab import registry, tensorio
from fedlab.cli import main

SMALL = ["--clients", "6", "--fraction", "0.5", "--rounds", "2", "--local-steps", "1"]


@pytest.mark.parametrize("name", registry.names("strategies"))
def test_strategy_runs_with_no_other_setting(name: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["simulate", "--strategy", name, *SMALL, "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 2
    assert all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
    model = tensorio.load(out / "model.fl")
    assert model and all(bool(torch.isfinite(t).all()) for t in model.values())


def test_a_declared_workload_is_the_default_and_a_conflicting_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert (
        main(["simulate", "--strategy", "admm-wls", *SMALL, "--no-progress", "--out", str(out)])
        == 0
    )
    assert 'workload = "wls"' in (out / "config.toml").read_text()
    argv = ["simulate", "--strategy", "admm-wls", "--workload", "synthetic", *SMALL]
    assert main([*argv, "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "strategy 'admm-wls' runs on workload 'wls', not 'synthetic'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("name", "held"), [("frl", "scores"), ("fed-sb", "w0"), ("fedit", "w0")])
def test_a_root_linear_model_is_a_layer(name: str, held: str) -> None:
    """The default synthetic model is ``nn.Linear`` itself: its entry ``weight`` is the layer
    the strategy masks (FRL) or adapts (Fed-SB, FedIT); the bias is not."""
    strategy = registry.create("strategies", name, {})
    params = {k: v.detach().clone() for k, v in torch.nn.Linear(8, 5).state_dict().items()}
    assert list(strategy.init(params)[held]) == ["weight"]
