"""FedZip (ALGORITHMS.md section 9): top-z, k-means, the three encodings, the reported ratio."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlab.clients.codecs import SEP, read_header
from fedlab.clients.fedzip import (
    GAP,
    HUFFMAN,
    METHODS,
    POSITION,
    FedZip,
    decode_symbols,
    encode_symbols,
    encoded_bits,
    huffman_lengths,
    kmeans,
    topz,
)
from fedlab.transforms import TransformContext

CTX = TransformContext(client_id=3, version=0, seed=0)


def _tensor(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- (a) top-z


@given(seed=st.integers(0, 10_000), n=st.integers(1, 400), z=st.floats(0.001, 1.0))
@settings(max_examples=60, deadline=None)
def test_topz_keeps_exactly_ceil_zn_of_the_largest(seed: int, n: int, z: float) -> None:
    x = _tensor(seed, (n,))  # continuous values: no ties
    out = topz(x, z)
    keep = min(n, math.ceil(z * n))
    kept = out != 0
    assert int(kept.sum()) == keep
    assert torch.equal(out[kept], x[kept])  # kept entries are unchanged
    if keep < n:
        assert float(x[kept].abs().min()) >= float(x[~kept].abs().max())


# --------------------------------------------------------------------------- (b) k-means


@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), k=st.integers(2, 8))
@settings(max_examples=60, deadline=None)
def test_at_most_k_distinct_values_after_quantization(seed: int, n: int, k: int) -> None:
    x = topz(_tensor(seed, (n, 1)), 0.2)
    codec = FedZip(k=k)
    encoded, _ = codec.encode({"w": x}, CTX, None)
    out = codec.decode(encoded, CTX)["w"]
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.unique(out).numel() <= k


def test_lloyd_is_the_standard_update() -> None:
    # Two obvious groups; linspace init puts one centroid at each end and one in the middle.
    v = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.2, -1.0, -1.4])
    c, a = kmeans(v, 3, 4)
    assert c.tolist() == pytest.approx([-1.2, 0.0, 1.1])
    assert a.tolist() == [1, 1, 1, 1, 2, 2, 0, 0]
    # An empty cluster disappears instead of producing NaN.
    c, a = kmeans(torch.tensor([5.0, 5.0, 5.0]), 3, 4)
    assert c.tolist() == [5.0] and a.tolist() == [0, 0, 0]


def test_quantile_init_and_options_are_checked() -> None:
    c, _ = kmeans(_tensor(0, (100,)), 4, 2, "quantile")
    assert c.numel() == 4
    for bad in ({"z": 0.0}, {"z": 1.5}, {"k": 1}, {"k": 33}, {"iterations": -1}):
        with pytest.raises(ValueError, match="fedzip"):
            FedZip(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="init"):
        FedZip(init="kmeans++")
    with pytest.raises(ValueError, match="encodings"):
        FedZip(encodings=("zip",))
    assert FedZip(encodings="gap").encodings == ("gap",)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- (c, d) encodings


@st.composite
def symbol_arrays(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    k = draw(st.integers(1, 6))
    n = draw(st.integers(0, 300))
    weights = draw(st.lists(st.floats(0.01, 1.0), min_size=k, max_size=k))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    p = np.asarray(weights) / sum(weights)
    return rng.choice(k, size=n, p=p).astype(np.int64), k


@pytest.mark.parametrize("method", [HUFFMAN, POSITION, GAP])
@given(case=symbol_arrays())
@settings(max_examples=80, deadline=None)
def test_each_encoding_round_trips_and_its_size_is_exact(
    method: int, case: tuple[np.ndarray, int]
) -> None:
    symbols, k = case
    blob = encode_symbols(symbols, k, [method])
    assert blob[0] & 3 == method
    assert np.array_equal(decode_symbols(blob, k, symbols.size), symbols)
    counts = np.bincount(symbols, minlength=k).tolist()
    # Index-list sizes are varints (7 bits a byte); the gap code adds one Rice byte per list.
    listed = [c for s, c in enumerate(counts) if s != int(np.argmax(counts))]
    varints = sum(max(1, math.ceil(c.bit_length() / 7)) for c in listed)
    head = {HUFFMAN: k, POSITION: varints, GAP: varints + len(listed)}[method]
    assert len(blob) == 1 + head + (encoded_bits(method, symbols, counts) + 7) // 8


def test_position_costs_ceil_log2_n_bits_per_index() -> None:
    n = 1000
    symbols = np.zeros(n, dtype=np.int64)
    symbols[[3, 500, 999]] = [1, 2, 1]
    counts = np.bincount(symbols, minlength=3).tolist()
    assert encoded_bits(POSITION, symbols, counts) == 3 * math.ceil(math.log2(n))


def test_the_smallest_encoding_is_chosen() -> None:
    rng = np.random.default_rng(0)
    dense = rng.choice(3, size=2000, p=[0.4, 0.3, 0.3]).astype(np.int64)
    sparse = np.zeros(20_000, dtype=np.int64)
    sparse[rng.choice(20_000, 40, replace=False)] = 1
    assert encode_symbols(dense, 3)[0] & 3 == HUFFMAN
    assert encode_symbols(sparse, 2)[0] & 3 in (POSITION, GAP)
    for symbols, k in ((dense, 3), (sparse, 2)):
        best = encode_symbols(symbols, k)
        assert all(len(best) <= len(encode_symbols(symbols, k, [m])) for m in range(3))


@given(counts=st.lists(st.integers(1, 10_000), min_size=2, max_size=12))
@settings(max_examples=100, deadline=None)
def test_huffman_lengths_satisfy_kraft_and_sit_within_a_bit_of_entropy(counts: list[int]) -> None:
    lengths = huffman_lengths(counts)
    assert sum(2.0**-ln for ln in lengths) <= 1.0 + 1e-12
    p = np.asarray(counts, dtype=float) / sum(counts)
    entropy = float(-(p * np.log2(p)).sum())
    expected = float((p * np.asarray(lengths)).sum())
    assert entropy - 1e-9 <= expected < entropy + 1


def test_huffman_gives_the_most_frequent_of_three_symbols_one_bit() -> None:
    # The reference code's bug gave the *least* frequent symbol the long code.
    assert huffman_lengths([10, 800, 190]) == [2, 1, 2]


def test_a_corrupt_stream_is_refused_not_misread() -> None:
    codec = FedZip(z=0.1)
    encoded, _ = codec.encode({"w": _tensor(1, (50, 40))}, CTX, None)
    blob = encoded["w#fedzip"]
    with pytest.raises(ValueError):
        codec.decode({"w#fedzip": blob[: blob.numel() // 2]}, CTX)
    with pytest.raises(ValueError, match="encoded with"):
        codec.decode({"w#int8": blob}, CTX)


# --------------------------------------------------------------------------- the transform


def test_decode_of_encode_is_exactly_the_quantizer_output() -> None:
    codec = FedZip()
    x = {"conv.weight": _tensor(2, (16, 8, 3, 3)), "conv.bias": _tensor(3, (16,))}
    encoded, state = codec.encode(x, CTX, None)
    assert state is None
    assert set(encoded) == {"conv.weight" + SEP + "fedzip", "conv.bias" + SEP + "fedzip"}
    assert all(v.dtype == torch.uint8 and v.dim() == 1 for v in encoded.values())
    out = codec.decode(encoded, CTX)
    for name, t in x.items():
        centroids, symbols = codec.quantize(t)
        assert torch.equal(out[name], centroids[symbols].reshape(t.shape))
    # Biases are quantized but not sparsified; weights keep about z of their entries.
    assert (out["conv.weight"] == out["conv.weight"].flatten().mode().values).float().mean() > 0.5
    assert torch.unique(out["conv.bias"]).numel() == 3


def test_float64_and_empty_tensors_round_trip() -> None:
    codec = FedZip()
    x = {"w": _tensor(4, (30, 30)).double(), "e": torch.zeros(0, 3)}
    out = codec.decode(codec.encode(x, CTX, None)[0], CTX)
    assert out["w"].dtype == torch.float64 and out["e"].shape == (0, 3)


def test_non_float_entries_pass_through_and_all_int_payloads_are_refused() -> None:
    codec = FedZip()
    ranks = torch.randperm(20)
    encoded, _ = codec.encode({"w": _tensor(5, (8, 8)), "rank": ranks}, CTX, None)
    assert torch.equal(encoded["rank"], ranks)
    assert torch.equal(codec.decode(encoded, CTX)["rank"], ranks)
    with pytest.raises(ValueError, match="floating-point"):
        codec.encode({"rank": ranks}, CTX, None)


# --------------------------------------------------------------------------- (e) the ratio


def test_reported_ratio_is_32n_over_the_bits_sent() -> None:
    from conftest import Rows
    from fedlab.config import RunConfig
    from fedlab.run import build_engine

    rows = Rows()
    config = RunConfig(
        clients=10,
        fraction=0.3,
        rounds=2,
        seed=1,
        local_steps=2,
        compress="fedzip",
        compress_options={"z": 0.1},
    )
    engine = build_engine(config, callbacks=[rows])
    sent: list[int] = []
    entries: list[int] = []
    original = engine._receive

    def spy(update):  # type: ignore[no-untyped-def]
        sent.append(sum(t.numel() for t in update.payload.values()))  # uint8: one per byte
        for key, blob in update.payload.items():
            entries.append(math.prod(read_header(blob.numpy().tobytes())[1]))
            assert key.endswith(SEP + "fedzip")
        original(update)

    engine._receive = spy  # type: ignore[method-assign]
    engine.run(2)
    assert sum(r["bytes_up"] for r in rows.rows) == sum(sent)
    for r in rows.rows:
        assert r["compression_ratio"] > 5
    total_ratio = sum(r["compression_ratio"] * r["bytes_up"] for r in rows.rows) / sum(sent)
    assert total_ratio == pytest.approx(32 * sum(entries) / (8 * sum(sent)))


# --------------------------------------------------------------------------- (f) error, EF


def test_lossy_error_is_bounded_by_sparsification_plus_quantization() -> None:
    x = _tensor(6, (40, 50))
    codec = FedZip()
    q = codec.decode(codec.encode({"w": x}, CTX, None)[0], CTX)["w"]
    s = topz(x, codec.z)
    c, a = kmeans(s, codec.k, codec.iterations)
    quant = float((s - c[a].reshape(s.shape)).norm())
    assert float((x - q).norm()) <= float((x - s).norm()) + quant + 1e-5


def test_error_feedback_carries_the_residual_into_the_next_update() -> None:
    codec = FedZip(z=0.05, error_feedback=True)
    x1, x2 = _tensor(7, (20, 20)), _tensor(8, (20, 20))
    enc1, state = codec.encode({"w": x1}, CTX, None)
    sent1 = codec.decode(enc1, CTX)["w"]
    assert state is not None
    assert torch.allclose(state["residual"]["w"], x1 - sent1)
    enc2, state2 = codec.encode({"w": x2}, CTX, state)
    sent2 = codec.decode(enc2, CTX)["w"]
    # What was sent over both versions plus what is still owed is exactly what was produced.
    assert state2 is not None
    assert torch.allclose(sent1 + sent2 + state2["residual"]["w"], x1 + x2, atol=1e-6)
    # Without error feedback the second encoding ignores the first one's residual.
    plain = FedZip(z=0.05)
    centroids, symbols = plain.quantize(x2)
    out = plain.decode(plain.encode({"w": x2}, CTX, state)[0], CTX)["w"]
    assert torch.equal(out, centroids[symbols].reshape(20, 20))


def test_every_encoding_can_be_forced() -> None:
    x = {"w": _tensor(9, (64, 64))}
    for name in METHODS:
        codec = FedZip(encodings=(name,))
        encoded, _ = codec.encode(x, CTX, None)
        blob = encoded["w#fedzip"].numpy().tobytes()
        # header: dtype and ndim, 2 dims (one varint byte each); then k and k float32
        # centroids; then the lead byte, the method in its low 2 bits.
        k = blob[1 + 2]
        assert blob[1 + 2 + 1 + 4 * k] & 3 == METHODS.index(name)
        default = FedZip().encode(x, CTX, None)[0]
        assert torch.equal(codec.decode(encoded, CTX)["w"], FedZip().decode(default, CTX)["w"])
