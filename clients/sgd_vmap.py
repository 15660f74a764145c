"""Local SGD for many clients at once: the batched form of :meth:`LocalSGD.fit`.

The vmap backend (:mod:`fedlab.sim.vmap`) trains every queued client of a :class:`LocalSGD`
client half as one computation per step: each client has its own slice of parameters stacked
along a leading client dimension, and ``torch.func`` (``functional_call`` inside ``vmap``)
runs the model for all of them. Minibatches come from the same generators as the sequential
loop, so each client sees the same examples in the same order, and clients with different
data sizes, batch sizes, step counts, learning rates, momentum and weight decay are padded and
masked. With sample-level DP-SGD, per-record gradients are nested inside the per-client
``vmap``: Poisson batches, clipping and noise come from the same streams as
:meth:`LocalSGD.train`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedlab import precision, privacy, seeding
from fedlab.client import ClientAlgorithm, ClientContext, Fit, batches_per_pass
from fedlab.clients.sgd import LocalSGD, Plan, _SampleDP, dp_result
from fedlab.data import ClientData
from fedlab.types import State, Task

__all__ = ["BatchItem", "batchable", "fit_batched", "unbatchable_model"]


@dataclass(frozen=True)
class BatchItem:
    """One client's task in a batched call of :meth:`LocalSGD.fit_batched`."""

    data: ClientData
    task: Task
    state: State | None
    ctx: ClientContext


def batchable(algorithm: ClientAlgorithm) -> bool:
    """Whether :func:`fit_batched` trains ``algorithm``'s tasks as its ``fit`` would.

    True for :class:`LocalSGD` (sample-level DP-SGD included) and subclasses that only change
    its settings; client halves that override ``fit`` or ``setup`` (FRL's scores, Fed-SB's and
    FedIT's adapters, ADMM-WLS, DP-BREM) train other tensors with their own code.
    """
    kind = type(algorithm)
    return (
        isinstance(algorithm, LocalSGD)
        and kind.fit is LocalSGD.fit
        and kind.setup is ClientAlgorithm.setup
    )


def unbatchable_model(model: nn.Module) -> str:
    """Why ``model`` cannot be trained per client inside ``vmap`` ("" when it can).

    Buffers (BatchNorm's running statistics) would be updated in place by every client at
    once, and dropout draws from the global random stream, which the sequential loop consumes
    client after client: neither has a per-client batched equivalent with the same numbers.
    """
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"it has buffers ({', '.join(buffers[:3])})"
    aliases = set(model.state_dict()) - {name for name, _ in model.named_parameters()}
    if aliases:  # a tied weight is one parameter under two state names
        return f"it has tied parameters ({', '.join(sorted(aliases)[:3])})"
    dropout = [
        type(m).__name__ for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)
    ]
    if dropout:
        return f"it uses {dropout[0]}"
    return ""


def fit_batched(algorithm: LocalSGD, model: nn.Module, items: Sequence[BatchItem]) -> list[Fit]:
    """:meth:`LocalSGD.fit` for many clients at once, as one batched computation per step.

    Every client has its own slice of parameters stacked along a leading client dimension
    (tasks of different versions may share a call) and is trained with ``torch.func``
    (``functional_call`` + ``vmap`` + ``grad``). The minibatch index streams are drawn from
    the same generators as the sequential loop, so every client sees the same examples in
    the same order; clients with different data sizes, batch sizes and step counts are padded,
    and a masked mean loss per client makes a partial batch equal the sequential one. Clients
    are ordered by step count, so step ``s`` computes only the clients that still train.
    Results equal :meth:`LocalSGD.fit` up to floating-point rounding (batched kernels sum
    in another order). ``model`` gives the architecture; its values are not used or changed.
    """
    model.train()
    fits: list[Fit | None] = [None] * len(items)
    floating = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    live = [i for i, it in enumerate(items) if len(it.data) > 0]
    for i, it in enumerate(items):
        if len(it.data) == 0:  # no data: no step, a zero delta, as the sequential loop gives
            payload = {
                k: torch.zeros_like(it.task.params[k], device=it.ctx.device) for k in floating
            }
            fits[i] = Fit(payload=payload, num_examples=0, state=it.state)
    for private, cast in itertools.product((False, True), precision.PRECISIONS):
        group = [
            i
            for i in live
            if bool(algorithm.setting(items[i].task, "dp")) == private
            and algorithm.setting(items[i].task, "precision") == cast
        ]
        if not group:
            continue
        plans = {i: algorithm.plan(items[i].task, len(items[i].data)) for i in group}
        group.sort(key=lambda i: -plans[i].steps)  # stable: a prefix trains at every step
        dps = (
            [
                algorithm._sample_dp(
                    items[i].task,
                    len(items[i].data),
                    plans[i].batch_size,
                    plans[i].steps,
                    items[i].state or {},
                )
                for i in group
            ]
            if private
            else None
        )
        chosen = [items[i] for i in group]
        trained = _train_stacked(model, chosen, [plans[i] for i in group], dps, floating, cast)
        for i, fit in zip(group, trained, strict=True):
            fits[i] = fit
    return [f for f in fits if f is not None]


