"""Tests for fedlab.data: lazy, deterministic workloads and partitioners."""

from __future__ import annotations

import re
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlab.data import (
    PARTITIONS,
    WORKLOADS,
    ClientData,
    Workload,
    load_dotted,
    make_workload,
)

DIGITS_TRAIN = 1797 - 1797 // 5


def _same(a: ClientData, b: ClientData) -> bool:
    return torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def _indices(w: Workload, k: int) -> np.ndarray:
    return np.asarray(getattr(w, "client_indices")(k))  # noqa: B009 - not in the Protocol


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    ("name", "partition"),
    [("synthetic", "iid"), ("synthetic", "natural")]
    + [("digits", p) for p in PARTITIONS if p != "natural"],
)
def test_same_seed_and_client_give_identical_data_in_any_order(name: str, partition: str) -> None:
    first = make_workload(name, num_clients=50, seed=7, partition=partition)
    forward = [first.client_data(k) for k in (3, 17, 42)]
    again = first.client_data(17)
    fresh = make_workload(name, num_clients=50, seed=7, partition=partition)
    backward = [fresh.client_data(k) for k in (42, 17, 3)][::-1]
    for a, b in zip(forward, backward, strict=True):
        assert _same(a, b)
    assert _same(again, forward[1])
    assert _same(first.test_data(), fresh.test_data())


@pytest.mark.parametrize(
    ("name", "partition"),
    [("synthetic", "iid"), ("synthetic", "natural")]
    + [("digits", p) for p in PARTITIONS if p != "natural"],
)
def test_clients_and_seeds_differ(name: str, partition: str) -> None:
    w = make_workload(name, num_clients=50, seed=1, partition=partition)
    assert not _same(w.client_data(0), w.client_data(1))
    other = make_workload(name, num_clients=50, seed=2, partition=partition)
    assert not _same(w.client_data(0), other.client_data(0))


def test_global_rng_is_untouched() -> None:
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()  # type: ignore[index]
    w = make_workload("synthetic", num_clients=10, seed=0, model="mlp")
    w.make_model()
    w.client_data(3)
    w.test_data()
    make_workload("digits", num_clients=10, seed=0, partition="dirichlet").client_data(1)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state, np.random.get_state()[1])  # type: ignore[index]


def test_make_model_is_deterministic_per_seed() -> None:
    a = make_workload("digits", num_clients=2, seed=5).make_model().state_dict()
    b = make_workload("digits", num_clients=2, seed=5).make_model().state_dict()
    c = make_workload("digits", num_clients=2, seed=6).make_model().state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_client_shapes_and_split() -> None:
    w = make_workload("synthetic", num_clients=100, seed=3)
    assert (w.name, w.num_classes) == ("synthetic", 10)
    for k in range(20):
        d = w.client_data(k)
        # 50..1000 examples, 80% kept for training.
        assert 40 <= len(d) <= 800
        assert d.x.shape == (len(d), 60)
        assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
        assert int(d.y.min()) >= 0 and int(d.y.max()) < 10


def test_synthetic_rejects_partitions_other_than_iid_and_natural() -> None:
    with pytest.raises(ValueError, match="Synthetic-IID"):
        make_workload("synthetic", num_clients=10, seed=0, partition="dirichlet")
    with pytest.raises(ValueError, match="no natural"):
        make_workload("digits", num_clients=10, seed=0, partition="natural")


def test_synthetic_iid_variant_shares_the_labelling_model() -> None:
    iid = make_workload("synthetic", num_clients=20, seed=0, partition="iid")
    non = make_workload(
        "synthetic",
        num_clients=20,
        seed=0,
        partition="natural",
        synthetic_alpha=0,
        synthetic_beta=1,
    )
    # v = 0 for every client in the IID variant; non-IID clients have shifted means.
    iid_means = torch.stack([iid.client_data(k).x.mean(0) for k in range(20)])
    non_means = torch.stack([non.client_data(k).x.mean(0) for k in range(20)])
    assert float(iid_means.abs().mean()) < 0.2 < float(non_means.abs().mean())


