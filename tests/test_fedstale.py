"""FedStale and FedVARP: the unit properties of the spec (§3), memory, resume, label swap."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_params_equal, small_config
from fedlab import registry
from fedlab.cli import main
from fedlab.data import make_workload
from fedlab.participation import MODELS
from fedlab.run import build_engine
from fedlab.store import ClientStore, MemoryStore
from fedlab.strategies import FedStale, FedVARP
from fedlab.types import Params, Round, State, Update

N = 6
SHAPES = {"w": (3, 2), "b": (2,)}


def delta(rng: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=rng, dtype=torch.float64) for k, s in SHAPES.items()}


def zeros() -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=torch.float64) for k, s in SHAPES.items()}


class World:
    """Drives a strategy's ``aggregate`` directly, with random deltas and example counts."""

    def __init__(self, strategy: FedStale, seed: int = 0) -> None:
        self.strategy = strategy
        self.rng = torch.Generator().manual_seed(seed)
        self.memory: ClientStore = MemoryStore()
        self.params: Params = zeros()
        self.state: State = strategy.init(self.params)

    def updates(self, clients: list[int]) -> list[Update]:
        sizes = torch.randint(1, 50, (len(clients),), generator=self.rng).tolist()
        return [
            Update(client_id=c, version=0, payload=delta(self.rng), num_examples=n)
            for c, n in zip(clients, sizes, strict=True)
        ]

    def step(self, updates: list[Update], strategy: FedStale | None = None) -> dict[str, Any]:
        strategy = strategy or self.strategy
        rnd = Round(version=0, time=0.0, num_clients=N, memory=self.memory)
        params, self.state, _ = strategy.aggregate(self.state, self.params, updates, rnd)
        step = {k: params[k] - self.params[k] for k in params}
        self.params = params
        return step

    def peek(self, updates: list[Update], strategy: FedStale) -> dict[str, Any]:
        """The step ``strategy`` would take now, leaving this world untouched."""
        other = World(strategy)
        other.memory = MemoryStore()
        other.memory.load_state_dict(self.memory.state_dict())
        other.params, other.state = self.params, self.state
        return other.step(updates)

    def h(self, client: int) -> dict[str, torch.Tensor]:
        entry = self.memory.get(client)
        return zeros() if entry is None else entry["h"]

    def alpha(self, strategy: FedStale, updates: list[Update]) -> dict[int, float]:
        """``alpha_i`` as the strategy defines it, with this version's counts included."""
        if strategy.weights == "uniform":
            return {c: 1.0 / N for c in range(N)}
        counts = {c: e["n"] for c in range(N) if (e := self.memory.get(c)) is not None}
        counts.update({u.client_id: u.num_examples for u in updates})
        total = sum(counts.values())
        return {c: counts.get(c, 0) / total for c in range(N)}


def reference(
    world: World, updates: list[Update], beta: float, inv_p: dict[int, float], lr: float = 1.0
) -> dict[str, torch.Tensor]:
    """The spec's display in pseudo-gradient form: ``x <- x - lr * G``."""
    alpha = world.alpha(world.strategy, updates)
    out = {}
    for k in SHAPES:
        g_sum = sum(
            alpha[u.client_id]
            * inv_p[u.client_id]
            * (-u.payload[k] - beta * -world.h(u.client_id)[k])
            for u in updates
        )
        stale = sum(alpha[c] * -world.h(c)[k] for c in range(N))
        out[k] = -lr * (g_sum + beta * stale)
    return out


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in SHAPES:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


PROBS = (1.0, 0.5, 0.8, 0.5, 1.0, 0.25)


def warm(world: World, versions: int = 5, seed: int = 1) -> None:
    """Run random versions so that memory holds some stale updates."""
    pick = random.Random(seed)
    for _ in range(versions):
        world.step(world.updates(sorted(pick.sample(range(N), pick.randint(0, N - 1)))))


@pytest.mark.parametrize("weights", ["examples", "uniform"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.3])
def test_step_matches_the_spec_formula(beta: float, weights: str) -> None:
    # (a) beta = 0 is unbiased FedAvg, (b) beta = 1 FedVARP, and anything between.
    strategy = FedStale(beta=beta, weights=weights, probabilities=PROBS, server_lr=0.7)
    world = World(strategy)
    warm(world)
    updates = world.updates([0, 2, 3])
    expected = reference(world, updates, beta, {c: 1 / p for c, p in enumerate(PROBS)}, 0.7)
    close(world.step(updates), expected)


