"""Checkpoint files: each tensor once, old files still load, background writes that stay
atomic and report their errors, the client store's files kept until a write is on disk, and
``checkpoint_every`` with an exact resume."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import fedlab
from conftest import BufferedFedAvg, assert_params_equal, small_config
from fedlab import checkpoint, registry, tensorio
from fedlab.checkpoint import CHECKPOINT, PREVIOUS, CheckpointError
from fedlab.cli import main
from fedlab.config import ConfigError, RunConfig
from fedlab.engine import Engine
from fedlab.run import build_engine
from fedlab.store import MemoryStore

REPO = Path(__file__).resolve().parents[1]
registry.register("strategies", "test-buffered", BufferedFedAvg)


def _tensor_bytes(path: Path) -> int:
    """The bytes of tensor data a fedlab file holds (from its header)."""
    raw = path.read_bytes()
    start = len(tensorio.MAGIC) + 8
    (hlen,) = struct.unpack("<Q", raw[len(tensorio.MAGIC) : start])
    header = json.loads(raw[start : start + hlen])
    return sum(int(m["nbytes"]) for m in header["tensors"])


def _version_of(path: Path) -> int:
    return int(tensorio.load(path)["version"])


# ------------------------------------------------------------------ each tensor once


def test_a_checkpoint_holds_the_model_once_and_loads_to_the_same_run(tmp_path: Path) -> None:
    engine = build_engine(small_config(), run_dir=tmp_path)
    engine.run(2)
    model = sum(t.numel() * t.element_size() for t in engine.params.values())
    state = engine.state_dict()
    # params and the current version's task params are the same tensors...
    assert all(state["task_params"][2][k] is state["params"][k] for k in state["params"])
    # ...written once: FedAvg keeps no other tensor, so the file holds exactly one model,
    # where writing every place separately (format 1) holds two.
    assert _tensor_bytes(tmp_path / CHECKPOINT) == model
    tensorio.save(tmp_path / "unshared.fl", state)
    assert _tensor_bytes(tmp_path / "unshared.fl") == 2 * model
    ckpt = tensorio.load(tmp_path / CHECKPOINT)
    assert ckpt["format"] == 2
    assert all(ckpt["task_params"][2][k] is ckpt["params"][k] for k in ckpt["params"])
    assert_params_equal(ckpt["params"], engine.params)


def test_share_writes_views_of_the_same_memory_once_and_keeps_distinct_tensors() -> None:
    a = torch.arange(1000.0)
    tree = {"x": a, "y": a.detach(), "z": a.clone(), "w": a[:10]}
    shared = tensorio.loads(tensorio.dumps(tree, share=True))
    assert shared["x"] is shared["y"]
    assert shared["z"] is not shared["x"] and shared["w"] is not shared["x"]
    assert len(tensorio.dumps(tree, share=True)) < len(tensorio.dumps(tree)) - 3900
    plain = tensorio.loads(tensorio.dumps(tree))
    for k in tree:
        assert torch.equal(shared[k], tree[k]) and torch.equal(plain[k], tree[k])


def test_a_checkpoint_written_the_old_way_resumes_exactly(tmp_path: Path) -> None:
    """Format 1 wrote ``state_dict()`` with every tensor where it appears (the params twice)."""
    config = small_config(strategy="test-buffered", concurrency=6)
    straight = build_engine(config)
    straight.run(6)
    first = build_engine(config)
    first.run(3)
    tensorio.save(tmp_path / CHECKPOINT, {**first.state_dict(), "format": 1})
    first.transport.close()
    resumed = build_engine(config, run_dir=tmp_path)
    resumed.resume()
    assert resumed.version == 3
    resumed.run(6)
    assert_params_equal(resumed.params, straight.params)
    assert tensorio.load(tmp_path / CHECKPOINT)["format"] == checkpoint.FORMAT


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    engine = build_engine(small_config())
    tensorio.save(tmp_path / CHECKPOINT, {**engine.state_dict(), "format": 99})
    with pytest.raises(CheckpointError, match="unsupported checkpoint format 99"):
        build_engine(small_config(), run_dir=tmp_path).resume()


# ------------------------------------------------------------------ snapshots


def test_a_snapshot_copies_what_may_change_and_refuses_params_changed_while_written(
    tmp_path: Path,
) -> None:
    params = {"w": torch.zeros(4)}
    state: dict[str, Any] = {"version": 5, "params": params, "strategy": {"m": torch.ones(4)}}
    snap = checkpoint.snapshot(5, state, params.values())
    state["strategy"]["m"].add_(1)  # a strategy may change its own state in place...
    checkpoint.write(tmp_path, snap)
    assert torch.equal(tensorio.load(tmp_path / CHECKPOINT)["strategy"]["m"], torch.ones(4))
    snap = checkpoint.snapshot(6, {**state, "version": 6}, params.values())
    params["w"].add_(1)  # ...but the params are shared with the file being written
    with pytest.raises(CheckpointError, match=r"version 6: 1 tensor.*changed in place"):
        checkpoint.write(tmp_path, snap)
    assert _version_of(tmp_path / CHECKPOINT) == 5
    assert not (tmp_path / checkpoint.NEW).exists()


# ------------------------------------------------------------------ background writes


class _Gate:
    """Holds every checkpoint write of :mod:`fedlab.checkpoint` until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = tensorio.save

        def held(path: Any, obj: Any, **kw: Any) -> None:
            self.entered.set()
            assert self.release.wait(180)
            real(path, obj, **kw)

        monkeypatch.setattr(checkpoint.tensorio, "save", held)


