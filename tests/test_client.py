"""The client runtime: one persistent model, params loaded in place, bounded data cache."""

from __future__ import annotations

import pytest
import torch

from conftest import small_config
from fedlab.client import batches_per_pass, minibatches
from fedlab.run import build_runtime, build_workload
from fedlab.types import Task


def test_one_model_serves_every_client_and_the_cache_changes_nothing() -> None:
    config = small_config(clients=12)
    workload = build_workload(config)
    cached = build_runtime(config.replace(cache_mb=1.0), workload)
    uncached = build_runtime(config.replace(cache_mb=0.0), workload)
    model_id = id(cached.model)
    params = {k: v.clone() for k, v in workload.make_model().state_dict().items()}
    task = Task(0, params, config.task_config)
    for _ in range(2):
        for cid in range(12):
            a, _ = cached.run(cid, task, None)
            b, _ = uncached.run(cid, task, None)
            for k in a.payload:
                assert torch.equal(a.payload[k], b.payload[k])
    assert id(cached.model) == model_id
    assert len(uncached._cache) == 0
    assert 0 < cached._cached <= cached.cache_bytes


def test_cache_evicts_least_recently_used_within_its_budget() -> None:
    config = small_config(clients=50)
    workload = build_workload(config)
    one = workload.client_data(0)
    runtime = build_runtime(
        config.replace(cache_mb=3 * (one.x.nbytes + one.y.nbytes) / 2**20), workload
    )
    for cid in range(50):
        runtime._data(cid)
        assert runtime._cached <= runtime.cache_bytes
    assert 49 in runtime._cache and 0 not in runtime._cache


@pytest.mark.parametrize(("n", "bs"), [(23, 5), (20, 5), (7, 32), (9, 0)])
def test_one_pass_is_every_example_once_with_a_partial_last_batch(n: int, bs: int) -> None:
    gen = torch.Generator().manual_seed(3)
    per_pass = batches_per_pass(n, bs)
    batches = list(minibatches(n, bs, 2 * per_pass, gen))
    for p in range(2):
        one_pass = torch.cat(batches[p * per_pass : (p + 1) * per_pass])
        assert sorted(one_pass.tolist()) == list(range(n))
    width = min(bs, n) if bs else n
    assert [len(b) for b in batches[:per_pass]] == [width] * (n // width) + (
        [n % width] if n % width else []
    )


def test_drop_last_leaves_out_the_partial_batch_and_reshuffles() -> None:
    gen = torch.Generator().manual_seed(3)
    batches = list(minibatches(23, 5, 8, gen, drop_last=True))
    assert batches_per_pass(23, 5, drop_last=True) == 4
    assert all(len(b) == 5 for b in batches)
    first, second = torch.cat(batches[:4]), torch.cat(batches[4:])
    assert len(set(first.tolist())) == 20 and len(set(second.tolist())) == 20


@pytest.mark.parametrize("drop_last", [False, True])
def test_one_local_epoch_trains_on_exactly_the_clients_examples(drop_last: bool) -> None:
    """Before the partial last batch, one epoch of 23 examples in batches of 5 saw 25."""
    from fedlab.client import ClientContext
    from fedlab.clients import LocalSGD
    from fedlab.data import ClientData
    from fedlab.types import Task

    seen: list[torch.Tensor] = []
    data = ClientData(x=torch.arange(23.0).unsqueeze(1), y=torch.zeros(23, dtype=torch.long))
    weight = torch.zeros(2, 1, requires_grad=True)

    def forward(tensors: object, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().squeeze(1))
        return x @ weight.T

    config = {"local_epochs": 1.0, "batch_size": 5, "drop_last": drop_last}
    LocalSGD().train(data, Task(0, {}, config), ClientContext(0, seed=1), [weight], forward)
    used = torch.cat(seen).tolist()
    assert len(used) == len(set(used)) == (20 if drop_last else 23)


def test_drop_last_reaches_the_task_config() -> None:
    from fedlab.config import RunConfig

    assert "drop_last" not in RunConfig().task_config
    assert RunConfig(drop_last=True).task_config["drop_last"] is True


@pytest.mark.parametrize(
    ("n", "bs", "steps", "drop_last"),
    [(23, 5, 11, False), (23, 5, 9, True), (7, 32, 3, False), (9, 0, 2, False), (20, 5, 4, False)],
)
def test_minibatch_grid_holds_the_same_batches_as_minibatches(
    n: int, bs: int, steps: int, drop_last: bool
) -> None:
    from fedlab.client import minibatch_grid

    ref = list(minibatches(n, bs, steps, torch.Generator().manual_seed(5), drop_last=drop_last))
    grid, valid = minibatch_grid(
        n, bs, steps, torch.Generator().manual_seed(5), drop_last=drop_last
    )
    assert grid.shape == valid.shape == (steps, len(ref[0]))
    for row, mask, batch in zip(grid, valid, ref, strict=True):
        assert torch.equal(row[mask], batch)
