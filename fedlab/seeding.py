"""Derived random streams.

Every random draw in fedlab comes from a stream named by a tuple such as
``(seed, purpose, version, client_id)``. No stream carries state from one use to the next, so
results do not depend on worker count, scheduling order or where a run was resumed, and
checkpoints hold no generator state beyond the run seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

# Purposes keep streams that share (seed, version, client) apart.
SAMPLE = 1
TRAIN = 2
CLOCK = 3
MODEL = 4
TRANSFORM = 5
# Federated evaluation (fedlab.evaluation): which clients are evaluated, and the minibatch order
# of their personalisation steps; apart from TRAIN so evaluating never changes training.
EVAL_SAMPLE = 6
PERSONALIZE = 7


def derive(*keys: int) -> int:
    """A 63-bit seed derived from non-negative integer keys."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def params_key(params: Mapping[str, torch.Tensor]) -> int:
    """A 63-bit stream key digested from a model's tensors (names and values).

    Strategies that draw model-sized randomness from the initial model (FRL's weights, LoRA's
    ``A``) key it by this: the initial model is itself a function of the run seed.
    """
    h = hashlib.sha256()
    for name in sorted(params):
        h.update(name.encode())
        h.update(params[name].detach().cpu().contiguous().numpy().tobytes())
    return derive(int.from_bytes(h.digest()[:7], "little"))


def numpy_rng(*keys: int) -> np.random.Generator:
    """A NumPy generator for the stream named by ``keys``."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def torch_generator(*keys: int) -> torch.Generator:
    """A CPU torch generator for the stream named by ``keys``."""
    return torch.Generator().manual_seed(derive(*keys))


def sample_without_replacement(
    rng: np.random.Generator, population: int, k: int, exclude: frozenset[int] = frozenset()
) -> list[int]:
    """Draw ``k`` distinct ids from ``range(population)`` minus ``exclude``, sorted.

    Rejection sampling when ``k`` is small against the population, so sampling 100 of a
    million clients costs about 100 draws rather than a million-entry permutation.
    """
    available = population - len(exclude)
    if k > available:
        raise ValueError(f"cannot sample {k} clients: only {available} are available")
    if k <= 0:
        return []
    if 4 * (k + len(exclude)) < population:
        chosen: set[int] = set()
        while len(chosen) < k:
            c = int(rng.integers(population))
            if c not in chosen and c not in exclude:
                chosen.add(c)
        return sorted(chosen)
    pool = np.setdiff1d(np.arange(population), np.fromiter(exclude, dtype=np.int64))
    return sorted(int(c) for c in rng.choice(pool, size=k, replace=False))
