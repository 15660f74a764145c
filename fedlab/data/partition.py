"""Partitioners of a central labelled data set: which examples each client holds.

:class:`LabelPartition` computes client ``k``'s indices on demand from ``(seed, k)`` (plus, for
``iid`` and ``shards``, one permutation of the pool), so a federation of any size costs a few
arrays of the pool's size. Digits and CIFAR share it, and :class:`LabelPartitioned`, the base of
their workloads.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedlab.data.base import (
    P_DIRICHLET,
    P_IID_PERM,
    P_IID_SAMPLE,
    P_LOGNORMAL,
    P_SHARDS,
    ClientData,
    IntArray,
    check_client_id,
    check_split,
    matched_test_indices,
    rng,
)

PARTITIONS: tuple[str, ...] = ("natural", "iid", "dirichlet", "shards", "lognormal")
"""``natural``: the workload's own per-client split (LEAF Synthetic(alpha, beta), LEAF's
writers and roles, or the user's ``load_client``); the others split a central data set
(``iid`` on synthetic is LEAF's Synthetic-IID)."""

# Below this many examples per client a disjoint split is too thin to train on, so clients
# instead sample this many examples from the shared pool.
MIN_CLIENT_EXAMPLES = 8


def shard_groups(labels: IntArray, num_shards: int) -> tuple[IntArray, IntArray]:
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


@dataclass(frozen=True)
class LabelSplit:
    """How a central labelled data set is split over clients (see :class:`LabelPartition`).

    Attributes:
        partition: one of ``iid``, ``dirichlet``, ``shards``, ``lognormal``.
        alpha: Dirichlet concentration.
        shards_per_client: ``s`` of ``shards``.
        sigma: lognormal sigma of client sizes.
    """

    partition: str
    alpha: float = 0.5
    shards_per_client: int = 2
    sigma: float = 1.0


class LabelPartition:
    """Client ``k``'s indices into a pool of ``n`` labelled examples.

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
      permutation costs ``4 * N * s`` bytes and is built on the first call.
      With more shards than examples, shards hold one example and repeat through the pool.
    * ``lognormal``: IID labels, ``n_k = clip(round(exp(N(log m - sigma^2/2, sigma))), 1, n)``
      with ``m = max(8, n / N)`` (so the expected size is ``m``), drawn without replacement
      from the whole pool.

    Args:
        labels: the pool's int64 labels in ``[0, num_classes)``.
        num_classes: how many labels there are (Dirichlet draws over all of them).
        num_clients: ``N``.
        seed: fixes every draw.
        split: the partition and its parameters.
    """

    def __init__(
        self,
        labels: IntArray,
        *,
        num_classes: int,
        num_clients: int,
        seed: int,
        split: LabelSplit,
    ) -> None:
        if split.partition not in PARTITIONS[1:]:
            raise ValueError(f"LabelPartition cannot split by {split.partition!r}")
        self.labels = labels
        self.num_classes = num_classes
        self.num_clients = num_clients
        self.seed = seed
        self.partition = split.partition
        self._alpha = split.alpha
        self._shards_per_client = split.shards_per_client
        self._sigma = split.sigma
        n = len(labels)
        self._n = n
        self._client_size = max(MIN_CLIENT_EXAMPLES, n // num_clients)
        self._iid_disjoint = n // num_clients >= MIN_CLIENT_EXAMPLES
        self._iid_perm = rng(seed, P_IID_PERM).permutation(n)
        self._by_label = np.argsort(labels, kind="stable")
        self._pools = [np.flatnonzero(labels == c) for c in range(num_classes)]
        self._absent = np.array([len(p) == 0 for p in self._pools], dtype=bool)
        self._shard_perm: npt.NDArray[np.signedinteger[Any]] | None = None
        if split.partition == "shards":
            sizes, per_group = shard_groups(labels, num_clients * split.shards_per_client)
            self._group_start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._group_sizes = sizes
            self._group_shards = per_group
            self._group_first_shard = np.concatenate([[0], np.cumsum(per_group)])

    def indices(self, k: int) -> IntArray:
        """Indices into the pool that make up client ``k``'s data (``k`` already checked)."""
        if self.partition == "iid":
            return self._iid(k)
        if self.partition == "dirichlet":
            return self._dirichlet(k)
        if self.partition == "shards":
            return self._shards(k)
        return self._lognormal(k)

    def _iid(self, k: int) -> IntArray:
        n, num = self._n, self.num_clients
        if self._iid_disjoint:
            return self._iid_perm[k * n // num : (k + 1) * n // num]
        gen = rng(self.seed, P_IID_SAMPLE, k)
        return gen.choice(n, size=MIN_CLIENT_EXAMPLES, replace=False)

    def _dirichlet(self, k: int) -> IntArray:
        gen = rng(self.seed, P_DIRICHLET, k)
        q = gen.dirichlet(np.full(self.num_classes, self._alpha))
        # Labels with no example in the pool get no share (q is unchanged when all exist).
        q[self._absent] = 0.0
        if q.sum() == 0:
            q[~self._absent] = 1.0
        counts = gen.multinomial(self._client_size, q / q.sum())
        parts = []
        for label in np.flatnonzero(counts):
            pool, c = self._pools[label], int(counts[label])
            if c <= len(pool):
                parts.append(pool[gen.choice(len(pool), size=c, replace=False)])
            else:
                parts.append(pool[gen.integers(0, len(pool), size=c)])
        out: IntArray = np.concatenate(parts)[gen.permutation(self._client_size)]
        return out

    def _shards(self, k: int) -> IntArray:
        s = self._shards_per_client
        if self._shard_perm is None:
            total = self.num_clients * s
            perm = rng(self.seed, P_SHARDS).permutation(total)
            # int32 halves the only O(num_clients) structure of the partition.
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
        out: IntArray = np.concatenate(parts)
        return out

    def _lognormal(self, k: int) -> IntArray:
        gen = rng(self.seed, P_LOGNORMAL, k)
        mean = max(float(MIN_CLIENT_EXAMPLES), self._n / self.num_clients)
        raw = math.exp(gen.normal(math.log(mean) - self._sigma**2 / 2, self._sigma))
        size = int(min(max(round(raw), 1), self._n))
        return gen.choice(self._n, size=size, replace=False)


class LabelPartitioned(abc.ABC):
    """A workload that splits a central labelled data set over clients by label.

    Client ``k``'s training data is its :class:`LabelPartition` share of the training split;
    its own test data is a label-matched share of the global test split
    (:func:`~fedlab.data.base.matched_test_indices`). Subclasses (digits, CIFAR) say how the
    examples at given indices are built.

    Args:
        train_labels: the int64 labels of the training split, in ``[0, num_classes)``.
        test_labels: the int64 labels of the global test split.
        num_classes: how many labels there are.
        num_clients: the number of clients.
        seed: the run seed.
        split: the partition and its parameters.
    """

    def __init__(
        self,
        *,
        train_labels: IntArray,
        test_labels: IntArray,
        num_classes: int,
        num_clients: int,
        seed: int,
        split: LabelSplit,
    ) -> None:
        self.num_classes = num_classes
        self.num_clients = num_clients
        self.seed = seed
        self.y_train = train_labels
        self.y_test = test_labels
        self._partition = LabelPartition(
            train_labels, num_classes=num_classes, num_clients=num_clients, seed=seed, split=split
        )

    def client_indices(self, client_id: int) -> IntArray:
        """Indices into the training split that make up ``client_id``'s data."""
        return self._partition.indices(check_client_id(client_id, self.num_clients))

    def client_test_indices(self, client_id: int) -> IntArray:
        """Indices into the test split that make up ``client_id``'s own test data."""
        train = self.y_train[self.client_indices(client_id)]
        return matched_test_indices(self.y_test, train, self.seed, client_id)

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        if check_split(split) == "test":
            return self._test_examples(self.client_test_indices(client_id))
        return self._train_examples(client_id, self.client_indices(client_id))

    @abc.abstractmethod
    def _train_examples(self, client_id: int, idx: IntArray) -> ClientData:
        """Client ``client_id``'s training data: the training examples at ``idx``."""

    @abc.abstractmethod
    def _test_examples(self, idx: IntArray) -> ClientData:
        """The test examples at ``idx``."""
