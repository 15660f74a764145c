"""The workload protocol and the value types and helpers every data source shares.

A workload pairs a model factory with a federation of clients. Client data is never
materialised up front: ``client_data(k)`` rebuilds (or memory-maps) client ``k``'s examples on
every call, so registering a million clients costs a few integers, and the same ``(seed, k)``
gives bit-identical tensors whatever was built before and in any order.

Every random stream is ``numpy.random.default_rng(SeedSequence([seed, PURPOSE, ...]))``; the
global NumPy and torch generators are never read or advanced.
"""

from __future__ import annotations

import difflib
import hashlib
import operator
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlab import seeding
from fedlab.registry import load_dotted

SPLITS: tuple[str, ...] = ("train", "test")
"""``client_data(k, split)``: ``train`` is what client ``k`` trains on; ``test`` is its own
held-out data, disjoint from its training data, for measuring each client on its own
distribution. The workload's global ``test_data()`` stays the common yardstick."""

# Stream purposes. They are part of the data definition: changing one changes every
# client's data for every seed. Kept clear of fedlab.seeding's small purpose numbers.
P_MODEL_INIT = 101
P_SYNTH_CLIENT = 102
P_SYNTH_SHARED = 103
P_SYNTH_TEST_CLIENTS = 104
P_DIGITS_SPLIT = 105
P_IID_PERM = 106
P_IID_SAMPLE = 107
P_DIRICHLET = 108
P_SHARDS = 109
P_LOGNORMAL = 110
P_LABEL_SWAP = 111
P_WLS_TRUE = 112
P_WLS_CLIENT = 113
P_PRETRAIN = 114
P_CLIENT_TEST = 115
P_WLS_CLIENT_TEST = 116
P_CLIENT_SUBSET = 117
P_HF_SPLIT = 118
P_AUGMENT = 119

IntArray = npt.NDArray[np.int64]

rng = seeding.numpy_rng

# A client's held-out share, for workloads that split a central data set: one example for
# every four it trains on (the usual 80/20), drawn from the global test split.
CLIENT_TEST_RATIO = 4


@dataclass(frozen=True)
class ClientData:
    """Supervised examples of one client (or a test set).

    Attributes:
        x: the features; the first dimension indexes examples. float32 for every built-in
            workload except text, whose ``x`` holds int64 token ids.
        y: the targets, one entry per example along the first dimension: int64 class labels
            ``[N]`` for classification (the default objective), float targets ``[N]`` or
            ``[N, d]`` for regression, int64 token ids ``[N, T]`` for next-token prediction
            (see :mod:`fedlab.objectives`).
        augment: an optional random transform of a training batch, ``augment(x, generator)``,
            that the local training loop applies to each batch with the client's training
            stream (CIFAR's crop and flip); ``None`` for no augmentation.
    """

    x: torch.Tensor
    y: torch.Tensor
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.x.dim() == 0 or self.y.dim() == 0 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ClientData needs x and y with a leading example dimension of the same "
                f"length, got x{tuple(self.x.shape)} and y{tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class PublicSample:
    """Labelled examples the *server* may use, disjoint from every client's data.

    A workload that has such a split offers it as ``public_data() -> ClientData``; the
    simulator pairs it with a fresh model of the workload for strategies that initialise from
    data (Fed-SB's gradient initialization), so that no client's private data is read.

    Attributes:
        model: a module of the workload's architecture (its values are overridden by params).
        data: the public examples.
        objective: the workload's objective, a name of :data:`fedlab.objectives.OBJECTIVES`
            (a name, not the object: the objectives module sits above this one): the loss a
            strategy computes on these examples.
    """

    model: nn.Module
    data: ClientData
    objective: str = "classification"


class Workload(Protocol):
    """A model family plus a federation of clients whose data is built on demand.

    A workload may declare what its model is trained to do with an ``objective`` attribute
    (``"regression"``, ``"next-token"``; see :mod:`fedlab.objectives`); without one it is a
    classification workload.
    """

    name: str
    num_clients: int
    num_classes: int

    def make_model(self) -> nn.Module:
        """A freshly initialised model; the same workload seed gives the same weights."""
        ...

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        """Data of ``client_id``: its training data, or (``split="test"``) its own held-out
        data; raises ValueError outside ``[0, num_clients)`` or for an unknown split."""
        ...

    def test_data(self) -> ClientData:
        """The fixed global held-out test set."""
        ...


