"""Where client data comes from: workloads, partitioners and user-supplied data.

A workload pairs a model factory with a federation of clients. Client data is never
materialised up front: ``client_data(k)`` rebuilds client ``k``'s examples from
``(seed, k)`` on every call, so registering a million clients costs a few integers, and the
same ``(seed, k)`` gives bit-identical tensors whatever was built before and in any order.

Every random stream is ``numpy.random.default_rng(SeedSequence([seed, PURPOSE, ...]))``; the
global NumPy and torch generators are never read or advanced.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlab import seeding
from fedlab.registry import load_dotted
from fedlab.types import Params, Task

__all__ = [
    "PARTITIONS",
    "WORKLOADS",
    "ClientData",
    "PublicSample",
    "Workload",
    "load_dotted",
    "make_workload",
    "unpack_wls",
]

WORKLOADS: tuple[str, ...] = ("synthetic", "digits")
PARTITIONS: tuple[str, ...] = ("natural", "iid", "dirichlet", "shards", "lognormal")
"""``natural``: the workload's own per-client split (LEAF Synthetic(alpha, beta), or the
user's ``load_client``); the others split a central data set (``iid`` on synthetic is LEAF's
Synthetic-IID)."""

DEFAULT_PARTITION = {
    "synthetic": "iid",
    "digits": "iid",
    "digits-shift": "iid",
    "wls": "natural",
    "custom": "natural",
}

# Stream purposes. They are part of the data definition: changing one changes every
# client's data for every seed. Kept clear of fedlab.seeding's small purpose numbers.
_P_MODEL_INIT = 101
_P_SYNTH_CLIENT = 102
_P_SYNTH_SHARED = 103
_P_SYNTH_TEST_CLIENTS = 104
_P_DIGITS_SPLIT = 105
_P_IID_PERM = 106
_P_IID_SAMPLE = 107
_P_DIRICHLET = 108
_P_SHARDS = 109
_P_LOGNORMAL = 110
_P_LABEL_SWAP = 111
_P_WLS_TRUE = 112
_P_WLS_CLIENT = 113
_P_PRETRAIN = 114

# Below this many examples per client a disjoint split is too thin to train on, so clients
# instead sample this many examples from the shared pool (see ``_DigitsWorkload``).
_MIN_CLIENT_EXAMPLES = 8

_SYNTH_DIM = 60
_SYNTH_CLASSES = 10
# LEAF draws lognormal(4, 2) + 50 examples, which is unbounded (a few clients get 10^5+);
# capping keeps per-client cost and the test set bounded while leaving the median (~105)
# untouched.
_SYNTH_MAX_EXAMPLES = 1000
_SYNTH_TEST_FRACTION_DENOM = 5  # 1/5 = 20% of each client held out
_SYNTH_MAX_TEST_CLIENTS = 200
_SYNTH_STD = np.arange(1, _SYNTH_DIM + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)

_DIGITS_CLASSES = 10
# FedStale's heterogeneity construction (Rodio & Neglia): even clients swap 0 <-> 1, odd
# clients 8 <-> 9, on a fraction of each of those labels' examples.
_SWAP_PAIRS = ((0, 1), (8, 9))
_CUSTOM_TEST_CLIENTS = 50

# The WLS regression workload (ADMM-WLS): w° ~ N(0, I_d) once per seed; client k draws
# X_k ~ N(0, 1) (n_k x d), weights psi_i ~ U[0.5, 2] and y_i = x_i w° + nu_i with
# nu_i ~ N(0, sigma^2 / psi_i), so the WLS weights are the inverse noise variances (WLS is
# then the best linear unbiased estimator).
WLS_DIM = 8
WLS_EXAMPLES = 20
WLS_NOISE_STD = 0.1
_WLS_PSI_RANGE = (0.5, 2.0)

_IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class ClientData:
    """Supervised examples of one client (or a test set).

    Attributes:
        x: float32 features; the first dimension indexes examples.
        y: int64 class labels, one per example.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() == 0 or self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"ClientData needs x with a leading example dimension and 1-D y of the same "
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
    """

    model: nn.Module
    data: ClientData


class Workload(Protocol):
    """A model family plus a federation of clients whose data is built on demand."""

    name: str
    num_clients: int
    num_classes: int

    def make_model(self) -> nn.Module:
        """A freshly initialised model; the same workload seed gives the same weights."""
        ...

    def client_data(self, client_id: int) -> ClientData:
        """Training data of ``client_id``; raises ValueError outside ``[0, num_clients)``."""
        ...

    def test_data(self) -> ClientData:
        """The fixed global held-out test set."""
        ...


# --------------------------------------------------------------------------- helpers


_rng = seeding.numpy_rng


def _unknown(kind: str, value: str, choices: tuple[str, ...] | list[str]) -> ValueError:
    close = difflib.get_close_matches(value, list(choices), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ValueError(
        f"unknown {kind} {value!r}{hint}; valid choices: {', '.join(repr(c) for c in choices)}"
    )


def _check_client_id(client_id: int, num_clients: int) -> int:
    try:
        k = operator.index(client_id)
    except TypeError:
        raise ValueError(f"client_id must be an integer, got {client_id!r}") from None
    if not 0 <= k < num_clients:
        raise ValueError(f"client_id {k} is outside [0, {num_clients})")
    return k


def _load_model_factory(path: str) -> Callable[[], nn.Module]:
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


def _seeded_model(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    # fork_rng restores the caller's global torch RNG, so building a model never perturbs
    # training randomness elsewhere; devices=[] skips CUDA, which initialisation never uses.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeding.derive(seed, _P_MODEL_INIT))
        return factory()


def _concat(parts: list[ClientData]) -> ClientData:
    return ClientData(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))


# --------------------------------------------------------------------------- synthetic


def _synthetic_logreg() -> nn.Module:
    return nn.Linear(_SYNTH_DIM, _SYNTH_CLASSES)


def _synthetic_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(_SYNTH_DIM, 64), nn.ReLU(), nn.Linear(64, _SYNTH_CLASSES))


class _SyntheticWorkload:
    """LEAF / FedProx Synthetic(alpha, beta), generated one client at a time.

    Client ``k`` draws, from its own stream: ``n_k = 50 + min(int(lognormal(4, 2)), 950)``
    examples (LEAF's quantity skew, capped at 1000), ``u_k ~ N(0, alpha)``,
    ``B_k ~ N(0, beta)``, ``W_k ~ N(u_k, 1)`` (10x60), ``b_k ~ N(u_k, 1)``,
    ``v_k ~ N(B_k, 1)`` (60), ``x ~ N(v_k, diag(j^-1.2))`` and ``y = argmax(W_k x + b_k)``
    (alpha and beta are standard deviations, as in LEAF's ``np.random.normal``). With
    ``iid=True`` it is LEAF's "Synthetic-IID": one shared ``W, b`` (drawn from ``N(0, 1)``)
    and ``v = 0`` for every client, whatever alpha and beta are. Note that LEAF's
    Synthetic(0, 0) is *not* IID: each client still draws its own ``W_k ~ N(0, 1)``.

    The last 20% of each client's examples are held out; ``test_data`` concatenates the
    held-out parts of a fixed subset of at most 200 clients.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        seed: int,
        alpha: float,
        beta: float,
        iid: bool,
        model: Callable[[], nn.Module],
    ) -> None:
        self.name = "synthetic"
        self.num_clients = num_clients
        self.num_classes = _SYNTH_CLASSES
        self.seed = seed
        self._alpha = alpha
        self._beta = beta
        self._model = model
        self._shared: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
        if iid:
            shared = _rng(seed, _P_SYNTH_SHARED)
            self._shared = (
                shared.standard_normal((_SYNTH_CLASSES, _SYNTH_DIM)),
                shared.standard_normal(_SYNTH_CLASSES),
            )
        self._test: ClientData | None = None

    def make_model(self) -> nn.Module:
        return _seeded_model(self.seed, self._model)

    def _generate(self, k: int) -> tuple[ClientData, ClientData]:
        rng = _rng(self.seed, _P_SYNTH_CLIENT, k)
        n = 50 + int(min(rng.lognormal(4.0, 2.0), _SYNTH_MAX_EXAMPLES - 50))
        if self._shared is not None:
            w, b = self._shared
            v: npt.NDArray[np.float64] | float = 0.0
        else:
            u = rng.normal(0.0, self._alpha)
            big_b = rng.normal(0.0, self._beta)
            w = rng.normal(u, 1.0, (_SYNTH_CLASSES, _SYNTH_DIM))
            b = rng.normal(u, 1.0, _SYNTH_CLASSES)
            v = rng.normal(big_b, 1.0, _SYNTH_DIM)
        x = (rng.standard_normal((n, _SYNTH_DIM)) * _SYNTH_STD + v).astype(np.float32)
        # Label the float32 features the model will actually see, so no label sits on the
        # wrong side of a boundary because of the cast.
        y = np.argmax(x.astype(np.float64) @ w.T + b, axis=1).astype(np.int64)
        n_train = n - n // _SYNTH_TEST_FRACTION_DENOM
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        return (
            ClientData(xt[:n_train], yt[:n_train]),
            ClientData(xt[n_train:], yt[n_train:]),
        )

    def client_data(self, client_id: int) -> ClientData:
        return self._generate(_check_client_id(client_id, self.num_clients))[0]

    def test_clients(self) -> list[int]:
        """The (sorted) clients whose held-out splits form ``test_data``."""
        count = min(_SYNTH_MAX_TEST_CLIENTS, self.num_clients)
        rng = _rng(self.seed, _P_SYNTH_TEST_CLIENTS, self.num_clients)
        return sorted(int(c) for c in rng.choice(self.num_clients, size=count, replace=False))

    def test_data(self) -> ClientData:
        if self._test is None:
            self._test = _concat([self._generate(k)[1] for k in self.test_clients()])
        return self._test


# --------------------------------------------------------------------------- digits

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
    # Imported here: fedlab.client and the client halves import this module.
    from fedlab.client import ClientContext
    from fedlab.clients.sgd import LocalSGD

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = ClientContext(client_id=0, seed=seeding.derive(seed, _P_PRETRAIN))
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        task = Task(version=0, params=start, config=dict(config or PRETRAIN_CONFIG))
        LocalSGD().fit(model, data, task, None, ctx)  # trains ``model`` in place
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def _digits_arrays() -> tuple[npt.NDArray[np.float32], _IntArray]:
    # Imported lazily: sklearn takes most of a second to import and only digits needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).copy()
    y = np.asarray(bunch.target, dtype=np.int64).copy()
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _digits_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, _DIGITS_CLASSES),
    )


