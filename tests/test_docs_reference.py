"""The reference pages stay complete: every strategy, option, flag and participation model.

``docs/reference/strategies.md``, ``participation.md`` and ``cli.md`` are written by hand; these
tests check them against the registry, the strategies' dataclass fields, the real argument
parser and ``fedlab.participation.MODELS``, and that the commands they show parse and build.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fedlab import registry
from fedlab.cli import build_parser
from fedlab.cli.flags import resolve_config
from fedlab.participation import MODELS
from fedlab.run import build_strategy

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "reference"
STRATEGIES = REFERENCE / "strategies.md"
PARTICIPATION = REFERENCE / "participation.md"
CLI = REFERENCE / "cli.md"


def _sections(doc: Path) -> dict[str, str]:
    """``{heading: body}`` for every ``## `` heading of ``doc``."""
    parts = re.split(r"^## (.+)$", doc.read_text(), flags=re.MULTILINE)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def _section(doc: Path, name: str) -> str:
    """The section whose heading names ``name`` as a code span (e.g. ``## `fedau`: ...``)."""
    found = [body for head, body in _sections(doc).items() if f"`{name}`" in head]
    assert len(found) == 1, f"{doc.name}: expected one '## ' heading with `{name}`, got {found!r}"
    return found[0]


def _clean_strategy_names() -> list[str]:
    """Registered strategy names in a fresh interpreter, without names tests register."""
    code = "import json, fedlab.registry as r; print(json.dumps(r.names('strategies')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    names: list[str] = json.loads(out)
    return names


CLEAN_NAMES = _clean_strategy_names()


def test_clean_registry_has_every_builtin() -> None:
    assert set(registry.BUILTIN["strategies"]) <= set(CLEAN_NAMES)


# ---------------------------------------------------------------- (a) one section per strategy


@pytest.mark.parametrize("name", CLEAN_NAMES)
def test_every_registered_strategy_has_a_section(name: str) -> None:
    _section(STRATEGIES, name)


# ---------------------------------------------------------------- (b) every option documented


@pytest.mark.parametrize("name", sorted(registry.BUILTIN["strategies"]))
def test_every_option_of_a_builtin_strategy_is_in_its_section(name: str) -> None:
    cls = registry.resolve("strategies", name)
    body = _section(STRATEGIES, name)
    options = [f.name for f in dataclasses.fields(cls) if f.init]
    missing = [o for o in options if f"`{o}`" not in body]
    assert not missing, f"section `{name}` of strategies.md lacks options {missing}"
    # The documented default is the dataclass default.
    for f in dataclasses.fields(cls):
        if f.init and f.default is not dataclasses.MISSING:
            row = re.search(rf"^\| `{f.name}` \|[^|]*\| `?([^`|]*)`? \|", body, re.MULTILINE)
            assert row, f"section `{name}`: no table row for option `{f.name}`"
            shown = row.group(1).strip().strip('"')
            assert shown == str(f.default), f"`{name}`.{f.name}: doc says {shown}, is {f.default!r}"


# ---------------------------------------------------------------- (c) every simulate flag


def _simulate_parser():  # type: ignore[no-untyped-def]
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["simulate"]  # type: ignore[attr-defined]


def test_every_simulate_flag_is_in_cli_md() -> None:
    body = _section(CLI, "fedlab simulate")
    flags = [s for a in _simulate_parser()._actions for s in a.option_strings if s.startswith("--")]
    assert len(flags) > 40
    missing = [f for f in flags if not re.search(rf"`{re.escape(f)}[` ]", body)]
    assert not missing, f"the `fedlab simulate` section of cli.md lacks flags {missing}"


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    p = sub.choices[command]  # type: ignore[index]
    return {s for a in p._actions for s in a.option_strings if s.startswith("--")}


@pytest.mark.parametrize("command", ["server", "client", "certs"])
def test_every_deployment_flag_is_in_its_cli_md_section(command: str) -> None:
    # The run flags the server and client share with simulate are documented there once.
    own = _flags(command) - _flags("simulate")
    assert own, f"`fedlab {command}` has no flags of its own"
    body = _section(CLI, f"fedlab {command}")
    missing = [f for f in sorted(own) if not re.search(rf"`{re.escape(f)}[` ]", body)]
    assert not missing, f"the `fedlab {command}` section of cli.md lacks flags {missing}"


def test_every_subcommand_has_a_section_in_cli_md() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for command in sub.choices:  # type: ignore[union-attr]
        _section(CLI, f"fedlab {command}")


# ---------------------------------------------------------------- (d) every participation model


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_participation_model_has_a_section(model: str) -> None:
    _section(PARTICIPATION, model)


# ---------------------------------------------------------------- (e) the examples parse and build


def _commands(doc: Path) -> list[str]:
    """Every ``fedlab simulate ...`` line of the fenced bash blocks of ``doc``."""
    blocks = re.findall(r"^```bash\n(.*?)^```", doc.read_text(), re.MULTILINE | re.DOTALL)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line.startswith("fedlab simulate ")]


EXAMPLES = _commands(STRATEGIES) + _commands(PARTICIPATION)


def test_every_strategy_section_has_an_example() -> None:
    for name in registry.BUILTIN["strategies"]:
        assert f"--strategy {name} " in _section(STRATEGIES, name)


@pytest.mark.parametrize("line", EXAMPLES)
def test_example_parses_and_builds_its_strategy(line: str) -> None:
    args = build_parser().parse_args(shlex.split(line)[1:])
    config = resolve_config(args)
    strategy = build_strategy(config)
    if getattr(strategy, "needs_probabilities", False):
        assert config.participation != "uniform", f"{line}: uniform defines no probabilities"
