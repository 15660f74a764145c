"""Local minibatch SGD: the client half of FedAvg and of every strategy that takes deltas."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedlab.client import ClientAlgorithm, ClientContext, Fit, minibatches
from fedlab.data import ClientData
from fedlab.types import Params, State, Task


def model_delta(model: nn.Module, start: Params) -> dict[str, torch.Tensor]:
    """``y - x``: trained minus starting values of the floating-point state entries."""
    return {
        k: v.detach() - start[k].to(v.device)
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


@dataclass(frozen=True, kw_only=True)
class LocalSGD(ClientAlgorithm):
    """Minibatch SGD from the task's params; returns the delta ``y - x``.

    Every setting can be overridden per task through ``task.config`` (the server decides).

    Args:
        lr: local learning rate.
        local_steps: SGD steps per task (used when ``local_epochs`` is 0).
        local_epochs: passes over the client's data; overrides ``local_steps`` when > 0.
        batch_size: minibatch size; 0 means full batch.
        momentum: local momentum (the buffer is reset every task).
        weight_decay: L2 penalty.
    """

    lr: float = 0.05
    local_steps: int = 10
    local_epochs: float = 0
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        metrics = self.train(data, task, ctx, params, model)
        return Fit(payload=model_delta(model, task.params), num_examples=len(data), metrics=metrics)

    def train(
        self,
        data: ClientData,
        task: Task,
        ctx: ClientContext,
        params: Sequence[torch.Tensor],
        forward: Callable[[torch.Tensor], torch.Tensor],
    ) -> dict[str, float]:
        """The task's local SGD on ``params``, with ``forward(x) -> logits``, in place.

        The one local training loop: client halves that train other tensors than the model's
        parameters (FRL's scores, Fed-SB's R) pass their own ``params`` and ``forward``.
        Returns the mean training loss and accuracy (empty for a client without data).
        """
        n = len(data)
        if n == 0:
            return {}
        lr = float(self.setting(task, "lr"))
        bs = int(self.setting(task, "batch_size"))
        epochs = float(self.setting(task, "local_epochs"))
        bs_eff = min(bs, n) if bs > 0 else n
        steps = (
            max(1, math.ceil(epochs * n / bs_eff))
            if epochs > 0
            else int(self.setting(task, "local_steps"))
        )
        momentum = float(self.setting(task, "momentum"))
        weight_decay = float(self.setting(task, "weight_decay"))
        buffers: list[torch.Tensor] = []
        loss_sum = torch.zeros((), device=data.x.device)
        correct = torch.zeros((), device=data.x.device, dtype=torch.long)
        seen = 0
        for idx in minibatches(n, bs_eff, steps, ctx.generator(task.version)):
            idx = idx.to(data.x.device)
            x, y = data.x[idx], data.y[idx]
            out = forward(x)
            loss = F.cross_entropy(out, y)
            grads = torch.autograd.grad(loss, list(params))
            with torch.no_grad():
                # torch.optim.SGD's update (no dampening, no Nesterov) written out: for small
                # models its per-step bookkeeping costs more than the arithmetic.
                if weight_decay:
                    grads = tuple(
                        g.add(p, alpha=weight_decay) for g, p in zip(grads, params, strict=True)
                    )
                if momentum:
                    if buffers:
                        for b, g in zip(buffers, grads, strict=True):
                            b.mul_(momentum).add_(g)
                    else:
                        buffers = [g.clone() for g in grads]
                    grads = tuple(buffers)
                for p, g in zip(params, grads, strict=True):
                    p.add_(g, alpha=-lr)
            loss_sum += loss.detach() * len(idx)
            correct += (out.detach().argmax(1) == y).sum()
            seen += len(idx)
        return {"loss": float(loss_sum) / seen, "accuracy": float(correct) / seen}
