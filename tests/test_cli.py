"""The ``fedlab`` command: simulate, config files, resume, strategies, plot, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_params_equal
from fedlab import tensorio
from fedlab.cli import main

FAST = ["--clients", "20", "--fraction", "0.25", "--local-steps", "2", "--no-progress"]


def test_simulate_writes_the_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "3", "--out", str(out)]) == 0
    for name in ("config.toml", "metrics.jsonl", "summary.json", "model.fl", "checkpoint.fl"):
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [1, 2, 3]
    assert all("accuracy" in r and "time" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"] == 3 and 0 <= summary["accuracy"] <= 1
    assert "accuracy" in capsys.readouterr().out


def test_config_file_with_flag_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "clients = 20\nrounds = 2\nlr = 0.3\nfraction = 0.25\n[strategy_options]\nserver_lr = 0.5\n"
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "simulate",
                "--config",
                str(cfg),
                "--lr",
                "0.2",
                "--no-progress",
                "--local-steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = (out / "config.toml").read_text()
    assert "lr = 0.2" in saved and "clients = 20" in saved and "server_lr = 0.5" in saved
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strategy", "fedavgg"], "Did you mean 'fedavg'"),
        (["--workload", "digitz"], "digits"),
        (["--fraction", "1.5"], "fraction must be in (0, 1]"),
        (["--clients", "0"], "clients must be at least 1"),
        (["--lr", "nan"], "lr must be positive"),
        (["--backend", "slurm"], "backend must be one of"),
        (["--strategy-opt", "server_lr=-1"], "server_lr must be positive"),
        (["--strategy-opt", "servr_lr=1"], "valid options: server_optimizer, server_lr"),
        (["--partition", "dirichlet"], "does not apply to synthetic"),
        (["--model", "nomod.x:Net"], "cannot import module 'nomod.x'"),
    ],
)
def test_bad_input_gives_a_clear_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *FAST, "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text("clinets = 10\n")
    assert main(["simulate", "--config", str(cfg)]) == 2
    assert "unknown configuration key 'clinets'" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.fl").read_bytes()
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "checkpoint.fl").read_bytes() == before


def test_resume_extends_a_run_and_refuses_changed_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "2", "--out", str(out)]) == 0
    assert main(["simulate", "--resume", str(out), "--lr", "0.9"]) == 2
    assert "cannot change lr on resume" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(out), "--rounds", "4", "--no-progress"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [1, 2, 3, 4]


def test_strategies_lists_fedavg(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("fedavg"))
    assert "average" in line.lower()


def test_plot_draws_several_runs(tmp_path: Path) -> None:
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"run{seed}"
        assert main(["simulate", *FAST, "--rounds", "2", "--seed", seed, "--out", str(out)]) == 0
        runs.append(str(out))
    png = tmp_path / "plot.png"
    assert main(["plot", *runs, "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_of_a_non_run_directory_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def _fedlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlab", *args]


@pytest.mark.parametrize("strategy", ["fedavg", "conftest:BufferedFedAvg"])
def test_sigkill_mid_run_then_resume_is_bit_identical(strategy: str, tmp_path: Path) -> None:
    """Kill the simulate process with SIGKILL mid-run; the resumed run ends bit-identical."""
    common = [
        "--clients",
        "40",
        "--fraction",
        "0.25",
        "--local-steps",
        "40",
        "--rounds",
        "30",
        "--strategy",
        strategy,
        "--no-progress",
        "--eval-every",
        "1000",
    ]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # Deadlines for a loaded machine; a run here takes seconds alone.
    subprocess.run(
        _fedlab("simulate", *common, "--out", str(straight)),
        check=True,
        capture_output=True,
        timeout=600,
    )
    proc = subprocess.Popen(
        _fedlab("simulate", *common, "--out", str(killed)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = killed / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done = len(metrics.read_text().splitlines())
    assert done < 30
    subprocess.run(
        _fedlab("simulate", "--resume", str(killed), "--no-progress"),
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert_params_equal(tensorio.load(killed / "model.fl"), tensorio.load(straight / "model.fl"))
    versions = [json.loads(x)["version"] for x in metrics.read_text().splitlines()]
    assert versions == list(range(1, 31))


def test_fingerprint_ignores_keys_at_their_default() -> None:
    """A checkpoint written before a setting existed resumes after it is added: keys at their
    default (the old behaviour) do not enter the fingerprint; any other value does."""
    import hashlib
    import json

    from fedlab.config import NOT_FINGERPRINTED, RunConfig

    config = RunConfig(clients=10, lr=0.2)
    changed = {
        k: v
        for k, v in config.to_dict().items()
        if k not in NOT_FINGERPRINTED and v != RunConfig().to_dict()[k]
    }
    assert changed == {"clients": 10, "lr": 0.2}
    expected = hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()
    assert config.fingerprint() == expected
    assert config.fingerprint() != config.replace(noise_multiplier=0.5).fingerprint()
    assert config.fingerprint() == config.replace(out="elsewhere").fingerprint()
