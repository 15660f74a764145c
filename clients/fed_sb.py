"""The client half of Fed-SB: train only the LoRA-SB cores ``R``, upload them.

Singhal et al., arXiv 2502.15436; see :mod:`fedlab.strategies.fed_sb`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedlab.client import ClientContext, Fit, minibatches
from fedlab.clients.sgd import LocalSGD
from fedlab.data import ClientData
from fedlab.strategies.fed_sb import A_KEY, B_KEY, R_KEY, effective
from fedlab.types import Params, State, Task


def adapter_forward(
    model: nn.Module,
    x: torch.Tensor,
    frozen: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    cores: dict[str, torch.Tensor],
) -> torch.Tensor:
    """``model(x)`` with every adapted weight replaced by ``W0 + B R A``.

    ``frozen[name] = (W0, B, A)``. For the small models here materialising ``B R A`` costs
    less than three thin matmuls per layer, and it leaves the module untouched (no wrapping).
    """
    overrides = {name: effective(w0, b, cores[name], a) for name, (w0, b, a) in frozen.items()}
    out: torch.Tensor = functional_call(model, overrides, (x,))
    return out


@dataclass(frozen=True, kw_only=True)
class FedSBClient(LocalSGD):
    """Trains ``R`` of every adapted layer by minibatch SGD; returns the trained ``R``'s.

    ``W0``, ``B`` and ``A`` come in the task params and are never trained, nor is any other
    model entry. The payload maps each adapted weight's name to its ``r x r`` core. Settings in
    ``task.config`` win over the fields (``lr``, ``local_steps``, ``local_epochs``,
    ``batch_size``, ``momentum``, ``weight_decay``), as in :class:`LocalSGD`.
    """

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        names = [k[len(R_KEY) :] for k in task.params if k.startswith(R_KEY)]
        if not names:
            raise ValueError("FedSBClient needs the adapter tensors of the fed-sb strategy")
        dev = ctx.device
        frozen = {
            k: (
                task.params[k].detach().to(dev),
                task.params[B_KEY + k].detach().to(dev),
                task.params[A_KEY + k].detach().to(dev),
            )
            for k in names
        }
        cores = {
            k: task.params[R_KEY + k].detach().to(dev).clone().requires_grad_(True) for k in names
        }
        n = len(data)
        if n == 0:
            return Fit(payload=_payload(cores), num_examples=0)
        lr = float(self._setting(task, "lr"))
        bs = int(self._setting(task, "batch_size"))
        epochs = float(self._setting(task, "local_epochs"))
        bs_eff = min(bs, n) if bs > 0 else n
        steps = (
            max(1, math.ceil(epochs * n / bs_eff))
            if epochs > 0
            else int(self._setting(task, "local_steps"))
        )
        momentum = float(self._setting(task, "momentum"))
        weight_decay = float(self._setting(task, "weight_decay"))
        params = list(cores.values())
        buffers: list[torch.Tensor] = []
        model.train()
        loss_sum = torch.zeros((), device=data.x.device)
        correct = torch.zeros((), device=data.x.device, dtype=torch.long)
        seen = 0
        for idx in minibatches(n, bs_eff, steps, ctx.generator(task.version)):
            idx = idx.to(data.x.device)
            x, y = data.x[idx], data.y[idx]
            out = adapter_forward(model, x, frozen, cores)
            loss = F.cross_entropy(out, y)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                # torch.optim.SGD (no dampening, no Nesterov), as in LocalSGD.
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
        metrics = {"loss": float(loss_sum) / seen, "accuracy": float(correct) / seen}
        return Fit(payload=_payload(cores), num_examples=n, metrics=metrics)


def _payload(cores: Params) -> dict[str, torch.Tensor]:
    return {k: r.detach().cpu() for k, r in cores.items()}
