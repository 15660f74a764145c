"""ADMM-based federated weighted least squares over noisy links, with random scheduling.

Lari, Arablouei, Gogineni, Werner. "Noise-Robust and Resource-Efficient ADMM-based Federated
Learning." arXiv 2409.13451, 2024.

The paper's exact iteration could not be checked (no public code, body unread); what follows
is derived from the problem and the abstract, and the ``"proposed"`` variant is a
reconstruction, not a verified copy of the paper's algorithm box.

Problem. Client ``k`` holds ``X_k``, ``y_k`` and a positive diagonal ``Psi_k``; with
``A_k = X_k^T Psi_k X_k`` and ``b_k = X_k^T Psi_k y_k`` the WLS optimum of
``sum_k 1/2 (y_k - X_k w)^T Psi_k (y_k - X_k w)`` is ``w* = (sum_k A_k)^-1 sum_k b_k``. In
consensus form: ``min sum_k f_k(w_k)`` subject to ``w_k = z``.

Standard FL-ADMM (``variant="standard"``). The scaled augmented Lagrangian
``sum_k f_k(w_k) + lambda_k^T (w_k - z) + rho/2 ||w_k - z||^2`` gives, per iteration,
``w_k <- argmin_w f_k(w) + lambda_k^T w + rho/2 ||w - z||^2 = (A_k + rho I)^-1
(b_k - lambda_k + rho z)``, then ``z <- (1/K) sum_k (w_k + lambda_k / rho)`` and
``lambda_k <- lambda_k + rho (w_k - z)``. The dual step needs the new ``z``, so a client runs
it when the next model arrives: on receiving ``z~ = z + eta`` (downlink noise) it does
``lambda_k <- lambda_k + rho (w_k - z~)``, ``w_k <- (A_k + rho I)^-1 (b_k - lambda_k +
rho z~)`` and uploads ``u_k = w_k + lambda_k / rho``; the server receives ``u_k + zeta``
(uplink noise) and averages the latest upload of every client (unscheduled clients contribute
their last one). Without noise ``sum_k lambda_k = 0`` is invariant and ``z -> w*``. With noise
``z~`` enters twice, and ``sum_k lambda_k`` absorbs ``-rho sum_k eta_k`` every iteration with
nothing pulling it back: a random walk, so the MSD grows with the iteration count.

Proposed (``variant="proposed"``, reconstructed). Drop the dual and use the received model
once, as a proximal anchor: ``w_k <- (A_k + rho I)^-1 (b_k + rho z~)``, upload ``w_k``,
``z <- (1/K) sum_k w~_k``. Each iteration is an affine contraction
``z <- (1/K) sum_k M_k (b_k + rho z + rho eta_k) + zeta_bar`` with ``M_k = (A_k + rho I)^-1``;
its spectral radius ``rho ||(1/K) sum_k M_k|| < 1``, so noise stays bounded (a steady-state
MSD instead of a random walk). Its fixed point solves ``sum_k (M_k (b_k - A_k z)) = 0``, which
equals ``w*`` when all ``M_k`` agree and is unbiased for ``w°`` when ``y = X w° + nu``
(``E[b_k - A_k w°] = 0``), the "convergence in mean" the abstract claims; in general it is
``O(1/rho)``-close to ``w*`` but not equal to it.

Scheduling: every available client gets a task each version; ``task.config["scheduled"]``
marks the ``round.slots`` (``ceil(fraction * K)``) of them drawn uniformly from ``round.seed``
that upload. Unscheduled clients answer with an empty payload that :meth:`ADMMWLS.aggregate`
ignores. That is the hook for the paper's second change (unscheduled clients keep updating
locally); under the reconstructed update it changes nothing, because a scheduled solve does not
read the client's previous ``w_k``, so no local update is run (the paper's rule is unknown).

Noise: ``eta ~ N(0, link_noise^2 I)`` per ``(round seed, client)`` on the downlink (added in
:meth:`ADMMWLS.configure`) and ``zeta`` likewise on the uplink (added in
:meth:`ADMMWLS.aggregate`), both from :mod:`fedlab.seeding` streams, so runs resume
bit-identically.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab import seeding
from fedlab.strategy import Strategy, check_like
from fedlab.types import ClientId, Metrics, Params, Round, State, Task, Update

VARIANTS = ("proposed", "standard")

# Stream purposes of the simulated channel, clear of fedlab.seeding's and fedlab.data's.
_P_DOWNLINK = 201
_P_UPLINK = 202


def channel_noise(like: torch.Tensor, std: float, *keys: int) -> torch.Tensor:
    """Gaussian channel noise shaped like ``like`` from the stream named by ``keys``."""
    g = seeding.torch_generator(*keys)
    return torch.randn(like.shape, generator=g, dtype=torch.float64).to(like.dtype) * std


@dataclass(frozen=True, kw_only=True)
class ADMMWLS(Strategy):
    """FL-ADMM for weighted least squares with noisy links (``admm-wls``).

    Args:
        variant: ``"proposed"`` (dual-free local solve) or ``"standard"`` (FL-ADMM with duals).
        rho: the ADMM penalty.
        link_noise: standard deviation of the additive Gaussian noise on each downlink and
            uplink transmission (0: noise-free links).
    """

    client: ClassVar[str] = "admm-wls"
    # Weighted least squares over each client's (X, y, Psi): the default workload when the user
    # names none, and the only built-in one its client half can read.
    run_defaults: ClassVar[Mapping[str, str]] = {"workload": "wls"}

    variant: str = "proposed"
    rho: float = 1.0
    link_noise: float = 0.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not (math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be > 0, got {self.rho!r}")
        if not (math.isfinite(self.link_noise) and self.link_noise >= 0):
            raise ValueError(f"link_noise must be >= 0, got {self.link_noise!r}")

    def configure(self, state: State, params: Params, round: Round) -> dict[ClientId, Task]:
        """Give every available client the (noisy) model; mark ``round.slots`` as scheduled."""
        if round.available is not None:
            clients = [c for c in round.available if c not in round.busy]
        else:
            clients = [c for c in range(round.num_clients) if c not in round.busy]
        scheduled = set(clients)
        if len(clients) > round.slots:
            rng = seeding.numpy_rng(round.seed, seeding.SAMPLE)
            picked = rng.choice(len(clients), size=round.slots, replace=False)
            scheduled = {clients[int(i)] for i in picked}
        tasks: dict[ClientId, Task] = {}
        for c in clients:
            sent = dict(params)
            if self.link_noise > 0:
                sent = {
                    k: v + channel_noise(v, self.link_noise, round.seed, _P_DOWNLINK, c)
                    for k, v in params.items()
                }
            config = {"scheduled": c in scheduled, "rho": self.rho, "variant": self.variant}
            tasks[c] = Task(version=round.version, params=sent, config=config)
        return tasks

    def validate(self, update: Update, params: Params) -> None:
        """Accept an empty payload (an unscheduled client) or one shaped like ``params``."""
        if update.payload:
            check_like(update.payload, params, what=f"update from client {update.client_id}")

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        """Store each scheduled client's noisy upload; average the latest uploads of all."""
        w = params["weight"]
        uploads: torch.Tensor = state.get("uploads", w.reshape(1, -1).repeat(round.num_clients, 1))
        uploads = uploads.clone()
        received = 0
        for u in updates:
            if not u.payload:
                continue
            got = u.payload["weight"]
            if self.link_noise > 0:
                got = got + channel_noise(got, self.link_noise, round.seed, _P_UPLINK, u.client_id)
            uploads[u.client_id] = got.reshape(-1)
            received += 1
        z = uploads.double().mean(dim=0).to(uploads.dtype).reshape(w.shape)
        step = float(torch.linalg.vector_norm(z - w))
        return {"weight": z}, {"uploads": uploads}, {"scheduled": received, "step_norm": step}
