"""ADMM-WLS: the wls workload, the closed-form local solves and the noisy-link comparison."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import Rows, assert_resume_bit_identical
from fedlab.callbacks import Evaluator
from fedlab.config import RunConfig
from fedlab.data import make_workload
from fedlab.run import build_engine, build_workload
from fedlab.strategies.admm_wls import ADMMWLS, channel_noise
from fedlab.types import Round


def wls_config(**changes: Any) -> RunConfig:
    base: dict[str, Any] = dict(
        workload="wls", strategy="admm-wls", clients=10, fraction=1.0, rounds=20, seed=0
    )
    return RunConfig(**{**base, **changes})


def run(config: RunConfig) -> tuple[Any, list[dict[str, Any]], Any]:
    workload = build_workload(config)
    rows = Rows()
    engine = build_engine(config, workload=workload, callbacks=[Evaluator(workload), rows])
    engine.run(config.rounds)
    return engine, rows.rows, workload


def test_solution_matches_lstsq() -> None:
    wl: Any = make_workload("wls", num_clients=7, seed=3)
    xs, ys = [], []
    for k in range(7):
        x, y, psi = wl.wls_client(k)
        assert bool((psi > 0).all())
        xs.append(x.numpy() * np.sqrt(psi.numpy())[:, None])
        ys.append(y.numpy() * np.sqrt(psi.numpy()))
    expected = np.linalg.lstsq(np.concatenate(xs), np.concatenate(ys), rcond=None)[0]
    np.testing.assert_allclose(wl.solution().numpy(), expected, rtol=1e-10, atol=1e-12)
    assert wl.evaluate({"weight": wl.w_true[None, :]})["msd"] == 0.0


def test_standard_noise_free_converges_to_wls_optimum() -> None:
    engine, rows, wl = run(
        wls_config(rounds=100, strategy_options={"variant": "standard", "rho": 5.0})
    )
    z = engine.params["weight"].reshape(-1)
    assert 10 * math.log10(float(((z - wl.solution()) ** 2).sum()) + 1e-300) < -60
    assert rows[-1]["msd_db"] < -30


def test_proposed_noise_free_reaches_its_derived_fixed_point() -> None:
    """The dual-free iteration's fixed point solves ``sum_k M_k (b_k - A_k z) = 0``."""
    rho = 5.0
    engine, _, wl = run(wls_config(rounds=100, strategy_options={"rho": rho}))
    lhs = torch.zeros(wl.dim, wl.dim, dtype=torch.float64)
    rhs = torch.zeros(wl.dim, dtype=torch.float64)
    for k in range(wl.num_clients):
        x, y, psi = wl.wls_client(k)
        a = x.T @ (psi[:, None] * x)
        m = torch.linalg.inv(a + rho * torch.eye(wl.dim, dtype=torch.float64))
        lhs += m @ a
        rhs += m @ (x.T @ (psi * y))
    fixed = torch.linalg.solve(lhs, rhs)
    z = engine.params["weight"].reshape(-1)
    assert float(((z - fixed) ** 2).sum()) < 1e-20
    # Close to, but (with heterogeneous clients) not exactly, the WLS optimum.
    assert float(((fixed - wl.solution()) ** 2).sum()) < 1e-3


def steady_msd_db(variant: str, seed: int) -> float:
    config = wls_config(
        rounds=300, seed=seed, strategy_options={"variant": variant, "rho": 1.0, "link_noise": 0.1}
    )
    _, rows, _ = run(config)
    return float(np.mean([r["msd_db"] for r in rows[-100:]]))


def test_proposed_beats_standard_under_link_noise() -> None:
    # Measured (seeds 0, 1; mean of the last 100 of 300 versions): standard about -17.5 dB,
    # proposed about -21.3 dB.
    for seed in (0, 1):
        assert steady_msd_db("proposed", seed) < steady_msd_db("standard", seed) - 2.0


def test_channel_noise_is_unbiased_with_configured_std() -> None:
    like = torch.zeros(200_000, dtype=torch.float64)
    draws = channel_noise(like, 0.3, 5, 201, 2)
    assert abs(float(draws.mean())) < 0.005
    assert abs(float(draws.std()) - 0.3) < 0.005


def test_every_client_gets_a_task_and_slots_are_scheduled() -> None:
    strategy = ADMMWLS(link_noise=0.1)
    params = {"weight": torch.zeros(1, 4, dtype=torch.float64)}
    counts = np.zeros(20)
    for v in range(200):
        tasks = strategy.configure(
            {}, params, Round(version=v, time=0, num_clients=20, slots=5, seed=v)
        )
        assert sorted(tasks) == list(range(20))
        assert sum(bool(t.config["scheduled"]) for t in tasks.values()) == 5
        counts += [bool(tasks[c].config["scheduled"]) for c in range(20)]
        assert not torch.equal(tasks[0].params["weight"], tasks[1].params["weight"])
    assert abs(counts.mean() / 200 - 0.25) < 1e-12
    assert counts.min() > 25


@pytest.mark.parametrize("variant", ["proposed", "standard"])
def test_resume_bit_identical(variant: str, tmp_path: Path) -> None:
    config = wls_config(
        fraction=0.5, strategy_options={"variant": variant, "link_noise": 0.05, "rho": 2.0}
    )
    assert_resume_bit_identical(config, tmp_path / "run")


def test_cli_writes_msd(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "fedlab", "simulate", "--workload", "wls", "--strategy",
        "admm-wls", "--fraction", "1.0", "--clients", "10", "--rounds", "20", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all("msd_db" in r for r in rows)
    assert rows[-1]["msd_db"] < rows[0]["msd_db"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["msd_db"] == pytest.approx(rows[-1]["msd_db"])
