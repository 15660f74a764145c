"""DP-BREM: record-level differential privacy and Byzantine robustness through client momentum.

Xiaolan Gu, Ming Li, Li Xiong. "DP-BREM: Differentially-Private and Byzantine-Robust Federated
Learning with Client Momentum." USENIX Security 2025 (arXiv 2306.12608). Reference code:
Emory-AIMS/DP-BREM (``train.py``, ``utils.py::get_clipped_gradient``, ``args.py``).

Clients (:mod:`fedlab.clients.dp_brem`) send their momentum ``m_i`` of per-record clipped
gradients. The trusted server, at version ``t``::

    S  = a uniform sample of ceil(client_rate · n) of the n momenta received
    U  = Σ_{i∈S} clip(m_i − v, τ_t) + N(0, s_t² I)      clip(x, τ) = x · min(1, τ/‖x‖)
    v ← v + U / |S|
    x ← x − η_t · v                                    (through the server optimizer, on Δ = −v)

with the reference code's linear schedules over ``schedule_versions`` = T versions (0: none):
``η_t = server_lr · (1 + (lr_end − 1) t/T)``, ``R_t = record_clip · (1 − (1 − clip_end) t/T)``,
``τ_t = tau · (1 − (1 − clip_end) t/T)``.

The reference code's DP baselines (its ``client_clip_type=direct_clip`` and
``aggregate_method=median``; "DP-FedAvg" with ``β = 0``) are the ``aggregator`` option, with the
same clients, schedules and noise calibration, so that comparisons are at equal privacy:

* ``"direct-clip"``: ``v = (Σ_{i∈S} clip(m_i, τ_t) + N(0, s_t² I)) / |S|``, clipping around 0.
* ``"median"``: ``v = median_{i∈S}(m_i) + N(0, s_t² I)``, coordinate-wise, no clipping. The
  noise is on the median itself, not divided by ``|S|``, as in the reference: the median's
  sensitivity is that of one momentum, not ``1/|S|`` of it.

Sensitivity and noise. Neighbouring datasets differ in one record of one client (substitution).
A client divides its clipped sum by the fixed ``batch_size`` B, so one record moves its gradient
``g_i`` by at most ``Δ_t = 2 R_t / B``, and its momentum ``m_i = Σ_k (1 − β) β^{t−k} g_i^k``
by at most ``b_i = (1 − β) Δ_t + β b_i`` (the recursion, over the versions the client
answered, that the server tracks per client). ``clip(· − v, τ)`` is the projection onto a ball
around ``v``, which is 1-Lipschitz, and ``v`` depends only on past outputs, so the sum ``U``
moves by at most ``D_t = max_{i∈S} b_i``. The noise std is ``s_t = noise_multiplier · D_t``: a
Gaussian mechanism with noise multiplier ``z`` at every version. ``direct-clip`` projects onto a
ball around 0, also 1-Lipschitz: same bound. For ``median``, each coordinate of a
coordinate-wise median moves by at most that coordinate's change in the one changed momentum
(sorting is 1-Lipschitz in the max norm), so the median moves by at most ``b_i ≤ D_t`` in L2:
the same Gaussian mechanism, and the same ``ε``.

Accounting. Conditioned on the hidden randomness (minibatches, the sample ``S``), the run is an
adaptive composition of Gaussian mechanisms of noise multiplier ``z``; Rényi divergence is
jointly quasi-convex, so the mixture over that randomness keeps the bound. We account it with
Opacus's RDP accountant at sample rate 1: no amplification by subsampling, because momentum
carries a record into every later version and the client sample is not the add/remove Poisson
sampling that Opacus's analysis covers. This is an upper bound, looser than the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab import optim, privacy, seeding
from fedlab.strategies.robust import coordinate_median
from fedlab.strategy import EveryRound, Strategy, Trigger, floating
from fedlab.types import ClientId, Metrics, Params, Round, State, Task, Update

__all__ = ["AGGREGATORS", "DPBREM"]

AGGREGATORS = ("centered", "direct-clip", "median")
"""DP-BREM's centered clipping, then the reference code's two DP baselines."""


@dataclass(frozen=True, kw_only=True)
class DPBREM(optim.ServerOptimizerOptions, Strategy):
    """DP-BREM: centered clipping of client momenta plus server-side Gaussian noise.

    Every available client gets a task every version, so every honest momentum moves every
    version as in the reference code with ``β > 0``; ``--fraction`` therefore does not limit
    training, and ``client_rate`` says how many answers are aggregated.

    Args:
        aggregator: ``"centered"`` (DP-BREM), or the baselines ``"direct-clip"`` and
            ``"median"`` (see the module docs), all at the same noise.
        noise_multiplier: ``z``: noise std over the sensitivity of the clipped sum (0: no DP).
        record_clip: ``R_0``, the per-record gradient clipping norm sent to clients.
        tau: ``C_0``, the clipping radius around ``v`` (``centered``) or around 0
            (``direct-clip``); ``inf``: plain mean. ``median`` does not clip.
        momentum: ``β``, the client momentum in ``[0, 1)``.
        batch_size: ``B``, records per client per version, and the clients' divisor.
        client_rate: ``q``, the fraction of received momenta aggregated, in ``(0, 1]``.
        schedule_versions: ``T`` of the decaying schedules (0: constant ``lr``, ``R``, ``τ``).
        lr_end: ``η_T / η_0`` of the linear learning-rate decay.
        clip_end: ``R_T / R_0 = τ_T / τ_0`` of the linear clip decay.
        delta: the ``δ`` at which ``epsilon`` is reported.
        server_optimizer: ``"sgd"`` or ``"adam"``.
        server_lr: ``η_0``.
        server_momentum: ``mu`` of server SGD.
        server_beta1: Adam's first-moment decay.
        server_beta2: Adam's second-moment decay.
        server_eps: Adam's ``eps``.
    """

    client: ClassVar[str] = "dp-brem"

    aggregator: str = "centered"
    noise_multiplier: float = 1.0
    record_clip: float = 10.0
    tau: float = 5.0
    momentum: float = 0.9
    batch_size: int = 32
    client_rate: float = 1.0
    schedule_versions: int = 0
    lr_end: float = 0.1
    clip_end: float = 0.3
    delta: float = 1e-5
    server_lr: float = 0.1

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(
                f"dp-brem: aggregator must be one of {', '.join(AGGREGATORS)}, "
                f"got {self.aggregator!r}"
            )
        checks = {
            "noise_multiplier": math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0,
            "record_clip": self.record_clip > 0,
            "tau": self.tau > 0,
            "momentum": 0 <= self.momentum < 1,
            "batch_size": self.batch_size >= 1,
            "client_rate": 0 < self.client_rate <= 1,
            "schedule_versions": self.schedule_versions >= 0,
            "lr_end": math.isfinite(self.lr_end) and self.lr_end > 0,
            "clip_end": 0 < self.clip_end <= 1,
            "delta": 0 < self.delta < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"dp-brem: invalid {bad[0]}={getattr(self, bad[0])!r}")
        if self.noise_multiplier > 0 and math.isinf(self.record_clip):
            raise ValueError("dp-brem: noise needs a finite record_clip")
        self.optimizer  # noqa: B018  (builds it, so a bad hyperparameter fails here)

    @property
    def trigger(self) -> Trigger:
        return EveryRound()

    def progress(self, version: int) -> float:
        """``t / T`` of the schedules, capped at 1 (0 without schedules)."""
        if self.schedule_versions == 0:
            return 0.0
        return min(1.0, version / self.schedule_versions)

    def record_clip_at(self, version: int) -> float:
        """``R_t``."""
        return self.record_clip * (1 - (1 - self.clip_end) * self.progress(version))

    def tau_at(self, version: int) -> float:
        """``τ_t``."""
        return self.tau * (1 - (1 - self.clip_end) * self.progress(version))

    def lr_at(self, version: int) -> float:
        """``η_t``."""
        return self.server_lr * (1 + (self.lr_end - 1) * self.progress(version))

    def _clipped_sum(
        self, chosen: Sequence[Update], center: Params, tau: float
    ) -> tuple[dict[str, torch.Tensor], float]:
        """``Σ clip(m_i − c, τ)``, ``c`` the center (``centered``) or 0, and the share clipped."""
        # In float64: differences and sums of finite float32 updates can overflow float32.
        total = {name: torch.zeros_like(center[name], dtype=torch.float64) for name in center}
        clipped = 0
        for u in chosen:
            if self.aggregator == "centered":
                diff = {name: u.payload[name].double() - center[name] for name in center}
            else:
                diff = {name: u.payload[name].double() for name in center}
            norm = optim.norm(diff)
            scale = min(1.0, tau / norm) if norm > 0 else 1.0
            clipped += scale < 1.0
            for name in center:
                total[name].add_(diff[name], alpha=scale)
        return total, clipped / len(chosen)

    def init(self, params: Params) -> State:
        return {
            "optimizer": self.optimizer.init(params),
            "center": {k: torch.zeros_like(v) for k, v in floating(params).items()},
            "bounds": {},
            "steps": 0,
        }

    def configure(self, state: State, params: Params, round: Round) -> dict[ClientId, Task]:
        """Every available client gets the model and this version's ``R_t``, ``B`` and ``β``."""
        if round.available is not None:
            clients = [c for c in round.available if c not in round.busy]
        else:
            clients = [c for c in range(round.num_clients) if c not in round.busy]
        config = {
            "record_clip": self.record_clip_at(round.version),
            "batch_size": self.batch_size,
            "momentum": self.momentum,
        }
        task = Task(version=round.version, params=params, config=config)
        return {c: task for c in clients}

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            return params, state, {}
        t = round.version
        sens = 2 * self.record_clip_at(t) / self.batch_size
        # Every client that answered has folded this version's gradient into its momentum.
        bounds = dict(state["bounds"])
        for u in updates:
            key = str(u.client_id)
            bounds[key] = (1 - self.momentum) * sens + self.momentum * bounds.get(key, 0.0)
        k = max(1, math.ceil(self.client_rate * len(updates)))
        chosen = list(updates)
        if k < len(updates):
            rng = seeding.numpy_rng(round.seed, seeding.SAMPLE)
            picked = sorted(int(i) for i in rng.choice(len(updates), size=k, replace=False))
            chosen = [updates[i] for i in picked]
        center = state["center"]
        metrics: dict[str, float] = {"aggregated": float(k)}
        if self.aggregator == "median":
            v = coordinate_median([{name: u.payload[name] for name in center} for u in chosen])
        else:
            v, metrics["clipped"] = self._clipped_sum(chosen, center, self.tau_at(t))
        v = {name: x.double() for name, x in v.items()}  # noise and center join in float64
        steps = int(state["steps"])
        if self.noise_multiplier > 0:
            std = self.noise_multiplier * max(bounds[str(u.client_id)] for u in chosen)
            gen = seeding.torch_generator(round.seed, privacy.NOISE)
            for name in sorted(v):
                noise = torch.randn(v[name].shape, generator=gen, dtype=torch.float64)
                v[name].add_(noise * std)
            steps += 1
            metrics["noise_std"] = std
            history = [[self.noise_multiplier, 1.0, float(steps)]]
            metrics["epsilon"] = privacy.epsilon(history, self.delta)
        if self.aggregator == "centered":
            v = {name: center[name] + x / k for name, x in v.items()}
        elif self.aggregator == "direct-clip":
            v = {name: x / k for name, x in v.items()}
        v = {name: x.to(center[name].dtype) for name, x in v.items()}
        opt = self.optimizer
        direction, opt_state = opt.direction(
            {name: -x for name, x in v.items()}, state["optimizer"]
        )
        new = optim.apply(params, direction, self.lr_at(t))
        new_state = {"optimizer": opt_state, "center": v, "bounds": bounds, "steps": steps}
        metrics["step_norm"] = optim.norm(direction)
        return new, new_state, metrics