def test_beta_zero_ignores_memory_and_fedvarp_is_beta_one() -> None:
    world = World(FedStale(beta=0.0, probabilities=PROBS, weights="uniform"))
    warm(world)
    updates = world.updates([1, 5])
    step = world.peek(updates, world.strategy)
    for k in SHAPES:
        expected = sum(u.payload[k] / (N * PROBS[u.client_id]) for u in updates)
        torch.testing.assert_close(step[k], expected)
    assert FedVARP().beta == 1.0 and FedStale().beta == 0.5
    varp = FedVARP(probabilities=PROBS, weights="uniform")
    close(world.peek(updates, varp), world.peek(updates, FedStale(**{**vars(varp), "beta": 1.0})))


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("probabilities", ["estimated", (1.0,) * N])
def test_full_participation_is_fedavg_for_any_beta(beta: float, probabilities: Any) -> None:
    # (c) with p_i = 1 (known, or estimated from always participating) G = sum_i alpha_i g_i.
    world = World(FedStale(beta=beta, probabilities=probabilities))
    for _ in range(4):
        updates = world.updates(list(range(N)))
        total = sum(u.num_examples for u in updates)
        step = world.step(updates)
        for k in SHAPES:
            expected = sum(u.payload[k] * u.num_examples / total for u in updates)
            torch.testing.assert_close(step[k], expected)


def test_step_is_linear_in_beta() -> None:
    # (d) G(beta) = (1 - beta) G(0) + beta G(1).
    world = World(FedStale(probabilities="estimated"))
    warm(world, versions=8)
    updates = world.updates([0, 1, 4])
    g0 = world.peek(updates, FedStale(beta=0.0))
    g1 = world.peek(updates, FedStale(beta=1.0))
    for beta in (0.25, 0.5, 0.9):
        g = world.peek(updates, FedStale(beta=beta))
        close(g, {k: (1 - beta) * g0[k] + beta * g1[k] for k in SHAPES})


def test_estimated_probabilities_are_fedau_weights() -> None:
    # Participation [1, 0, 0, 1, 0, 1] for client 0: weights [1, 1, 2] (spec §2 (d)).
    world = World(FedStale(beta=0.0, weights="uniform"))
    for t, present in enumerate([1, 0, 0, 1, 0, 1]):
        updates = world.updates([0] if present else [])
        step = world.step(updates)
        if present:
            weight = {0: 1.0, 3: 1.0, 5: 2.0}[t]
            for k in SHAPES:
                torch.testing.assert_close(step[k], weight * updates[0].payload[k] / N)


def test_memory_holds_the_last_update_of_participants_only() -> None:
    # (e)
    world = World(FedStale())
    warm(world)
    before = {c: world.memory.get(c) for c in range(N)}
    updates = world.updates([1, 4])
    world.step(updates)
    for c in range(N):
        entry = world.memory.get(c)
        if c in (1, 4):
            assert entry is not None
            u = next(u for u in updates if u.client_id == c)
            assert entry["n"] == u.num_examples
            assert_params_equal(entry["h"], u.payload)
        else:
            assert entry is before[c]


def test_incremental_sum_equals_brute_force_after_many_versions() -> None:
    # (f) with example counts that change from version to version.
    world = World(FedStale(probabilities="estimated"), seed=3)
    pick = random.Random(7)
    for _ in range(200):
        world.step(world.updates(sorted(pick.sample(range(N), pick.randint(0, N)))))
    counts = {c: e["n"] for c in range(N) if (e := world.memory.get(c)) is not None}
    assert world.state["total"] == sum(counts.values())
    for k in SHAPES:
        brute = sum(n * world.h(c)[k] for c, n in counts.items())
        torch.testing.assert_close(world.state["stale"][k], brute, rtol=1e-12, atol=1e-10)


def test_empty_version_steps_with_the_stale_term_only() -> None:
    world = World(FedStale(beta=0.5, probabilities=PROBS))
    assert all(bool((v == 0).all()) for v in world.step([]).values())  # nothing remembered yet
    warm(world)
    alpha = world.alpha(world.strategy, [])
    step = world.step([])
    for k in SHAPES:
        torch.testing.assert_close(step[k], 0.5 * sum(alpha[c] * world.h(c)[k] for c in range(N)))


def test_bad_hyperparameters_and_missing_memory_are_refused() -> None:
    for bad in (
        {"beta": 1.5},
        {"beta": -0.1},
        {"server_lr": 0.0},
        {"weights": "size"},
        {"probabilities": "guess"},
        {"probabilities": (0.5, 0.0)},
        {"cutoff": -1},
    ):
        with pytest.raises(ValueError):
            FedStale(**bad)
    assert FedStale(probabilities=[0.5, 1]).probabilities == (0.5, 1.0)  # type: ignore[arg-type]
    assert FedStale(probabilities="known").needs_probabilities
    assert not FedStale(probabilities=(0.5,)).needs_probabilities
    strategy = FedStale()
    with pytest.raises(ValueError, match=r"Round\.memory"):
        strategy.aggregate(strategy.init(zeros()), zeros(), [], Round(0, 0.0, N))
    with pytest.raises(ValueError, match="2 participation probabilities given for 6"):
        World(FedStale(probabilities=(0.5, 0.5))).step([])
    with pytest.raises(ValueError, match="true participation probabilities"):
        World(FedStale(probabilities="known")).step([])


