"""FedAvg against an independent hand-written loop, and its properties from ALGORITHMS.md §1."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config
from fedlab import seeding
from fedlab.run import build_engine, build_workload
from fedlab.strategies import FedAvg
from fedlab.types import Round, Update


def reference_fedavg(versions: int, **cfg: object) -> dict[str, torch.Tensor]:
    """FedAvg written out by hand: full participation, logistic regression, plain autograd."""
    config = small_config(fraction=1.0, **cfg)
    workload = build_workload(config)
    init = workload.make_model().state_dict()
    W, b = init["weight"].clone(), init["bias"].clone()
    for v in range(versions):
        dW, db, total = torch.zeros_like(W), torch.zeros_like(b), 0
        for cid in range(config.clients):
            data = workload.client_data(cid)
            n = len(data)
            bs = min(config.batch_size, n)
            Wc, bc = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
            gen = seeding.torch_generator(config.seed, seeding.TRAIN, v, cid)
            perm, pos = torch.randperm(n, generator=gen), 0
            for _ in range(config.local_steps):
                if pos >= n:  # a pass ends with a partial batch, then reshuffles
                    perm, pos = torch.randperm(n, generator=gen), 0
                idx = perm[pos : pos + bs]
                pos += bs
                loss = F.cross_entropy(data.x[idx] @ Wc.T + bc, data.y[idx])
                gW, gb = torch.autograd.grad(loss, [Wc, bc])
                with torch.no_grad():
                    Wc -= config.lr * gW
                    bc -= config.lr * gb
            dW += n * (Wc.detach() - W)
            db += n * (bc.detach() - b)
            total += n
        W, b = W + dW / total, b + db / total
    return {"weight": W, "bias": b}


def test_engine_matches_hand_written_reference_loop() -> None:
    config = small_config(fraction=1.0, clients=12, model="logreg")
    engine = build_engine(config)
    engine.run(3)
    ref = reference_fedavg(3, clients=12, model="logreg")
    for k in ref:
        torch.testing.assert_close(engine.params[k], ref[k], rtol=1e-5, atol=1e-6)


def test_one_client_equals_local_sgd() -> None:
    """(a) A single client with server lr 1: two versions are two runs of local SGD."""
    config = small_config(clients=1, fraction=1.0)
    engine = build_engine(config)
    engine.run(2)
    ref = reference_fedavg(2, clients=1)
    for k in ref:
        torch.testing.assert_close(engine.params[k], ref[k], rtol=1e-5, atol=1e-6)


def test_fedsgd_equivalence_full_batch_one_step() -> None:
    """(b) One full-batch step per client is centralized GD on the example-weighted objective."""
    config = small_config(clients=6, fraction=1.0, local_steps=1, batch_size=0, lr=0.3)
    engine = build_engine(config)
    x0 = {k: v.clone() for k, v in engine.params.items()}
    engine.run(1)
    workload = build_workload(config)
    xs = torch.cat([workload.client_data(c).x for c in range(6)])
    ys = torch.cat([workload.client_data(c).y for c in range(6)])
    W = x0["weight"].clone().requires_grad_(True)
    b = x0["bias"].clone().requires_grad_(True)
    gW, gb = torch.autograd.grad(F.cross_entropy(xs @ W.T + b, ys), [W, b])
    torch.testing.assert_close(
        engine.params["weight"], x0["weight"] - 0.3 * gW, atol=1e-6, rtol=1e-5
    )
    torch.testing.assert_close(engine.params["bias"], x0["bias"] - 0.3 * gb, atol=1e-6, rtol=1e-5)


def _updates(deltas: list[torch.Tensor], ns: list[int]) -> list[Update]:
    return [
        Update(client_id=i, version=0, payload={"w": d}, num_examples=n)
        for i, (d, n) in enumerate(zip(deltas, ns, strict=True))
    ]


ROUND = Round(version=0, time=0.0, num_clients=3)


def test_identical_models_give_that_model() -> None:
    """(c) If every client returns the same y, the new model is y."""
    x = {"w": torch.tensor([1.0, -2.0])}
    y = torch.tensor([0.5, 4.0])
    s = FedAvg()
    new, _, _ = s.aggregate(s.init(x), x, _updates([y - x["w"]] * 3, [5, 1, 9]), ROUND)
    torch.testing.assert_close(new["w"], y)


def test_server_lr_scales_step_linearly_and_weights_by_examples() -> None:
    """(d) eta_g scales the step; weights are n_i / sum n_j."""
    x = {"w": torch.zeros(2)}
    ups = _updates([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [1, 3])
    one, _, _ = FedAvg().aggregate({}, x, ups, ROUND)
    torch.testing.assert_close(one["w"], torch.tensor([0.25, 0.75]))
    two, _, _ = FedAvg(server_lr=2.0).aggregate({}, x, ups, ROUND)
    torch.testing.assert_close(two["w"], 2 * one["w"])
    uni, _, _ = FedAvg(weighting="uniform").aggregate({}, x, ups, ROUND)
    torch.testing.assert_close(uni["w"], torch.tensor([0.5, 0.5]))


def test_server_momentum_accumulates() -> None:
    x = {"w": torch.zeros(1)}
    s = FedAvg(server_momentum=0.5, server_lr=1.0)
    state = s.init(x)
    ups = _updates([torch.ones(1)], [1])
    x1, state, _ = s.aggregate(state, x, ups, ROUND)
    x2, state, _ = s.aggregate(state, x1, ups, ROUND)
    torch.testing.assert_close(x1["w"], torch.tensor([1.0]))
    torch.testing.assert_close(x2["w"], torch.tensor([2.5]))  # v = 0.5 * 1 + 1


def test_no_updates_leaves_model_unchanged() -> None:
    x = {"w": torch.ones(2)}
    new, _, _ = FedAvg().aggregate({}, x, [], ROUND)
    assert torch.equal(new["w"], x["w"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"server_lr": 0.0},
        {"server_lr": float("nan")},
        {"server_momentum": 1.0},
        {"weighting": "median"},
    ],
)
def test_bad_hyperparameters_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FedAvg(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.5, 0.01)])
def test_local_sgd_matches_torch_optim_sgd(momentum: float, weight_decay: float) -> None:
    """The hand-written local update is exactly torch.optim.SGD's."""
    from fedlab.client import ClientContext, minibatches
    from fedlab.clients import LocalSGD
    from fedlab.types import Task

    config = small_config(clients=3)
    workload = build_workload(config)
    data = workload.client_data(1)
    ours, ref = workload.make_model(), workload.make_model()
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    task = Task(0, start, {"momentum": momentum, "weight_decay": weight_decay, "local_steps": 5})
    fit = LocalSGD().fit(ours, data, task, None, ClientContext(client_id=1, seed=config.seed))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    gen = ClientContext(client_id=1, seed=config.seed).generator(0)
    for idx in minibatches(len(data), 32, 5, gen):
        opt.zero_grad()
        F.cross_entropy(ref(data.x[idx]), data.y[idx]).backward()
        opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(fit.payload[k], v - start[k], rtol=1e-6, atol=1e-7)