def test_million_client_synthetic_is_lazy_and_bounded() -> None:
    tracemalloc.start()
    w = make_workload("synthetic", num_clients=1_000_000, seed=0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20
    start = time.perf_counter()
    last = w.client_data(999_999)
    test = w.test_data()
    assert time.perf_counter() - start < 2.0
    assert len(last) > 0
    assert len(test) <= 200 * 200  # at most 200 clients, 20% of at most 1000 each
    assert w.test_data() is test
    for bad in (-1, 1_000_000):
        with pytest.raises(ValueError, match="outside"):
            w.client_data(bad)


def test_synthetic_test_set_is_fixed_for_small_federations() -> None:
    w = make_workload("synthetic", num_clients=3, seed=4)
    again = make_workload("synthetic", num_clients=3, seed=4)
    assert _same(w.test_data(), again.test_data())
    assert 30 <= len(w.test_data()) <= 3 * 200


# --------------------------------------------------------------------------- digits


def test_digits_construction_is_lazy_for_a_million_clients() -> None:
    make_workload("digits", num_clients=1, seed=0)  # load sklearn's arrays outside the trace
    tracemalloc.start()
    w = make_workload("digits", num_clients=1_000_000, seed=0, partition="dirichlet")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20
    assert len(w.client_data(999_999)) == 8


def test_digits_test_set_is_global_and_disjoint_from_training() -> None:
    w = make_workload("digits", num_clients=1, seed=0, model="mlp")
    test, train = w.test_data(), w.client_data(0)
    assert len(test) == 1797 // 5 and len(train) == DIGITS_TRAIN
    assert float(test.x.min()) >= 0.0 and float(test.x.max()) <= 1.0
    rows = {tuple(r) for r in train.x.tolist()}
    # Digits has a few duplicate images, so allow a handful of coincidences.
    assert sum(tuple(r) in rows for r in test.x.tolist()) < 10


def test_iid_is_a_balanced_disjoint_partition() -> None:
    w = make_workload("digits", num_clients=10, seed=0, partition="iid")
    parts = [_indices(w, k) for k in range(10)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == DIGITS_TRAIN and max(sizes) - min(sizes) <= 1
    assert len(np.unique(np.concatenate(parts))) == DIGITS_TRAIN


def test_iid_with_many_clients_samples_a_floor_of_examples() -> None:
    w = make_workload("digits", num_clients=1000, seed=0, partition="iid")
    for k in (0, 500, 999):
        idx = _indices(w, k)
        assert len(idx) == 8 and len(np.unique(idx)) == 8


def _max_label_share(w: Workload, clients: int) -> float:
    shares = []
    for k in range(clients):
        y = w.client_data(k).y
        shares.append(float(torch.bincount(y, minlength=10).max()) / len(y))
    return float(np.mean(shares))


def test_dirichlet_alpha_controls_label_skew() -> None:
    skewed = make_workload("digits", num_clients=10, seed=0, partition="dirichlet", alpha=0.05)
    uniform = make_workload("digits", num_clients=10, seed=0, partition="dirichlet", alpha=1000)
    assert _max_label_share(skewed, 10) > 0.6
    assert _max_label_share(uniform, 10) < 0.25
    assert all(len(skewed.client_data(k)) == DIGITS_TRAIN // 10 for k in range(10))


def test_dirichlet_examples_are_distinct_within_a_client() -> None:
    w = make_workload("digits", num_clients=10, seed=0, partition="dirichlet", alpha=1.0)
    for k in range(10):
        idx = _indices(w, k)
        assert len(np.unique(idx)) == len(idx)


def test_shards_limit_labels_per_client() -> None:
    w = make_workload("digits", num_clients=10, seed=0, partition="shards", shards_per_client=2)
    parts = [_indices(w, k) for k in range(10)]
    for k in range(10):
        assert len(torch.unique(w.client_data(k).y)) <= 2
    # Few enough shards that they tile the training set exactly once.
    everything = np.concatenate(parts)
    assert len(everything) == DIGITS_TRAIN and len(np.unique(everything)) == DIGITS_TRAIN


def test_shards_with_more_shards_than_examples_still_feed_every_client() -> None:
    w = make_workload("digits", num_clients=1000, seed=0, partition="shards", shards_per_client=3)
    for k in range(0, 1000, 97):
        d = w.client_data(k)
        assert len(d) >= 3 and len(torch.unique(d.y)) <= 3


def test_lognormal_sigma_controls_size_spread() -> None:
    flat = make_workload("digits", num_clients=20, seed=0, partition="lognormal", sigma=0.0)
    spread = make_workload("digits", num_clients=20, seed=0, partition="lognormal", sigma=1.0)
    flat_sizes = {len(flat.client_data(k)) for k in range(20)}
    spread_sizes = [len(spread.client_data(k)) for k in range(20)]
    assert flat_sizes == {round(DIGITS_TRAIN / 20)}
    assert len(set(spread_sizes)) > 10 and max(spread_sizes) > 2 * min(spread_sizes)


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("name", "model", "feature_shape"),
    [
        ("synthetic", "default", (60,)),
        ("synthetic", "logreg", (60,)),
        ("synthetic", "mlp", (60,)),
        ("digits", "default", (1, 8, 8)),
        ("digits", "cnn", (1, 8, 8)),
        ("digits", "mlp", (64,)),
    ],
)
def test_models_accept_client_data(name: str, model: str, feature_shape: tuple[int, ...]) -> None:
    w = make_workload(name, num_clients=5, seed=0, model=model)
    d = w.client_data(2)
    assert tuple(d.x.shape[1:]) == feature_shape
    out = w.make_model()(d.x)
    assert out.shape == (len(d), w.num_classes)
    assert w.make_model()(w.test_data().x).shape == (len(w.test_data()), w.num_classes)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"name": "synthtic"}, ["synthtic", "synthetic"]),
        ({"name": "digit"}, ["digits"]),
        ({"name": "custom"}, ["data="]),
        ({"name": "digits", "model": "cnnn"}, ["cnnn", "cnn", "mlp"]),
        ({"name": "synthetic", "model": "cnn"}, ["cnn", "logreg"]),
        ({"name": "digits", "partition": "dirichlett"}, ["dirichlet", "shards"]),
        ({"name": "digits", "num_clients": 0}, ["num_clients"]),
        ({"name": "digits", "seed": -1}, ["seed"]),
        ({"name": "digits", "alpha": 0.0}, ["alpha"]),
        ({"name": "digits", "alpha": float("nan")}, ["alpha"]),
        ({"name": "digits", "sigma": -0.5}, ["sigma"]),
        ({"name": "digits", "shards_per_client": 0}, ["shards_per_client"]),
        ({"name": "synthetic", "synthetic_beta": -1.0}, ["synthetic_beta"]),
        ({"name": "digits", "model": "no_such_pkg_xyz:Net"}, ["no_such_pkg_xyz"]),
        ({"name": "digits", "model": "collections:NoSuchNet"}, ["NoSuchNet"]),
        ({"name": "digits", "data": "collections:OrderedDict"}, ["custom"]),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict[str, object], words: list[str]) -> None:
    args: dict[str, object] = {"num_clients": 4, "seed": 0, **kwargs}
    with pytest.raises(ValueError) as info:
        make_workload(**args)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value)


