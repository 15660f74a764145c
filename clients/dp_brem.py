"""The client half of DP-BREM: per-record clipped gradients folded into a persistent momentum.

Every version a client draws one minibatch, computes per-record gradients
(:func:`fedlab.privacy.per_record_grads`: ``torch.func`` over a ``functional_call`` of the
model, so the model needs no wrapping and no Opacus hooks), clips each to ``record_clip``, sums
them, divides by the *configured* batch size (not the drawn one, so one record moves the mean by
at most ``2 * record_clip / batch_size`` whatever the client's size), and updates its momentum
``m <- (1 - β) g + β m``. The payload is ``m`` itself, a gradient (not a delta); the momentum is
kept in :attr:`fedlab.client.Fit.state` between versions. See :mod:`fedlab.strategies.dp_brem`.

Per-record gradients are undefined for BatchNorm in training mode; use models without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from fedlab import privacy
from fedlab.client import ClientAlgorithm, ClientContext, Fit, minibatches
from fedlab.data import ClientData
from fedlab.types import Params, State, Task


@dataclass(frozen=True, kw_only=True)
class DPBREMClient(ClientAlgorithm):
    """One DP-SGD gradient per version, clipped per record, folded into client momentum.

    The strategy sends ``record_clip`` (already decayed), ``batch_size`` and ``momentum`` in
    every task's config; these fields are only the defaults for tasks that do not.

    Args:
        record_clip: ``R``, the per-record gradient clipping norm (``inf``: no clipping).
        batch_size: ``B``, records drawn per version, and the divisor of the clipped sum.
        momentum: ``β`` in ``[0, 1)``; 0 sends the clipped minibatch gradient itself.
    """

    record_clip: float = 10.0
    batch_size: int = 32
    momentum: float = 0.9

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        clip = float(self.setting(task, "record_clip"))
        bs = int(self.setting(task, "batch_size"))
        beta = float(self.setting(task, "momentum"))
        if not (clip > 0 and bs >= 1 and 0 <= beta < 1):
            raise ValueError(
                f"dp-brem client needs record_clip > 0, batch_size >= 1 and momentum in [0, 1), "
                f"got {clip}, {bs}, {beta}"
            )
        names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
        trainable = [k for k, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        buffers = {k: b.detach() for k, b in model.named_buffers()}
        old: dict[str, torch.Tensor] = dict((state or {}).get("momentum", {}))
        n = len(data)
        g: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if n > 0:
            idx = next(minibatches(n, bs, 1, ctx.generator(task.version))).to(data.x.device)
            x, y = data.x[idx], data.y[idx]

            def forward(ts: Sequence[torch.Tensor], xr: torch.Tensor) -> torch.Tensor:
                p = dict(zip(trainable, ts, strict=True))
                out: torch.Tensor = functional_call(model, (p, buffers), (xr,))
                return out

            model.train()
            objective = ctx.objective  # the workload's declared loss and metrics
            per, losses, logits = privacy.per_record_grads(forward, params, x, y, objective.loss)
            clipped, norms = privacy.clip_per_record(per, clip)
            # Divide by the configured B, not len(idx): the strategy's sensitivity 2R/B then
            # holds for every client, however few records it has.
            g = {k: c.sum(0) / bs for k, c in zip(trainable, clipped, strict=True)}
            metrics = {
                "loss": float(losses.mean()),
                **{k: float(v.mean()) for k, v in objective.example_scores(logits, y).items()},
                "clipped": float((norms > clip).double().mean()),
            }
        ref = model.state_dict()
        momentum: dict[str, torch.Tensor] = {}
        for k in names:
            prev = old.get(k)
            m = prev.to(ref[k].device) * beta if prev is not None else torch.zeros_like(ref[k])
            if k in g:
                m = m + (1 - beta) * g[k].to(ref[k].dtype)
            momentum[k] = m.detach()
        payload: Params = {k: v.clone() for k, v in momentum.items()}
        return Fit(
            payload=payload,
            num_examples=min(bs, n),
            metrics=metrics,
            state={"momentum": {k: v.cpu() for k, v in momentum.items()}},
        )
