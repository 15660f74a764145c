"""Baseline codecs, the --compress flags, and bytes on the wire in metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import Rows, assert_resume_bit_identical, small_config
from fedlab import registry
from fedlab.cli import main
from fedlab.clients.codecs import DTYPES, Float16, Int8, TopK, header, read_header, uvarint
from fedlab.run import build_engine
from fedlab.transforms import TransformContext

CTX = TransformContext(client_id=0, version=0, seed=0)
FAST = ["--clients", "20", "--fraction", "0.25", "--local-steps", "2", "--no-progress"]


def _payload(seed: int, n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, 3, generator=g) * 10, "b": torch.randn(n, generator=g)}


def test_codecs_are_registered_by_kebab_case_name() -> None:
    for name, cls in (("float16", Float16), ("int8", Int8), ("topk", TopK)):
        assert registry.resolve("transforms", name) is cls
    assert "fedzip" in registry.names("transforms")


@given(
    shape=st.lists(st.integers(0, 2**20), min_size=0, max_size=3),
    code=st.integers(0, len(DTYPES) - 1),
)
@settings(max_examples=60, deadline=None)
def test_the_varint_header_round_trips_and_is_small(shape: list[int], code: int) -> None:
    x = torch.zeros((), dtype=DTYPES[code]).expand(shape)  # no memory for huge shapes
    data = header(x) + b"body"
    dtype, got, offset = read_header(data)
    assert (dtype, got, data[offset:]) == (DTYPES[code], tuple(shape), b"body")
    # One byte for dtype and ndim, then 7 bits of each dim a byte.
    assert offset == 1 + sum(max(1, math.ceil(d.bit_length() / 7)) for d in shape)
    for cut in range(offset):
        with pytest.raises(ValueError, match="header"):
            read_header(data[:cut])


def test_a_conv_weight_header_takes_five_bytes_not_eighteen() -> None:
    assert header(torch.zeros(32, 1, 3, 3)) == uvarint(4 * len(DTYPES), 32, 1, 3, 3)
    assert len(header(torch.zeros(32, 1, 3, 3))) == 5
    assert uvarint(300) == bytes([0xAC, 0x02])
    with pytest.raises(ValueError, match="dimension over"):
        read_header(uvarint(1 * len(DTYPES), 2**40))


@given(seed=st.integers(0, 1000), n=st.integers(1, 200))
@settings(max_examples=30, deadline=None)
def test_baseline_codecs_round_trip_within_their_precision(seed: int, n: int) -> None:
    x = _payload(seed, n)
    for codec in (Float16(), Int8()):
        encoded, _ = codec.encode(x, CTX, None)
        out = codec.decode(encoded, CTX)
        for name, t in x.items():
            assert out[name].dtype == t.dtype and out[name].shape == t.shape
            if isinstance(codec, Float16):
                assert torch.allclose(out[name], t, rtol=2**-10, atol=1e-7)
                assert encoded[name + "#float16"].numel() == len(header(t)) + 2 * t.numel()
            else:
                step = float(t.abs().max()) / 127
                assert float((out[name] - t).abs().max()) <= step / 2 + 1e-6
                assert encoded[name + "#int8"].numel() == len(header(t)) + 4 + t.numel()


def test_float16_saturates_instead_of_sending_infinity() -> None:
    out = Float16().decode(Float16().encode({"w": torch.tensor([1e6, -1e6])}, CTX, None)[0], CTX)
    assert out["w"].tolist() == [65504.0, -65504.0]


@given(seed=st.integers(0, 1000), n=st.integers(1, 300), fraction=st.floats(0.001, 1.0))
@settings(max_examples=30, deadline=None)
def test_topk_sends_exactly_the_largest_entries(seed: int, n: int, fraction: float) -> None:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    codec = TopK(fraction=fraction)
    out = codec.decode(codec.encode({"w": x}, CTX, None)[0], CTX)["w"]
    k = max(1, math.ceil(fraction * n))
    sent = out != 0
    assert int(sent.sum()) == k and torch.equal(out[sent], x[sent])
    if k < n:
        assert float(x[sent].abs().min()) >= float(x[~sent].abs().max())


def test_topk_error_feedback_sends_what_it_owed() -> None:
    codec = TopK(fraction=0.5, error_feedback=True)
    x = torch.tensor([4.0, 3.0, 2.0, 1.0])
    enc, state = codec.encode({"w": x}, CTX, None)
    assert codec.decode(enc, CTX)["w"].tolist() == [4.0, 3.0, 0.0, 0.0]
    assert state is not None and state["residual"]["w"].tolist() == [0.0, 0.0, 2.0, 1.0]
    enc, state = codec.encode({"w": torch.tensor([0.0, 0.0, 0.0, 0.5])}, CTX, state)
    assert codec.decode(enc, CTX)["w"].tolist() == [0.0, 0.0, 2.0, 1.5]
    assert state is not None and state["residual"]["w"].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_bad_codec_options_and_mismatched_entries_are_refused() -> None:
    with pytest.raises(ValueError, match="fraction"):
        TopK(fraction=0.0)
    enc, _ = Int8().encode({"w": torch.ones(3)}, CTX, None)
    with pytest.raises(ValueError, match="encoded with 'int8'"):
        Float16().decode(enc, CTX)
    with pytest.raises(ValueError, match=r"malformed|bytes"):
        Int8().decode({"w#int8": enc["w#int8"][:-2]}, CTX)
    with pytest.raises(ValueError, match="may not contain"):
        Int8().encode({"w#x": torch.ones(3)}, CTX, None)


def test_uncompressed_runs_log_the_bytes_of_every_update_and_task() -> None:
    rows = Rows()
    engine = build_engine(small_config(), callbacks=[rows])
    engine.run(3)
    size = sum(t.numel() * t.element_size() for t in engine.params.values())
    for r in rows.rows:
        assert r["bytes_up"] == r["updates"] * size  # FedAvg sends a delta of every param
        assert r["bytes_down"] == r["updates"] * size  # and receives every param
        assert r["compression_ratio"] == 1.0


@pytest.mark.parametrize("codec", ["float16", "int8", "topk"])
def test_every_codec_runs_with_fedavg_and_shrinks_the_upload(codec: str) -> None:
    rows = Rows()
    engine = build_engine(small_config(compress=codec), callbacks=[rows])
    engine.run(2)
    assert all(r["updates"] > 0 and r["rejected"] == 0 for r in rows.rows)
    assert min(r["compression_ratio"] for r in rows.rows) > 1.5


def test_error_feedback_state_survives_resume(tmp_path: Path) -> None:
    config = small_config(compress="fedzip", compress_options={"z": 0.1, "error_feedback": True})
    assert_resume_bit_identical(config, tmp_path / "run", stop=2, end=4)


def test_simulate_with_fedzip_logs_bytes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["simulate", *FAST, "--rounds", "2", "--out", str(out), "--compress", "fedzip"]
    assert main([*argv, "--compress-opt", "z=0.05", "--compress-opt", "error_feedback=true"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
    assert all(r["compression_ratio"] > 5 for r in rows)
    saved = (out / "config.toml").read_text()
    assert 'compress = "fedzip"' in saved and "[compress_options]" in saved
    assert (
        main(["plot", str(out), "--metrics", "accuracy,bytes_up", "-o", str(tmp_path / "p.png")])
        == 0
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compress", "fedzap"], "Did you mean 'fedzip'"),
        (["--compress", "fedzip", "--compress-opt", "zz=0.1"], "valid options: error_feedback, z"),
        (["--compress", "fedzip", "--compress-opt", "z=2"], "z must be in (0, 1]"),
        (["--compress-opt", "z=0.1"], "compress_options given without compress"),
        (
            ["--workload", "digits", "--model", "mlp", "--strategy", "frl", "--compress", "int8"],
            "sends no plain float updates",
        ),
    ],
)
def test_bad_compression_input_gives_a_clear_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", *FAST, "--rounds", "1", "--out", str(tmp_path / "r"), *argv]) == 2
    assert message in capsys.readouterr().err
