"""Per-client train and test splits of the built-in workloads (``client_data(k, split)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlab.data import SPLITS, ClientData, make_workload


def _rows(data: ClientData) -> set[bytes]:
    return {row.numpy().tobytes() for row in data.x.reshape(len(data), -1)}


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("synthetic", {}),
        ("synthetic", {"partition": "natural"}),
        ("digits", {}),
        ("digits", {"partition": "dirichlet", "alpha": 0.1}),
        ("digits", {"partition": "shards"}),
        ("digits-shift", {}),
        ("wls", {}),
    ],
)
def test_client_test_split_is_deterministic_and_held_out(
    name: str, kwargs: dict[str, object]
) -> None:
    w = make_workload(name, num_clients=12, seed=3, **kwargs)  # type: ignore[arg-type]
    again = make_workload(name, num_clients=12, seed=3, **kwargs)  # type: ignore[arg-type]
    for k in (0, 5, 11):
        train, test = w.client_data(k, "train"), w.client_data(k, "test")
        assert len(test) >= 1
        assert torch.equal(train.x, w.client_data(k).x)  # "train" is the default
        other = again.client_data(k, "test")
        assert torch.equal(test.x, other.x) and torch.equal(test.y, other.y)
        assert not _rows(train) & _rows(test)  # held out: no training example reappears


def test_digits_client_test_split_follows_the_client_label_mix() -> None:
    w = make_workload("digits", num_clients=10, seed=0, partition="dirichlet", alpha=0.05)
    for k in range(10):
        train, test = w.client_data(k), w.client_data(k, "test")
        assert len(test) == max(1, len(train) // 4)
        assert set(test.y.tolist()) <= set(train.y.tolist())
        share = np.bincount(train.y.numpy(), minlength=10) / len(train)
        got = np.bincount(test.y.numpy(), minlength=10) / len(test)
        assert np.abs(share - got).max() <= 1 / len(test) + 1e-9


def test_synthetic_client_test_split_is_its_own_held_out_fifth() -> None:
    w = make_workload("synthetic", num_clients=50, seed=1)
    k = w.test_clients()[0]  # type: ignore[attr-defined]
    test = w.client_data(k, "test")
    n = len(w.client_data(k)) + len(test)
    assert len(test) == n // 5
    # The global test set is the concatenation of such held-out parts.
    assert _rows(test) <= _rows(w.test_data())


def test_unknown_split_is_refused_with_the_choices() -> None:
    w = make_workload("digits", num_clients=4, seed=0)
    with pytest.raises(ValueError, match=r"unknown split 'tset'.*'test'"):
        w.client_data(0, "tset")
    assert SPLITS == ("train", "test")