def _digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, _DIGITS_CLASSES))


def _shard_groups(labels: _IntArray, num_shards: int) -> tuple[_IntArray, _IntArray]:
    """Split ``num_shards`` among label groups so that shards are label-pure when possible.

    Returns ``(group_sizes, shards_per_group)`` over the label-sorted order. Every present
    label gets at least one shard and the rest go by largest remainder in proportion to
    label frequency. With fewer shards than labels, purity is impossible and the whole
    sorted order is one group cut into contiguous shards.
    """
    counts = np.bincount(labels).astype(np.int64)
    counts = counts[counts > 0]
    if num_shards < len(counts):
        return np.array([len(labels)], dtype=np.int64), np.array([num_shards], dtype=np.int64)
    extra = num_shards - len(counts)
    quota = extra * counts / counts.sum()
    alloc = np.floor(quota).astype(np.int64)
    leftover = extra - int(alloc.sum())
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[:leftover]] += 1
    return counts, alloc + 1


class _DigitsWorkload:
    """scikit-learn's 8x8 digits, split 80/20 by the seed and partitioned lazily.

    Partitions of the ~1438 training examples (``n`` below) over ``N`` clients:

    * ``iid``: if ``n // N >= 8``, a seeded permutation cut into ``N`` contiguous slices
      whose sizes differ by at most one (a true partition). Otherwise clients would be too
      thin, so each client draws 8 distinct examples from the whole pool with its own
      stream; clients then share examples.
    * ``dirichlet``: ``q_k ~ Dir(alpha)``, ``max(8, n // N)`` labels drawn from ``q_k``, each
      example drawn from that label's pool (distinct within a client while the pool lasts,
      shared across clients). The standard lazy construction for large federations.
    * ``shards``: the label-sorted order is cut into ``N * shards_per_client`` shards,
      label-pure whenever there are at least as many shards as labels; client ``k`` takes the
      shards at positions ``[k*s, (k+1)*s)`` of one seeded permutation of shard ids. The
      permutation costs ``4 * N * s`` bytes and is built on the first ``client_data`` call.
      With more shards than examples, shards hold one example and repeat through the pool.
    * ``lognormal``: IID labels, ``n_k = clip(round(exp(N(log m - sigma^2/2, sigma))), 1, n)``
      with ``m = max(8, n / N)`` (so the expected size is ``m``), drawn without replacement
      from the whole pool.

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
        partition: str,
        alpha: float,
        shards_per_client: int,
        sigma: float,
        model: Callable[[], nn.Module],
        flat_features: bool,
        label_swap: float = 0.0,
        shift: bool = False,
        model_name: str = "",
    ) -> None:
        self.name = "digits-shift" if shift else "digits"
        self.num_clients = num_clients
        self.num_classes = _DIGITS_CLASSES
        self.seed = seed
        self._partition = partition
        self._alpha = alpha
        self._shards_per_client = shards_per_client
        self._sigma = sigma
        self._model = model
        self._model_name = model_name
        self._label_swap = label_swap
        self._shift = shift

        x_all, y_all = _digits_arrays()
        perm = _rng(seed, _P_DIGITS_SPLIT).permutation(len(y_all))
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
        self._x_train = torch.from_numpy(x_all[train_idx]).reshape(shape)
        self._y_train_np: _IntArray = y_all[train_idx]
        self._y_train = torch.from_numpy(self._y_train_np)
        self._test = ClientData(
            torch.from_numpy(x_all[test_idx]).reshape(shape),
            torch.from_numpy(y_all[test_idx]),
        )
        n = len(train_idx)
        self._n_train = n
        self._client_size = max(_MIN_CLIENT_EXAMPLES, n // num_clients)
        self._iid_disjoint = n // num_clients >= _MIN_CLIENT_EXAMPLES
        self._iid_perm = _rng(seed, _P_IID_PERM).permutation(n)
        self._by_label = np.argsort(self._y_train_np, kind="stable")
        self._pools = [np.flatnonzero(self._y_train_np == c) for c in range(_DIGITS_CLASSES)]
        self._shard_perm: npt.NDArray[np.signedinteger[Any]] | None = None
        if partition == "shards":
            sizes, per_group = _shard_groups(self._y_train_np, num_clients * shards_per_client)
            self._group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._group_sizes = sizes
            self._group_shards = per_group
            self._group_first_shard = np.concatenate([[0], np.cumsum(per_group)])

    def make_model(self) -> nn.Module:
        model = _seeded_model(self.seed, self._model)
        if self._shift:
            model.load_state_dict(self._pretrained())
        return model

    def _pretrained(self) -> dict[str, torch.Tensor]:
        key = (self.seed, self._model_name, tuple(self._shape))
        if key not in _PRETRAINED:
            x_all, y_all = _digits_arrays()
            source = ClientData(
                torch.from_numpy(x_all[self._source_idx]).reshape(self._shape),
                torch.from_numpy(y_all[self._source_idx]),
            )
            _PRETRAINED[key] = pretrain(_seeded_model(self.seed, self._model), source, self.seed)
        return _PRETRAINED[key]

    def public_data(self) -> ClientData:
        """The server's public sample of the target task (``digits-shift`` only): examples
        disjoint from every client's data, from the pretraining set and from the test set."""
        if not self._shift:
            raise ValueError("workload 'digits' has no public sample; 'digits-shift' has one")
        x_all, y_all = _digits_arrays()
        x = np.rot90(x_all.reshape(-1, 8, 8), 1, axes=(1, 2))[self._public_idx]
        return ClientData(
            torch.from_numpy(np.ascontiguousarray(x)).reshape(self._shape),
            torch.from_numpy(y_all[self._public_idx]),
        )

    def test_data(self) -> ClientData:
        return self._test

    def client_indices(self, client_id: int) -> _IntArray:
        """Indices into the training split that make up ``client_id``'s data."""
        k = _check_client_id(client_id, self.num_clients)
        if self._partition == "iid":
            return self._iid(k)
        if self._partition == "dirichlet":
            return self._dirichlet(k)
        if self._partition == "shards":
            return self._shards(k)
        return self._lognormal(k)

    def client_data(self, client_id: int) -> ClientData:
        idx = self.client_indices(client_id)
        x = self._x_train[torch.from_numpy(idx)]
        if self._label_swap == 0:
            return ClientData(x, self._y_train[torch.from_numpy(idx)])
        return ClientData(x, torch.from_numpy(self._swap_labels(client_id, idx)))

    def _swap_labels(self, k: int, idx: _IntArray) -> _IntArray:
        """Client ``k``'s labels with ``round(h * count)`` examples of each label of its pair
        relabelled as the other one, the examples drawn from the ``(seed, k)`` stream."""
        y = self._y_train_np[idx]
        out = y.copy()
        rng = _rng(self.seed, _P_LABEL_SWAP, k)
        a, b = _SWAP_PAIRS[k % 2]
        for src, dst in ((a, b), (b, a)):
            where = np.flatnonzero(y == src)
            count = round(self._label_swap * len(where))
            out[rng.choice(where, size=count, replace=False)] = dst
        return out

    def _iid(self, k: int) -> _IntArray:
        n, num = self._n_train, self.num_clients
        if self._iid_disjoint:
            return self._iid_perm[k * n // num : (k + 1) * n // num]
        rng = _rng(self.seed, _P_IID_SAMPLE, k)
        return rng.choice(n, size=_MIN_CLIENT_EXAMPLES, replace=False)

    def _dirichlet(self, k: int) -> _IntArray:
        rng = _rng(self.seed, _P_DIRICHLET, k)
        q = rng.dirichlet(np.full(_DIGITS_CLASSES, self._alpha))
        counts = rng.multinomial(self._client_size, q / q.sum())
        parts = []
        for label in np.flatnonzero(counts):
            pool, c = self._pools[label], int(counts[label])
            if c <= len(pool):
                parts.append(pool[rng.choice(len(pool), size=c, replace=False)])
            else:
                parts.append(pool[rng.integers(0, len(pool), size=c)])
        return np.concatenate(parts)[rng.permutation(self._client_size)]

    def _shards(self, k: int) -> _IntArray:
        s = self._shards_per_client
        if self._shard_perm is None:
            total = self.num_clients * s
            perm = _rng(self.seed, _P_SHARDS).permutation(total)
            # int32 halves the only O(num_clients) structure in the module.
            self._shard_perm = perm.astype(np.int32) if total < 2**31 else perm
        parts = []
        for shard in self._shard_perm[k * s : (k + 1) * s]:
            g = int(np.searchsorted(self._group_first_shard, shard, side="right")) - 1
            i = int(shard) - int(self._group_first_shard[g])
            m, size = int(self._group_shards[g]), int(self._group_sizes[g])
            start = i * size // m
            end = max((i + 1) * size // m, start + 1)  # more shards than examples: 1 each
            offset = int(self._group_start[g])
            parts.append(self._by_label[offset + start : offset + end])
        return np.concatenate(parts)

    def _lognormal(self, k: int) -> _IntArray:
        rng = _rng(self.seed, _P_LOGNORMAL, k)
        mean = max(float(_MIN_CLIENT_EXAMPLES), self._n_train / self.num_clients)
        raw = math.exp(rng.normal(math.log(mean) - self._sigma**2 / 2, self._sigma))
        size = int(min(max(round(raw), 1), self._n_train))
        return rng.choice(self._n_train, size=size, replace=False)


# --------------------------------------------------------------------------- custom


def _as_client_data(result: object, source: str) -> ClientData:
    if isinstance(result, ClientData):
        x, y = result.x, result.y
    elif (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[0], torch.Tensor)
        and isinstance(result[1], torch.Tensor)
    ):
        x, y = result
    else:
        got = type(result).__name__
        if isinstance(result, tuple):
            got = f"tuple of ({', '.join(type(r).__name__ for r in result)})"
        raise ValueError(f"{source} must return ClientData or a (x, y) tuple of tensors, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{source} returned x of dtype {x.dtype}; expected floating point")
    if y.dtype != torch.int64:
        raise ValueError(f"{source} returned y of dtype {y.dtype}; expected torch.int64")
    if y.dim() != 1:
        raise ValueError(f"{source} returned y of shape {tuple(y.shape)}; expected 1-D")
    if x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{source} returned x{tuple(x.shape)} and y{tuple(y.shape)}; "
            "expected the same number of examples"
        )
    if y.shape[0] == 0:
        raise ValueError(f"{source} returned no examples")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{source} returned non-finite values in x")
    if int(y.min()) < 0:
        raise ValueError(f"{source} returned negative labels")
    return ClientData(x.to(torch.float32), y)


