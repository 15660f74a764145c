"""Participation models: determinism, long-run frequencies, FedAU's recipe, traces, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Rows, small_config
from fedlab.data import Workload
from fedlab.participation import (
    MODELS,
    Participation,
    build_participation,
    fedau_probabilities,
)
from fedlab.run import build_engine, build_workload

N = 40


def make(
    name: str, workload: Workload | None = None, seed: int = 3, **options: Any
) -> Participation:
    workload = workload or build_workload(small_config(clients=N))
    return build_participation(
        name, workload=workload, num_clients=N, seed=seed, fraction=0.2, options=options
    )


def frequencies(model: Participation, versions: int) -> np.ndarray:
    counts = np.zeros(N)
    for v in range(versions):
        ids = model.participants(v)
        assert ids is not None and list(ids) == sorted(set(ids))
        counts[list(ids)] += 1
    return counts / versions


@pytest.fixture(scope="module")
def digits() -> Workload:
    return build_workload(
        small_config(clients=N, workload="digits", partition="dirichlet", alpha=0.1)
    )


CASES: list[tuple[str, dict[str, Any]]] = [
    ("bernoulli", {"p": 0.3}),
    ("bernoulli", {"recipe": "tiled", "values": [1.0, 0.5, 0.1]}),
    ("bernoulli", {}),  # p defaults to the run's fraction
    ("cyclic", {"cycle": 20, "p": 0.25}),
    ("cyclic", {"groups": 4, "cycle": 20}),
    ("cyclic", {"recipe": "tiled", "values": [0.5, 0.1]}),
    ("markov", {"p_on": 0.3, "p_off": 0.2}),
    ("markov", {"p_on": 0.3, "recipe": "tiled", "values": [0.9, 0.2]}),
]


@pytest.mark.parametrize(("name", "options"), CASES)
def test_same_seed_same_participants_in_any_call_order(name: str, options: Any) -> None:
    forward = [make(name, **options).participants(v) for v in range(30)]
    model = make(name, **options)
    backward = {v: model.participants(v) for v in reversed(range(30))}
    assert forward == [backward[v] for v in range(30)]
    other = [make(name, seed=4, **options).participants(v) for v in range(30)]
    if name != "cyclic" or "groups" not in options:  # a fixed rota has no randomness
        assert other != forward


def test_markov_resumed_at_any_version_equals_the_continuous_chain() -> None:
    continuous = make("markov", p_on=0.2, p_off=0.3)
    straight = [continuous.participants(v) for v in range(50)]
    for start in (0, 17, 49):
        resumed = make("markov", p_on=0.2, p_off=0.3)  # a new process: empty cache
        assert [resumed.participants(v) for v in range(start, 50)] == straight[start:]
    assert continuous.participants(10) == straight[10]  # going back replays from 0


@pytest.mark.parametrize(("name", "options"), CASES)
def test_long_run_frequencies_match_probabilities(name: str, options: Any) -> None:
    model = make(name, **options)
    p = model.probabilities()
    assert p is not None and p.shape == (N,)
    got = frequencies(model, 4000)
    # Bernoulli: sd <= 0.008 at 4000 versions; these Markov chains mix within a few versions;
    # cyclic is exact over whole cycles (4000 versions are 40 or 200 of them).
    tol = {"bernoulli": 0.035, "markov": 0.05, "cyclic": 1e-9}[name]
    np.testing.assert_allclose(got, p, atol=tol)


def test_bernoulli_tiled_and_fedstale_values() -> None:
    p = make("bernoulli", recipe="tiled", values=[1.0, 0.5]).probabilities()
    assert p is not None
    assert list(p[:4]) == [1.0, 0.5, 1.0, 0.5]
    model = make("bernoulli", recipe="tiled", values=[1.0, 0.5])
    for v in range(20):
        ids = set(model.participants(v) or [])
        assert set(range(0, N, 2)) <= ids  # p = 1 clients are always there


def test_cyclic_follows_fedau_blocks() -> None:
    model = make("cyclic", cycle=10, p=0.3)
    for cid in range(N):
        on = [cid in (model.participants(v) or []) for v in range(40)]
        # Starts off for fewer than 7 versions, then 3 on, 7 off, repeated.
        first = on.index(True)
        assert first < 7
        assert on[first : first + 10] == [True] * 3 + [False] * 7
        assert on[first + 10 : first + 20] == on[first : first + 10]
    rota = make("cyclic", groups=5, cycle=10)
    assert rota.participants(0) == list(range(0, N, 5)) == rota.participants(1)
    assert rota.participants(2) == list(range(1, N, 5))


def test_fedau_recipe_has_the_mean_floor_and_follows_labels(digits: Workload) -> None:
    model = make("bernoulli", digits, recipe="fedau")
    p = model.probabilities()
    assert p is not None
    assert p.mean() == pytest.approx(0.1, abs=1e-9)
    assert p.min() == pytest.approx(0.02) and p.max() <= 1
    assert len(set(np.round(p, 6))) > 5  # heterogeneous
    # p_n is linear in the label mix above the floor: clients with the same dominant label
    # get similar probabilities, so the label mix explains most of p's variance.
    labels = np.stack(
        [np.bincount(digits.client_data(k).y.numpy(), minlength=10) for k in range(N)]
    )
    mix = labels / labels.sum(1, keepdims=True)
    above = p > 0.02 + 1e-9
    coef, *_ = np.linalg.lstsq(mix[above], p[above], rcond=None)
    np.testing.assert_allclose(mix[above] @ coef, p[above], rtol=1e-6)
    # Other options and other seeds.
    q = make("bernoulli", digits, recipe="fedau", mean_p=0.3, min_p=0.05).probabilities()
    assert q is not None and q.mean() == pytest.approx(0.3) and q.min() >= 0.05 - 1e-12
    r = make("bernoulli", digits, seed=4, recipe="fedau").probabilities()
    assert r is not None and not np.allclose(r, p)


def test_fedau_probabilities_formula_on_balanced_labels() -> None:
    # With a uniform average label mix the fitted scale is FedAU's fixed mean_p * C.
    counts = np.eye(10, dtype=np.int64).repeat(3, axis=0) * 7
    p = fedau_probabilities(counts, seed=0, mean_p=0.1, min_p=0.0, alpha=0.1)
    assert p.mean() == pytest.approx(0.1)
    d = p[::3] / (0.1 * 10)  # client 3c holds only label c, so p = mean_p * C * d_c
    assert d.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="out of reach"):
        fedau_probabilities(counts, seed=0, mean_p=0.01, min_p=0.02, alpha=0.1)


def test_markov_keeps_the_stationary_probability_per_client() -> None:
    model = make("markov", p_on=0.5, recipe="tiled", values=[0.2, 0.8])
    p = model.probabilities()
    assert p is not None
    np.testing.assert_allclose(p[:2], [0.2, 0.8])


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return str(path)


def test_trace_replays_versions_and_times(tmp_path: Path) -> None:
    path = write(tmp_path, "client_id,version\n3,0\n1,0\n3,2\n3,2\n\n")
    model = make("trace", path=path)
    assert [model.participants(v) for v in range(6)] == [[1, 3], [], [3], [1, 3], [], [3]]
    p = model.probabilities()
    assert p is not None and p[3] == pytest.approx(2 / 3) and p[1] == pytest.approx(1 / 3)
    once = make("trace", path=path, repeat=False, versions=4)
    assert [once.participants(v) for v in range(6)] == [[1, 3], [], [3], [], [], []]
    timed = make("trace", path=write(tmp_path, "time,client_id\n0.5,2\n2.9,4\n3.0,5\n"), period=1.5)
    assert [timed.participants(v) for v in range(3)] == [[2], [4], [5]]


@pytest.mark.parametrize(
    ("text", "options", "match"),
    [
        ("client_id,round\n1,0\n", {}, "line 1: unknown column 'round'"),
        ("client_id\n1\n", {}, "line 1: columns"),
        ("client_id,version\n1,0\n40,1\n", {}, r"line 3: client_id 40 is outside \[0, 40\)"),
        ("client_id,version\n1,0\n2,-1\n", {}, "line 3: negative version"),
        ("client_id,version\n1,x\n", {}, "line 2: version 'x' is not an integer"),
        ("client_id,version\n1,0,3\n", {}, "line 2: expected 2 fields"),
        ("client_id,time\n1,-0.5\n", {"period": 1.0}, "line 2: negative time"),
        ("client_id,time\n1,0.5\n", {}, "needs the 'period' option"),
        ("client_id,version\n1,0\n", {"period": 2.0}, "applies only to a trace with a time"),
        ("client_id,version\n1,5\n", {"versions": 3}, "line 2: version 5 is past versions=3"),
        ("client_id,version\n", {}, "no rows"),
    ],
)
def test_trace_errors_name_the_line(
    tmp_path: Path, text: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make("trace", path=write(tmp_path, text), **options)


def test_trace_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read trace"):
        make("trace", path=str(tmp_path / "nope.csv"))


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("poisson", {}, "unknown participation model 'poisson'"),
        ("uniform", {"p": 0.3}, "'uniform' has no option 'p'; valid options: none"),
        ("bernoulli", {"q": 0.3}, "'bernoulli' has no option 'q'; valid options: p, recipe"),
        ("cyclic", {"period": 3}, "'cyclic' has no option 'period'"),
        ("markov", {"p_on": 0.1, "x": 1}, "'markov' has no option 'x'"),
        ("trace", {"path": "t.csv", "cycle": 3}, "'trace' has no option 'cycle'"),
        ("bernoulli", {"p": 1.5}, r"p must be a probability in \[0, 1\]"),
        ("bernoulli", {"p": "high"}, "p must be a number"),
        ("bernoulli", {"p": 0.2, "recipe": "fedau"}, "either 'p' or 'recipe'"),
        ("bernoulli", {"recipe": "zipf"}, "unknown recipe 'zipf'"),
        ("bernoulli", {"recipe": "tiled"}, "needs 'values'"),
        ("bernoulli", {"values": [0.5]}, "needs recipe='tiled'"),
        ("bernoulli", {"mean_p": 0.5}, "need recipe='fedau'"),
        ("cyclic", {"cycle": 1}, "cycle must be an integer >= 2"),
        ("markov", {}, "markov needs 'p_on'"),
        ("markov", {"p_on": 0.0, "p_off": 0.5}, "p_on must be positive"),
        ("markov", {"p_on": 0.1, "p_off": 0.5, "p": 0.2}, "either 'p_off' or p"),
        ("trace", {}, "trace needs 'path'"),
    ],
)
def test_unknown_models_and_bad_options_are_clear_errors(
    name: str, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make(name, **options)


def test_every_model_is_registered() -> None:
    assert set(MODELS) == {"uniform", "bernoulli", "cyclic", "markov", "trace"}


def test_large_populations_are_cheap() -> None:
    workload = build_workload(small_config(clients=10))
    for name, options in [("bernoulli", {"p": 0.01}), ("markov", {"p_on": 0.01, "p_off": 0.5})]:
        model = build_participation(
            name, workload=workload, num_clients=100_000, seed=0, fraction=0.1, options=options
        )
        sizes = [len(model.participants(v) or []) for v in range(20)]
        assert 500 < np.mean(sizes) < 2000


def test_engine_gives_every_available_client_a_task() -> None:
    config = small_config(participation="bernoulli", participation_options={"p": 0.3})
    rows = Rows()
    engine = build_engine(config, callbacks=[rows])
    engine.run(5)
    expected = [len(engine.participation.participants(v) or []) for v in range(5)]
    assert [r["updates"] for r in rows.rows] == expected
    assert len(set(expected)) > 1 and all(0 < e < config.clients for e in expected)