# --------------------------------------------------------------------------- in the engine


def fedstale_config(**changes: Any) -> Any:
    return small_config(strategy="fedstale", fraction=0.3, **changes)


def test_disk_and_memory_stores_give_bit_identical_runs(tmp_path: Path) -> None:
    a = build_engine(fedstale_config(memory="memory"), run_dir=tmp_path / "a")
    b = build_engine(fedstale_config(memory="disk"), run_dir=tmp_path / "b")
    a.run(5)
    b.run(5)
    assert_params_equal(a.params, b.params)
    assert len(b.memory) > 0 and (tmp_path / "b" / "memory").is_dir()


def test_resume_with_disk_memory_is_bit_identical(tmp_path: Path) -> None:
    config = fedstale_config(memory="disk")
    straight = build_engine(config, run_dir=tmp_path / "straight")
    straight.run(6)
    first = build_engine(config, run_dir=tmp_path / "resumed")
    first.run(3)
    first.memory.put(0, {"junk": torch.ones(2)})  # a write the crash leaves behind
    second = build_engine(config, run_dir=tmp_path / "resumed")
    second.resume()
    assert second.version == 3
    second.run(6)
    assert_params_equal(straight.params, second.params)
    for k in ("stale", "estimator"):
        for name, t in straight.state[k].items():
            assert torch.equal(t, second.state[k][name])
    on_disk = {p.name for p in (tmp_path / "resumed" / "memory").iterdir()}
    assert len(on_disk) <= 2 * 30


def test_known_probabilities_are_injected_from_the_participation_model() -> None:
    if "bernoulli" not in MODELS:
        pytest.skip("no bernoulli participation model")
    config = fedstale_config(
        strategy_options={"probabilities": "known"},
        participation="bernoulli",
        participation_options={"recipe": "tiled", "values": [1.0, 0.5]},
    )
    engine = build_engine(config)
    assert engine.strategy.probabilities == (1.0, 0.5) * 15  # type: ignore[attr-defined]
    engine.run(2)


def test_cli_run_exits_zero(tmp_path: Path) -> None:
    if "bernoulli" in MODELS:
        participation = ["--participation", "bernoulli", "--participation-opt", "p=0.5"]
    else:
        participation = []
    args = ["simulate", "--strategy", "fedstale", "--clients", "12", "--rounds", "3"]
    args += ["--local-steps", "2", "--no-progress", "--memory", "disk"]
    assert main([*args, *participation, "--out", str(tmp_path / "run")]) == 0
    assert main([*args[:2], "fedvarp", *args[3:], "--out", str(tmp_path / "varp")]) == 0
    assert registry.resolve("strategies", "fedvarp") is FedVARP


# --------------------------------------------------------------------------- label swap


def test_label_swap_swaps_the_pair_of_each_client_on_a_fraction_h() -> None:
    base = make_workload("digits", num_clients=4, seed=5)
    for h in (0.5, 1.0):
        swapped = make_workload("digits", num_clients=4, seed=5, label_swap=h)
        for k in range(4):
            a, b = (0, 1) if k % 2 == 0 else (8, 9)
            before, after = base.client_data(k), swapped.client_data(k)
            assert torch.equal(before.x, after.x)
            changed = before.y != after.y
            assert set(before.y[changed].tolist()) <= {a, b}
            for src, dst in ((a, b), (b, a)):
                n = int((before.y == src).sum())
                moved = int(((before.y == src) & (after.y == dst)).sum())
                assert moved == round(h * n)
        assert torch.equal(base.test_data().y, swapped.test_data().y)
    # Deterministic from (seed, client), whatever was built before.
    first = make_workload("digits", num_clients=4, seed=5, label_swap=0.5)
    again = make_workload("digits", num_clients=4, seed=5, label_swap=0.5)
    again.client_data(0)
    assert torch.equal(first.client_data(2).y, again.client_data(2).y)
    other_seed = make_workload("digits", num_clients=4, seed=6, label_swap=0.5)
    assert not torch.equal(first.client_data(2).y, other_seed.client_data(2).y)
    assert torch.equal(
        make_workload("digits", num_clients=4, seed=5, label_swap=0.0).client_data(1).y,
        base.client_data(1).y,
    )


def test_label_swap_is_validated() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_swap"):
            make_workload("digits", num_clients=4, seed=0, label_swap=bad)
    with pytest.raises(ValueError, match="digits workload only"):
        make_workload("synthetic", num_clients=4, seed=0, label_swap=0.5)
