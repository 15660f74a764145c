"""``fedlab server`` and ``fedlab client`` as real processes over loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from deploy import Proc, start_clients, start_server

from fedlab.transport.security import make_certs

pytestmark = pytest.mark.slow

RUN = ["--clients", "3", "--fraction", "1", "--min-clients", "3", "--local-steps", "2"]


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return make_certs(tmp_path / "certs", clients=3)


def _finish(server: Proc, clients: list[Proc]) -> None:
    assert server.wait(60) == 0, server.output
    for c in clients:
        assert c.wait(30) == 0, c.output
        assert "the run is finished" in c.output


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [("fedavg", []), ("fedbuff", ["--buffer", "2", "--concurrency", "3"])],
)
def test_mutual_tls_run_completes(
    tmp_path: Path, certs: Path, strategy: str, extra: list[str]
) -> None:
    run_dir = tmp_path / "run"
    server, port = start_server(
        [
            *RUN,
            "--rounds",
            "3",
            "--strategy",
            strategy,
            *extra,
            "--certs",
            str(certs),
            "--out",
            str(run_dir),
            "--linger",
            "10",
        ],
        cwd=tmp_path,
    )
    clients = start_clients(range(3), port, ["--certs", str(certs)], cwd=tmp_path)
    _finish(server, clients)
    assert "(mutual TLS)" in server.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"] == 3
    assert summary["updates_rejected"] == 0
    assert summary["updates_received"] >= 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [1, 2, 3]
