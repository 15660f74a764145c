"""A user-supplied federation for fedlab: ``--workload custom --data mydata:load_client``.

Each client is a sensor that records 20 features and labels them with one of 4 activities.
Clients differ in how many examples they hold and in which activities they see most (label
skew), the way a real federation's natural split does.

Everything is computed from ``(seed, client_id)`` on every call: nothing is loaded up front
and nothing is kept per client, so a federation of a million clients costs no memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

FEATURES = 20
CLASSES = 4
_CENTERS = 0  # stream purposes, so no two streams share a seed
_CLIENT = 1
_TEST = 2


def _centers(seed: int) -> np.ndarray:
    """The mean feature vector of each activity: shared by every client."""
    return np.random.default_rng([seed, _CENTERS]).normal(0.0, 1.0, (CLASSES, FEATURES))


def _examples(
    rng: np.random.Generator, seed: int, n: int, mix: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    y = rng.choice(CLASSES, size=n, p=mix)
    x = _centers(seed)[y] + rng.normal(0.0, 1.5, (n, FEATURES))
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def load_client(client_id: int, num_clients: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``client_id``'s training examples: ``x`` float32 (n, 20), ``y`` int64 (n,)."""
    rng = np.random.default_rng([seed, _CLIENT, client_id])
    n = int(rng.integers(20, 200))  # quantity skew
    mix = rng.dirichlet(np.full(CLASSES, 0.5))  # label skew
    return _examples(rng, seed, n, mix)


def load_test(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out global test set: 2000 examples, every activity equally likely."""
    rng = np.random.default_rng([seed, _TEST])
    return _examples(rng, seed, 2000, np.full(CLASSES, 1 / CLASSES))


class Net(nn.Module):
    """A small MLP; fedlab calls ``Net()`` with no arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
