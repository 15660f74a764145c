"""The client half of Fed-SB: train only the LoRA-SB cores ``R``, upload them.

Singhal et al., arXiv 2502.15436; see :mod:`fedlab.strategies.fed_sb`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from fedlab.client import ClientContext, Fit
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
        model.train()
        metrics, state = self.train(
            data,
            task,
            ctx,
            list(cores.values()),
            lambda ts, x: adapter_forward(model, x, frozen, dict(zip(names, ts, strict=True))),
            state,
        )
        return Fit(payload=_payload(cores), num_examples=len(data), metrics=metrics, state=state)


def _payload(cores: Params) -> dict[str, torch.Tensor]:
    return {k: r.detach().cpu() for k, r in cores.items()}
