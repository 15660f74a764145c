"""The README's two commands stay true: CI runs its test command verbatim."""

from __future__ import annotations

from conftest import REPO


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_run_and_test_commands() -> None:
    run, test = _commands()
    assert run.endswith("fedlab simulate --clients 1000")
    assert "pytest" in test and "torch==2.13.0" in test


def test_ci_calls_the_readme_test_command() -> None:
    _, test = _commands()
    assert test in (REPO / ".ci" / "run").read_text().splitlines()