class _CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def checkpointed(self) -> None:
        self.calls += 1


def test_the_store_forgets_files_only_once_the_checkpoint_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _CountingStore()
    engine = build_engine(small_config(), run_dir=tmp_path)
    engine.memory = store
    gate = _Gate(monkeypatch)
    engine.step()  # version 1: its checkpoint is written on a background thread
    assert gate.entered.wait(180)
    assert engine.version == 1 and store.calls == 0
    assert not (tmp_path / CHECKPOINT).exists()
    gate.release.set()
    engine.close()  # waits for the write
    assert store.calls == 1 and engine.checkpointed_version == 1
    assert _version_of(tmp_path / CHECKPOINT) == 1


def test_training_goes_on_while_a_checkpoint_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = small_config(checkpoint_every=2)
    straight = build_engine(config)
    straight.run(3)
    engine = build_engine(config, run_dir=tmp_path)
    gate = _Gate(monkeypatch)
    engine.step()
    engine.step()  # version 2 is due: its write is held
    assert gate.entered.wait(180)
    engine.step()  # version 3 trains meanwhile (not due: no second write is started)
    assert engine.version == 3 and not (tmp_path / CHECKPOINT).exists()
    gate.release.set()
    engine.close()
    assert _version_of(tmp_path / CHECKPOINT) == 2
    assert_params_equal(engine.params, straight.params)


def _failing_save(monkeypatch: pytest.MonkeyPatch, version: int, code: int) -> None:
    """Make the checkpoint write of ``version`` fail half-way through its temporary file."""
    real = tensorio.save

    def save(path: Any, obj: Any, **kw: Any) -> None:
        if obj["version"] == version:
            tmp = Path(path).with_name(Path(path).name + ".tmp")
            tmp.write_bytes(tensorio.dumps(obj, share=True)[:1000])
            raise OSError(code, os.strerror(code), str(tmp))
        real(path, obj, **kw)

    monkeypatch.setattr(checkpoint.tensorio, "save", save)


def test_a_failed_background_write_stops_the_next_version_and_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = small_config()
    straight = build_engine(config)
    straight.run(5)
    engine = build_engine(config, run_dir=tmp_path)
    _failing_save(monkeypatch, 2, errno.ENOSPC)
    with pytest.raises(OSError, match="No space left on device") as raised:
        engine.run(5)
    assert raised.value.errno == errno.ENOSPC
    assert engine.version == 3  # surfaced by the version after the failed write
    assert _version_of(tmp_path / CHECKPOINT) == 1 and engine.checkpointed_version == 1
    monkeypatch.undo()
    resumed = build_engine(config, run_dir=tmp_path)
    resumed.resume()
    assert resumed.version == 1 and resumed.resume_warnings == []
    resumed.run(5)
    assert_params_equal(resumed.params, straight.params)


def test_a_failed_last_write_is_raised_by_run_and_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_save(monkeypatch, 2, errno.EROFS)
    with pytest.raises(OSError, match="Read-only file system"):
        build_engine(small_config(), run_dir=tmp_path).run(2)  # the last write is waited for
    engine = build_engine(small_config(), run_dir=tmp_path / "b")
    engine.step()
    engine.step()
    with pytest.raises(OSError, match="Read-only file system"):
        engine.close()
    assert _version_of(tmp_path / "b" / CHECKPOINT) == 1


def test_a_run_stopping_on_another_error_reports_that_one_and_logs_the_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _failing_save(monkeypatch, 1, errno.ENOSPC)
    engine = build_engine(small_config(), run_dir=tmp_path, callbacks=[_Crash(2)])
    with pytest.raises(RuntimeError, match="crash at version 2"):
        engine.run(4)
    assert "the checkpoint of version 1 was not written: [Errno 28]" in caplog.text
    engine.close()  # the failure was reported once; nothing is left to raise


