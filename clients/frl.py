"""The client half of FRL: train supermask scores over frozen weights, upload the ranking.

Mozaffari, Shejwalkar, Houmansadr, USENIX Security 2023; see :mod:`fedlab.strategies.frl`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from fedlab.client import ClientContext, Fit
from fedlab.clients.sgd import LocalSGD
from fedlab.data import ClientData
from fedlab.strategies.frl import bias_name, maskable, ranking, signed_constant, top_k_mask
from fedlab.types import Params, State, Task


def masked_forward(
    model: nn.Module,
    x: torch.Tensor,
    weights: dict[str, torch.Tensor],
    scores: dict[str, torch.Tensor],
    sparsity: float,
) -> torch.Tensor:
    """``model(x)`` with every masked layer computing with ``W * top_k(|s|)`` and no bias.

    The mask is a hard 0/1 tensor; adding ``|s| - |s|.detach()`` makes its gradient the
    straight-through estimator of edge-popup (the mask's gradient passed to ``|s|``).
    """
    overrides: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for name, w in weights.items():
        s = scores[name]
        a = s.abs()
        overrides[name] = w * (top_k_mask(s, sparsity) + a - a.detach())
        if bias_name(name) in state:
            overrides[bias_name(name)] = torch.zeros_like(state[bias_name(name)])
    out: torch.Tensor = functional_call(model, overrides, (x,))
    return out


@dataclass(frozen=True, kw_only=True)
class FRLClient(LocalSGD):
    """Trains the scores only (SGD with momentum and weight decay), returns rankings.

    The payload holds, per masked layer, the int64 permutation ``argsort(s, stable)`` of the
    flattened trained scores, ascending by signed score. Settings in ``task.config`` win over
    the fields (``lr``, ``local_steps``, ``local_epochs``, ``batch_size``, and the server's
    ``sparsity``); the frozen weights come from the task's ``frl_key``.

    Args:
        lr: score learning rate (the paper's 0.4).
        local_steps: SGD steps per task (used when ``local_epochs`` is 0).
        local_epochs: passes over the client's data; overrides ``local_steps`` when > 0.
        batch_size: minibatch size (the paper's 8); 0 means full batch.
        momentum: SGD momentum on the scores (the buffer is reset every task).
        weight_decay: L2 penalty on the scores.
        sparsity: share of edges the mask keeps, unless the task says otherwise.
    """

    lr: float = 0.4
    batch_size: int = 8
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sparsity: float = 0.5
    # W of the last key seen: every task of a run shares it, so it is generated once per worker.
    _cache: dict[int, dict[str, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def _weights(self, model: nn.Module, key: int, device: torch.device) -> dict[str, torch.Tensor]:
        # The same layer choice and stream indices as the server (``maskable``), so W agrees.
        cached = self._cache.get(key)
        if cached is None:
            state = model.state_dict()
            cached = {
                name: signed_constant(key, i, state[name].shape).to(device)
                for i, name in enumerate(maskable(state))
            }
            self._cache.clear()
            self._cache[key] = cached
        return cached

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        if "frl_key" not in task.config:
            raise ValueError("FRLClient needs the 'frl_key' task setting of the FRL strategy")
        weights = self._weights(model, int(task.config["frl_key"]), ctx.device)
        scores = {
            k: task.params[k].detach().to(ctx.device).clone().requires_grad_(True) for k in weights
        }
        sparsity = float(self.setting(task, "sparsity"))
        model.train()
        keys = list(scores)
        metrics, state = self.train(
            data,
            task,
            ctx,
            list(scores.values()),
            lambda ts, x: masked_forward(
                model, x, weights, dict(zip(keys, ts, strict=True)), sparsity
            ),
            state,
        )
        return Fit(payload=_rankings(scores), num_examples=len(data), metrics=metrics, state=state)


def _rankings(scores: Params) -> dict[str, torch.Tensor]:
    return {k: ranking(s).cpu() for k, s in scores.items()}
