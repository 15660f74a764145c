"""Fed-SB: ALGORITHMS.md §7 unit tests (exactness, init, only R trains and travels), runs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import assert_resume_bit_identical
from fedlab import registry
from fedlab.callbacks import Evaluator
from fedlab.clients.fed_sb import FedSBClient
from fedlab.config import RunConfig
from fedlab.data import SHIFT_PUBLIC_EXAMPLES, ClientData, _DigitsWorkload
from fedlab.lora import A_KEY, B_KEY, R_KEY, adapted, effective
from fedlab.run import build_engine, build_runtime, build_workload
from fedlab.strategies import FedSB
from fedlab.strategies.fed_sb import public_gradient
from fedlab.strategy import UpdateRejected
from fedlab.types import Round, Update


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PARAMS = {
    "fc1.weight": torch.randn(12, 9, generator=_gen(0)),
    "fc1.bias": torch.randn(12, generator=_gen(1)),
    "fc2.weight": torch.randn(5, 12, generator=_gen(2)),
    "fc2.bias": torch.randn(5, generator=_gen(3)),
}
RND = Round(version=0, time=0.0, num_clients=8)


def _update(payload: dict[str, torch.Tensor], cid: int = 0, n: int = 10) -> Update:
    return Update(client_id=cid, version=0, payload=payload, num_examples=n)


def test_exactness_mean_of_full_updates_equals_update_of_mean_r() -> None:
    """(a) B mean(R_i) A == mean(B R_i A), and the aggregate is W0 + B R̄ A."""
    fed = FedSB(rank=3, weighting="uniform")
    state = fed.init(PARAMS)
    rs = [
        {k: torch.randn(3, 3, generator=_gen(10 * i + j)) for j, k in enumerate(state["r"])}
        for i in range(4)
    ]
    ups = [_update({R_KEY + k: v for k, v in r.items()}, cid=i) for i, r in enumerate(rs)]
    for u in ups:
        fed.validate(u, PARAMS)
    params, new_state, metrics = fed.aggregate(state, PARAMS, ups, RND)
    for name in state["r"]:
        b, a, w0 = state["b"][name], state["a"][name], state["w0"][name]
        mean_full = sum(b @ r[name] @ a for r in rs) / len(rs)
        r_bar = sum(r[name] for r in rs) / len(rs)
        torch.testing.assert_close(b @ r_bar @ a, mean_full)
        torch.testing.assert_close(new_state["r"][name], r_bar)
        torch.testing.assert_close(params[name], w0 + b @ r_bar @ a)
    # Biases are not adapted and stay the initial ones.
    assert torch.equal(params["fc1.bias"], PARAMS["fc1.bias"])
    # Only R travels: r^2 floats per adapted layer, against the full matrices for FedAvg.
    assert metrics["upload_bytes"] == 4 * 2 * 9 * len(ups)
    assert metrics["download_bytes"] == metrics["upload_bytes"]
    assert metrics["fedavg_upload_bytes"] == 4 * (12 * 9 + 12 + 5 * 12 + 5) * len(ups)


def test_example_weighting() -> None:
    fed = FedSB(rank=2)
    state = fed.init(PARAMS)
    r1 = {R_KEY + k: torch.ones(2, 2) for k in state["r"]}
    r2 = {R_KEY + k: torch.zeros(2, 2) for k in state["r"]}
    _, new_state, _ = fed.aggregate(state, PARAMS, [_update(r1, 0, 30), _update(r2, 1, 10)], RND)
    for r in new_state["r"].values():
        torch.testing.assert_close(r, torch.full((2, 2), 0.75))


def test_init_is_orthonormal_weight_svd_and_starts_at_the_initial_model() -> None:
    """(b, e) B^T B = I, A A^T = I, R0 = 0 (scale 1): the effective model is the initial one."""
    fed = FedSB(rank=4)
    state = fed.init(PARAMS)
    for name in ("fc1.weight", "fc2.weight"):
        b, a = state["b"][name], state["a"][name]
        assert b.shape == (PARAMS[name].shape[0], 4) and a.shape == (4, PARAMS[name].shape[1])
        torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-5, rtol=0)
        assert not state["r"][name].any()
        # B and A span the top-r singular subspaces of W0 (a deterministic, data-free init).
        u, _, vh = torch.linalg.svd(PARAMS[name].double(), full_matrices=False)
        torch.testing.assert_close(b.double(), u[:, :4], atol=1e-5, rtol=0)
        torch.testing.assert_close(a.double(), vh[:4], atol=1e-5, rtol=0)
    assert FedSB(rank=4).init(PARAMS)["b"]["fc1.weight"].equal(state["b"]["fc1.weight"])
    params, _, _ = fed.aggregate(state, PARAMS, [], RND)
    for k, v in PARAMS.items():
        torch.testing.assert_close(params[k], v)


def test_target_regex_and_options() -> None:
    assert adapted(PARAMS) == ["fc1.weight", "fc2.weight"]
    assert adapted(PARAMS, "fc2") == ["fc2.weight"]
    # A head is trained in full and never adapted, whatever target says.
    assert adapted(PARAMS, ".*", head="fc2") == ["fc1.weight"]
    assert list(FedSB(head="fc2").init(PARAMS)["r"]) == ["fc1.weight"]
    assert list(FedSB(target="fc1").init(PARAMS)["r"]) == ["fc1.weight"]
    with pytest.raises(ValueError):
        FedSB(target="nothing").init(PARAMS)
    with pytest.raises(ValueError):
        FedSB(rank=6).init(PARAMS)  # fc2 is 5 x 12
    with pytest.raises(ValueError):
        FedSB(rank=0)
    with pytest.raises(ValueError):
        FedSB(weighting="median")
    with pytest.raises(ValueError):
        FedSB(target="(")
    with pytest.raises(ValueError):
        FedSB(head="[")
    with pytest.raises(ValueError):
        FedSB(initialization="random")


def test_validation_rejects_wrong_shapes_names_and_non_finite() -> None:
    fed = FedSB(rank=2)
    r1, r2 = R_KEY + "fc1.weight", R_KEY + "fc2.weight"
    good = {r1: torch.zeros(2, 2), r2: torch.zeros(2, 2)}
    fed.validate(_update(good), PARAMS)
    bad = [
        {r1: torch.zeros(2, 2)},
        {**good, r2: torch.zeros(3, 3)},
        {**good, r2: torch.zeros(2, 2, dtype=torch.float64)},
        {**good, r1: torch.tensor([[0.0, float("nan")], [0.0, 0.0]])},
        {**good, "fc1.bias": torch.zeros(12)},
        {"fc1.weight": torch.zeros(2, 2), "fc2.weight": torch.zeros(2, 2)},
    ]
    for payload in bad:
        with pytest.raises(UpdateRejected):
            fed.validate(_update(payload), PARAMS)


def _digits(**changes: object) -> RunConfig:
    base: dict[str, object] = dict(
        strategy="fed-sb",
        workload="digits",
        model="mlp",
        clients=10,
        fraction=1.0,
        rounds=3,
        local_steps=10,
        lr=5.0,
    )
    return RunConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_clients_train_only_r_and_only_r_travels() -> None:
    """(c, f) The payload is one r x r core per Linear; W0, B, A and the model are unchanged."""
    config = _digits(clients=4)
    engine = build_engine(config)
    fed = engine.strategy
    assert isinstance(fed, FedSB)
    rnd = Round(version=0, time=0.0, num_clients=4, slots=4)
    tasks = fed.configure(engine.state, engine.params, rnd)
    # Every client gets the same frozen B and A (the same tensors).
    first = next(iter(tasks.values())).params
    assert all(t.params is first for t in tasks.values())
    before = {k: v.clone() for k, v in first.items()}
    runtime = build_runtime(config)
    update, _ = runtime.run(0, tasks[0], None)
    fed.validate(update, engine.params)
    assert set(update.payload) == {R_KEY + "0.weight", R_KEY + "2.weight"}
    assert sum(r.numel() for r in update.payload.values()) == 2 * 4**2
    assert any(update.payload[k].any() for k in update.payload)  # R moved from R0 = 0
    for k, v in before.items():
        assert torch.equal(first[k], v), k  # nothing the server sent was modified
    for k, v in runtime.model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the module keeps W0: only R was trained
    for k in ("0.weight", "2.weight"):
        assert B_KEY + k in first and A_KEY + k in first and R_KEY + k in first


def test_registry() -> None:
    assert registry.resolve("strategies", "fed-sb") is FedSB
    assert registry.resolve("clients", "fed-sb") is FedSBClient
    assert FedSB.client == "fed-sb"


def test_engine_run_improves_digits_accuracy() -> None:
    config = _digits()
    workload = build_workload(config)
    engine = build_engine(config, workload=workload)
    evaluator = Evaluator(workload)
    start = evaluator.evaluate(engine.params)["accuracy"]
    engine.run(3)
    # Measured 0.117 -> 0.226 (rank 4 over a frozen random MLP, a weak but real learner).
    accuracy = evaluator.evaluate(engine.params)["accuracy"]
    assert accuracy > start + 0.05
    assert engine.counters.rejected == 0


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    resumed, straight = assert_resume_bit_identical(_digits(clients=6), tmp_path, stop=2, end=4)
    for name, r in straight.state["r"].items():
        assert torch.equal(resumed.state["r"][name], r)
        assert torch.equal(resumed.state["b"][name], straight.state["b"][name])


def test_cli_simulate_exits_zero(tmp_path: Path) -> None:
    args = ["simulate", "--strategy", "fed-sb", "--workload", "digits-shift"]
    args += ["--strategy-opt", "initialization=gradient", "--strategy-opt", "head=2"]
    args += ["--clients", "10", "--fraction", "1.0", "--rounds", "2", "--no-progress"]
    args += ["--out", str(tmp_path / "run")]
    proc = subprocess.run(
        [sys.executable, "-m", "fedlab", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- pretrain-then-fine-tune


def _shift(**changes: object) -> RunConfig:
    return _digits(workload="digits-shift", model="default", lr=1.0, **changes)


def test_digits_shift_parts_are_disjoint_and_the_backbone_is_pretrained() -> None:
    workload = build_workload(_shift())
    assert isinstance(workload, _DigitsWorkload)
    parts = {k: set(v.tolist()) for k, v in workload.split.items()}
    assert set(parts) == {"test", "clients", "source", "public"}
    for a in parts:
        for b in parts:
            assert a == b or not parts[a] & parts[b], (a, b)
    public = workload.public_data()
    assert len(public) == SHIFT_PUBLIC_EXAMPLES
    # Deterministic from the seed; pretrained on upright digits, which the shift defeats.
    model = workload.make_model()
    again = build_workload(_shift()).make_model()
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    upright = Evaluator(build_workload(_digits(workload="digits"))).evaluate(model.state_dict())
    shifted = Evaluator(workload).evaluate(model.state_dict())
    assert upright["accuracy"] > 0.9 and shifted["accuracy"] < 0.3
    with pytest.raises(ValueError, match="public sample"):
        build_workload(_digits()).public_data()  # type: ignore[attr-defined]


def test_gradient_init_is_the_best_rank_r_approximation_of_the_sign_update() -> None:
    """(b) B R0 A = trunc_r(-eta sign(G)) with G on the public sample (Eckart-Young),
    B^T B = I, A A^T = I; (f) every client receives the same B and A (hashes)."""
    config = _shift(strategy_options={"rank": 4, "initialization": "gradient", "init_lr": 0.01})
    workload = build_workload(config)
    engine = build_engine(config, workload=workload)
    fed = engine.strategy
    assert isinstance(fed, FedSB) and fed.public is not None
    assert torch.equal(fed.public.data.x, workload.public_data().x)  # never client data
    grads = public_gradient(fed.public, engine.params, list(engine.state["r"]), 64, 16)
    for name, g in grads.items():
        b, r0, a = (engine.state[f][name].double() for f in ("b", "r", "a"))
        delta = -0.01 * torch.sign(g).double()
        s = torch.linalg.svdvals(delta)
        residual = float(torch.linalg.matrix_norm(delta - b @ r0 @ a) ** 2)
        assert residual == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-4)
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.diag(r0), s[:4], atol=1e-6, rtol=1e-5)
    rnd = Round(version=0, time=0.0, num_clients=10, slots=10)
    tasks = fed.configure(engine.state, engine.params, rnd)
    digests = {
        hashlib.sha256(
            b"".join(
                t.params[k].numpy().tobytes()
                for k in sorted(t.params)
                if k.startswith((B_KEY, A_KEY))
            )
        ).hexdigest()
        for t in tasks.values()
    }
    assert len(tasks) == 10 and len(digests) == 1
    # The run starts at W0 + trunc_r(dW), not at W0.
    assert not torch.equal(
        fed.model_params(engine.state, engine.params)["0.weight"], engine.params["0.weight"]
    )


def test_gradient_init_only_r_and_head_train() -> None:
    """(c) The payload (what was trained) is one r x r core per adapted layer plus the head."""
    opts = {"rank": 4, "initialization": "gradient", "head": "2"}
    config = _shift(clients=4, strategy_options=opts)
    engine = build_engine(config)
    rnd = Round(version=0, time=0.0, num_clients=4, slots=4)
    task = engine.strategy.configure(engine.state, engine.params, rnd)[0]
    update, _ = build_runtime(config).run(0, task, None)
    assert set(update.payload) == {R_KEY + "0.weight", "2.weight", "2.bias"}
    assert update.payload[R_KEY + "0.weight"].numel() == 4**2


def test_gradient_init_refuses_a_workload_without_public_data() -> None:
    with pytest.raises(ValueError, match="public sample"):
        build_engine(_digits(strategy_options={"initialization": "gradient"}))
    with pytest.raises(ValueError, match="public sample"):
        FedSB(initialization="gradient").init(PARAMS)


def test_fine_tuning_the_pretrained_backbone_recovers_the_shifted_task() -> None:
    config = _shift(rounds=4, strategy_options={"rank": 8, "initialization": "gradient"})
    workload = build_workload(config)
    engine = build_engine(config, workload=workload)
    engine.run(4)
    # Measured 0.109 -> 0.694 after 4 versions (0.877 after 20).
    assert Evaluator(workload).evaluate(engine.params)["accuracy"] > 0.6


def test_adapter_forward_is_w0_x_plus_b_r_a_x() -> None:
    """(d) The adapted layer computes ``W0 x + B (R (A x))`` (+ bias), as the client runs it."""
    layer = torch.nn.Linear(9, 12)
    g = _gen(7)
    b, r, a = (
        torch.randn(12, 3, generator=g),
        torch.randn(3, 3, generator=g),
        torch.randn(3, 9, generator=g),
    )
    x = torch.randn(5, 9, generator=g)
    out = functional_call(layer, {"weight": effective(layer.weight, b, a, r)}, (x,))
    expected = x @ layer.weight.T + ((x @ a.T) @ r.T) @ b.T + layer.bias
    torch.testing.assert_close(out, expected)


def test_private_variant_is_dp_sgd_on_r_and_head_with_delta_below_one_over_n() -> None:
    """--dp sample: DP-SGD on exactly R and the head; delta < 1/n_i (records, not batches);
    epsilon reported per update and per version; the init reads only public data."""
    pytest.importorskip("opacus")
    opts = {"rank": 4, "initialization": "gradient", "head": "2"}
    config = _shift(clients=4, rounds=1, strategy_options=opts).replace(
        dp="sample", noise_multiplier=1.0, max_grad_norm=1.0, batch_size=16
    )
    workload = build_workload(config)
    rows: list[dict[str, object]] = []

    class Rows:
        def on_version(self, engine: object, row: dict[str, object]) -> None:
            rows.append(row)

    engine = build_engine(config, workload=workload, callbacks=[Rows()])
    rnd = Round(version=0, time=0.0, num_clients=4, slots=4)
    task = engine.strategy.configure(engine.state, engine.params, rnd)[0]
    task = type(task)(task.version, task.params, {**config.task_config, **task.config})
    update, state = build_runtime(config, workload).run(0, task, None)
    assert set(update.payload) == {R_KEY + "0.weight", "2.weight", "2.bias"}
    record = state["client"]["dp"]
    n = len(workload.client_data(0))
    assert record["delta"] < 1 / n and record["delta"] == pytest.approx(1 / (10 * n))
    assert 0 < update.metrics["epsilon"] < float("inf")
    engine.run(1)
    assert 0 < float(rows[-1]["client_epsilon_max"]) < float("inf")  # type: ignore[arg-type]


# A regression federation (three features, two targets), as in tests/test_objectives.py.
REGRESSION = textwrap.dedent(
    """\
    import torch

    objective = "regression"


    def load_client(client_id, num_clients, seed):
        g = torch.Generator().manual_seed(1000 * seed + client_id)
        w = torch.randn(3, 2, generator=g) + 2.0
        x = torch.randn(40, 3, generator=g)
        return x, x @ w + 0.1 * torch.randn(40, 2, generator=g)
    """
)


class _WithPublic:
    """A workload plus a public sample of its own kind, as digits-shift has one."""

    def __init__(self, inner: object, public: ClientData) -> None:
        self._inner = inner
        self._public = public

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def public_data(self) -> ClientData:
        return self._public


def test_gradient_init_uses_the_workloads_objective(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a regression workload ``G`` is the gradient of the mean squared error, the loss the
    clients train; cross-entropy would read the float targets as class probabilities."""
    (tmp_path / "fedlab_test_fed_sb_regression.py").write_text(REGRESSION)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _digits(
        workload="custom",
        data="fedlab_test_fed_sb_regression:load_client",
        clients=4,
        rounds=1,
        lr=0.05,
        strategy_options={"rank": 2, "initialization": "gradient", "init_lr": 0.01},
    )
    inner = build_workload(config)
    x = torch.randn(32, 3, generator=_gen(5))
    public = ClientData(x, x @ torch.full((3, 2), 2.0))
    engine = build_engine(config, workload=_WithPublic(inner, public))  # type: ignore[arg-type]
    fed = engine.strategy
    assert isinstance(fed, FedSB) and fed.public is not None
    names = list(engine.state["r"])
    got = public_gradient(fed.public, engine.params, names, 32, 16)
    # By hand: the mean squared error of each batch of 16, the gradients summed.
    weights = {k: engine.params[k].clone().requires_grad_(True) for k in names}
    rest = {k: v for k, v in engine.params.items() if k not in weights}
    expected = {k: torch.zeros_like(w) for k, w in weights.items()}
    model = inner.make_model()
    for start in (0, 16):
        out = functional_call(model, {**rest, **weights}, (x[start : start + 16],))
        loss = F.mse_loss(out, public.y[start : start + 16])
        for k, g in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
            expected[k] += g
    for k in names:
        torch.testing.assert_close(got[k], expected[k])
    assert fed.public.objective == "regression"
    engine.run(1)
    engine.transport.close()
    final = fed.model_params(engine.state, engine.params)
    assert all(bool(torch.isfinite(v).all()) for v in final.values())