class _CustomWorkload:
    """User data from ``load_client(client_id, num_clients, seed)``.

    The test set is ``load_test(seed)`` from the same module when it defines one, otherwise
    the concatenated data of the first ``min(num_clients, 50)`` clients (then it is not
    held out: it measures fit, not generalisation). ``num_classes`` is the largest test
    label plus one, and client labels must stay below it.
    """

    def __init__(
        self,
        *,
        name: str,
        data: str,
        num_clients: int,
        seed: int,
        model: str,
    ) -> None:
        self.name = name
        self.num_clients = num_clients
        self.seed = seed
        # Check the model choice before running user data code, which may be slow.
        user_model = _load_model_factory(model) if ":" in model else None
        if user_model is None and model not in ("default", "logreg", "mlp"):
            raise _unknown("model for custom data", model, ["logreg", "mlp", "pkg.mod:Factory"])
        loader = load_dotted(data)
        if not callable(loader):
            raise ValueError(f"data {data!r} is not callable (got {type(loader).__name__})")
        self._loader: Callable[..., object] = loader
        self._source = f"data function {data!r}"
        # load_dotted imported (and, in a deployed client, checked) this module just above.
        module = importlib.import_module(data.partition(":")[0])
        load_test = getattr(module, "load_test", None)
        if callable(load_test):
            test_source = f"load_test in module {module.__name__!r}"
            self._test = _as_client_data(load_test(seed), test_source)
        else:
            parts = [self._load(k) for k in range(min(num_clients, _CUSTOM_TEST_CLIENTS))]
            for k, part in enumerate(parts):
                if part.x.shape[1:] != parts[0].x.shape[1:]:
                    raise ValueError(
                        f"{self._source}: client {k} has features of shape "
                        f"{tuple(part.x.shape[1:])}, client 0 has {tuple(parts[0].x.shape[1:])}"
                    )
            self._test = _concat(parts)
        self.num_classes = int(self._test.y.max()) + 1
        self._feature_shape = tuple(self._test.x.shape[1:])
        features, classes = math.prod(self._feature_shape), self.num_classes
        if user_model is not None:
            self._model = user_model
        elif model == "mlp":
            self._model = lambda: nn.Sequential(
                nn.Flatten(), nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, classes)
            )
        else:
            self._model = lambda: nn.Sequential(nn.Flatten(), nn.Linear(features, classes))

    def _load(self, k: int) -> ClientData:
        return _as_client_data(self._loader(k, self.num_clients, self.seed), self._source)

    def make_model(self) -> nn.Module:
        return _seeded_model(self.seed, self._model)

    def client_data(self, client_id: int) -> ClientData:
        k = _check_client_id(client_id, self.num_clients)
        data = self._load(k)
        if tuple(data.x.shape[1:]) != self._feature_shape:
            raise ValueError(
                f"{self._source} returned features of shape {tuple(data.x.shape[1:])} for "
                f"client {k}; the test set has {self._feature_shape}"
            )
        if int(data.y.max()) >= self.num_classes:
            raise ValueError(
                f"{self._source} returned label {int(data.y.max())} for client {k}, but the "
                f"test set implies {self.num_classes} classes"
            )
        return data

    def test_data(self) -> ClientData:
        return self._test


