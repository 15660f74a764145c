"""Federated evaluation of many clients at once: the batched form of
:class:`~fedlab.evaluation.LocalEvaluation`, used by the vmap backend.

Without personalisation every client is tested with the same global params, so the test splits
of all evaluated clients go through one model in large batches, and each example's loss and
metrics are summed per client (segment sums). With ``personalize = K`` all clients fine-tune at
once with :func:`~fedlab.clients.sgd_vmap.fit_batched` (the same ``(seed, PERSONALIZE, version,
client)`` minibatch streams as the sequential loop) and are tested with their stacked params:
``vmap`` of ``functional_call`` over the clients' padded test splits, padding masked out.

The figures equal the sequential ones up to floating-point rounding: batched kernels sum in
another order, and a personalised model is rebuilt as ``start + (trained - start)``.

Memory follows the training budget (``--vmap-chunk`` clients, or as many as fit the budget
of :func:`~fedlab.sim.vmap.auto_chunk`): a training step of ``C`` clients holds the
activations of ``C x batch`` examples and their backward, about :data:`_BACKWARD` times a
forward, so an evaluation forward takes ``C x _BACKWARD x batch`` examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedlab.clients.sgd_vmap import BatchItem, fit_batched
from fedlab.data import ClientData
from fedlab.evaluation import ClientScore, EvalTask, LocalEvaluation, Scores, personalize_context
from fedlab.objectives import Objective
from fedlab.types import Task

__all__ = ["evaluate_batched"]

# A training step's memory over a forward's for the same examples (activations kept for the
# backward, their gradients, the loss's temporaries): the factor auto_chunk counts with.
_BACKWARD = 3


def evaluate_batched(
    local: LocalEvaluation, task: EvalTask, *, chunk: int = 0, budget: int = 0
) -> Scores:
    """``local(task)`` computed in batches: the same figures up to floating-point rounding.

    ``local`` gives the model architecture, the objective and the clients' data (its cache);
    ``chunk`` clients go per batched call (0: as many as ``budget`` bytes hold, see
    :func:`~fedlab.sim.vmap.auto_chunk`).

    Raises:
        NotImplementedError: personalisation on augmented training data (the batched loop
            does not augment), or a model ``torch.func`` cannot batch; the caller evaluates
            one client after another instead.
    """
    from fedlab.sim.vmap import auto_chunk

    model = local.model
    tests = [local.data(cid, "test") for cid in task.clients]
    trains = [local.data(cid, "train") for cid in task.clients] if task.personalize else []
    if any(t.augment is not None for t in trains):
        raise NotImplementedError("the clients' training data is augmented")
    sgd = task.sgd()
    start = Task(version=task.version, params=task.params)
    width = max((sgd.plan(start, len(t)).batch_size for t in trains if len(t)), default=0)
    width = width or task.batch_size or task.eval_batch
    example = next((d.x[:1] for d in [*trains, *tests] if len(d)), None)
    if example is None:  # nobody has data: every figure is 0, as evaluate_model gives
        empty = [_score(cid, 0, local.objective, None) for cid in task.clients]
        return empty, list(empty) if task.personalize else []
    size = chunk or auto_chunk(model, example, width, budget)
    state = {k: v.to(local.device) for k, v in model.state_dict().items()}
    params = {k: task.params[k].to(local.device, v.dtype) for k, v in state.items()}
    model.eval()
    rows = size * _BACKWARD * width
    global_scores = _shared(model, params, tests, task.clients, local.objective, rows)
    if not task.personalize:
        return global_scores, []
    personal: list[ClientScore] = []
    for first in range(0, len(task.clients), size):
        part = range(first, min(first + size, len(task.clients)))
        items = [
            BatchItem(
                data=trains[i],
                task=start,
                state=None,
                ctx=personalize_context(task.clients[i], task.seed, local.device, local.objective),
            )
            for i in part
        ]
        fits = fit_batched(sgd, model, items)
        stacked = {
            k: torch.stack([v + fit.payload[k] if k in fit.payload else v for fit in fits])
            for k, v in params.items()
        }
        model.eval()  # fit_batched leaves the model in training mode
        personal += _stacked(
            model,
            stacked,
            [tests[i] for i in part],
            [task.clients[i] for i in part],
            local.objective,
            _BACKWARD * width,
        )
    return global_scores, personal


def _score(
    client_id: int, n: int, objective: Objective, totals: Mapping[str, float] | None
) -> ClientScore:
    """A client's means from its sums (``None``: no examples), as evaluate_model gives them."""
    names = [name for name, _ in objective.metrics] + ["loss"]
    values = {name: (totals[name] if totals else 0.0) / max(n, 1) for name in names}
    return ClientScore(client_id=client_id, examples=n, values=values)


