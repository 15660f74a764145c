"""FedAU and the known-probability baseline: the properties of ALGORITHMS.md §2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_params_equal, assert_resume_bit_identical, small_config
from fedlab import seeding
from fedlab.cli import main
from fedlab.run import build_engine
from fedlab.strategies import FedAU, FedAvg, KnownProbability
from fedlab.strategies.fedau import estimator_init, estimator_update, estimator_weights
from fedlab.types import Round, Update

BERNOULLI = {"participation": "bernoulli", "participation_options": {"p": 0.3}}


def updates_for(clients: list[int], dim: int = 3) -> list[Update]:
    return [
        Update(
            client_id=c,
            version=0,
            payload={"w": torch.full((dim,), float(c + 1))},
            num_examples=10 * (c + 1),
        )
        for c in clients
    ]


def params() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(3), "steps": torch.tensor(7)}


# --------------------------------------------------------------------------- the estimator


def run_estimator(pattern: list[list[int]], n: int, cutoff: int = 0) -> list[list[float]]:
    """Drive the estimator over ``pattern`` (participants per version); weights used."""
    state = estimator_init(n)
    used = []
    for participants in pattern:
        used.append(estimator_weights(state, participants).tolist())
        state = estimator_update(state, participants, cutoff)
    return used


def test_trace_gives_the_documented_weights_and_intervals() -> None:
    """(d) Pattern [1,0,0,1,0,1]: weights [1, 1, 2], intervals 1, 3, 2."""
    state = estimator_init(1)
    weights = []
    for took_part in [1, 0, 0, 1, 0, 1]:
        if took_part:
            weights.append(float(estimator_weights(state, [0])[0]))
        state = estimator_update(state, [0] if took_part else [], cutoff=0)
    assert weights == [1.0, 1.0, 2.0]
    assert int(state["count"][0]) == 3 and float(state["mean"][0]) == 2.0  # mean(1, 3, 2)
    assert int(state["since"][0]) == 0


def test_update_does_not_mutate_its_input() -> None:
    state = estimator_init(3)
    before = {k: v.clone() for k, v in state.items()}
    new = estimator_update(state, [1], cutoff=2)
    for k in state:
        assert torch.equal(state[k], before[k])
    assert new["since"].dtype == torch.int64 and new["mean"].dtype == torch.float64
    assert new["since"].tolist() == [1, 0, 1] and new["count"].tolist() == [0, 1, 0]


def test_full_participation_weights_are_one() -> None:
    """(a) Everybody every version: every interval is 1, every weight 1."""
    used = run_estimator([[0, 1, 2, 3]] * 20, 4)
    assert all(w == [1.0] * 4 for w in used)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_bernoulli_weights_converge_to_inverse_probability(p: float) -> None:
    """(b) K = infinity: the mean interval of Bernoulli(p) participation tends to 1/p."""
    n, versions = 200, 5000
    state = estimator_init(n)
    for v in range(versions):
        u = seeding.numpy_rng(0, 99, v).random(n)
        state = estimator_update(state, np.flatnonzero(u < p).tolist(), cutoff=0)
    omega = estimator_weights(state, list(range(n))).numpy()
    # Each client's mean of ~500p geometric intervals (sd of one: sqrt(1-p)/p); the mean over
    # 200 clients is much tighter, and the first interval (from version 0) is unbiased too.
    assert abs(omega.mean() - 1 / p) < 0.02 / p
    assert np.abs(omega - 1 / p).max() < 0.25 / p


def test_never_participating_client_tends_to_the_cutoff() -> None:
    """(c) Finite K: only intervals of length K are recorded, so the weight is K."""
    state = estimator_init(2)
    for _ in range(103):
        state = estimator_update(state, [1], cutoff=10)
    assert int(state["count"][0]) == 10 and float(state["mean"][0]) == 10.0
    assert int(state["since"][0]) == 3
    assert estimator_weights(state, [0, 1]).tolist() == [10.0, 1.0]


def test_cutoff_bounds_a_participant_interval() -> None:
    # Absent 25 versions with K = 10: intervals 10, 10, then 6 when it participates.
    pattern: list[list[int]] = [[]] * 25 + [[0]]
    state = estimator_init(1)
    for participants in pattern:
        state = estimator_update(state, participants, cutoff=10)
    assert int(state["count"][0]) == 3
    assert float(state["mean"][0]) == pytest.approx((10 + 10 + 6) / 3)


def test_estimator_rejects_bad_input() -> None:
    state = estimator_init(3)
    with pytest.raises(ValueError, match="client ids"):
        estimator_weights(state, [3])
    with pytest.raises(ValueError, match="cutoff"):
        estimator_update(state, [0], cutoff=-1)
    with pytest.raises(ValueError, match="num_clients"):
        estimator_init(0)


# --------------------------------------------------------------------------- aggregation


def test_step_divides_by_the_population_not_the_participants() -> None:
    """(e) x <- x + eta_g (1/N) sum omega delta, N = round.num_clients."""
    strategy = FedAU(server_lr=2.0)
    rnd = Round(version=0, time=0.0, num_clients=10)
    new, state, metrics = strategy.aggregate(
        strategy.init(params()), params(), updates_for([1, 4]), rnd
    )
    torch.testing.assert_close(new["w"], torch.full((3,), 2.0 * (2 + 5) / 10))
    assert torch.equal(new["steps"], torch.tensor(7))  # integer buffers are left alone
    assert metrics["participants"] == 2
    # Second version: client 1 again (interval 1, weight 1), client 4 absent, client 7 new.
    new2, state, _ = strategy.aggregate(state, new, updates_for([1, 7]), rnd)
    torch.testing.assert_close(new2["w"], new["w"] + 2.0 * (2 + 8) / 10)
    # Third: client 4 comes back; its weight still uses only its first interval (1) and it
    # then records an interval of 2; fourth: it weighs mean(1, 2) = 1.5.
    new3, state, _ = strategy.aggregate(state, new2, updates_for([4]), rnd)
    torch.testing.assert_close(new3["w"], new2["w"] + 2.0 * 1.0 * 5 / 10)
    new4, state, metrics = strategy.aggregate(state, new3, updates_for([4]), rnd)
    torch.testing.assert_close(new4["w"], new3["w"] + 2.0 * 1.5 * 5 / 10)
    assert metrics["mean_weight"] == 1.5


def test_baseline_weightings() -> None:
    rnd = Round(version=0, time=0.0, num_clients=10)
    ups = updates_for([0, 2, 5])  # deltas 1, 3, 6
    new, _, _ = FedAU(weighting="all").aggregate({}, params(), ups, rnd)
    torch.testing.assert_close(new["w"], torch.full((3,), 10 / 10))
    new, _, _ = FedAU(weighting="participating", server_lr=3.0).aggregate({}, params(), ups, rnd)
    torch.testing.assert_close(new["w"], torch.full((3,), 3.0 * 10 / 3))


@pytest.mark.parametrize("weighting", ["adaptive", "participating", "all"])
def test_a_version_without_updates_leaves_the_model(weighting: str) -> None:
    strategy = FedAU(weighting=weighting)
    rnd = Round(version=0, time=0.0, num_clients=4)
    p, state, _ = strategy.aggregate({}, params(), [], rnd)
    assert_params_equal(p, params())
    if weighting == "adaptive":  # and every client's counter still advances
        assert state["estimator"]["since"].tolist() == [1, 1, 1, 1]


def test_full_participation_equals_uniform_fedavg() -> None:
    """(a) In an engine: fraction 1, every client every version."""
    config = small_config(clients=12, fraction=1.0, model="logreg")
    fedau = build_engine(config.replace(strategy="fedau"))
    fedavg = build_engine(config.replace(strategy_options={"weighting": "uniform"}))
    assert isinstance(fedavg.strategy, FedAvg)
    fedau.run(3)
    fedavg.run(3)
    for k in fedavg.params:
        torch.testing.assert_close(fedau.params[k], fedavg.params[k], rtol=1e-6, atol=1e-7)
    assert fedau.state["estimator"]["mean"].tolist() == [1.0] * 12


def test_resume_is_bit_identical_under_bernoulli_participation(tmp_path: Path) -> None:
    config = small_config(strategy="fedau", strategy_options={"cutoff": 3}, **BERNOULLI)
    resumed, straight = assert_resume_bit_identical(config, tmp_path)
    for k in ("since", "count", "mean"):
        assert torch.equal(resumed.state["estimator"][k], straight.state["estimator"][k])


def test_engine_estimator_sees_exactly_the_available_clients() -> None:
    config = small_config(strategy="fedau", **BERNOULLI)
    engine = build_engine(config)
    engine.run(8)
    state = estimator_init(config.clients)
    for v in range(8):
        state = estimator_update(state, engine.participation.participants(v) or [], 0)
    for k in ("since", "count", "mean"):
        assert torch.equal(engine.state["estimator"][k], state[k])


# --------------------------------------------------------------------------- known probability


def test_known_probability_weights_by_inverse_probability() -> None:
    strategy = KnownProbability(probabilities=(0.5, 0.25, 1.0, 0.1), server_lr=1.0)
    rnd = Round(version=0, time=0.0, num_clients=4)
    new, _, _ = strategy.aggregate({}, params(), updates_for([0, 1]), rnd)
    torch.testing.assert_close(new["w"], torch.full((3,), (1 / 0.5 + 2 / 0.25) / 4))


def test_known_probability_gets_probabilities_from_the_simulator() -> None:
    engine = build_engine(small_config(strategy="known-probability", **BERNOULLI))
    assert isinstance(engine.strategy, KnownProbability)
    assert engine.strategy.probabilities == (0.3,) * 30
    engine.run(2)


def test_known_probability_errors() -> None:
    rnd = Round(version=0, time=0.0, num_clients=3)
    with pytest.raises(ValueError, match="needs the true participation probabilities"):
        KnownProbability().aggregate({}, params(), updates_for([0]), rnd)
    with pytest.raises(ValueError, match="2 probabilities for 3 clients"):
        KnownProbability(probabilities=(0.5, 0.5)).aggregate({}, params(), updates_for([0]), rnd)
    with pytest.raises(ValueError, match=r"probabilities must be in \(0, 1\]"):
        KnownProbability(probabilities=(0.5, 0.0))
    with pytest.raises(ValueError, match="defines none"):
        build_engine(small_config(strategy="known-probability"))


def test_fedau_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="weighting must be one of"):
        FedAU(weighting="examples")
    with pytest.raises(ValueError, match="cutoff must be an integer >= 0"):
        FedAU(cutoff=-5)
    with pytest.raises(ValueError, match="server_lr must be positive"):
        FedAU(server_lr=0.0)
    with pytest.raises(ValueError, match="server_lr must be positive"):
        KnownProbability(server_lr=float("nan"))


def test_cli_runs_fedau_with_the_fedau_recipe(tmp_path: Path) -> None:
    args = ["simulate", "--strategy", "fedau", "--participation", "bernoulli"]
    args += ["--participation-opt", "recipe=fedau", "--participation-opt", "mean_p=0.3"]
    args += ["--workload", "digits", "--partition", "dirichlet", "--alpha", "0.1"]
    args += ["--clients", "20", "--rounds", "3", "--local-steps", "2", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    quoted = [a if a != "recipe=fedau" else 'recipe="fedau"' for a in args]
    assert main([*quoted, "--out", str(tmp_path / "quoted")]) == 0


def test_known_probability_keeps_probabilities_the_user_gives() -> None:
    from fedlab.config import RunConfig
    from fedlab.run import build_engine

    given = tuple([0.5] * 10)
    config = RunConfig(
        clients=10,
        fraction=0.5,
        rounds=1,
        local_steps=1,
        strategy="known-probability",
        strategy_options={"probabilities": list(given)},
    )
    engine = build_engine(config)  # uniform participation defines no probabilities
    assert engine.strategy.probabilities == given  # type: ignore[attr-defined]
    engine.run(1)
