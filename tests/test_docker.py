"""The compose files stay true to the CLI: every container command parses, each client mounts
only its own key, and the files agree with each other and with docker/run.toml.

(docker/e2e.sh builds the image and runs the compose file for real; it needs root and docker.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from fedlab.cli import build_parser
from fedlab.cli.flags import resolve_config
from fedlab.config import from_mapping, load_toml

yaml = pytest.importorskip("yaml")

DOCKER = Path(__file__).resolve().parents[1] / "docker"
VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _load(name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A compose file with ``${VAR:-default}`` interpolated as compose does."""
    env = env or {}
    text = VARIABLE.sub(
        lambda m: env.get(m.group(1), m.group(2) or ""), (DOCKER / name).read_text()
    )
    data: dict[str, Any] = yaml.safe_load(text)
    return data


def _services(name: str, env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _load(name, env)["services"]
    return services


def test_server_command_parses_and_reads_the_shipped_run_config() -> None:
    (server,) = _services("compose.server.yaml").values()
    args = build_parser().parse_args(server["command"])
    assert args.command == "server" and args.certs == "/certs" and not args.insecure
    assert args.address == "0.0.0.0:50051"
    assert "/config/run.toml" in {v.split(":")[1] for v in server["volumes"]}
    args.config = str(DOCKER / "run.toml")  # what the container sees at /config/run.toml
    config = resolve_config(args)
    assert config.min_clients == 3 and config.out == "/runs/run"
    clients = _services("compose.clients.yaml")
    assert config.clients == len(clients), "run.toml's clients must match the client services"
    # The server mounts the CA and its own pair, never a client's key.
    mounted = {Path(v.split(":")[1]).name for v in server["volumes"]}
    assert {"ca.pem", "server.pem", "server.key"} <= mounted
    assert not any(m.startswith("client-") or m == "ca.key" for m in mounted)


def test_resume_override_parses_and_keeps_the_security_flags() -> None:
    (server,) = _services("compose.resume.yaml", {"FEDLAB_RUN": "r1"}).values()
    args = build_parser().parse_args(server["command"])
    assert args.resume == "/runs/r1" and args.certs == "/certs" and args.config is None
    base = build_parser().parse_args(_services("compose.server.yaml")["server"]["command"])
    assert args.address == base.address


def test_each_client_parses_and_mounts_only_its_own_key() -> None:
    clients = _services("compose.clients.yaml", {"FEDLAB_SERVER": "fl.example.org:50051"})
    for name, service in clients.items():
        args = build_parser().parse_args(service["command"])
        assert args.command == "client" and name == f"client-{args.client_id}"
        assert args.server == "fl.example.org:50051" and args.certs == "/certs"
        assert not args.insecure
        mounted = sorted(Path(v.split(":")[1]).name for v in service["volumes"])
        cid = args.client_id
        assert mounted == ["ca.pem", f"client-{cid}.key", f"client-{cid}.pem"], name
        assert all(v.endswith(":ro") for v in service["volumes"])


def test_one_host_file_extends_every_service_and_gpu_override_matches() -> None:
    server = _services("compose.server.yaml")
    clients = _services("compose.clients.yaml")
    both = _services("compose.yaml")
    assert set(both) == set(server) | set(clients)
    for name, service in both.items():
        source = "compose.server.yaml" if name in server else "compose.clients.yaml"
        assert service["extends"] == {"file": source, "service": name}
    assert set(_services("compose.gpu.yaml")) == set(clients)
    for service in _services("compose.gpu.yaml").values():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]


def test_shipped_run_config_is_valid() -> None:
    config = from_mapping(load_toml(DOCKER / "run.toml"))
    assert config.fraction == 1.0 and config.rounds > 0