class MissingExtra(ImportError, ValueError):
    """An optional dependency is not installed; the message says what to install.

    A ValueError too, so the command line reports it as one line like any other bad input.
    """


def unknown(kind: str, value: str, choices: tuple[str, ...] | list[str]) -> ValueError:
    """A ValueError naming the valid choices and the closest ones to ``value``."""
    close = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ValueError(
        f"unknown {kind} {value!r}{hint}; valid choices: {', '.join(repr(c) for c in choices)}"
    )


def check_client_id(client_id: int, num_clients: int) -> int:
    """``client_id`` as an int in ``[0, num_clients)``; ValueError otherwise."""
    try:
        k = operator.index(client_id)
    except TypeError:
        raise ValueError(f"client_id must be an integer, got {client_id!r}") from None
    if not 0 <= k < num_clients:
        raise ValueError(f"client_id {k} is outside [0, {num_clients})")
    return k


def check_split(split: str) -> str:
    """``split`` if it is one of :data:`SPLITS`; ValueError otherwise."""
    if split not in SPLITS:
        raise unknown("split", split, SPLITS)
    return split


def load_model_factory(path: str) -> Callable[[], nn.Module]:
    """The model factory at ``pkg.mod:Factory``, checked to build an ``nn.Module``."""
    factory = load_dotted(path)
    if not callable(factory):
        raise ValueError(f"model {path!r} is not callable (got {type(factory).__name__})")

    def build() -> nn.Module:
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"model factory {path!r} returned {type(model).__name__}, not torch.nn.Module"
            )
        return model

    return build


def seeded_model(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` initialised from the workload seed, the global torch RNG untouched."""
    # fork_rng restores the caller's global torch RNG, so building a model never perturbs
    # training randomness elsewhere; devices=[] skips CUDA, which initialisation never uses.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.derive(seed, P_MODEL_INIT))
        return factory()


def concat(parts: list[ClientData]) -> ClientData:
    """The examples of ``parts``, in order, as one :class:`ClientData`."""
    return ClientData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


def matched_test_indices(
    test_labels: IntArray, train_labels: IntArray, seed: int, client_id: int
) -> IntArray:
    """A client's held-out share of a global test split, label-matched to its training data.

    For workloads that partition a central data set, a client's own test data cannot come out
    of its training examples without changing them, so it is drawn from the global test split:
    ``max(1, n_train // CLIENT_TEST_RATIO)`` examples whose labels follow the client's
    training label histogram (largest remainder), each label's examples drawn without
    replacement while its test pool lasts, from the ``(seed, client)`` stream. Labels absent
    from the test split are skipped.
    """
    size = max(1, len(train_labels) // CLIENT_TEST_RATIO)
    classes = int(max(int(test_labels.max()), int(train_labels.max()) if len(train_labels) else 0))
    counts = np.bincount(train_labels, minlength=classes + 1).astype(np.float64)
    present = np.bincount(test_labels, minlength=classes + 1) > 0
    counts[~present] = 0
    if counts.sum() == 0:  # no training label in the test split: an unmatched draw
        counts = present.astype(np.float64)
    quota = size * counts / counts.sum()
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[: size - int(alloc.sum())]] += 1
    gen = rng(seed, P_CLIENT_TEST, client_id)
    parts = []
    for label in np.flatnonzero(alloc):
        pool = np.flatnonzero(test_labels == label)
        c = int(alloc[label])
        if c <= len(pool):
            parts.append(pool[gen.choice(len(pool), size=c, replace=False)])
        else:
            parts.append(pool[gen.integers(0, len(pool), size=c)])
    out: IntArray = np.concatenate(parts).astype(np.int64)
    return out


def cache_root(data_dir: Path) -> Path:
    """Where caches of ``data_dir`` go: beside the data when writable, else the user's cache."""
    beside = data_dir / ".fedlab-cache"
    try:
        beside.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=beside):
            return beside
    except OSError:
        home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedlab"
        key = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
        path = home / key
        path.mkdir(parents=True, exist_ok=True)
        return path
