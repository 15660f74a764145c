"""LEAF / FedProx Synthetic(alpha, beta), generated one client at a time."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import numpy.typing as npt
import torch
from threadpoolctl import ThreadpoolController
from torch import nn

from fedlab.data.base import (
    P_SYNTH_CLIENT,
    P_SYNTH_SHARED,
    P_SYNTH_TEST_CLIENTS,
    ClientData,
    check_client_id,
    check_split,
    concat,
    rng,
    seeded_model,
)

SYNTH_DIM = 60
SYNTH_CLASSES = 10
# LEAF draws lognormal(4, 2) + 50 examples, which is unbounded (a few clients get 10^5+);
# capping keeps per-client cost and the test set bounded while leaving the median (~105)
# untouched.
SYNTH_MAX_EXAMPLES = 1000
_SYNTH_TEST_FRACTION_DENOM = 5  # 1/5 = 20% of each client held out
_SYNTH_MAX_TEST_CLIENTS = 200
_SYNTH_STD = np.arange(1, SYNTH_DIM + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)


@cache
def _blas() -> ThreadpoolController:
    """NumPy's BLAS, to run the labels' small matmul on one thread (built once: it scans
    the loaded libraries)."""
    return ThreadpoolController()


def synthetic_logreg() -> nn.Module:
    """Multinomial logistic regression on the 60 features."""
    return nn.Linear(SYNTH_DIM, SYNTH_CLASSES)


def synthetic_mlp() -> nn.Module:
    """One hidden layer of 64 units."""
    return nn.Sequential(nn.Linear(SYNTH_DIM, 64), nn.ReLU(), nn.Linear(64, SYNTH_CLASSES))


MODELS: dict[str, Callable[[], nn.Module]] = {"logreg": synthetic_logreg, "mlp": synthetic_mlp}


class SyntheticWorkload:
    """LEAF / FedProx Synthetic(alpha, beta), generated one client at a time.

    Client ``k`` draws, from its own stream: ``n_k = 50 + min(int(lognormal(4, 2)), 950)``
    examples (LEAF's quantity skew, capped at 1000), ``u_k ~ N(0, alpha)``,
    ``B_k ~ N(0, beta)``, ``W_k ~ N(u_k, 1)`` (10x60), ``b_k ~ N(u_k, 1)``,
    ``v_k ~ N(B_k, 1)`` (60), ``x ~ N(v_k, diag(j^-1.2))`` and ``y = argmax(W_k x + b_k)``
    (alpha and beta are standard deviations, as in LEAF's ``np.random.normal``). With
    ``iid=True`` it is LEAF's "Synthetic-IID": one shared ``W, b`` (drawn from ``N(0, 1)``)
    and ``v = 0`` for every client, whatever alpha and beta are. Note that LEAF's
    Synthetic(0, 0) is *not* IID: each client still draws its own ``W_k ~ N(0, 1)``.

    The last 20% of each client's examples are held out (``client_data(k, "test")``);
    ``test_data`` concatenates the held-out parts of a fixed subset of at most 200 clients.
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
        self.num_classes = SYNTH_CLASSES
        self.seed = seed
        self._alpha = alpha
        self._beta = beta
        self._model = model
        self._shared: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
        if iid:
            shared = rng(seed, P_SYNTH_SHARED)
            self._shared = (
                shared.standard_normal((SYNTH_CLASSES, SYNTH_DIM)),
                shared.standard_normal(SYNTH_CLASSES),
            )
        self._test: ClientData | None = None

    def make_model(self) -> nn.Module:
        return seeded_model(self.seed, self._model)

    def _generate(self, k: int) -> tuple[ClientData, ClientData]:
        gen = rng(self.seed, P_SYNTH_CLIENT, k)
        n = 50 + int(min(gen.lognormal(4.0, 2.0), SYNTH_MAX_EXAMPLES - 50))
        if self._shared is not None:
            w, b = self._shared
            v: npt.NDArray[np.float64] | float = 0.0
        else:
            u = gen.normal(0.0, self._alpha)
            big_b = gen.normal(0.0, self._beta)
            w = gen.normal(u, 1.0, (SYNTH_CLASSES, SYNTH_DIM))
            b = gen.normal(u, 1.0, SYNTH_CLASSES)
            v = gen.normal(big_b, 1.0, SYNTH_DIM)
        x = (gen.standard_normal((n, SYNTH_DIM)) * _SYNTH_STD + v).astype(np.float32)
        # Label the float32 features the model will actually see, so no label sits on the
        # wrong side of a boundary because of the cast.
        # On one thread: OpenBLAS splits an (n x 60) @ (60 x 10) product over every core, and
        # waking its threads costs 10x the product (0.5 ms a client on 2 busy cores). Each
        # entry is still one thread's dot product, so the labels are the same.
        with _blas().limit(limits=1, user_api="blas"):
            logits = x.astype(np.float64) @ w.T + b
        y = np.argmax(logits, axis=1).astype(np.int64)
        n_train = n - n // _SYNTH_TEST_FRACTION_DENOM
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        return (
            ClientData(xt[:n_train], yt[:n_train]),
            ClientData(xt[n_train:], yt[n_train:]),
        )

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        k = check_client_id(client_id, self.num_clients)
        return self._generate(k)[check_split(split) == "test"]

    def test_clients(self) -> list[int]:
        """The (sorted) clients whose held-out splits form ``test_data``."""
        count = min(_SYNTH_MAX_TEST_CLIENTS, self.num_clients)
        gen = rng(self.seed, P_SYNTH_TEST_CLIENTS, self.num_clients)
        return sorted(int(c) for c in gen.choice(self.num_clients, size=count, replace=False))

    def test_data(self) -> ClientData:
        if self._test is None:
            self._test = concat([self._generate(k)[1] for k in self.test_clients()])
        return self._test
