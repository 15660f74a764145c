"""Local minibatch SGD: the client half of FedAvg and of every strategy that takes deltas.

With ``dp`` set, the same loop is DP-SGD (Abadi et al., CCS 2016, as Opacus implements it):
Poisson-sampled batches at rate ``q = L / n``, per-record gradients clipped to
``max_grad_norm`` ``C``, ``N(0, σ²C²)`` added to their sum, divided by the expected batch size
``L``. Each client's accountant history lives in its client state, so it persists across
versions and resumes, and the client's ``ε`` at its ``δ`` is reported in every update's metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fedlab import precision, privacy, seeding
from fedlab.client import (
    ClientAlgorithm,
    ClientContext,
    Fit,
    batches_per_pass,
    minibatches,
)
from fedlab.data import ClientData
from fedlab.objectives import CLASSIFICATION, Objective
from fedlab.privacy import Forward
from fedlab.types import Params, State, Task


def model_delta(model: nn.Module, start: Params) -> dict[str, torch.Tensor]:
    """``y - x``: trained minus starting values of the floating-point state entries."""
    return {
        k: v.detach() - start[k].to(v.device)
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


def poisson_batches(
    n: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches for ``steps`` steps, each record in each batch independently w.p. ``q``."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=generator) < sample_rate).squeeze(1)


@dataclass(frozen=True)
class Plan:
    """One task's local SGD settings for one client, resolved against its data size."""

    lr: float
    batch_size: int  # effective: at most the client's examples
    steps: int
    momentum: float
    weight_decay: float
    drop_last: bool


