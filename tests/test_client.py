"""The client runtime: one persistent model, params loaded in place, bounded data cache."""

from __future__ import annotations

import torch

from conftest import small_config
from fedlab.sim import build_runtime, build_workload
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