def _index_streams(
    items: Sequence[BatchItem],
    plans: Sequence[Plan],
    dps: Sequence[_SampleDP] | None,
    offsets: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Flat example indices ``[C, S, B]`` and their mask, from each client's own generator,
    and per step ``s`` the number of clients still training and the widest batch.

    Clients are ordered by step count, so the clients still training are a prefix. Shuffled
    batches are laid out for every client at once with tensor arithmetic: per client, only
    the ``randperm`` draws (:func:`~fedlab.client.minibatch_grid`'s, in its order) remain."""
    steps = max(p.steps for p in plans)
    width = max(p.batch_size for p in plans)
    poisson: dict[int, list[torch.Tensor]] = {}
    perms: list[torch.Tensor] = []
    shuffled: list[tuple[int, int, int, int]] = []  # client, used per pass, per pass, passes
    for c, (it, plan) in enumerate(zip(items, plans, strict=True)):
        n, gen = len(it.data), it.ctx.generator(it.task.version)
        dp = dps[c] if dps is not None else None
        if dp is not None and dp.poisson:
            # poisson_batches' draws, in its order: one uniform per record per step
            poisson[c] = [
                torch.nonzero(torch.rand(n, generator=gen) < dp.sample_rate).squeeze(1)
                for _ in range(plan.steps)
            ]
            width = max([width, *(len(b) for b in poisson[c])])
            continue
        per_pass = batches_per_pass(n, plan.batch_size, plan.drop_last)
        used = min(n, per_pass * plan.batch_size)  # drop_last leaves the tail of a pass out
        passes = -(-plan.steps // per_pass)
        perms += [torch.randperm(n, generator=gen)[:used] for _ in range(passes)]
        shuffled.append((c, used, per_pass, passes))
    idx = torch.zeros(len(items), steps, width, dtype=torch.long)
    valid = torch.zeros(len(items), steps, width, dtype=torch.bool)
    if shuffled:
        client, kept, batches, rounds = (torch.tensor(v) for v in zip(*shuffled, strict=True))
        bs = torch.tensor([plans[c].batch_size for c, *_ in shuffled])
        limit = torch.tensor([plans[c].steps for c, *_ in shuffled])
        first = torch.tensor([offsets[c] for c, *_ in shuffled])
        # element e of client i's draws: pass e // kept, slot e % kept of that pass, which
        # minibatch_grid puts at step (pass * batches per pass * bs + slot) // bs
        drawn = kept * rounds
        owner = torch.repeat_interleave(torch.arange(len(shuffled)), drawn)
        e = torch.arange(len(owner)) - (torch.cumsum(drawn, 0) - drawn)[owner]
        u, b = kept[owner], bs[owner]
        q = (e // u) * batches[owner] * b + e % u
        step, col = q // b, q % b
        keep = step < limit[owner]
        rows = client[owner][keep]
        idx[rows, step[keep], col[keep]] = torch.cat(perms)[keep] + first[owner][keep]
        valid[rows, step[keep], col[keep]] = True
    for c, drawn_batches in poisson.items():
        for i, batch in enumerate(drawn_batches):
            idx[c, i, : len(batch)], valid[c, i, : len(batch)] = batch + offsets[c], True
    counts = torch.tensor([p.steps for p in plans])
    active = (counts[None, :] > torch.arange(steps)[:, None]).sum(1).tolist()
    widest = valid.sum(2).max(0).values.tolist()
    return idx, valid, list(zip(active, widest, strict=True))


def _train_stacked(
    model: nn.Module,
    items: Sequence[BatchItem],
    plans: Sequence[Plan],
    dps: Sequence[_SampleDP] | None,
    floating: list[str],
    cast: str = "fp32",
) -> list[Fit]:
    """Train ``items`` (ordered by step count) with ``plans``, and DP-SGD when ``dps``, the
    forward and loss at precision ``cast`` (:func:`fedlab.precision.autocast`)."""
    device = items[0].data.x.device
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    shapes = dict(model.state_dict())
    start = {
        k: torch.stack([it.task.params[k].to(device, shapes[k].dtype) for it in items])
        for k in floating
    }
    params = [start[k].clone() for k in names]
    sizes = [len(it.data) for it in items]
    offsets = [0, *itertools.accumulate(sizes)][:-1]
    xs = torch.cat([it.data.x for it in items])
    ys = torch.cat([it.data.y for it in items])
    idx, valid, schedule = _index_streams(items, plans, dps, offsets)
    idx, valid = idx.to(device), valid.to(device)
    dtype = params[0].dtype if params else torch.float32
    update = _Update(plans, params, dtype, device)
    n_clients = len(items)
    loss_sum = torch.zeros(n_clients, dtype=dtype, device=device)
    correct = torch.zeros(n_clients, dtype=torch.long, device=device)
    clipped = torch.zeros(n_clients, dtype=torch.long, device=device)
    if dps is None:
        step = _plain_step(model, names, cast)
    else:
        dp_step = _DPStep(model, names, items, dps, dtype, device, cast)
    autocast = precision.autocast(cast, device)
    weights = valid.to(dtype)
    for s, (k, width) in enumerate(schedule):
        b_idx = idx[:k, s, :width]
        ps = [p[:k] for p in params]
        if dps is None:
            with autocast:  # bf16: forward and loss only; params and gradients stay fp32
                grads, totals, hits = step(ps, xs[b_idx], ys[b_idx], weights[:k, s, :width])
        else:
            w = valid[:k, s, :width]
            with autocast:
                grads, totals, hits, n_clipped = dp_step(ps, xs[b_idx], ys[b_idx], w)
            clipped[:k] += n_clipped
        with torch.no_grad():
            update(params, grads, k)
            loss_sum[:k] += totals
            correct[:k] += hits
    trained = dict(zip(names, params, strict=True))
    # one subtraction per tensor for every client; each payload is a copy of its row, not a
    # view that would keep (and serialise) the whole stack
    deltas = {
        k: (trained[k] - start[k]) if k in trained else torch.zeros_like(start[k]) for k in floating
    }
    seen = valid.sum((1, 2)).tolist()
    losses, right, n_clip = loss_sum.tolist(), correct.tolist(), clipped.tolist()
    fits = []
    for c, it in enumerate(items):
        payload = {k: deltas[k][c].clone() for k in floating}
        metrics = {"loss": losses[c] / max(seen[c], 1), "accuracy": right[c] / max(seen[c], 1)}
        state = it.state
        if dps is not None:
            metrics, state = dp_result(
                dps[c], plans[c].steps, metrics, n_clip[c] / max(seen[c], 1), state
            )
        fits.append(Fit(payload=payload, num_examples=sizes[c], metrics=metrics, state=state))
    return fits


Step = Callable[
    [list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[Sequence[torch.Tensor], torch.Tensor, torch.Tensor],
]


def _plain_step(model: nn.Module, names: list[str], cast: str = "fp32") -> Step:
    # No tie_weights lookup per call (it walks the whole module tree): unbatchable_model
    # refuses tied parameters, so there is nothing to tie.
    batched_forward = vmap(
        precision.lowered(
            cast,
            lambda ps, x: functional_call(
                model, dict(zip(names, ps, strict=True)), (x,), tie_weights=False
            ),
        )
    )

    def step(
        ps: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Per-client gradients of the masked mean loss, loss sums and hits, for ``k``
        clients at once: the clients' losses do not share a parameter, so the gradient of
        their sum is every client's own gradient (one backward; cheaper than ``vmap(grad)``
        for small models, whose cost is per-call overhead)."""
        leaves = [p.detach().requires_grad_(True) for p in ps]
        out = batched_forward(tuple(leaves), x)  # [k, B, classes]
        # Classes along dim 1 of [1, classes, k*B]: log-softmax over a short last dimension
        # (10 classes) is a scalar loop per row in torch's CPU kernel, 5x slower than over
        # a strided one; the values agree to rounding.
        flat = out.flatten(0, 1)
        losses = F.cross_entropy(flat.T.unsqueeze(0), y.flatten().unsqueeze(0), reduction="none")
        totals = (losses.view_as(w) * w).sum(1)
        grads = torch.autograd.grad((totals / w.sum(1)).sum(), leaves)
        hits = ((out.detach().argmax(2) == y) & (w > 0)).sum(1)
        return grads, totals.detach(), hits

    return step


class _DPStep:
    """One DP-SGD step for ``k`` clients: per-record gradients nested inside the per-client
    ``vmap``, each record clipped to its client's ``C``, the masked sum plus the client's
    noise (drawn from its own stream, in :meth:`_SampleDP.gradient`'s order and dtype),
    divided by its expected batch size."""

    def __init__(
        self,
        model: nn.Module,
        names: list[str],
        items: Sequence[BatchItem],
        dps: Sequence[_SampleDP],
        dtype: torch.dtype,
        device: torch.device,
        cast: str = "fp32",
    ) -> None:
        forward = precision.lowered(
            cast,
            lambda ps, x: functional_call(
                model, dict(zip(names, ps, strict=True)), (x,), tie_weights=False
            ),
        )

        def loss(
            ps: tuple[torch.Tensor, ...], xr: torch.Tensor, yr: torch.Tensor
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            out = forward(ps, xr.unsqueeze(0))
            value = F.cross_entropy(out, yr.unsqueeze(0))
            return value, (value.detach(), out.detach().squeeze(0))

        per_record = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0))
        self.per_client = vmap(per_record, in_dims=(0, 0, 0))
        self.dps = dps
        self.noise = [
            seeding.torch_generator(it.ctx.seed, privacy.NOISE, it.task.version, it.ctx.client_id)
            for it in items
        ]
        self.clip = torch.tensor([dp.clip for dp in dps], dtype=torch.float64, device=device)
        self.expected = torch.tensor(
            [float(dp.expected_batch) for dp in dps], dtype=dtype, device=device
        )
        self.dtype = dtype

    def __call__(
        self, ps: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        k, width = w.shape
        if width > 0:
            grads, (losses, logits) = self.per_client(tuple(p.detach() for p in ps), x, y)
            sq = torch.zeros(k, width, dtype=torch.float64, device=w.device)
            for g in grads:  # privacy.clip_per_record's arithmetic, per client's clip
                sq += g.detach().double().reshape(k, width, -1).pow(2).sum(2)
            norms = sq.sqrt()
            clip = self.clip[:k, None]
            over = norms > clip
            factor = torch.where(over, clip / norms.clamp_min(1e-300), torch.ones_like(norms))
            factor = factor.to(self.dtype) * w
            totals = [(g * factor.view(k, width, *([1] * (g.dim() - 2)))).sum(1) for g in grads]
            loss_sums = (losses * w).sum(1)
            hits = ((logits.argmax(2) == y) & w).sum(1)
            n_clipped = (over & w).sum(1)
        else:  # every batch empty: pure noise steps, as the sequential loop takes
            totals = [torch.zeros_like(p) for p in ps]
            loss_sums = torch.zeros(k, dtype=self.dtype, device=w.device)
            hits = n_clipped = torch.zeros(k, dtype=torch.long, device=w.device)
        noised = []
        for t in totals:  # parameter by parameter, client by client: the sequential order
            draws = []
            for c in range(k):
                dp = self.dps[c]
                if dp.noise_multiplier > 0:
                    std = dp.noise_multiplier * dp.clip
                    z = torch.randn(t.shape[1:], generator=self.noise[c], dtype=torch.float64)
                    draws.append((z * std).to(self.dtype))
                else:
                    draws.append(torch.zeros(t.shape[1:], dtype=self.dtype))
            noised.append(t + torch.stack(draws).to(t.device))
        scale = self.expected[:k]
        out = [t / scale.view(k, *([1] * (t.dim() - 1))) for t in noised]
        return out, loss_sums, hits, n_clipped


class _Update:
    """SGD with weight decay and momentum, each client with its own settings: a scalar (the
    sequential loop's exact operation) when every client shares it, else a per-client tensor."""

    def __init__(
        self,
        plans: Sequence[Plan],
        params: list[torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        def per_client(values: list[float]) -> float | torch.Tensor:
            if all(v == values[0] for v in values):
                return values[0]
            return torch.tensor(values, dtype=dtype, device=device)

        self.lr = per_client([p.lr for p in plans])
        self.momentum = per_client([p.momentum for p in plans])
        self.decay = per_client([p.weight_decay for p in plans])
        self.use_momentum = any(p.momentum for p in plans)
        self.use_decay = any(p.weight_decay for p in plans)
        self.buffers = [torch.zeros_like(p) for p in params] if self.use_momentum else []

    def __call__(self, params: list[torch.Tensor], grads: Sequence[torch.Tensor], k: int) -> None:
        """One step of the first ``k`` clients, in place."""
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            pk = p[:k]
            if self.use_decay:
                d = _first(self.decay, k, pk)
                g = g.add(pk, alpha=d) if isinstance(d, float) else g + d * pk
            if self.use_momentum:
                b = self.buffers[i][:k]
                b.mul_(_first(self.momentum, k, pk)).add_(g)
                g = b
            r = _first(self.lr, k, pk)
            if isinstance(r, float):
                pk.add_(g, alpha=-r)
            else:
                pk.sub_(r * g)


def _first(v: float | torch.Tensor, k: int, like: torch.Tensor) -> float | torch.Tensor:
    """``v`` for the first ``k`` clients, shaped to broadcast against ``like``."""
    if isinstance(v, float):
        return v
    return v[:k].view(-1, *([1] * (like.dim() - 1)))