@dataclass(frozen=True)
class _SampleDP:
    """One task's DP-SGD settings, resolved against the client's size and stored state."""

    noise_multiplier: float
    clip: float
    delta: float
    expected_batch: int
    sample_rate: float
    poisson: bool
    history: privacy.History

    def gradient(
        self,
        forward: Forward,
        params: Sequence[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        noise: torch.Generator,
        objective: Objective = CLASSIFICATION,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, int]:
        """``(Σ clip(g_j) + N(0, σ²C²)) / L``, the per-record losses and logits, and how many
        records were clipped."""
        if len(x) > 0:
            grads, losses, out = privacy.per_record_grads(forward, params, x, y, objective.loss)
            clipped, norms = privacy.clip_per_record(grads, self.clip)
            total = [g.sum(0) for g in clipped]
            n_clipped = int((norms > self.clip).sum())
        else:  # an empty Poisson batch still takes a (pure noise) step, as Opacus does
            total = [torch.zeros_like(p) for p in params]
            losses = out = torch.zeros(0, device=x.device)
            n_clipped = 0
        if self.noise_multiplier > 0:
            std = self.noise_multiplier * self.clip
            total = [
                t + (torch.randn(t.shape, generator=noise, dtype=torch.float64) * std).to(t)
                for t in total
            ]
        return [t / self.expected_batch for t in total], losses, out, n_clipped


@dataclass(frozen=True, kw_only=True)
class LocalSGD(ClientAlgorithm):
    """Minibatch SGD from the task's params; returns the delta ``y - x``.

    Every setting can be overridden per task through ``task.config`` (the server decides).

    Args:
        lr: local learning rate.
        local_steps: SGD steps per task (used when ``local_epochs`` is 0).
        local_epochs: passes over the client's data; overrides ``local_steps`` when > 0.
        batch_size: minibatch size (with ``dp``: the expected batch size ``L``); 0 means full
            batch.
        momentum: local momentum (the buffer is reset every task).
        weight_decay: L2 penalty.
        dp: train with DP-SGD (record-level differential privacy of this client's data).
        noise_multiplier: DP-SGD's ``σ`` (ignored when ``target_epsilon`` is set).
        max_grad_norm: DP-SGD's per-record clipping norm ``C``.
        delta: the client's ``δ``; 0 means ``1 / (10 n)`` for a client with ``n`` records.
        target_epsilon: when > 0, ``σ`` is solved at the client's first task so that
            ``dp_versions`` tasks cost at most this ``ε`` (the client could be picked at every
            version); ``σ`` then stays fixed in the client's state.
        dp_versions: the versions the run plans, for ``target_epsilon``.
        poisson: Poisson sampling (what the accountant assumes); ``False`` uses shuffled
            fixed-size batches, for which the accounted ``ε`` is an approximation.
        drop_last: leave out the partial last batch of each pass over the data (by default
            it is trained, so an epoch is exactly one pass, as with PyTorch's ``DataLoader``).
        precision: ``fp32``, or ``bf16`` (forward and loss under bfloat16 autocast, fp32
            params and momentum; for GPUs, see :mod:`fedlab.precision`).
    """

    lr: float = 0.05
    local_steps: int = 10
    local_epochs: float = 0
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    dp: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 0.0
    target_epsilon: float = 0.0
    dp_versions: int = 0
    poisson: bool = True
    drop_last: bool = False
    precision: str = "fp32"

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        model.train()
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        # functional_call looks for tied weights on every call, walking the whole module
        # tree (half the overhead of a small model's forward); only a model with a
        # parameter under two names needs it.
        tied = any(
            len(list(named(remove_duplicate=False))) > len(list(named()))
            for named in (model.named_parameters, model.named_buffers)
        )

        def forward(tensors: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = functional_call(
                model, dict(zip(names, tensors, strict=True)), (x,), tie_weights=tied
            )
            return out

        metrics, state = self.train(data, task, ctx, params, forward, state)
        return Fit(
            payload=model_delta(model, task.params),
            num_examples=len(data),
            metrics=metrics,
            state=state,
        )

    def plan(self, task: Task, n: int) -> Plan:
        """The task's SGD settings for a client with ``n >= 1`` examples.

        With ``local_epochs`` the step count is ``ceil(epochs * batches per pass)``: one
        epoch is exactly one pass (the partial last batch included unless ``drop_last``).
        """
        bs = int(self.setting(task, "batch_size"))
        epochs = float(self.setting(task, "local_epochs"))
        drop_last = bool(self.setting(task, "drop_last"))
        steps = (
            max(1, math.ceil(epochs * batches_per_pass(n, bs, drop_last)))
            if epochs > 0
            else int(self.setting(task, "local_steps"))
        )
        return Plan(
            lr=float(self.setting(task, "lr")),
            batch_size=min(bs, n) if bs > 0 else n,
            steps=steps,
            momentum=float(self.setting(task, "momentum")),
            weight_decay=float(self.setting(task, "weight_decay")),
            drop_last=drop_last,
        )

    def _sample_dp(self, task: Task, n: int, bs: int, steps: int, state: State) -> _SampleDP:
        """This task's DP-SGD settings; solves ``σ`` once per client for ``target_epsilon``."""
        clip = float(self.setting(task, "max_grad_norm"))
        delta = float(self.setting(task, "delta")) or 1 / (10 * n)
        target = float(self.setting(task, "target_epsilon"))
        q = min(1.0, bs / n)
        stored = dict(state.get("dp") or {})
        if target > 0:
            z = stored.get("noise_multiplier")
            if z is None:
                versions = int(self.setting(task, "dp_versions"))
                if versions < 1:
                    raise ValueError("dp with target_epsilon needs dp_versions >= 1")
                z = privacy.noise_multiplier_for(target, delta, q, versions * steps)
        else:
            z = float(self.setting(task, "noise_multiplier"))
        if not (clip > 0 and z >= 0 and 0 < delta < 1) or (z > 0 and math.isinf(clip)):
            raise ValueError(
                f"dp needs max_grad_norm > 0 (finite with noise), noise_multiplier >= 0 and "
                f"delta in (0, 1), got {clip}, {z}, {delta}"
            )
        return _SampleDP(
            noise_multiplier=float(z),
            clip=clip,
            delta=delta,
            expected_batch=bs,
            sample_rate=q,
            poisson=bool(self.setting(task, "poisson")),
            history=list(stored.get("history") or []),
        )

    def train(
        self,
        data: ClientData,
        task: Task,
        ctx: ClientContext,
        params: Sequence[torch.Tensor],
        forward: Forward,
        state: State | None = None,
    ) -> tuple[dict[str, float], State | None]:
        """The task's local SGD on ``params``, with ``forward(tensors, x) -> logits``, in place.

        The one local training loop: client halves that train other tensors than the model's
        parameters (FRL's scores, Fed-SB's R) pass their own ``params`` and ``forward``, which
        computes with the tensors it is given in place of ``params`` (DP-SGD differentiates it
        per record). ``state`` is the client's state: with ``dp`` its ``"dp"`` entry (noise
        multiplier and accountant history) is updated. Returns the mean training loss and
        accuracy (empty for a client without data) and the client's new state.
        """
        n = len(data)
        if n == 0:
            return {}, state
        plan = self.plan(task, n)
        lr, bs_eff, steps = plan.lr, plan.batch_size, plan.steps
        momentum, weight_decay = plan.momentum, plan.weight_decay
        dp = (
            self._sample_dp(task, n, bs_eff, steps, state or {})
            if self.setting(task, "dp")
            else None
        )
        gen = ctx.generator(task.version)
        batches = (
            poisson_batches(n, dp.sample_rate, steps, gen)
            if dp is not None and dp.poisson
            else minibatches(n, bs_eff, steps, gen, drop_last=plan.drop_last)
        )
        # The noise stream exists only with DP-SGD: deriving its seed costs a SeedSequence
        # per task, which a run without DP must not pay.
        noise = (
            seeding.torch_generator(ctx.seed, privacy.NOISE, task.version, ctx.client_id)
            if dp is not None
            else None
        )
        objective = ctx.objective  # the workload's loss and metrics
        buffers: list[torch.Tensor] = []
        loss_sum = torch.zeros((), device=data.x.device)
        score_sums = {name: torch.zeros((), device=data.x.device) for name, _ in objective.metrics}
        seen = clipped = 0
        at = str(self.setting(task, "precision"))
        # DP-SGD's per-record gradients run under vmap, which autocast alone does not reach.
        cast, per_record = precision.autocast(at, data.x.device), precision.lowered(at, forward)
        for idx in batches:
            idx = idx.to(data.x.device)
            x, y = data.x[idx], data.y[idx]
            if data.augment is not None:  # e.g. CIFAR's crop and flip, from the client's stream
                x = data.augment(x, gen)
            if dp is None:
                with cast:  # bf16: forward and loss only; params and gradients stay fp32
                    out = forward(params, x)
                    loss = objective.loss(out, y)
                grads: Sequence[torch.Tensor] = torch.autograd.grad(loss, list(params))
                loss_sum += loss.detach() * len(idx)
            else:
                assert noise is not None  # made with dp
                with cast:
                    grads, losses, out, c = dp.gradient(per_record, params, x, y, noise, objective)
                loss_sum += losses.sum()
                clipped += c
            with torch.no_grad():
                # torch.optim.SGD's update (no dampening, no Nesterov) written out: for small
                # models its per-step bookkeeping costs more than the arithmetic.
                if weight_decay:
                    grads = [
                        g.add(p, alpha=weight_decay) for g, p in zip(grads, params, strict=True)
                    ]
                if momentum:
                    if buffers:
                        for b, g in zip(buffers, grads, strict=True):
                            b.mul_(momentum).add_(g)
                    else:
                        buffers = [g.clone() for g in grads]
                    grads = buffers
                for p, g in zip(params, grads, strict=True):
                    p.add_(g, alpha=-lr)
            if len(idx):
                for name, value in objective.example_scores(out.detach(), y).items():
                    score_sums[name] += value.sum()
            seen += len(idx)
        metrics = {"loss": float(loss_sum) / max(seen, 1)}
        metrics.update({name: float(s) / max(seen, 1) for name, s in score_sums.items()})
        if dp is None:
            return metrics, state
        return dp_result(dp, steps, metrics, float(clipped) / max(seen, 1), state)


def dp_result(
    dp: _SampleDP, steps: int, metrics: dict[str, float], clipped: float, state: State | None
) -> tuple[dict[str, float], State]:
    """The metrics and client state after ``steps`` private steps, for either training loop.

    The client's privacy history grows by ``steps`` compositions; Opacus is a core dependency,
    so a DP run always reports the ε it spent, never silently none.
    """
    history = privacy.compose(dp.history, dp.noise_multiplier, dp.sample_rate, steps)
    metrics = {**metrics, "clipped": clipped, "noise_multiplier": dp.noise_multiplier}
    if dp.noise_multiplier > 0:
        metrics["epsilon"] = privacy.epsilon(history, dp.delta)
    record: dict[str, Any] = {
        "noise_multiplier": dp.noise_multiplier,
        "delta": dp.delta,
        "history": history,
    }
    return metrics, {**(state or {}), "dp": record}