# --------------------------------------------------------------------------- factory

_MODELS: dict[str, dict[str, Callable[[], nn.Module]]] = {
    "synthetic": {"logreg": _synthetic_logreg, "mlp": _synthetic_mlp},
    "digits": {"cnn": _digits_cnn, "mlp": _digits_mlp},
}


# --------------------------------------------------------------------------- wls


class _WLSWorkload:
    """Weighted linear least squares over clients (the ADMM-WLS workload).

    ``client_data(k)`` packs client ``k``'s regression data into one float64 ``x`` of shape
    ``(n_k, d + 2)`` with columns ``[X_k | y_k | psi_k]`` (``ClientData.y`` holds int64
    class labels, which regression has none of; it is all zeros), so a client half that sees
    only its :class:`ClientData` can still rebuild ``X_k``, ``y_k`` and ``Psi_k``
    (:func:`unpack_wls`). The model is ``nn.Linear(d, 1, bias=False)`` in float64,
    initialised to zero (ADMM's usual ``z^0 = 0``); params are ``{"weight": 1 x d}``.
    ``evaluate(params)`` reports the mean-square deviation from the true ``w°``.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        seed: int,
        dim: int = WLS_DIM,
        examples: int = WLS_EXAMPLES,
        noise_std: float = WLS_NOISE_STD,
    ) -> None:
        self.name = "wls"
        self.num_clients = num_clients
        self.num_classes = 1
        self.seed = seed
        self.dim = dim
        self.examples = examples
        self.noise_std = noise_std
        self.w_true = torch.from_numpy(_rng(seed, _P_WLS_TRUE).standard_normal(dim))

    def make_model(self) -> nn.Module:
        model = nn.Linear(self.dim, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            model.weight.zero_()
        return model

    def wls_client(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(X_k, y_k, psi_k)`` of ``client_id`` as float64 tensors (psi: the diagonal)."""
        k = _check_client_id(client_id, self.num_clients)
        rng = _rng(self.seed, _P_WLS_CLIENT, k)
        x = rng.standard_normal((self.examples, self.dim))
        psi = rng.uniform(*_WLS_PSI_RANGE, self.examples)
        noise = rng.standard_normal(self.examples) * self.noise_std / np.sqrt(psi)
        y = x @ self.w_true.numpy() + noise
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(psi)

    def client_data(self, client_id: int) -> ClientData:
        x, y, psi = self.wls_client(client_id)
        packed = torch.cat([x, y[:, None], psi[:, None]], dim=1)
        return ClientData(packed, torch.zeros(len(y), dtype=torch.int64))

    def test_data(self) -> ClientData:
        # Regression has no held-out labels to classify; evaluation uses ``evaluate``. This
        # is client 0's data, so the protocol still holds.
        return self.client_data(0)

    def solution(self) -> torch.Tensor:
        """The centralised WLS optimum ``w* = (sum_k A_k)^-1 sum_k b_k`` (float64, d)."""
        a = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        b = torch.zeros(self.dim, dtype=torch.float64)
        for k in range(self.num_clients):
            x, y, psi = self.wls_client(k)
            a += x.T @ (psi[:, None] * x)
            b += x.T @ (psi * y)
        solution: torch.Tensor = torch.linalg.solve(a, b)
        return solution

    def evaluate(self, params: Params) -> dict[str, float]:
        """``msd = ||w - w°||^2`` and ``msd_db = 10 log10(msd)`` of the global model."""
        w = params["weight"].detach().reshape(-1).to(torch.float64)
        msd = float(torch.sum((w - self.w_true) ** 2))
        return {"msd": msd, "msd_db": 10 * math.log10(msd) if msd > 0 else -math.inf}


