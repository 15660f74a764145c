"""The final model in the ecosystem's formats, ``fedlab export``, and ``fedlab strategies``."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from fedlab import interchange, registry, tensorio
from fedlab.cli import main
from fedlab.cli import strategies as cli_strategies
from fedlab.interchange import load_safetensors, save_safetensors

FAST = ["--clients", "20", "--fraction", "0.2", "--local-steps", "2", "--rounds", "2"]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        f"{dtype}".replace("torch.", ""): (torch.randn(3, 4, generator=g) * 50).to(dtype)
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    }
    out |= {
        "int64": torch.arange(-5, 7).reshape(3, 4),
        "int8": torch.arange(-6, 6, dtype=torch.int8),
        "uint8": torch.arange(12, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }
    return out


def test_safetensors_written_here_read_by_the_safetensors_package(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    save_safetensors(path, tensors, {"format": "pt", "note": "fedlab"})
    back = st.load_file(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "fedlab"}


def test_safetensors_written_by_the_package_read_here(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.torch")
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    path = tmp_path / "m.safetensors"
    st.save_file(tensors, str(path))
    back = load_safetensors(path)
    assert set(back) == set(tensors)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_own_reader_round_trips_and_header_is_aligned(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    save_safetensors(path, tensors)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    back = load_safetensors(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x01\x00", "shorter than"),
        (struct.pack("<Q", 1 << 40) + b"{}", "impossible"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (
            struct.pack("<Q", 56)
            + b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}'.ljust(56)
            + bytes(8),
            "does not fit",
        ),
        (struct.pack("<Q", 16) + b'{"w":{"x":1}}   ', "malformed"),
    ],
)
def test_bad_safetensors_is_one_clear_error(tmp_path: Path, data: bytes, match: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=match):
        load_safetensors(path)


def test_unstorable_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a tensor"):
        save_safetensors(tmp_path / "x", {"a": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="cannot store"):
        save_safetensors(tmp_path / "x", {"a": torch.zeros(2, dtype=torch.complex64)})
    assert not (tmp_path / "x").exists()


def test_a_run_writes_model_safetensors_equal_to_model_fl(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--out", str(out), "--no-progress"]) == 0
    model = tensorio.load(out / "model.fl")
    st = pytest.importorskip("safetensors.torch")
    back = st.load_file(str(out / "model.safetensors"))
    assert set(back) == set(model) and all(torch.equal(back[k], model[k]) for k in model)


def test_export_both_formats_and_from_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--out", str(out), "--no-progress"]) == 0
    model = tensorio.load(out / "model.fl")
    target = tmp_path / "exported.safetensors"
    assert main(["export", str(out), "--format", "safetensors", "-o", str(target)]) == 0
    assert f"wrote {target} (from model.fl)" in capsys.readouterr().out
    back = load_safetensors(target)
    assert all(torch.equal(back[k], model[k]) for k in model)
    assert main(["export", str(out), "--format", "pt-state-dict"]) == 0
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == set(model) and all(torch.equal(state[k], model[k]) for k in model)
    # A run stopped early has only its checkpoint: export its params.
    (out / "model.fl").unlink()
    assert main(["export", str(out), "-o", str(tmp_path / "ckpt.safetensors")]) == 0
    assert "(from checkpoint.fl)" in capsys.readouterr().out
    ckpt = tensorio.load(out / "checkpoint.fl")["params"]
    back = load_safetensors(tmp_path / "ckpt.safetensors")
    assert all(torch.equal(back[k], ckpt[k]) for k in ckpt)


def test_export_of_a_directory_without_a_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither model.fl nor checkpoint.fl" in err
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--format", "onnx"])
    with pytest.raises(ValueError, match="unknown export format"):
        interchange.export(tmp_path, "onnx")


def test_strategies_prints_one_clean_whole_sentence_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["strategies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    builtin = registry.BUILTIN["strategies"]
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines}
    assert set(builtin) <= set(listed)
    for name in builtin:
        text = listed[name]
        assert "``" not in text and ":class:" not in text and ":mod:" not in text, text
        assert text.endswith((".", ")")), f"{name}: {text!r} is cut mid-sentence"
        assert text == cli_strategies.summary(registry.resolve("strategies", name))
    # The two that the first docstring line used to cut mid-sentence:
    assert listed["median"].endswith("for an even count).")
    assert listed["fed-sb"].endswith("the server averages them.")
    assert listed["fedavg"] == "Weighted average of client deltas, applied by a server optimizer."


def test_plain_strips_markup() -> None:
    text = "See :class:`~fedlab.strategy.Strategy` and :mod:`.fedavg`: ``a * b`` is *big*."
    assert cli_strategies.plain(text) == "See Strategy and fedavg: a * b is big."


def test_strategy_options_with_types_defaults_and_words(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["strategies", "fedavg"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fedavg: Weighted average of client deltas")
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert rows["server_lr"].split()[1:3] == ["float", "1.0"]
    assert "original FedAvg" in rows["server_lr"]  # FedAvg's own words over the base class's
    assert rows["weighting"].split()[1:3] == ["str", "'examples'"]
    assert rows["server_eps"].split()[1:3] == ["float", "0.001"]
    assert "``" not in out
    # Every option of every built-in strategy is listed with a type and a default.
    for name in registry.BUILTIN["strategies"]:
        assert main(["strategies", name]) == 0
        shown = capsys.readouterr().out
        for option, kind, default, _ in cli_strategies.options(
            registry.resolve("strategies", name)
        ):
            assert f"  {option} " in shown and kind and default


def test_unknown_strategy_name_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies", "fedavgg"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Did you mean 'fedavg'" in err
