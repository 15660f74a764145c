"""Bad input and bad luck on the command line: one clear line, and nothing stored is lost.

Numeric deployment flags, a torn metrics log, a full or read-only run directory, a model that
raises, a missing package, wrongly typed options, and the plot and resume guards.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest

from fedlab import tensorio
from fedlab.cli import main
from fedlab.config import ConfigError, RunConfig

FAST = ["--clients", "8", "--fraction", "0.5", "--local-steps", "1", "--no-progress"]


def _one_error_line(err: str) -> str:
    """The single ``fedlab: error:`` line of ``err`` (no traceback around it)."""
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("fedlab: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    return errors[0]


def _rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ item 4: numeric flags


NUMERIC = [
    f.name
    for f in fields(RunConfig)
    if f.default is not MISSING and type(f.default) in (int, float)
]


@pytest.mark.parametrize("name", NUMERIC)
def test_every_numeric_run_setting_refuses_negative_and_nan(name: str) -> None:
    """No numeric setting accepts -1 or NaN: each is range-checked where the config is made."""
    with pytest.raises(ConfigError, match=name):
        RunConfig(**{name: -1})
    if isinstance(getattr(RunConfig(), name), float):
        with pytest.raises(ConfigError, match=name):
            RunConfig(**{name: math.nan})


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test instead of serving or connecting if a bad flag slips through."""

    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError("the command started with a flag out of range")

    monkeypatch.setattr("fedlab.cli.server.execute", refuse)
    monkeypatch.setattr("fedlab.transport.client.run_client", refuse)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-update-mb", "-5"], "--max-update-mb must be >= 0, got -5"),
        (["--max-update-mb", "nan"], "--max-update-mb must be >= 0"),
        (["--spool-mb", "-1"], "--spool-mb must be >= 0"),
        (["--linger", "-1"], "--linger must be >= 0"),
        (["--heartbeat", "0"], "--heartbeat must be positive"),
        (["--stall-timeout", "inf"], "--stall-timeout must be positive"),
        (["--max-uploads", "0"], "--max-uploads must be positive"),
        (["--address", "127.0.0.1:70000"], "--address must be HOST:PORT"),
        (["--address", "127.0.0.1"], "--address must be HOST:PORT"),
    ],
)
@pytest.mark.usefixtures("no_serving")
def test_server_refuses_numeric_flags_out_of_range(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["server", *FAST, "--insecure", "--address", "127.0.0.1:0", "--out", str(tmp_path / "r")]
    assert main([*argv, *flags]) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--give-up", "0"], "--give-up must be positive"),
        (["--give-up", "-3"], "--give-up must be positive"),
        (["--client-id", "-1"], "--client-id must be >= 0"),
        (["--server", "127.0.0.1:0"], "--server must be HOST:PORT with PORT in 1..65535"),
    ],
)
@pytest.mark.usefixtures("no_serving")
def test_client_refuses_numeric_flags_out_of_range(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["client", "--server", "127.0.0.1:50051", "--client-id", "0", "--insecure"]
    assert main([*argv, *flags]) == 2
    assert message in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------ item 5: torn metrics


def test_resume_drops_a_torn_last_metrics_line_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "2", "--out", str(out)]) == 0
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"version": 3, "time": 1.5, "wa')  # power lost in the middle of the append
    capsys.readouterr()
    assert main(["simulate", "--resume", str(out), "--rounds", "3", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "torn last line 3 of" in captured.out and "metrics.jsonl" in captured.out
    assert [r["version"] for r in _rows(out)] == [1, 2, 3]


def test_a_corrupt_metrics_line_before_the_last_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "2", "--out", str(out)]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    before = (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["simulate", "--resume", str(out), "--rounds", "3", "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{out / 'metrics.jsonl'}, line 1: not a metrics row" in line
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing stored is lost


# ------------------------------------------------------------------ item 7: full disk


def _failing_open(fail_on: int, code: int) -> Any:
    """``open`` for :mod:`fedlab.tensorio` whose ``fail_on``-th checkpoint write fails."""
    import builtins

    calls = {"n": 0}

    def fake(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode and Path(path).name.startswith("checkpoint"):
            calls["n"] += 1
            if calls["n"] == fail_on:
                raise OSError(code, os.strerror(code), str(path))
        return builtins.open(path, mode, *args, **kwargs)

    return fake


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_run_directory_stops_with_one_line_and_resumes(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # Checkpoints of versions 0 and 1 are written; the disk fills on version 2's.
    monkeypatch.setattr(tensorio, "open", _failing_open(3, code), raising=False)
    assert main(["simulate", *FAST, "--rounds", "3", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write the run directory {out}: {os.strerror(code)}" in line
    assert f"--resume {out}" in line
    monkeypatch.undo()
    assert main(["simulate", "--resume", str(out), "--rounds", "3", "--no-progress"]) == 0
    assert [r["version"] for r in _rows(out)] == [1, 2, 3]


def test_a_full_disk_before_the_first_version_leaves_nothing_and_says_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr(tensorio, "open", _failing_open(1, errno.ENOSPC), raising=False)
    argv = ["simulate", *FAST, "--rounds", "1", "--out", str(out)]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write the run directory {out}: No space left on device" in line
    assert "run the same command again" in line and "--resume" not in line
    assert not out.exists()
    monkeypatch.undo()
    assert main(argv) == 0


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes to read-only dirs"
)
def test_a_really_read_only_run_directory_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.fl").read_bytes()
    out.chmod(0o555)
    try:
        assert main(["simulate", "--resume", str(out), "--rounds", "2", "--no-progress"]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"cannot write the run directory {out}" in line and "--resume" in line
    finally:
        out.chmod(0o755)
    assert (out / "checkpoint.fl").read_bytes() == before


def _read_only_mount_unavailable() -> str | None:
    """Why a read-only bind mount in a private mount namespace cannot be made here."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) for a private mount namespace"
    with tempfile.TemporaryDirectory() as d:
        q = shlex.quote(d)
        probe = subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount --bind {q} {q} && mount -o remount,ro,bind {q}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    return None if probe.returncode == 0 else f"cannot remount read-only: {probe.stderr.strip()}"


@pytest.mark.slow
@pytest.mark.skipif(_read_only_mount_unavailable() is not None, reason="no read-only mount")
def test_a_read_only_file_system_stops_with_one_line(tmp_path: Path) -> None:
    """A real EROFS, as root: the run directory's file system is remounted read-only in a
    private mount namespace of the child process (nothing changes outside it)."""
    out = tmp_path / "ro" / "run"
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out)]) == 0
    before = (out / "checkpoint.fl").read_bytes()
    ro = shlex.quote(str(out.parent))
    fedlab = shlex.join([sys.executable, "-m", "fedlab", "simulate", "--resume", str(out)])
    script = f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && exec {fedlab}"
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script + " --rounds 2 --no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr
    line = _one_error_line(done.stderr)
    assert f"cannot write the run directory {out}: Read-only file system" in line
    assert f"--resume {out}" in line
    assert (out / "checkpoint.fl").read_bytes() == before
    assert main(["simulate", "--resume", str(out), "--rounds", "2", "--no-progress"]) == 0


# ------------------------------------------------------------------ item 9: failures in training


MODELS = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(60, 10)

        def forward(self, x):
            raise RuntimeError("boom in forward")


    class WithBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(60, 16)
            self.bn = nn.BatchNorm1d(16)
            self.out = nn.Linear(16, 10)

        def forward(self, x):
            return self.out(torch.relu(self.bn(self.fc(x))))
    """
)


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The name of an importable module holding the test models."""
    (tmp_path / "secux_models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "secux_models"


def test_a_model_that_raises_names_client_and_version_and_leaves_no_run_directory(
    models: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["simulate", *FAST, "--rounds", "2", "--out", str(out)]
    assert main([*argv, "--model", f"{models}:Boom"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "failed training version 0: RuntimeError: boom in forward" in line
    assert f"(at {models}.py:" in line and "in forward)" in line
    assert line.split("fedlab: error: client ")[1].split(" ")[0].isdigit()
    assert not out.exists()  # half-made: a fresh run that failed before its first version
    assert main(argv) == 0  # so the same --out runs again


def test_a_training_error_survives_pickling_for_ray_actors() -> None:
    import pickle

    from fedlab.client import TrainingError

    error = TrainingError(3, 7, "ValueError: bad shape", "net.py:12 in forward")
    again = pickle.loads(pickle.dumps(error))
    assert (
        str(again)
        == str(error)
        == ("client 3 failed training version 7: ValueError: bad shape (at net.py:12 in forward)")
    )
    assert (again.client_id, again.version, again.detail) == (3, 7, "ValueError: bad shape")


def test_a_failed_fresh_run_in_an_existing_empty_directory_keeps_the_directory(
    models: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    assert main(["simulate", *FAST, "--out", str(out), "--model", f"{models}:Boom"]) == 2
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_failure_after_the_first_version_keeps_the_run_to_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out)]) == 0
    monkeypatch.setattr(tensorio, "open", _failing_open(1, errno.ENOSPC), raising=False)
    assert main(["simulate", "--resume", str(out), "--rounds", "2", "--no-progress"]) == 2
    assert (out / "checkpoint.fl").exists() and (out / "config.toml").exists()


def test_dp_without_opacus_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus raises ImportError
    for dp in (["--dp", "sample", "--noise-multiplier", "1"], ["--dp", "client"]):
        extra = ["--noise-multiplier", "1"] if dp[1] == "client" else []
        out = tmp_path / dp[1]
        assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out), *dp, *extra]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "needs Opacus" in line and "pip install 'opacus" in line
        assert not out.exists()


def test_dp_sample_reports_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "run"
    dp = ["--dp", "sample", "--noise-multiplier", "1"]
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out), *dp]) == 0
    assert _rows(out)[0]["client_epsilon_max"] > 0


def test_ray_backend_without_ray_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "fedlab.sim.ray", raising=False)
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--backend", "ray", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--backend ray needs Ray" in line and "pip install 'fedlab[ray]'" in line
    assert not out.exists()


def test_batchnorm_under_dp_sample_gets_the_module_validator_verdict(
    models: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["simulate", *FAST, "--out", str(out), "--model", f"{models}:WithBatchNorm"]
    assert main([*argv, "--dp", "sample", "--noise-multiplier", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "ModuleValidator says: layer 'bn': BatchNorm cannot support training with" in line
    assert "ModuleValidator.fix(model)" in line
    assert not out.exists()


# ------------------------------------------------------------------ item 10: option types


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--strategy", "centered-clipping", "--strategy-opt", "tau=abc"],
            "'centered-clipping' option 'tau' must be float, got str 'abc'",
        ),
        (
            ["--strategy", "krum", "--strategy-opt", "f=true"],
            "'krum' option 'f' must be int, got bool True",
        ),
        (
            ["--strategy", "fedbuff", "--strategy-opt", "max_staleness=1.5"],
            "'fedbuff' option 'max_staleness' must be int or None, got float 1.5",
        ),
        (
            ["--client-opt", "momentum=fast"],
            "'sgd' option 'momentum' must be float, got str 'fast'",
        ),
    ],
)
def test_options_of_the_wrong_type_are_refused_by_name(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *FAST, "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in _one_error_line(capsys.readouterr().err)


def test_options_are_converted_to_their_field_types() -> None:
    from fedlab import registry

    s = registry.create("strategies", "centered-clipping", {"tau": 3, "iterations": 2.0})
    assert s.tau == 3.0 and isinstance(s.tau, float)
    assert s.iterations == 2 and isinstance(s.iterations, int)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"clients": True}, "clients must be int, got bool True"),
        ({"rounds": "3"}, "rounds must be int, got str '3'"),
        ({"lr": "0.1"}, "lr must be float, got str '0.1'"),
        ({"adaptive_clip": 1}, "adaptive_clip must be bool, got int 1"),
    ],
)
def test_run_settings_of_the_wrong_type_are_refused_however_made(
    values: dict[str, Any], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig(**values)
    toml = tmp_path / "run.toml"
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    assert main(["simulate", "--config", str(toml), "--out", str(tmp_path / "r")]) == 2
    assert message in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------ item 12: plot and dirs


def test_plot_refuses_an_unknown_metric_listing_the_known_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(out)]) == 0
    png = tmp_path / "p.png"
    assert main(["plot", str(out), "--metrics", "acuracy", "-o", str(png)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "no run has the metric 'acuracy'; known:" in line and " accuracy," in line
    assert not png.exists()


def test_resume_of_a_directory_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for target in (tmp_path, tmp_path / "missing"):
        assert main(["simulate", "--resume", str(target)]) == 2
        assert f"{target} is not a fedlab run directory" in _one_error_line(capsys.readouterr().err)


def test_out_into_a_non_empty_directory_that_is_not_a_run_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(tmp_path)]) == 2
    assert "is not empty and is not a fedlab run directory" in _one_error_line(
        capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
