"""Client-level differential privacy (DP-FedAvg) around any strategy that averages deltas.

H. Brendan McMahan, Daniel Ramage, Kunal Talwar, Li Zhang. "Learning Differentially Private
Recurrent Language Models." ICLR 2018. Adaptive clipping: Galen Andrew, Om Thakkar, H. Brendan
McMahan, Swaroop Ramaswamy. "Differentially Private Learning with Adaptive Clipping." NeurIPS
2021.

Clients clip their delta to norm ``S`` (:class:`fedlab.clients.dp_fedavg.ClipUpdate`, an update
transform). :class:`DPFedAvg` wraps the run's strategy on the server:

- ``central`` noise (trusted server, Flower's ``DifferentialPrivacyServerSideFixedClipping``):
  the server clips every update again (so the bound holds even for a client that skipped the
  transform), forms the **uniform** mean of the ``m`` clipped updates plus ``N(0, (zS/m)² I)``,
  and hands the wrapped strategy that one noisy mean in place of every update, each with
  ``num_examples = 1``. Whatever the strategy then does (its staleness weights, FedAU's
  weights, FedStale's memory, its server optimizer) is post-processing of the accounted release.
  The accountant is Opacus's RDP for the Poisson-subsampled Gaussian mechanism with noise
  multiplier ``z`` at rate ``q = m / N`` per version. The run samples exactly ``m`` clients
  (or takes the ``m`` that arrive) and divides by the realized ``m``: that is the usual
  fixed-size approximation of the Poisson analysis (the ε is not a proof for fixed-size
  sampling), and it treats who took part as hidden, which the strategy's per-client weights
  and memory do not strictly keep hidden.
- ``local`` noise (untrusted server): each client adds ``N(0, (zS)² I)`` to its own clipped
  update, so every update that leaves a client is a Gaussian mechanism on its own; two
  datasets of one client give updates up to ``2S`` apart, so the noise multiplier accounted
  is ``z/2``, at rate 1 (the server knows who sent what), composed over the versions that
  client took part in. The ``epsilon`` reported is the worst client's. Any strategy that takes
  deltas may aggregate them (robust ones included), with its own weights.

Adaptive clipping (central only): clients also send the norm before clipping; the server
releases the noisy share ``b̃ = (Σ 1[‖Δ_i‖ <= S] + N(0, σ_b²)) / m`` and moves
``S <- S · exp(-η (b̃ - γ))`` toward the ``γ`` quantile of the norms. The count is a second
Gaussian query of sensitivity 1, so the update's noise multiplier is raised to
``z_Δ = (z^-2 - σ_b^-2)^-1/2``, which keeps the accounted ``z`` exact (Andrew et al., Thm 1).

``target_epsilon`` is a budget: before handing out tasks for a version whose release would
take ``ε`` past it, the wrapper raises :class:`fedlab.privacy.PrivacyBudgetExhausted`; nothing
of that version is computed or released, and the last checkpoint is the run's final model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fedlab import optim, privacy, seeding
from fedlab.clients.dp_fedavg import CLIP_KEY, NORM_KEY
from fedlab.privacy import PrivacyBudgetExhausted
from fedlab.strategy import Buffer, Strategy, Trigger, add_into
from fedlab.types import ClientId, Metrics, Params, Round, State, Task, Update

__all__ = ["NOISES", "DPFedAvg"]

NOISES = ("central", "local")


@dataclass(frozen=True, kw_only=True)
class DPFedAvg(Strategy):
    """Client-level DP around ``inner``: uniform mean of clipped deltas plus Gaussian noise.

    Args:
        inner: the strategy that aggregates; it must average deltas
            (``delta_aggregation == "linear"``; any delta strategy with ``local`` noise).
        noise: ``"central"`` (the server adds noise to the sum) or ``"local"`` (each client).
        noise_multiplier: ``z`` (0 with ``target_epsilon``: solved for ``versions`` versions
            at ``sample_rate``).
        clip_norm: ``S``, the initial clipping norm when ``adaptive``.
        delta: the ``δ`` of the reported ``ε``.
        target_epsilon: the budget (0: none).
        versions: versions the run plans, to solve ``z`` from ``target_epsilon``.
        sample_rate: the planned share of clients per version, to solve ``z``.
        adaptive: adapt ``S`` to the ``target_quantile`` of the update norms (central only).
        target_quantile: ``γ``.
        clip_lr: ``η``, the geometric step of ``S``.
        count_stddev: ``σ_b`` of the noisy count (0: ``m / 20``, the paper's choice).
    """

    inner: Strategy
    noise: str = "central"
    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float = 0.0
    versions: int = 0
    sample_rate: float = 0.0
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_stddev: float = 0.0

    def __post_init__(self) -> None:
        kind = getattr(self.inner, "delta_aggregation", "")
        name = type(self.inner).__name__
        if self.noise not in NOISES:
            raise ValueError(f"dp noise must be one of {NOISES}, got {self.noise!r}")
        if self.noise == "central" and kind != "linear":
            raise ValueError(
                f"client-level DP with central noise cannot hold for {name}: the noise is "
                "calibrated to a uniform mean of deltas, and this strategy "
                + (
                    "combines them non-linearly (use --dp-noise local)"
                    if kind
                    else "does not aggregate model deltas"
                )
            )
        if not kind:
            raise ValueError(
                f"client-level DP clips model deltas, and {name}'s clients send another payload"
            )
        checks = {
            "noise_multiplier": math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0,
            "clip_norm": self.clip_norm > 0,
            "delta": 0 < self.delta < 1,
            "target_epsilon": math.isfinite(self.target_epsilon) and self.target_epsilon >= 0,
            "target_quantile": 0 <= self.target_quantile <= 1,
            "clip_lr": math.isfinite(self.clip_lr) and self.clip_lr >= 0,
            "count_stddev": math.isfinite(self.count_stddev) and self.count_stddev >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"client-level dp: invalid {bad[0]}={getattr(self, bad[0])!r}")
        if self.adaptive and self.noise != "central":
            raise ValueError("adaptive clipping needs central noise: its count is released noisy")
        if self.noise_multiplier > 0 and math.isinf(self.clip_norm):
            raise ValueError("client-level dp: noise needs a finite clip_norm")
        if self.noise_multiplier == 0 and self.target_epsilon > 0:
            if not (self.versions >= 1 and 0 < self.sample_rate <= 1):
                raise ValueError("solving z from target_epsilon needs versions and sample_rate")
            rate = self.sample_rate if self.noise == "central" else 1.0
            z = privacy.noise_multiplier_for(self.target_epsilon, self.delta, rate, self.versions)
            object.__setattr__(self, "noise_multiplier", z if self.noise == "central" else 2 * z)

    @property
    def trigger(self) -> Trigger:
        return self.inner.trigger

    @property
    def accounted_multiplier(self) -> float:
        """The noise multiplier of one client's contribution as accounted."""
        return self.noise_multiplier if self.noise == "central" else self.noise_multiplier / 2

    def init(self, params: Params) -> State:
        return {
            "inner": self.inner.init(params),
            "clip": self.clip_norm,
            "history": [],
            "counts": {},
        }

    def _epsilon_after(self, state: State, m: int, num_clients: int) -> float:
        """The run's ``ε`` once a version of ``m`` updates from ``num_clients`` is released."""
        z = self.accounted_multiplier
        if self.noise == "central":
            history = privacy.compose(state["history"], z, min(1.0, m / num_clients), 1)
        else:
            worst = max([int(c) for c in state["counts"].values()], default=0) + 1
            history = [[z, 1.0, float(worst)]]
        return privacy.epsilon(history, self.delta)

    def configure(self, state: State, params: Params, round: Round) -> dict[ClientId, Task]:
        tasks = self.inner.configure(state["inner"], params, round)
        if tasks:
            trigger = self.inner.trigger
            m = trigger.k if isinstance(trigger, Buffer) else len(tasks)
            self.update_multiplier(m)  # an impossible count noise fails before training
            eps = self._epsilon_after(state, m, round.num_clients) if self.target_epsilon else 0
            if eps > self.target_epsilon:
                raise PrivacyBudgetExhausted(
                    f"stopped before version {round.version + 1}: releasing it would take the "
                    f"client-level epsilon to {eps:.3f}, past the budget target_epsilon="
                    f"{self.target_epsilon} (delta={self.delta:g}); the run so far spent "
                    f"{self.spent(state):.3f}"
                )
        clip = float(state["clip"])
        return {
            c: Task(t.version, t.params, {**t.config, CLIP_KEY: clip}) for c, t in tasks.items()
        }

    def count_std(self, m: int) -> float:
        """``σ_b`` for a version of ``m`` updates."""
        return self.count_stddev or m / 20

    def update_multiplier(self, m: int) -> float:
        """``z_Δ``, the noise multiplier on the sum of updates, for a version of ``m``.

        ``z`` itself without adaptive clipping; with it, ``(z^-2 - σ_b^-2)^-1/2`` so that the
        update and the count together cost what ``z`` alone is accounted for.
        """
        z = self.noise_multiplier
        if not (self.adaptive and z > 0):
            return z
        sigma_b = self.count_std(m)
        if sigma_b <= z:
            raise ValueError(
                f"adaptive clipping with noise_multiplier {z:g} needs clip_count_stddev > {z:g} "
                f"for versions of {m} updates (got {sigma_b:g}; the default is m/20)"
            )
        return float((z**-2 - sigma_b**-2) ** -0.5)

    def spent(self, state: State) -> float:
        """The ``ε`` released so far."""
        if self.noise == "central":
            return privacy.epsilon(state["history"], self.delta)
        worst = max([int(c) for c in state["counts"].values()], default=0)
        return privacy.epsilon([[self.accounted_multiplier, 1.0, float(worst)]], self.delta)

    def validate(self, update: Update, params: Params) -> None:
        payload = {k: v for k, v in update.payload.items() if k != NORM_KEY}
        self.inner.validate(replace(update, payload=payload), params)

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            new, inner, metrics = self.inner.aggregate(state["inner"], params, updates, round)
            return new, {**state, "inner": inner}, metrics
        m = len(updates)
        clip = float(state["clip"])
        norms = [float(u.payload[NORM_KEY]) for u in updates if NORM_KEY in u.payload]
        deltas = [{k: v for k, v in u.payload.items() if k != NORM_KEY} for u in updates]
        out: dict[str, float] = {"clip_norm": clip}
        if self.noise == "central":
            z = self.update_multiplier(m)
            # Summed in float64 (finite clipped deltas cannot overflow it), cast back below.
            total = {
                k: torch.zeros(v.shape, dtype=torch.float64, device=v.device)
                for k, v in deltas[0].items()
            }
            for d in deltas:
                n = optim.norm(d)
                scale = clip / n if n > clip else 1.0
                for k in total:
                    add_into(total[k], d[k], scale)
            std = z * clip if z > 0 else 0.0
            if std > 0:
                gen = seeding.torch_generator(round.seed, privacy.NOISE)
                for k in sorted(total):
                    noise = torch.randn(total[k].shape, generator=gen, dtype=torch.float64)
                    total[k].add_(noise * std)
            mean = {k: (v / m).to(deltas[0][k].dtype) for k, v in total.items()}
            shown = [replace(u, payload=mean, num_examples=1) for u in updates]
            history = privacy.compose(
                state["history"], self.noise_multiplier, min(1.0, m / round.num_clients), 1
            )
            out["noise_std"] = std / m
            counts = state["counts"]
        else:
            shown = [
                replace(u, payload=d, num_examples=1) for u, d in zip(updates, deltas, strict=True)
            ]
            history = state["history"]
            counts = dict(state["counts"])
            for u in updates:
                counts[str(u.client_id)] = int(counts.get(str(u.client_id), 0)) + 1
        new_clip = clip
        if self.adaptive:
            if len(norms) != m:
                raise ValueError(
                    "adaptive clipping needs every update's norm (ClipUpdate with send_norm)"
                )
            below = sum(n <= clip for n in norms)
            gen = seeding.torch_generator(round.seed, privacy.NOISE, 1)
            draw = float(torch.randn((), generator=gen, dtype=torch.float64))
            noisy = (below + draw * self.count_std(m)) / m
            new_clip = clip * math.exp(-self.clip_lr * (noisy - self.target_quantile))
            out["unclipped_share"] = noisy
        params, inner, metrics = self.inner.aggregate(state["inner"], params, shown, round)
        new_state = {"inner": inner, "clip": new_clip, "history": history, "counts": counts}
        out.update(metrics)
        if self.noise_multiplier > 0:
            out["epsilon"] = self.spent(new_state)
        return params, new_state, out