def _sums(objective: Objective, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each example's loss and metrics, ``[N]`` in float64 (``out``: ``[N, ...]``)."""
    values = {"loss": objective.example_losses(out, y), **objective.example_scores(out, y)}
    return {k: v.detach().double() for k, v in values.items()}


def _shared(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    tests: Sequence[ClientData],
    clients: Sequence[int],
    objective: Objective,
    rows: int,
) -> list[ClientScore]:
    """Every client's figures for one set of ``params``: all test examples through the model,
    ``rows`` at a time, summed per client."""
    sizes = torch.tensor([len(t) for t in tests])
    device = next(iter(params.values())).device
    names = [name for name, _ in objective.metrics] + ["loss"]
    totals = {k: torch.zeros(len(tests), dtype=torch.float64, device=device) for k in names}
    filled = [t for t in tests if len(t)]
    if filled:
        # The clients' test splits, concatenated: what the cache holds already, copied once.
        x = torch.cat([t.x for t in filled])
        y = torch.cat([t.y for t in filled])
        owner = torch.repeat_interleave(torch.arange(len(tests)), sizes).to(device)
        with torch.no_grad():
            for i in range(0, len(y), rows):
                out = functional_call(model, params, (x[i : i + rows],))
                for k, v in _sums(objective, out, y[i : i + rows]).items():
                    totals[k].index_add_(0, owner[i : i + rows], v)
    kept = {k: v.tolist() for k, v in totals.items()}
    return [
        _score(cid, int(n), objective, {k: kept[k][c] for k in names})
        for c, (cid, n) in enumerate(zip(clients, sizes.tolist(), strict=True))
    ]


def _stacked(
    model: nn.Module,
    stacked: dict[str, torch.Tensor],
    tests: Sequence[ClientData],
    clients: Sequence[int],
    objective: Objective,
    block: int,
) -> list[ClientScore]:
    """Each client's figures for its own slice of ``stacked`` params: the clients' test
    splits padded to the longest, ``block`` examples of every client per call; clients are
    ordered by test size, so a call computes only the clients that still have examples."""
    order = sorted(range(len(tests)), key=lambda c: -len(tests[c]))
    sizes = [len(tests[c]) for c in order]
    names = [name for name, _ in objective.metrics] + ["loss"]
    device = next(iter(stacked.values())).device
    totals = {k: torch.zeros(len(tests), dtype=torch.float64, device=device) for k in names}
    longest = sizes[0] if sizes else 0
    if longest:
        like = next(tests[c] for c in order)
        x = like.x.new_zeros((len(order), longest, *like.x.shape[1:]))
        y = like.y.new_zeros((len(order), longest, *like.y.shape[1:]))
        mask = torch.zeros(len(order), longest, dtype=torch.float64, device=device)
        for row, c in enumerate(order):
            n = sizes[row]
            x[row, :n], y[row, :n], mask[row, :n] = tests[c].x, tests[c].y, 1.0
        keys = list(stacked)
        ps = tuple(stacked[k][order] for k in keys)
        forward = vmap(lambda p, xb: functional_call(model, dict(zip(keys, p, strict=True)), (xb,)))
        with torch.no_grad():
            for j in range(0, longest, block):
                k = sum(n > j for n in sizes)
                out = forward(tuple(p[:k] for p in ps), x[:k, j : j + block])
                yb, w = y[:k, j : j + block], mask[:k, j : j + block]
                for name, v in _sums(objective, out.flatten(0, 1), yb.flatten(0, 1)).items():
                    totals[name][:k] += (v.view_as(w) * w).sum(1)
    kept = {k: v.tolist() for k, v in totals.items()}
    scores: list[ClientScore | None] = [None] * len(tests)
    for row, c in enumerate(order):
        scores[c] = _score(clients[c], sizes[row], objective, {k: kept[k][row] for k in names})
    return [s for s in scores if s is not None]
