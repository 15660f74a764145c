"""The client half of ADMM-WLS: a closed-form local WLS solve.

The derivation is in :mod:`fedlab.strategies.admm_wls`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedlab.client import ClientAlgorithm, ClientContext, Fit
from fedlab.data import ClientData, unpack_wls
from fedlab.types import State, Task


@dataclass(frozen=True, kw_only=True)
class ADMMClient(ClientAlgorithm):
    """Solves ``(A_k + rho I) w = rhs`` by Cholesky with ``A_k = X^T Psi X``.

    The task's params are the received (already noisy) global model ``z~``; ``task.config``
    carries ``rho``, ``variant`` and ``scheduled`` from the strategy. The factor is recomputed
    each task rather than kept in the client state: for ``d x d`` systems that costs less than
    checkpointing it, and it cannot go stale when ``rho`` changes.

    State (``"standard"`` only): ``w`` (local model) and ``lam`` (dual), float64 vectors.

    Args:
        rho: the ADMM penalty when the task does not set one.
    """

    rho: float = 1.0

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        if not task.config.get("scheduled", True):
            # Not scheduled this version: no upload, local state unchanged (see the strategy).
            return Fit(payload={}, num_examples=len(data), state=state)
        rho = float(task.config.get("rho", self.rho))
        variant = str(task.config.get("variant", "proposed"))
        x, y, psi = unpack_wls(data)
        received = task.params["weight"]
        z = received.reshape(-1).to(torch.float64)
        a = x.T @ (psi[:, None] * x) + rho * torch.eye(x.shape[1], dtype=torch.float64)
        b = x.T @ (psi * y)
        chol = torch.linalg.cholesky(a)

        def solve(rhs: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(rhs[:, None], chol)[:, 0]

        if variant == "standard":
            # No state yet: start at the received model, so the first dual step is zero.
            w = state["w"] if state else z
            lam = state["lam"] if state else torch.zeros_like(z)
            lam = lam + rho * (w - z)
            w = solve(b - lam + rho * z)
            upload = w + lam / rho
            new_state: State | None = {"w": w, "lam": lam}
        else:
            upload = solve(b + rho * z)
            new_state = None
        payload = {"weight": upload.to(received.dtype).reshape(received.shape)}
        return Fit(payload=payload, num_examples=len(data), state=new_state)
