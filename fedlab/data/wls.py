"""Weighted linear least squares over clients (the ADMM-WLS regression workload)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from fedlab.data.base import (
    P_WLS_CLIENT,
    P_WLS_CLIENT_TEST,
    P_WLS_TRUE,
    ClientData,
    check_client_id,
    check_split,
    rng,
)
from fedlab.types import Params

# The WLS regression workload (ADMM-WLS): w° ~ N(0, I_d) once per seed; client k draws
# X_k ~ N(0, 1) (n_k x d), weights psi_i ~ U[0.5, 2] and y_i = x_i w° + nu_i with
# nu_i ~ N(0, sigma^2 / psi_i), so the WLS weights are the inverse noise variances (WLS is
# then the best linear unbiased estimator).
WLS_DIM = 8
WLS_EXAMPLES = 20
WLS_NOISE_STD = 0.1
_WLS_PSI_RANGE = (0.5, 2.0)


class WLSWorkload:
    """Weighted linear least squares over clients (the ADMM-WLS workload).

    ``client_data(k)`` packs client ``k``'s regression data into one float64 ``x`` of shape
    ``(n_k, d + 2)`` with columns ``[X_k | y_k | psi_k]`` (``ClientData.y`` holds int64
    class labels, which regression has none of; it is all zeros), so a client half that sees
    only its :class:`ClientData` can still rebuild ``X_k``, ``y_k`` and ``Psi_k``
    (:func:`unpack_wls`). ``client_data(k, "test")`` is a fresh draw of the same size from
    client ``k``'s distribution (its own stream). The model is
    ``nn.Linear(d, 1, bias=False)`` in float64, initialised to zero (ADMM's usual
    ``z^0 = 0``); params are ``{"weight": 1 x d}``. ``evaluate(params)`` reports the
    mean-square deviation from the true ``w°``.
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
        self.w_true = torch.from_numpy(rng(seed, P_WLS_TRUE).standard_normal(dim))

    def make_model(self) -> nn.Module:
        model = nn.Linear(self.dim, 1, bias=False, dtype=torch.float64)
        with torch.no_grad():
            model.weight.zero_()
        return model

    def wls_client(
        self, client_id: int, split: str = "train"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(X_k, y_k, psi_k)`` of ``client_id`` as float64 tensors (psi: the diagonal)."""
        k = check_client_id(client_id, self.num_clients)
        purpose = P_WLS_CLIENT if check_split(split) == "train" else P_WLS_CLIENT_TEST
        gen = rng(self.seed, purpose, k)
        x = gen.standard_normal((self.examples, self.dim))
        psi = gen.uniform(*_WLS_PSI_RANGE, self.examples)
        noise = gen.standard_normal(self.examples) * self.noise_std / np.sqrt(psi)
        y = x @ self.w_true.numpy() + noise
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(psi)

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        x, y, psi = self.wls_client(client_id, split)
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
