"""Simulated attacks: each attack's defining property, malicious selection, the engine hook."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import Rows, small_config
from fedlab.attacks import (
    ALIE,
    IPM,
    Adversary,
    Gaussian,
    LabelFlip,
    MinMax,
    PoisonedWorkload,
    Scaling,
    SignFlip,
    alie_z,
    build_adversary,
    choose_malicious,
)
from fedlab.cli import main
from fedlab.config import ConfigError
from fedlab.data import ClientData, make_workload
from fedlab.run import build_engine
from fedlab.types import Round, Update

ROUND = Round(version=3, time=0.0, num_clients=10, seed=1234)
PARAMS = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}


def update(cid: int, seed: int, scale: float = 1.0) -> Update:
    gen = torch.Generator().manual_seed(seed)
    return Update(
        client_id=cid,
        version=3,
        payload={"w": scale * torch.randn(2, 3, generator=gen), "b": torch.randn(3, generator=gen)},
        num_examples=10 + cid,
    )


def flat(u: Update) -> torch.Tensor:
    return torch.cat([u.payload[k].double().reshape(-1) for k in sorted(u.payload)])


BENIGN = [update(c, 100 + c) for c in range(6)]
MALICIOUS = [update(c, 200 + c) for c in (6, 7)]


def benign_stats() -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([flat(u) for u in BENIGN])
    return rows.mean(0), rows.std(0, unbiased=False)


def test_sign_flip_negates_and_keeps_identity() -> None:
    out = SignFlip(scale=2.0).corrupt(MALICIOUS, BENIGN, PARAMS, ROUND)
    for before, after in zip(MALICIOUS, out, strict=True):
        assert (after.client_id, after.version, after.num_examples) == (
            before.client_id,
            before.version,
            before.num_examples,
        )
        assert torch.equal(flat(after), -2.0 * flat(before))


def test_scaling_multiplies() -> None:
    out = Scaling(factor=1e5).corrupt(MALICIOUS, BENIGN, PARAMS, ROUND)
    assert torch.allclose(flat(out[0]), 1e5 * flat(MALICIOUS[0]))


def test_gaussian_is_seeded_noise_of_the_right_scale() -> None:
    many = [update(c, c) for c in range(50)]
    a = Gaussian(std=3.0).corrupt(many, [], PARAMS, ROUND)
    b = Gaussian(std=3.0).corrupt(many, [], PARAMS, ROUND)
    assert all(torch.equal(flat(x), flat(y)) for x, y in zip(a, b, strict=True))
    noise = torch.cat([flat(u) for u in a])
    assert abs(float(noise.std()) - 3.0) < 0.3
    assert not torch.equal(flat(a[0]), flat(a[1]))


def test_alie_is_mean_minus_z_std() -> None:
    out = ALIE().corrupt(MALICIOUS, BENIGN, PARAMS, ROUND)
    mean, std = benign_stats()
    z = alie_z(8, 2)
    # n = 8, m = 2: s = floor(8/2 + 1) - 2 = 3, z = Phi^-1(5/8)
    assert z == pytest.approx(0.3186, abs=1e-3)
    for u in out:
        assert torch.allclose(flat(u), mean - z * std, atol=1e-6)
    fixed = ALIE(z=1.5).corrupt(MALICIOUS, BENIGN, PARAMS, ROUND)
    assert torch.allclose(flat(fixed[0]), mean - 1.5 * std, atol=1e-6)


def test_ipm_has_negative_inner_product_with_the_benign_mean() -> None:
    mean, _ = benign_stats()
    out = IPM(epsilon=0.5).corrupt(MALICIOUS, BENIGN, PARAMS, ROUND)
    assert float(flat(out[0]) @ mean) < 0
    assert torch.allclose(flat(out[1]), -0.5 * mean, atol=1e-6)


@pytest.mark.parametrize("direction", ["std", "unit"])
def test_min_max_stays_within_the_benign_diameter_and_is_maximal(direction: str) -> None:
    attack = MinMax(direction=direction)
    out = attack.corrupt(MALICIOUS, BENIGN, PARAMS, ROUND)
    rows = torch.stack([flat(u) for u in BENIGN])
    bound = float(torch.cdist(rows, rows).max())
    mal = flat(out[0])
    assert float((rows - mal).norm(dim=1).max()) <= bound + 1e-5
    mean = rows.mean(0)
    assert float((mal - mean).norm()) > 0  # it moved away from the mean
    # A little further along the same direction breaks the bound (γ is maximal).
    further = mean + 1.01 * (mal - mean)
    assert float((rows - further).norm(dim=1).max()) > bound


def test_omniscient_attacks_fall_back_to_their_own_updates() -> None:
    out = IPM().corrupt(MALICIOUS, [], PARAMS, ROUND)
    own = torch.stack([flat(u) for u in MALICIOUS]).mean(0)
    assert torch.allclose(flat(out[0]), -own, atol=1e-6)


def test_label_flip_maps_y_to_c_minus_1_minus_y() -> None:
    data = ClientData(x=torch.zeros(4, 2), y=torch.tensor([0, 3, 9, 5]))
    flipped = LabelFlip(num_classes=10).poison(data, 0, 0)
    assert flipped.y.tolist() == [9, 6, 0, 4]
    assert torch.equal(flipped.x, data.x)


def test_poisoned_workload_only_touches_malicious_clients() -> None:
    workload = make_workload("synthetic", num_clients=6, seed=3)
    poisoned = PoisonedWorkload(workload, frozenset({2}), LabelFlip(), seed=3)
    c = workload.num_classes
    assert torch.equal(poisoned.client_data(2).y, c - 1 - workload.client_data(2).y)
    assert torch.equal(poisoned.client_data(1).y, workload.client_data(1).y)


def test_adversary_keeps_order_and_benign_updates() -> None:
    updates = [update(c, c) for c in range(5)]
    adversary = Adversary(malicious=frozenset({1, 3}), attack=SignFlip())
    out = adversary.corrupt(updates, PARAMS, ROUND)
    assert [u.client_id for u in out] == [0, 1, 2, 3, 4]
    for before, after in zip(updates, out, strict=True):
        sign = -1.0 if before.client_id in (1, 3) else 1.0
        assert torch.equal(flat(after), sign * flat(before))
    assert adversary.count(out) == 2


def test_malicious_selection_is_reproducible_and_sized() -> None:
    a = choose_malicious(100, 0.2, seed=5)
    assert a == choose_malicious(100, 0.2, seed=5)
    assert len(a) == 20 and all(0 <= c < 100 for c in a)
    assert a != choose_malicious(100, 0.2, seed=6)
    assert choose_malicious(100, 0.0, seed=5) == frozenset()
    assert len(choose_malicious(3, 0.1, seed=5)) == 1  # at least one when asked for some
    with pytest.raises(ValueError, match=r"0\.5"):
        choose_malicious(10, 0.5, seed=0)


@pytest.mark.parametrize(
    ("name", "fraction", "options", "match"),
    [
        ("nope", 0.1, {}, "unknown attack"),
        ("scaling", 0.1, {"lambda": 2}, "no option 'lambda'"),
        ("min-max", 0.1, {"direction": "up"}, "direction"),
        ("", 0.1, {}, "both"),
        ("scaling", 0.0, {}, "both"),
    ],
)
def test_bad_attacks_fail_clearly(
    name: str, fraction: float, options: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_adversary(name, num_clients=10, fraction=fraction, seed=0, options=options)


def test_build_adversary_without_attack_is_none() -> None:
    assert build_adversary("", num_clients=10, fraction=0.0, seed=0, options={}) is None


def test_config_requires_attack_and_fraction_together() -> None:
    with pytest.raises(ConfigError, match="together"):
        small_config(attack="sign-flip")
    with pytest.raises(ConfigError, match="together"):
        small_config(byzantine=0.2)
    with pytest.raises(ConfigError, match="byzantine"):
        small_config(byzantine=0.6, attack="ipm")
    a = small_config(byzantine=0.2, attack="scaling", attack_options={"factor": 10.0})
    assert a.fingerprint() != a.replace(attack_options={"factor": 20.0}).fingerprint()
    assert a.fingerprint() != small_config().fingerprint()


def test_engine_counts_byzantine_updates_and_corrupts_them() -> None:
    config = small_config(byzantine=0.2, attack="sign-flip")
    rows = Rows()
    engine = build_engine(config, callbacks=[rows])
    engine.run(4)
    assert engine.adversary is not None and len(engine.adversary.malicious) == 6
    assert all("byzantine" in r for r in rows.rows)
    assert sum(r["byzantine"] for r in rows.rows) > 0
    assert all(r["byzantine"] <= r["updates"] for r in rows.rows)
    honest = build_engine(small_config())
    honest.run(4)
    assert any(not torch.equal(engine.params[k], honest.params[k]) for k in honest.params)


def test_label_flip_runs_end_to_end() -> None:
    rows = Rows()
    engine = build_engine(small_config(byzantine=0.3, attack="label-flip"), callbacks=[rows])
    engine.run(2)
    assert all(math.isfinite(r["train_loss"]) for r in rows.rows)


def test_cli_runs_an_attack_against_a_robust_strategy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = [
        "simulate",
        "--strategy",
        "trimmed-mean",
        "--byzantine",
        "0.2",
        "--attack",
        "alie",
        "--attack-opt",
        "z=1.0",
        "--clients",
        "20",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert 'attack = "alie"' in (out / "config.toml").read_text()
