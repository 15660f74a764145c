"""The documentation stays true: its example packages run and the commands it shows parse."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from fedlab import Round, Update, experiment
from fedlab.cli import export as cli_export
from fedlab.cli import main
from fedlab.cli import plot as cli_plot
from fedlab.cli import simulate as cli_simulate
from fedlab.cli import strategies as cli_strategies
from fedlab.cli.flags import resolve_config
from fedlab.data import make_workload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PLUGIN = DOCS / "examples" / "fedlab-trimmed-mean"
OWN_DATA = DOCS / "examples" / "own_data"
GUIDES = [
    DOCS / "tutorial-first-simulation.md",
    DOCS / "how-to-write-a-strategy.md",
    DOCS / "how-to-use-your-own-model-and-data.md",
    DOCS / "how-to-compress-updates.md",
    DOCS / "how-to-track-experiments.md",
    DOCS / "how-to-vmap-backend.md",
    DOCS / "explanation-architecture.md",
]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _blocks(doc: Path, lang: str) -> list[str]:
    """The fenced code blocks of ``doc`` in language ``lang`` (indented blocks included)."""
    text = re.sub(r"^[ \t]+(?=```)", "", doc.read_text(), flags=re.MULTILINE)
    return [body for kind, body in FENCE.findall(text) if kind == lang]


def _fedlab(args: list[str], *, pythonpath: list[Path], cwd: Path) -> str:
    """Run ``python -m fedlab ARGS`` with exactly ``pythonpath``; return its stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    proc = subprocess.run(
        [sys.executable, "-m", "fedlab", *args], env=env, cwd=cwd, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"fedlab {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc.stdout


# ---------------------------------------------------------------- (a) the plugin's entry point


def test_plugin_is_found_through_its_entry_point(tmp_path: Path) -> None:
    """Install the plugin by hand (module + dist-info on PYTHONPATH, no pip) and run it by name.

    The entry points are read from the example's pyproject.toml, so a wrong table there fails.
    """
    shutil.copy(PLUGIN / "fedlab_trimmed_mean.py", tmp_path)
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    assert (project["name"], project["version"]) == ("fedlab-trimmed-mean", "0.1.0")
    dist = tmp_path / "fedlab_trimmed_mean-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fedlab-trimmed-mean\nVersion: 0.1.0\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines += [f"[{group}]", *(f"{name} = {target}" for name, target in entries.items()), ""]
    (dist / "entry_points.txt").write_text("\n".join(lines))

    listed = _fedlab(["strategies"], pythonpath=[tmp_path], cwd=tmp_path).splitlines()
    line = next((x for x in listed if x.split()[:1] == ["my-trimmed-mean"]), None)
    assert line is not None, listed
    assert "Coordinate-wise trimmed mean" in line  # loaded, not "(cannot load: ...)"

    out = tmp_path / "run"
    _fedlab(
        ["simulate", "--strategy", "my-trimmed-mean", "--strategy-opt", "trim=0.2",
         "--clients", "20", "--fraction", "0.5", "--rounds", "2", "--local-steps", "2",
         "--no-progress", "--out", str(out)],
        pythonpath=[tmp_path], cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "my-trimmed-mean" and summary["versions"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # 10 updates per version, trim=0.2: two values cut from each end of every coordinate.
    assert [r["strategy_trimmed_per_end"] for r in rows] == [2.0, 2.0]


# ---------------------------------------------------------------- (b) my-trimmed-mean properties


@pytest.fixture
def trimmed(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(PLUGIN))
    return importlib.import_module("fedlab_trimmed_mean")


def _updates(deltas: list[dict[str, torch.Tensor]]) -> list[Update]:
    return [
        Update(client_id=i, version=0, payload=d, num_examples=10 * (i + 1))
        for i, d in enumerate(deltas)
    ]


def _random_delta(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"w": torch.rand(3, 4, generator=gen) * 2 - 1, "b": torch.rand(4, generator=gen) * 2 - 1}


def test_trim_zero_is_the_uniform_mean(trimmed: ModuleType) -> None:
    gen = torch.Generator().manual_seed(0)
    params = _random_delta(gen)
    deltas = [_random_delta(gen) for _ in range(5)]
    strategy = trimmed.TrimmedMean(trim=0)
    new, state, _ = strategy.aggregate(
        strategy.init(params), params, _updates(deltas), Round(version=0, time=0, num_clients=5)
    )
    for name in params:  # uniform, although the updates have different num_examples
        mean = torch.stack([d[name] for d in deltas]).mean(0)
        assert torch.allclose(new[name], params[name] + mean, atol=1e-6)
    assert state["aggregations"] == 1


def test_one_huge_outlier_stays_out_with_trim_02(trimmed: ModuleType) -> None:
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    honest = [_random_delta(gen) for _ in range(4)]
    attack = {name: torch.full_like(t, 1e9) for name, t in params.items()}
    rnd = Round(version=0, time=0, num_clients=5)
    strategy = trimmed.TrimmedMean(trim=0.2)
    new, _, metrics = strategy.aggregate(
        strategy.init(params), params, _updates([*honest, attack]), rnd
    )
    assert metrics["trimmed_per_end"] == 1
    for name in params:
        stacked = torch.stack([d[name] for d in honest])
        step = new[name] - params[name]
        assert bool((step >= stacked.min(0).values).all() & (step <= stacked.max(0).values).all())
    plain = trimmed.TrimmedMean(trim=0)
    mean, _, _ = plain.aggregate(plain.init(params), params, _updates([*honest, attack]), rnd)
    assert float(mean["w"].min()) > 1e8  # without trimming the outlier wins


def test_no_updates_keeps_the_params(trimmed: ModuleType) -> None:
    params = {"w": torch.ones(2)}
    strategy = trimmed.TrimmedMean()
    new, state, metrics = strategy.aggregate(
        strategy.init(params), params, [], Round(version=3, time=0, num_clients=5)
    )
    assert new is params and state["empty_versions"] == 1 and dict(metrics) == {}


@pytest.mark.parametrize("trim", [-0.1, 0.5, 1.0, math.nan, math.inf, "0.2", True, None])
def test_bad_trim_is_a_value_error(trimmed: ModuleType, trim: Any) -> None:
    with pytest.raises(ValueError, match="trim"):
        trimmed.TrimmedMean(trim=trim)


# ---------------------------------------------------------------- (c) the own-data example


def test_own_data_example_runs_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _fedlab(
        ["simulate", "--workload", "custom", "--data", "mydata:load_client", "--model",
         "mydata:Net", "--clients", "50", "--fraction", "0.2", "--rounds", "2",
         "--local-steps", "2", "--no-progress", "--out", str(out)],
        pythonpath=[OWN_DATA], cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workload"] == "custom" and summary["versions"] == 2
    assert 0 <= summary["accuracy"] <= 1


def test_own_data_keeps_the_laziness_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(OWN_DATA))
    workload = make_workload(
        "custom", data="mydata:load_client", model="mydata:Net", num_clients=10**6, seed=0
    )
    last = workload.client_data(10**6 - 1)
    assert torch.equal(workload.client_data(10**6 - 1).x, last.x)
    assert not torch.equal(workload.client_data(0).y[:5], last.y[:5])
    assert workload.num_classes == 4 and last.x.dtype == torch.float32


# ---------------------------------------------------------------- (d) documented commands parse


def _commands() -> list[tuple[str, list[str]]]:
    """Every ``fedlab ...`` (or ``python -m fedlab ...``) line of the guides' bash blocks."""
    found = []
    for doc in GUIDES:
        for block in _blocks(doc, "bash"):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                    words = words[1:]  # VAR=value prefixes
                if words[:3] in (["python", "-m", "fedlab"], ["python3", "-m", "fedlab"]):
                    words = words[2:]
                if words[:1] == ["fedlab"]:
                    found.append((f"{doc.name}: {line.strip()}", words[1:]))
    return found


COMMANDS = _commands()


def test_the_tutorial_shows_commands() -> None:
    tutorial = [c for c, _ in COMMANDS if c.startswith("tutorial-first-simulation.md")]
    assert len(tutorial) >= 10, tutorial


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[c for c, _ in COMMANDS])
def test_documented_command_parses(
    where: str, argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parse with the real parser; check the settings too, without running anything.

    ``main`` builds its parser inside, so the subcommands' ``run`` functions are replaced
    (``add_parser`` binds them by name when ``main`` runs) by ones that only record.
    """
    seen: list[str] = []

    def simulate(args: Any) -> int:
        if not args.config and not args.resume:  # files the docs create first
            resolve_config(args)  # types and ranges, as a real run checks them
        seen.append("simulate")
        return 0

    def no_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a documented command would really run")

    monkeypatch.setattr(cli_simulate, "run", simulate)
    monkeypatch.setattr(experiment, "run", no_run)
    monkeypatch.setattr(cli_export, "run", lambda args: seen.append("export") or 0)
    monkeypatch.setattr(cli_plot, "run", lambda args: seen.append("plot") or 0)
    monkeypatch.setattr(cli_strategies, "run", lambda args: seen.append("strategies") or 0)
    try:
        code = main(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: the parser refused it (exit {e.code})")
    assert code == 0, f"{where}: the settings were refused"
    assert seen == [argv[0]]


# ---------------------------------------------------------------- the guides quote the files


@pytest.mark.parametrize(
    ("doc", "lang", "path"),
    [
        ("how-to-write-a-strategy.md", "python", PLUGIN / "fedlab_trimmed_mean.py"),
        ("how-to-write-a-strategy.md", "toml", PLUGIN / "pyproject.toml"),
        ("how-to-use-your-own-model-and-data.md", "python", OWN_DATA / "mydata.py"),
    ],
)
def test_guide_quotes_the_example_file_verbatim(doc: str, lang: str, path: Path) -> None:
    assert path.read_text() in _blocks(DOCS / doc, lang), f"{doc} is out of date with {path}"


def test_strategy_guide_test_excerpts_are_real() -> None:
    tests = (PLUGIN / "test_fedlab_trimmed_mean.py").read_text()
    excerpts = [b for b in _blocks(DOCS / "how-to-write-a-strategy.md", "python")
                if b.startswith("def test_")]  # fmt: skip
    assert excerpts and all(b in tests for b in excerpts)
