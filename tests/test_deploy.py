"""``fedlab server``, ``client`` and ``certs`` as a user runs them, over loopback."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from deploy import READY, Proc, kill_all, start_clients, start_server, wait_until

from fedlab.cli import main
from fedlab.transport.security import make_certs

RUN = ["--clients", "3", "--fraction", "1", "--min-clients", "3", "--local-steps", "2"]


@pytest.fixture(autouse=True)
def _no_process_left() -> Iterator[None]:
    yield
    kill_all()  # after a failure too


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return make_certs(tmp_path / "certs", clients=3)


def _finish(server: Proc, clients: list[Proc]) -> None:
    assert server.wait(2 * READY) == 0, server.output
    for c in clients:
        assert c.wait() == 0, c.output
        assert "the run is finished" in c.output


def _rows(run_dir: Path) -> list[dict[str, object]]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.mark.slow
def test_mutual_tls_run_completes(tmp_path: Path, certs: Path) -> None:
    run_dir = tmp_path / "run"
    start = time.monotonic()
    server, port = start_server(
        [*RUN, "--rounds", "3", "--certs", str(certs), "--out", str(run_dir)], cwd=tmp_path
    )
    clients = start_clients(range(3), port, ["--certs", str(certs)], cwd=tmp_path)
    _finish(server, clients)
    print(f"loopback run, 3 clients, 3 versions: {time.monotonic() - start:.1f} s wall")
    assert "(mutual TLS)" in server.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"] == 3 and summary["updates_received"] == 9
    assert summary["updates_rejected"] == 0 and summary["updates_failed"] == 0
    assert [r["version"] for r in _rows(run_dir)] == [1, 2, 3]


def _wait_rows(run_dir: Path, n: int, server: Proc) -> None:
    wait_until(lambda: len(_rows(run_dir)) >= n, f"{n} versions written", watch=server)


@pytest.mark.slow
def test_chaos_clients_and_server_killed_mid_run_every_version_completes(
    tmp_path: Path, certs: Path
) -> None:
    """30% of the clients (rounded up) are SIGKILLed mid-version and restarted; later the
    server is SIGKILLed and resumed with --resume. The run finishes with every version."""
    run_dir = tmp_path / "run"
    rounds = 30
    deploy = ["--certs", str(certs), "--heartbeat", "0.5", "--linger", "10"]
    server, port = start_server(
        [*RUN, "--rounds", str(rounds), *deploy, "--out", str(run_dir)], cwd=tmp_path
    )
    client_args = ["--certs", str(certs), "--state-dir", str(tmp_path / "state")]
    clients = start_clients(range(3), port, client_args, cwd=tmp_path)
    _wait_rows(run_dir, 2, server)
    # The moment a version is written the next one has begun: with --fraction 1 every client,
    # the victims included, holds a task of it that the server is waiting for.
    victims = range(math.ceil(0.3 * len(clients)))
    for i in victims:
        clients[i].kill()
    killed_at = len(_rows(run_dir))
    for i in victims:
        clients[i] = start_clients([i], port, client_args, cwd=tmp_path)[0]
    _wait_rows(run_dir, killed_at + 3, server)
    server.kill()  # SIGKILL: no chance to clean up
    done = len(_rows(run_dir))
    assert killed_at + 3 <= done < rounds, server.output
    resumed, _ = start_server(["--resume", str(run_dir), *deploy], cwd=tmp_path, port=port)
    _finish(resumed, clients)
    assert [r["version"] for r in _rows(run_dir)] == list(range(1, rounds + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["versions"] == rounds
    assert any("retrying" in c.output for c in clients), "no client noticed the restart"


def test_insecure_is_refused_off_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--insecure", "--address", "0.0.0.0:0", "--out", str(tmp_path / "r"), *RUN]
    assert main(["server", *args]) == 2
    assert "--insecure refused on 0.0.0.0:0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["client", "--server", "10.1.2.3:50051", "--client-id", "0", "--insecure"]) == 2
    assert "--insecure refused for 10.1.2.3:50051" in capsys.readouterr().err
    assert main(["server", "--out", str(tmp_path / "r"), *RUN]) == 2
    assert "needs certificates" in capsys.readouterr().err


def test_certs_command_writes_a_ca_and_named_certificates(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    args = ["certs", "--out", str(out), "--server-name", "fl.example.org"]
    assert main([*args, "--server-name", "10.0.0.5", "--clients", "2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "ca.key", "ca.pem", "client-0.key", "client-0.pem", "client-1.key", "client-1.pem",
        "server.key", "server.pem",
    ]  # fmt: skip
    assert (out / "client-1.key").stat().st_mode & 0o077 == 0
    client = x509.load_pem_x509_certificate((out / "client-1.pem").read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client-1"
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"fl.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert {"10.0.0.5", "127.0.0.1"} <= ips
    assert main(args) == 2, "an existing CA must not be overwritten"