def test_load_dotted() -> None:
    assert load_dotted("os.path:join") is __import__("os").path.join
    assert load_dotted("collections:OrderedDict.fromkeys") is not None
    with pytest.raises(ValueError, match="is not a dotted path"):
        load_dotted("os.path.join")
    with pytest.raises(ValueError, match=re.escape("cannot import module 'no_such_pkg_xyz.mod'")):
        load_dotted("no_such_pkg_xyz.mod:f")
    with pytest.raises(ValueError, match="failed at 'nope'"):
        load_dotted("collections:OrderedDict.nope")


def test_load_dotted_wraps_errors_raised_while_importing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fl_broken_mod.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="RuntimeError: boom"):
        load_dotted("fl_broken_mod:f")


# --------------------------------------------------------------------------- user data

_USER_MODULE = """
import torch
from fedlab.data import ClientData

def load_client(client_id, num_clients, seed):
    g = torch.Generator().manual_seed(seed * 1000 + client_id)
    x = torch.randn(5 + client_id, 3, generator=g)
    return x, (x.sum(1) > 0).long() + (client_id % 2)

def bad_dtype(client_id, num_clients, seed):
    return torch.zeros(4, 3), torch.zeros(4)

def bad_length(client_id, num_clients, seed):
    return torch.zeros(4, 3), torch.zeros(3, dtype=torch.long)

def bad_type(client_id, num_clients, seed):
    return [1, 2, 3]

def not_finite(client_id, num_clients, seed):
    return torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "fl_user_data.py").write_text(textwrap.dedent(_USER_MODULE))
    (tmp_path / "fl_user_data_test.py").write_text(
        _USER_MODULE
        + "\ndef load_test(seed):\n    return ClientData(torch.ones(7, 3), torch.arange(7) % 4)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fl_user_data"
    for name in ("fl_user_data", "fl_user_data_test"):
        sys.modules.pop(name, None)


def test_user_data_without_load_test_uses_first_clients(user_module: str) -> None:
    w = make_workload(
        "custom",
        num_clients=60,
        seed=1,
        data=f"{user_module}:load_client",
        model=f"{user_module}:Net",
    )
    assert w.name == "custom" and w.num_clients == 60
    assert len(w.test_data()) == sum(5 + k for k in range(50))
    assert w.num_classes == 3
    d = w.client_data(59)
    assert len(d) == 64 and d.x.dtype == torch.float32
    assert w.make_model()(d.x).shape == (64, 3)
    with pytest.raises(ValueError, match="outside"):
        w.client_data(60)


def test_user_data_with_load_test_and_builtin_model(user_module: str) -> None:
    w = make_workload("custom", num_clients=3, seed=1, data=f"{user_module}_test:load_client")
    assert len(w.test_data()) == 7 and w.num_classes == 4
    d = w.client_data(1)
    assert w.make_model()(d.x).shape == (len(d), 4)
    mlp = make_workload(
        "custom", num_clients=3, seed=1, data=f"{user_module}_test:load_client", model="mlp"
    )
    assert mlp.make_model()(d.x).shape == (len(d), 4)


@pytest.mark.parametrize(
    ("function", "words"),
    [
        ("bad_dtype", "dtype"),
        ("bad_length", "same number of examples"),
        ("bad_type", "ClientData or a (x, y) tuple"),
        ("not_finite", "non-finite"),
        ("missing_function", "no attribute"),
    ],
)
def test_user_data_is_validated(user_module: str, function: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        make_workload("custom", num_clients=2, seed=0, data=f"{user_module}:{function}")
    assert function in str(info.value)


def test_public_constants() -> None:
    assert WORKLOADS == ("synthetic", "digits")
    assert PARTITIONS == ("natural", "iid", "dirichlet", "shards", "lognormal")


def test_user_data_rejects_unknown_model_names(user_module: str) -> None:
    with pytest.raises(ValueError, match="cnn") as info:
        make_workload(
            "custom", num_clients=2, seed=0, data=f"{user_module}:load_client", model="cnn"
        )
    assert "logreg" in str(info.value)