def test_a_full_disk_during_a_background_write_is_one_line_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    _failing_save(monkeypatch, 3, errno.ENOSPC)
    argv = ["--clients", "20", "--fraction", "0.2", "--local-steps", "2", "--no-progress"]
    assert main(["simulate", *argv, "--rounds", "5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The default --backend auto announces its pick before the run (an INFO line, not an error).
    err = [line for line in err if not line.startswith("fedlab: --backend auto picked")]
    assert len(err) == 1 and f"cannot write the run directory {out}: No space" in err[0]
    assert f"--resume {out}" in err[0]
    monkeypatch.undo()
    assert main(["simulate", "--resume", str(out), "--no-progress"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]


KILLED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fedlab import checkpoint, tensorio
    from fedlab.config import RunConfig
    from fedlab.run import build_engine

    run_dir, marker = Path(sys.argv[1]), Path(sys.argv[2])
    real = tensorio.save

    def save(path, obj, **kw):
        if obj["version"] == 3:  # half of version 3's file is on disk, then the process dies
            tmp = Path(path).with_name(Path(path).name + ".tmp")
            data = tensorio.dumps(obj, share=True)
            tmp.write_bytes(data[: len(data) // 2])
            marker.write_text("writing")
            time.sleep(600)
        real(path, obj, **kw)

    checkpoint.tensorio.save = save
    config = RunConfig(clients=30, fraction=0.2, rounds=6, seed=11, local_steps=3)
    build_engine(config, run_dir=run_dir).run(6)
    """
)


def test_a_process_killed_mid_write_leaves_the_last_finished_checkpoint(tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(run_dir), str(marker)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "the child never reached version 3's write"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=180)
    config = small_config(rounds=6)
    resumed = build_engine(config, run_dir=run_dir)
    resumed.resume()
    assert resumed.version == 2 and resumed.resume_warnings == []
    straight = build_engine(config)
    straight.run(6)
    resumed.run(6)
    assert_params_equal(resumed.params, straight.params)


# ------------------------------------------------------------------ checkpoint_every


def test_checkpoint_every_writes_the_multiples_and_the_last_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []
    real = checkpoint.write

    def write(run_dir: Path, snap: checkpoint.Snapshot) -> None:
        written.append(snap.version)
        real(run_dir, snap)

    monkeypatch.setattr(checkpoint, "write", write)
    build_engine(small_config(checkpoint_every=3), run_dir=tmp_path).run(7)
    assert written == [3, 6, 7]
    assert _version_of(tmp_path / CHECKPOINT) == 7
    assert _version_of(tmp_path / PREVIOUS) == 6


class _Crash:
    """Stops the run (like a killed process) once version ``at`` has its metrics row."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        if engine.version == self.at:
            raise RuntimeError(f"crash at version {self.at}")


def test_a_run_resumed_from_a_thinned_checkpoint_ends_as_if_never_stopped(
    tmp_path: Path,
) -> None:
    fast: dict[str, Any] = dict(clients=20, fraction=0.2, local_steps=2, seed=3, rounds=10)
    straight = fedlab.simulate(out=str(tmp_path / "straight"), **fast)
    out = tmp_path / "thinned"
    crash = _Crash(8)
    with pytest.raises(RuntimeError, match="crash at version 8"):
        fedlab.simulate(out=str(out), checkpoint_every=3, callbacks=[crash], **fast)
    assert _version_of(out / CHECKPOINT) == 6  # versions 7 and 8 ran after it
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]  # 8 crashed before its row
    resumed = fedlab.simulate(resume=out)
    assert resumed.versions == list(range(1, 11))  # 7 is done again, not duplicated
    assert_params_equal(resumed.params, straight.params)
    wall = {"wall"}
    assert [{k: v for k, v in r.items() if k not in wall} for r in resumed.rows] == [
        {k: v for k, v in r.items() if k not in wall} for r in straight.rows
    ]


def test_checkpoint_every_is_validated_and_free_to_change_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="checkpoint_every must be at least 1, got 0"):
        RunConfig(checkpoint_every=0)
    assert RunConfig(checkpoint_every=5).fingerprint() == RunConfig().fingerprint()
    assert main(["simulate", "--checkpoint-every", "-1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint_every must be at least 1, got -1" in err[0]
    out = tmp_path / "run"
    fast = ["--clients", "20", "--fraction", "0.2", "--local-steps", "2", "--no-progress"]
    assert main(["simulate", *fast, "--rounds", "2", "--out", str(out)]) == 0
    argv = ["simulate", "--resume", str(out), "--rounds", "4", "--checkpoint-every", "3"]
    assert main([*argv, "--no-progress"]) == 0
    assert _version_of(out / CHECKPOINT) == 4 and _version_of(out / PREVIOUS) == 3


def test_the_server_takes_checkpoint_every() -> None:
    from fedlab.cli import build_parser
    from fedlab.cli.simulate import prepare_config

    args = build_parser().parse_args(
        ["server", "--insecure", "--rounds", "4", "--checkpoint-every", "2", "--out", "r"]
    )
    assert prepare_config(args).checkpoint_every == 2


def test_engine_refuses_checkpoint_every_below_one() -> None:
    built = build_engine(small_config())
    with pytest.raises(ValueError, match="checkpoint_every must be at least 1, got 0"):
        Engine(
            strategy=built.strategy,
            transport=built.transport,
            params={},
            seed=0,
            checkpoint_every=0,
        )
