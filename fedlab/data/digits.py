"""scikit-learn's 8x8 digits, and ``digits-shift`` (the fine-tuning demonstration)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlab import seeding
from fedlab.data.base import (
    P_DIGITS_SPLIT,
    P_LABEL_SWAP,
    P_PRETRAIN,
    ClientData,
    IntArray,
    rng,
    seeded_model,
)
from fedlab.data.partition import LabelPartitioned, LabelSplit
from fedlab.types import Task

DIGITS_CLASSES = 10
# FedStale's heterogeneity construction (Rodio & Neglia): even clients swap 0 <-> 1, odd
# clients 8 <-> 9, on a fraction of each of those labels' examples.
_SWAP_PAIRS = ((0, 1), (8, 9))

# digits-shift: the server's public sample of the target task (Fed-SB's gradient init).
SHIFT_PUBLIC_EXAMPLES = 64
# Central pretraining on the source task: SGD with momentum, seconds on one CPU core.
PRETRAIN_CONFIG = {"lr": 0.1, "local_epochs": 30.0, "batch_size": 32, "momentum": 0.9}
_PRETRAINED: dict[tuple[int, str, tuple[int, ...]], dict[str, torch.Tensor]] = {}


def pretrain(
    model: nn.Module,
    data: ClientData,
    seed: int,
    config: Mapping[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Train ``model`` centrally on ``data`` with the one local training loop; its state.

    ``config`` holds the loop's settings (``lr``, ``local_epochs``, ``batch_size``,
    ``momentum``...; default ``PRETRAIN_CONFIG``). Deterministic for a seed: the batches come
    from the ``(seed, pretrain)`` stream and the loop runs single-threaded (thread count changes
    float sums), the caller's setting restored.
    """
    # Imported here: the training loop sits above the data layer (it imports ClientData).
    from fedlab.client import ClientContext
    from fedlab.clients.sgd import LocalSGD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = ClientContext(client_id=0, seed=seeding.derive(seed, P_PRETRAIN))
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        task = Task(version=0, params=start, config=dict(config or PRETRAIN_CONFIG))
        LocalSGD().fit(model, data, task, None, ctx)  # trains ``model`` in place
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def digits_arrays() -> tuple[npt.NDArray[np.float32], IntArray]:
    """scikit-learn's digits as read-only ``(x in [0, 1], y)`` arrays, loaded once."""
    # Imported lazily: sklearn takes most of a second to import and only digits needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).copy()
    y = np.asarray(bunch.target, dtype=np.int64).copy()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def digits_cnn() -> nn.Module:
    """Two 3x3 convolutions and two dense layers on ``(1, 8, 8)`` images."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, DIGITS_CLASSES),
    )


def digits_mlp() -> nn.Module:
    """One hidden layer of 128 units on the 64 flat pixels."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, DIGITS_CLASSES))


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": digits_cnn, "mlp": digits_mlp}