def unpack_wls(data: ClientData) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X, y, psi)`` from a ``wls`` client's packed :class:`ClientData` (float64)."""
    x = data.x.to(torch.float64)
    return x[:, :-2], x[:, -2], x[:, -1]


def make_workload(
    name: str,
    *,
    num_clients: int,
    seed: int,
    model: str = "default",
    data: str | None = None,
    partition: str | None = None,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sigma: float = 1.0,
    synthetic_alpha: float = 0.5,
    synthetic_beta: float = 0.5,
    label_swap: float = 0.0,
) -> Workload:
    """Build a workload whose client data is generated lazily from ``(seed, client_id)``.

    Args:
        name: one of ``WORKLOADS``, ``"digits-shift"`` (digits turned 90 degrees, with a
            model pretrained centrally on upright digits: the fine-tuning demonstration; it
            also has a public sample, ``public_data()``) or ``"wls"``; with ``data`` any
            other label (conventionally
            ``"custom"``) names the user's workload.
        num_clients: number of clients, at least 1. Costs no memory per client.
        seed: non-negative seed that fixes data, partition and model initialisation.
        model: ``"default"``, a built-in name (synthetic: ``"logreg"`` (default), ``"mlp"``;
            digits: ``"cnn"`` (default), ``"mlp"``; custom data: ``"logreg"`` (default),
            ``"mlp"``) or ``"pkg.mod:Factory"``, called with no arguments.
        data: ``"pkg.mod:load_client"`` with signature
            ``load_client(client_id, num_clients, seed) -> ClientData | (x, y)``; the module
            may also define ``load_test(seed)``.
        partition: one of ``PARTITIONS``, or ``None`` for the workload's default
            (``DEFAULT_PARTITION``). Synthetic takes ``"iid"`` (Synthetic-IID) or
            ``"natural"`` (Synthetic(alpha, beta)); custom data takes only ``"natural"``.
        alpha: Dirichlet concentration for ``"dirichlet"`` (smaller is more label-skewed).
        shards_per_client: shards per client for ``"shards"``.
        sigma: lognormal sigma of client sizes for ``"lognormal"`` (0 gives equal sizes).
        synthetic_alpha: LEAF Synthetic alpha (model heterogeneity across clients).
        synthetic_beta: LEAF Synthetic beta (feature heterogeneity); both 0 gives the IID
            variant with one shared labelling model.
        label_swap: digits only, FedStale's label-swap heterogeneity ``h`` in ``[0, 1]``: even
            clients relabel a fraction ``h`` of their 0s as 1 and of their 1s as 0, odd
            clients do the same with 8 and 9 (which examples: from ``(seed, client)``). The
            test set keeps the true labels.

    Returns:
        The workload.

    Raises:
        ValueError: on unknown names (with close matches), out-of-range parameters, or a
            dotted path that cannot be imported.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if partition is None or partition == "":
        partition = DEFAULT_PARTITION.get(name if data is None else "custom", "natural")
    if partition not in PARTITIONS:
        raise _unknown("partition", partition, PARTITIONS)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (Dirichlet concentration) must be > 0, got {alpha!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma (lognormal quantity skew) must be >= 0, got {sigma!r}")
    if (
        isinstance(shards_per_client, bool)
        or not isinstance(shards_per_client, int)
        or shards_per_client < 1
    ):
        raise ValueError(f"shards_per_client must be an integer >= 1, got {shards_per_client!r}")
    for label, value in (("synthetic_alpha", synthetic_alpha), ("synthetic_beta", synthetic_beta)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be >= 0, got {value!r}")
    if not (math.isfinite(label_swap) and 0 <= label_swap <= 1):
        raise ValueError(f"label_swap must be in [0, 1], got {label_swap!r}")
    if label_swap and (name != "digits" or data is not None):
        raise ValueError(f"label_swap applies to the digits workload only, not {name!r}")

    if data is not None:
        if name in (*WORKLOADS, "digits-shift", "wls"):
            raise ValueError(
                f"data={data!r} supplies a custom workload, but name={name!r} is a built-in "
                "workload; pass name='custom' (--workload custom)"
            )
        if partition != "natural":
            raise ValueError(
                f"partition {partition!r} does not apply to custom data: load_client decides "
                "each client's examples; use partition='natural' (--partition natural)"
            )
        return _CustomWorkload(
            name=name, data=data, num_clients=num_clients, seed=seed, model=model
        )
    if name == "custom":
        raise ValueError("workload 'custom' needs data='pkg.mod:load_client'")
    if name == "wls":
        # Kept out of WORKLOADS (the classification workloads): it is a regression
        # benchmark for ADMM-WLS, evaluated by its own ``evaluate``.
        if model != "default" or partition != "natural":
            raise ValueError("workload 'wls' has one model (linear) and one split (natural)")
        return _WLSWorkload(num_clients=num_clients, seed=seed)
    shift = name == "digits-shift"
    if shift:
        # Kept out of WORKLOADS like wls: the pretrain-then-fine-tune demonstration (digits
        # turned 90 degrees, the model pretrained centrally on upright digits).
        name = "digits"
    elif name not in WORKLOADS:
        raise _unknown("workload", name, (*WORKLOADS, "digits-shift", "wls"))

    builtins = _MODELS[name]
    if shift and model == "default":
        model = "mlp"
    if ":" in model:
        factory = _load_model_factory(model)
    elif model == "default":
        factory = next(iter(builtins.values()))
    elif model in builtins:
        factory = builtins[model]
    else:
        raise _unknown(f"model for {name}", model, (*builtins, "pkg.mod:Factory"))

    if name == "synthetic":
        if partition not in ("iid", "natural"):
            raise ValueError(
                f"partition {partition!r} does not apply to synthetic: use 'natural' for "
                "LEAF Synthetic(alpha, beta) (non-IID; tune synthetic_alpha and "
                "synthetic_beta) or 'iid' for Synthetic-IID"
            )
        return _SyntheticWorkload(
            num_clients=num_clients,
            seed=seed,
            alpha=synthetic_alpha,
            beta=synthetic_beta,
            iid=partition == "iid",
            model=factory,
        )
    if partition == "natural":
        raise ValueError(
            "digits has no natural per-client split; use one of 'iid', 'dirichlet', "
            "'shards' or 'lognormal'"
        )
    return _DigitsWorkload(
        num_clients=num_clients,
        seed=seed,
        partition=partition,
        alpha=alpha,
        shards_per_client=shards_per_client,
        sigma=sigma,
        model=factory,
        flat_features=model == "mlp",
        label_swap=label_swap,
        shift=shift,
        model_name=model,
    )
