"""FedAU's label-correlated participation probabilities (the recipe of its experiments; see
:mod:`fedlab.strategies.fedau`)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedlab import seeding
from fedlab.data import Workload
from fedlab.participation.models import _P_FEDAU_RECIPE, _Floats, _Ints


def fedau_probabilities(
    label_counts: npt.ArrayLike, *, seed: int, mean_p: float, min_p: float, alpha: float
) -> _Floats:
    """FedAU's label-correlated participation probabilities.

    ``p_n = clip(s * <q_n, d>, min_p, 1)`` where ``q_n`` is client ``n``'s label distribution
    over ``C`` classes and ``d ~ Dir(alpha * 1_C)`` is drawn once from the seed, so clients
    rich in the labels ``d`` favours show up more often.

    The scale ``s`` is fitted (by bisection) so that the mean of ``p`` is exactly ``mean_p``,
    floor and clip included. The official code uses the fixed scale ``mean_p * C``
    (``10 * 0.1`` on 10 classes), which gives the same ``p`` when the clients' average label
    distribution is uniform (then the mean of ``<q_n, d>`` is ``1 / C`` whatever ``d`` is); on
    a Dirichlet(0.1) split of 100 clients that average is far from uniform and the fixed
    scale's realised mean wanders (0.083 instead of 0.1 on digits, seed 0), so a run's
    expected participation would not be what ``mean_p`` says. The official code has no upper
    clip (its default never needs one); we clip at 1 so that ``p`` stays a probability.

    Args:
        label_counts: ``(N, C)`` counts of each label per client; a client with no examples
            gets the floor.
        seed: the run seed (``d`` comes from its own stream).
        mean_p: the mean of the returned probabilities, in ``[min_p, 1]``.
        min_p: the floor.
        alpha: Dirichlet concentration of ``d`` (FedAU: 0.1).

    Raises:
        ValueError: bad shape, or a ``mean_p`` no scale can reach.
    """
    counts = np.asarray(label_counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise ValueError(f"label_counts must be (clients, classes), got shape {counts.shape}")
    totals = counts.sum(axis=1, keepdims=True)
    q = counts / np.where(totals > 0, totals, 1.0)
    d = seeding.numpy_rng(seed, _P_FEDAU_RECIPE).dirichlet(np.full(counts.shape[1], alpha))
    x = q @ d

    def probs(scale: float) -> _Floats:
        p: _Floats = np.clip(scale * x, min_p, 1.0)
        return p

    # The largest mean any scale reaches: clients with x > 0 at 1, the others at the floor.
    top: _Floats = np.where(x > 0, 1.0, min_p)
    if not min_p <= mean_p <= top.mean():
        raise ValueError(
            f"mean_p={mean_p} is out of reach: with min_p={min_p} the mean participation "
            f"probability of these clients can only be in [{min_p}, {top.mean():.4g}]"
        )
    if mean_p == top.mean():
        return top
    lo, hi = 0.0, 1.0
    while probs(hi).mean() < mean_p:
        hi *= 2  # terminates: the mean tends to top.mean() > mean_p
    for _ in range(100):  # the mean is continuous and non-decreasing in the scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if probs(mid).mean() < mean_p else (lo, mid)
    return probs(hi)


def label_counts(workload: Workload, num_clients: int) -> _Ints:
    # One client_data call per client, once, at construction: fine up to ~1e5 clients of the
    # built-in workloads (seconds), and the only O(N * data) cost of any participation model.
    c = workload.num_classes
    out = np.zeros((num_clients, c), dtype=np.int64)
    for k in range(num_clients):
        y = workload.client_data(k).y.numpy()
        if y.size and (y.min() < 0 or y.max() >= c):
            raise ValueError(f"client {k} has labels outside [0, {c}) of the workload")
        out[k] = np.bincount(y, minlength=c)
    return out