class DigitsWorkload(LabelPartitioned):
    """scikit-learn's 8x8 digits, split 80/20 by the seed and partitioned lazily.

    The ~1438 training examples are partitioned over clients by
    :class:`~fedlab.data.partition.LabelPartition` (``iid``, ``dirichlet``, ``shards``,
    ``lognormal``). A client's own test data (``client_data(k, "test")``) is a label-matched
    share of the global test split (:func:`~fedlab.data.base.matched_test_indices`), so its
    training data is exactly what it was before per-client test splits existed.

    Features are ``(n, 1, 8, 8)`` for the CNN and for user models, ``(n, 64)`` for the MLP.

    With ``shift`` (``digits-shift``) the training split is cut in three, by the seed: the
    first third is the *source* task (upright digits) on which ``make_model`` pretrains the
    model centrally (cached per process), the next ``SHIFT_PUBLIC_EXAMPLES`` are the server's
    public sample, and the rest is partitioned among clients. Clients, the public sample and
    the test set see the *target* task: the same digits turned 90 degrees counter-clockwise.
    ``split`` maps each part (``test``, ``clients``, and with ``shift`` ``source`` and
    ``public``) to its indices into scikit-learn's digits.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        seed: int,
        split: LabelSplit,
        model: Callable[[], nn.Module],
        flat_features: bool,
        label_swap: float = 0.0,
        shift: bool = False,
        model_name: str = "",
    ) -> None:
        self.name = "digits-shift" if shift else "digits"
        self._model = model
        self._model_name = model_name
        self._label_swap = label_swap
        self._shift = shift

        x_all, y_all = digits_arrays()
        perm = rng(seed, P_DIGITS_SPLIT).permutation(len(y_all))
        n_test = len(y_all) // 5
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        shape = (-1, 64) if flat_features else (-1, 1, 8, 8)
        self._shape = shape
        if shift:
            # Source task (upright, pretraining only), the server's public sample and the
            # clients' pool are disjoint slices of the training split; clients, the public
            # sample and the test set see the target task (digits turned 90 degrees).
            n_source = len(train_idx) // 3
            public_end = n_source + SHIFT_PUBLIC_EXAMPLES
            self._source_idx = train_idx[:n_source]
            self._public_idx = train_idx[n_source:public_end]
            train_idx = train_idx[public_end:]
        self.split = {"test": test_idx, "clients": train_idx}
        if shift:
            self.split.update(source=self._source_idx, public=self._public_idx)
            x_all = np.ascontiguousarray(np.rot90(x_all.reshape(-1, 8, 8), 1, axes=(1, 2)))
            x_all = x_all.reshape(-1, 64)
        super().__init__(
            train_labels=y_all[train_idx],
            test_labels=y_all[test_idx],
            num_classes=DIGITS_CLASSES,
            num_clients=num_clients,
            seed=seed,
            split=split,
        )
        self._x_train = torch.from_numpy(x_all[train_idx]).reshape(shape)
        self._y_train = torch.from_numpy(self.y_train)
        self._test = ClientData(
            torch.from_numpy(x_all[test_idx]).reshape(shape), torch.from_numpy(self.y_test)
        )

    def make_model(self) -> nn.Module:
        model = seeded_model(self.seed, self._model)
        if self._shift:
            model.load_state_dict(self._pretrained())
        return model

    def _pretrained(self) -> dict[str, torch.Tensor]:
        key = (self.seed, self._model_name, tuple(self._shape))
        if key not in _PRETRAINED:
            x_all, y_all = digits_arrays()
            source = ClientData(
                torch.from_numpy(x_all[self._source_idx]).reshape(self._shape),
                torch.from_numpy(y_all[self._source_idx]),
            )
            _PRETRAINED[key] = pretrain(seeded_model(self.seed, self._model), source, self.seed)
        return _PRETRAINED[key]

    def public_data(self) -> ClientData:
        """The server's public sample of the target task (``digits-shift`` only): examples
        disjoint from every client's data, from the pretraining set and from the test set."""
        if not self._shift:
            raise ValueError("workload 'digits' has no public sample; 'digits-shift' has one")
        x_all, y_all = digits_arrays()
        x = np.rot90(x_all.reshape(-1, 8, 8), 1, axes=(1, 2))[self._public_idx]
        return ClientData(
            torch.from_numpy(np.ascontiguousarray(x)).reshape(self._shape),
            torch.from_numpy(y_all[self._public_idx]),
        )

    def test_data(self) -> ClientData:
        return self._test

    def _test_examples(self, idx: IntArray) -> ClientData:
        pick = torch.from_numpy(idx)
        return ClientData(self._test.x[pick], self._test.y[pick])

    def _train_examples(self, client_id: int, idx: IntArray) -> ClientData:
        x = self._x_train[torch.from_numpy(idx)]
        if self._label_swap == 0:
            return ClientData(x, self._y_train[torch.from_numpy(idx)])
        return ClientData(x, torch.from_numpy(self._swap_labels(client_id, idx)))

    def _swap_labels(self, k: int, idx: IntArray) -> IntArray:
        """Client ``k``'s labels with ``round(h * count)`` examples of each label of its pair
        relabelled as the other one, the examples drawn from the ``(seed, k)`` stream."""
        y = self.y_train[idx]
        out = y.copy()
        gen = rng(self.seed, P_LABEL_SWAP, k)
        a, b = _SWAP_PAIRS[k % 2]
        for src, dst in ((a, b), (b, a)):
            where = np.flatnonzero(y == src)
            count = round(self._label_swap * len(where))
            out[gen.choice(where, size=count, replace=False)] = dst
        return out
