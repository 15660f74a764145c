"""Client-level DP (DP-FedAvg): client clipping, central and local noise, accounting, budget."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_resume_bit_identical, small_config
from fedlab import tensorio
from fedlab.cli import main
from fedlab.clients.dp_fedavg import CLIP_KEY, NORM_KEY, ClipUpdate
from fedlab.optim import norm
from fedlab.strategies import FedAvg
from fedlab.strategies.dp_fedavg import DPFedAvg
from fedlab.strategies.robust import Median
from fedlab.strategy import Strategy
from fedlab.transforms import TransformContext
from fedlab.types import Params, Round, Update

N = 50
PARAMS: Params = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


def ctx(client: int = 0, version: int = 0, **config: Any) -> TransformContext:
    return TransformContext(client_id=client, version=version, seed=7, config=config)


def updates(m: int, scale: float = 1.0, seed: int = 0) -> list[Update]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Update(
            client_id=i,
            version=0,
            payload={k: torch.randn(v.shape, generator=gen) * scale for k, v in PARAMS.items()},
            num_examples=10 * (i + 1),
        )
        for i in range(m)
    ]


def step(strategy: Strategy, ups: list[Update], version: int = 0, state: Any = None) -> Any:
    state = strategy.init(PARAMS) if state is None else state
    rnd = Round(version=version, time=0.0, num_clients=N, seed=1000 + version)
    return strategy.aggregate(state, PARAMS, ups, rnd)


def test_clipped_norms_never_exceed_the_bound() -> None:
    # (b) Whatever the update, its clipped norm is at most S; a short update is left alone.
    t = ClipUpdate(clip_norm=1.5)
    for i, u in enumerate(updates(20, scale=3.0)):
        out, _ = t.encode(u.payload, ctx(i), None)
        assert norm(out) <= 1.5 * (1 + 1e-6)
    small = {"w": torch.full((4, 3), 0.01), "b": torch.zeros(3)}
    out, _ = t.encode(small, ctx(), None)
    assert torch.equal(out["w"], small["w"])
    # The server's clipping norm, sent in the task config, wins over the transform's own.
    out, _ = t.encode(updates(1, scale=3.0)[0].payload, ctx(**{CLIP_KEY: 0.2}), None)
    assert norm(out) == pytest.approx(0.2)


def test_clip_update_refuses_payloads_that_are_not_float_deltas() -> None:
    with pytest.raises(ValueError, match="floating-point deltas"):
        ClipUpdate().encode({"rank": torch.arange(5)}, ctx(), None)


def test_local_noise_std_is_z_times_s() -> None:
    t = ClipUpdate(clip_norm=0.5, noise_multiplier=3.0, local=True)
    out, _ = t.encode({"w": torch.zeros(40000)}, ctx(), None)
    assert float(out["w"].std()) == pytest.approx(1.5, rel=0.02)


def test_central_noise_std_matches_z_s_over_m() -> None:
    # (c) Zero updates: the model moves by the noise alone, N(0, (zS/m)²) per coordinate.
    params = {"w": torch.zeros(200, 200)}
    dp = DPFedAvg(inner=FedAvg(server_lr=1.0), noise_multiplier=2.0, clip_norm=0.7)
    ups = [Update(i, 0, {"w": torch.zeros(200, 200)}, 5) for i in range(8)]
    rnd = Round(version=0, time=0.0, num_clients=N, seed=3)
    new, _, metrics = dp.aggregate(dp.init(params), params, ups, rnd)
    assert float(new["w"].std()) == pytest.approx(2.0 * 0.7 / 8, rel=0.02)
    assert metrics["noise_std"] == pytest.approx(2.0 * 0.7 / 8)


def test_no_noise_and_no_clipping_is_uniform_fedavg() -> None:
    # (a) z = 0 and S = ∞: exactly FedAvg with uniform weights, also when the wrapped FedAvg
    # would weight by examples (the mechanism accounted for is the uniform mean).
    ups = updates(6, scale=2.0)
    plain, _, _ = step(FedAvg(weighting="uniform"), ups)
    for inner in (FedAvg(weighting="uniform"), FedAvg(weighting="examples")):
        dp = DPFedAvg(inner=inner, noise_multiplier=0.0, clip_norm=math.inf)
        new, _, _ = step(dp, ups)
        for k in PARAMS:
            assert torch.allclose(new[k], plain[k], atol=1e-6)


def test_server_clips_again_so_one_client_moves_the_sum_by_at_most_s() -> None:
    # (d) Sensitivity: without noise, removing one client (even one that skipped the client
    # transform and sent a huge update) changes the sum of clipped updates by at most S.
    dp = DPFedAvg(inner=FedAvg(weighting="uniform"), noise_multiplier=0.0, clip_norm=1.0)
    ups = updates(5)
    ups.append(Update(5, 0, {k: torch.full(v.shape, 100.0) for k, v in PARAMS.items()}, 1))
    with_all, _, _ = step(dp, ups)
    without, _, _ = step(dp, ups[:-1])
    diff = {k: with_all[k] * 6 - without[k] * 5 for k in PARAMS}
    assert norm(diff) <= 1.0 + 1e-5


def test_epsilon_matches_opacus_accountant() -> None:
    # (e) Three versions of m = 5 of N = 50 clients at z = 1.3: Opacus's RDP accountant stepped
    # three times at q = 0.1 gives the same ε.
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant

    dp = DPFedAvg(inner=FedAvg(), noise_multiplier=1.3, clip_norm=1.0, delta=1e-4)
    state = None
    for v in range(3):
        _, state, metrics = step(dp, updates(5, seed=v), version=v, state=state)
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=1.3, sample_rate=0.1)
    assert metrics["epsilon"] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)


def test_local_noise_accounts_each_client_at_half_z_without_sampling() -> None:
    pytest.importorskip("opacus")
    from opacus.accountants import RDPAccountant

    dp = DPFedAvg(inner=Median(), noise="local", noise_multiplier=2.0, clip_norm=1.0, delta=1e-4)
    state = None
    for v in range(2):  # clients 0..3 take part twice
        _, state, metrics = step(dp, updates(4, seed=v), version=v, state=state)
    acc = RDPAccountant()
    acc.history = [(1.0, 1.0, 2)]
    assert metrics["epsilon"] == pytest.approx(acc.get_epsilon(1e-4), rel=1e-9)


def test_guarantees_that_cannot_hold_are_refused() -> None:
    from fedlab.strategies.frl import FRL

    with pytest.raises(ValueError, match="non-linearly"):
        DPFedAvg(inner=Median(), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="does not aggregate model deltas"):
        DPFedAvg(inner=FRL(), noise_multiplier=1.0)
    with pytest.raises(ValueError, match="another payload"):
        DPFedAvg(inner=FRL(), noise="local", noise_multiplier=1.0)
    with pytest.raises(ValueError, match="central noise"):
        DPFedAvg(inner=FedAvg(), noise="local", adaptive=True, noise_multiplier=1.0)


def test_adaptive_clipping_moves_the_clip_to_the_target_quantile() -> None:
    # Update norms 1..10: from S = 0.5 or S = 50 the clip settles between the 4th and 7th norm
    # (the median is 5.5), and the share below it approaches γ = 0.5.
    base = updates(10)
    ups = [
        Update(u.client_id, 0, {k: v / norm(u.payload) * (i + 1) for k, v in u.payload.items()}, 1)
        for i, u in enumerate(base)
    ]
    encoded = []
    for u in ups:
        payload, _ = ClipUpdate(clip_norm=1e9, send_norm=True).encode(u.payload, ctx(), None)
        encoded.append(Update(u.client_id, 0, payload, 1))
    for start in (0.5, 50.0):
        dp = DPFedAvg(
            inner=FedAvg(),
            noise_multiplier=0.0,
            clip_norm=start,
            adaptive=True,
            count_stddev=0.1,
        )
        state = dp.init(PARAMS)
        for v in range(120):
            _, state, metrics = step(dp, encoded, version=v, state=state)
        assert 4.0 <= state["clip"] <= 7.0, (start, state["clip"])
        assert metrics["unclipped_share"] == pytest.approx(0.5, abs=0.2)


def test_adaptive_clipping_keeps_the_accounted_noise_multiplier() -> None:
    dp = DPFedAvg(inner=FedAvg(), noise_multiplier=1.0, adaptive=True, count_stddev=4.0)
    z_delta = dp.update_multiplier(80)
    assert (z_delta**-2 + 4.0**-2) ** -0.5 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        DPFedAvg(inner=FedAvg(), noise_multiplier=1.0, adaptive=True).update_multiplier(10)


def test_norm_key_is_stripped_before_the_strategy_sees_the_update() -> None:
    dp = DPFedAvg(inner=FedAvg(), noise_multiplier=0.0, adaptive=True)
    payload = {**PARAMS, NORM_KEY: torch.tensor(1.0, dtype=torch.float64)}
    dp.validate(Update(0, 0, payload, 1), PARAMS)  # the inner check_like would refuse the key


@pytest.mark.parametrize("strategy", ["fedbuff", "fedau", "fedstale"])
def test_client_dp_runs_and_resumes_with_other_strategies(strategy: str, tmp_path: Path) -> None:
    pytest.importorskip("opacus")
    extra: dict[str, Any] = {"buffer": 3} if strategy == "fedbuff" else {}
    config = small_config(
        strategy=strategy, dp="client", noise_multiplier=0.8, clip_norm=0.5, **extra
    )
    resumed, straight = assert_resume_bit_identical(config, tmp_path / "run", stop=2, end=4)
    assert resumed.state["history"] == straight.state["history"]
    assert len(resumed.state["history"]) >= 1 and resumed.state["history"][-1][0] == 0.8


def test_target_epsilon_stops_the_run_cleanly_via_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("opacus")
    out = tmp_path / "run"
    args = ["simulate", "--clients", "20", "--fraction", "0.25", "--local-steps", "2"]
    args += ["--no-progress", "--dp", "client", "--noise-multiplier", "1.0"]
    args += ["--target-epsilon", "3", "--rounds", "40", "--out", str(out)]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "privacy budget spent" in said and "cannot change on resume" in said
    summary = json.loads((out / "summary.json").read_text())
    stopped_at = summary["versions"]
    assert 0 < stopped_at < 40 and "stopped before version" in summary["stopped"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == list(range(1, stopped_at + 1))
    assert max(r["strategy_epsilon"] for r in rows) <= 3.0
    ckpt = tensorio.load(out / "checkpoint.fl")
    assert ckpt["version"] == stopped_at
    # Resuming stops again at once, before training anybody, and leaves the checkpoint as is.
    assert main(["simulate", "--resume", str(out), "--no-progress"]) == 0
    assert "privacy budget spent" in capsys.readouterr().out
    assert tensorio.load(out / "checkpoint.fl")["version"] == stopped_at
    more = ["simulate", "--resume", str(out), "--target-epsilon", "6", "--no-progress"]
    assert main(more) == 2
    assert "cannot change target_epsilon on resume" in capsys.readouterr().err


def test_config_refuses_incomplete_client_dp() -> None:
    from fedlab.config import ConfigError

    with pytest.raises(ConfigError, match="dp = 'client' needs"):
        small_config(dp="client")
    with pytest.raises(ConfigError, match="adaptive_clip needs"):
        small_config(dp="client", noise_multiplier=1.0, dp_noise="local", adaptive_clip=True)
    with pytest.raises(ValueError, match="non-linearly"):
        from fedlab.run import build_engine

        build_engine(small_config(dp="client", noise_multiplier=1.0, strategy="median"))


def _dp_commands() -> list[str]:
    docs = Path(__file__).resolve().parents[1] / "docs"
    text = (docs / "how-to-differential-privacy.md").read_text()
    text += (docs / "reference" / "cli.md").read_text()
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith("fedlab simulate ") and "--dp " in line]


@pytest.mark.parametrize("command", _dp_commands())
def test_documented_dp_commands_build(command: str) -> None:
    import shlex

    from fedlab.cli import build_parser
    from fedlab.cli.flags import resolve_config
    from fedlab.run import build_engine

    pytest.importorskip("opacus")
    args = build_parser().parse_args(shlex.split(command)[1:])
    engine = build_engine(resolve_config(args))
    engine.transport.close()
