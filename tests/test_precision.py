"""``--precision bf16``: bfloat16 forward and loss, fp32 params, in both training loops.

Tolerance. bfloat16 keeps 8 bits of mantissa (a relative rounding of 2**-9 per operation),
so a bf16 delta is not close to the fp32 one in the fp32 sense. The bound used here, for one
local epoch of a small CNN: every entry of a bf16 delta within 10% of the largest fp32 delta
entry, both from fp32 (bf16 against fp32) and between the loops (sequential bf16 against
batched bf16, which round in other places). Measured on these clients: 2.1% (bf16 against
fp32) and 1.0% (sequential against batched) without DP-SGD, 1.0% and 0.3% with it. Each bf16
run must also differ from fp32 by more than fp32 rounding, or the bf16 path did not run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from conftest import small_config
from fedlab.client import ClientContext
from fedlab.clients import LocalSGD
from fedlab.clients.sgd_vmap import BatchItem, fit_batched
from fedlab.config import ConfigError, RunConfig
from fedlab.data import ClientData
from fedlab.experiment import simulate
from fedlab.interchange import final_params
from fedlab.run import check_requirements
from fedlab.types import Task

BF16_BOUND = 0.1  # of the largest fp32 delta entry
FP32_ROUNDING = 1e-5  # relative: what fp32 reorderings alone give (tests/test_vmap.py)


def _cnn() -> nn.Module:
    # Convolutions only: inside vmap, autocast reaches a linear layer's product but not a
    # convolution, so this model would train in fp32 there if the loop relied on it alone.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 10, 5), nn.Flatten()
    )


def _clients() -> list[ClientData]:
    gen = torch.Generator().manual_seed(0)
    return [
        ClientData(
            x=torch.randn(n, 1, 12, 12, generator=gen), y=torch.randint(0, 10, (n,), generator=gen)
        )
        for n in (30, 17, 24)
    ]


def _deltas(precision: str, batched: bool, **config: Any) -> list[dict[str, torch.Tensor]]:
    model = _cnn()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = Task(0, params, {"local_epochs": 1.0, "batch_size": 8, "lr": 0.1, **config})
    if precision != "fp32":
        task = Task(0, params, {**task.config, "precision": precision})
    algorithm = LocalSGD()
    data = _clients()
    if batched:
        items = [BatchItem(d, task, None, ClientContext(c, seed=3)) for c, d in enumerate(data)]
        return [dict(f.payload) for f in fit_batched(algorithm, model, items)]
    out = []
    for c, d in enumerate(data):
        model.load_state_dict(params)
        fit = algorithm.fit(model, d, task, None, ClientContext(c, seed=3))
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master params
        out.append(dict(fit.payload))
    return out


def _largest(deltas: list[dict[str, torch.Tensor]]) -> float:
    return max(float(d[k].abs().max()) for d in deltas for k in d)


def _apart(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> float:
    return max(float((x[k] - y[k]).abs().max()) for x, y in zip(a, b, strict=True) for k in x)


@pytest.mark.parametrize("dp", [{}, {"dp": True, "noise_multiplier": 0.5}], ids=["plain", "dp"])
def test_bf16_differs_from_fp32_by_a_bounded_amount_in_both_loops(dp: dict[str, Any]) -> None:
    reference = _deltas("fp32", batched=False, **dp)
    scale = _largest(reference)
    for batched in (False, True):
        bf16 = _deltas("bf16", batched=batched, **dp)
        assert all(v.dtype == torch.float32 for d in bf16 for v in d.values())
        apart = _apart(bf16, reference)
        # Above fp32 rounding: the convolutions really ran in bf16 (inside vmap, autocast alone
        # leaves them fp32), and below the bound.
        assert FP32_ROUNDING * scale < apart < BF16_BOUND * scale, (batched, apart, scale)


@pytest.mark.parametrize("dp", [{}, {"dp": True, "noise_multiplier": 0.5}], ids=["plain", "dp"])
def test_sequential_and_batched_bf16_agree_within_the_bound(dp: dict[str, Any]) -> None:
    sequential = _deltas("bf16", batched=False, **dp)
    batched = _deltas("bf16", batched=True, **dp)
    scale = _largest(_deltas("fp32", batched=False, **dp))
    assert _apart(sequential, batched) < BF16_BOUND * scale


@pytest.mark.parametrize("backend", ["inprocess", "vmap"])
def test_bf16_trains_and_the_global_params_stay_fp32(backend: str, tmp_path: Any) -> None:
    history = simulate(
        small_config(backend=backend, precision="bf16", rounds=6, local_steps=5),
        out=str(tmp_path / backend),
    )
    losses = [v for v in history["loss"] if v is not None]
    assert losses[-1] < 0.9 * losses[0]
    params, _ = final_params(tmp_path / backend)
    assert all(v.dtype == torch.float32 for v in params.values() if v.is_floating_point())


def test_precision_reaches_clients_only_when_bf16_and_bad_values_are_refused() -> None:
    assert "precision" not in RunConfig().task_config
    assert RunConfig(precision="bf16").task_config["precision"] == "bf16"
    with pytest.raises(ConfigError, match=r"precision must be one of \('fp32', 'bf16'\)"):
        RunConfig(precision="fp16")
    model = _cnn()
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    task = Task(0, params, {"precision": "half"})
    with pytest.raises(ValueError, match="precision must be one of"):
        LocalSGD().fit(model, _clients()[0], task, None, ClientContext(0, seed=0))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a device this machine lacks")
def test_bf16_on_a_device_without_it_is_refused_at_start_up() -> None:
    config = RunConfig(precision="bf16", device="cuda")
    # Checked where clients train (in-process and vmap workers, Ray actors, deployed clients),
    # not by a deployed server, which trains nothing.
    check_requirements(config, _cnn())
    with pytest.raises(ValueError, match="--precision bf16 refused: CUDA is not available"):
        check_requirements(config, _cnn(), backend=False)


def test_a_deployed_client_trains_at_the_precision_its_tasks_carry() -> None:
    from fedlab.cli.client import runtime_builder
    from fedlab.transport.client import Joined

    server = small_config(precision="bf16", workload="digits")
    runtime = runtime_builder({"device": "cpu"})(Joined("run", server.to_toml(), 1.0))
    model = runtime.model
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sent = {
        precision: runtime.run(
            2, Task(0, params, server.replace(precision=precision).task_config), None
        )[0].payload
        for precision in ("bf16", "fp32")
    }
    scale = _largest([dict(sent["fp32"])])
    apart = _apart([dict(sent["bf16"])], [dict(sent["fp32"])])
    assert all(v.dtype == torch.float32 for v in sent["bf16"].values())
    assert FP32_ROUNDING * scale < apart < BF16_BOUND * scale
