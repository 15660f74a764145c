"""``fedlab plot`` and ``History.plot``: legend, ticks, axes, epsilon, seed bands, formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.ticker import MaxNLocator

from fedlab.cli import main
from fedlab.plots import draw, group_seeds

FAST = ["--clients", "20", "--fraction", "0.2", "--local-steps", "2", "--rounds", "3"]


def _rows(accuracy: list[float], **extra: list[float]) -> list[dict[str, Any]]:
    return [
        {
            "version": v + 1,
            "time": 10.0 * (v + 1),
            "bytes_up": 4e6,
            "bytes_down": 2e6,
            "accuracy": a,
            **{k: col[v] for k, col in extra.items()},
        }
        for v, a in enumerate(accuracy)
    ]


def test_one_legend_for_all_panels_and_integer_version_ticks() -> None:
    series = [("a", [_rows([0.1, 0.2, 0.3])]), ("b", [_rows([0.2, 0.3, 0.4])])]
    fig = draw(series, ["accuracy", "bytes_up"], ["version", "time"])
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b"]
    assert all(ax.get_legend() is None for ax in fig.axes)
    for ax in fig.axes[::2]:  # the version column
        locator = ax.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator)
        ax.figure.canvas.draw()
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_cumulative_bytes_axis_is_logarithmic() -> None:
    fig = draw([("a", [_rows([0.1, 0.2, 0.3])])], ["accuracy"], ["version", "bytes_up"])
    version_ax, bytes_ax = fig.axes
    assert version_ax.get_xscale() == "linear" and bytes_ax.get_xscale() == "log"
    assert list(bytes_ax.lines[0].get_xdata()) == pytest.approx([4.0, 8.0, 12.0])


def test_epsilon_is_drawn_as_its_cumulative_maximum() -> None:
    rows = _rows([0.1, 0.2, 0.3, 0.4], client_epsilon_max=[1.0, 3.0, 2.0, 2.5])
    fig = draw([("a", [rows])], ["client_epsilon_max"], ["version"])
    (ax,) = fig.axes
    assert list(ax.lines[0].get_ydata()) == [1.0, 3.0, 3.0, 3.0]
    assert "cumulative max" in ax.get_ylabel()


def test_runs_that_differ_only_by_seed_are_one_mean_with_a_band() -> None:
    config = {"lr": 0.1, "clients": 20}
    runs = [
        ("a-seed1", _rows([0.1, 0.2, 0.3]), {**config, "seed": 1, "out": "a-seed1"}),
        ("a-seed2", _rows([0.3, 0.4, 0.5]), {**config, "seed": 2, "out": "a-seed2"}),
        ("b", _rows([0.5, 0.5, 0.5]), {**config, "lr": 0.2, "seed": 1}),
    ]
    series = group_seeds(runs)
    assert [label for label, _ in series] == ["a-seed* (mean ± sd of 2 seeds)", "b"]
    fig = draw(series, ["accuracy"], ["version"])
    (ax,) = fig.axes
    assert list(ax.lines[0].get_ydata()) == pytest.approx([0.2, 0.3, 0.4])
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # the single run "b" has no band
    ys = bands[0].get_paths()[0].vertices[:, 1]
    sd = (0.02) ** 0.5  # sample sd of {0.1, 0.3}
    assert min(ys) == pytest.approx(0.2 - sd) and max(ys) == pytest.approx(0.4 + sd)


@pytest.mark.parametrize(
    ("suffix", "magic"), [("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")]
)
def test_plot_writes_png_svg_and_pdf_of_seed_runs(
    tmp_path: Path, suffix: str, magic: bytes
) -> None:
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"run-seed{seed}"
        assert main(["simulate", *FAST, "--seed", seed, "--out", str(out), "--no-progress"]) == 0
        runs.append(str(out))
    target = tmp_path / f"fig.{suffix}"
    assert main(["plot", *runs, "-o", str(target), "--x", "version,bytes"]) == 0
    assert target.read_bytes()[: len(magic)] == magic


def test_unknown_output_format_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *FAST, "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plot", str(out), "-o", str(tmp_path / "fig.gif")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ".png, .svg, .pdf" in err
    assert not (tmp_path / "fig.gif").exists()
