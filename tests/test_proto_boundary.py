"""Only ``fedlab/transport/`` imports the generated protocol code, and it is up to date."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("fedlab", "strategies", "clients")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_only_the_transport_package_imports_fedlab_proto() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO)
            if rel.parts[:2] in (("fedlab", "transport"), ("fedlab", "proto")):
                continue
            if any(n == "fedlab.proto" or n.startswith("fedlab.proto.") for n in _imports(path)):
                offenders.append(str(rel))
    assert not offenders, f"only fedlab/transport/ may import fedlab.proto: {offenders}"


def test_the_boundary_check_sees_an_import() -> None:
    # The check above must not pass vacuously: the transport does import the protocol.
    assert "fedlab.proto" in _imports(REPO / "fedlab" / "transport" / "server.py")


def test_generated_code_matches_the_proto_source() -> None:
    source = (REPO / "protos" / "fedlab" / "proto" / "fedlab.proto").read_text()
    from fedlab.proto import fedlab_pb2

    # The serialized descriptor embeds every message name of the source.
    for name in ("Tensor", "TaskChunk", "UpdateChunk", "JoinRequest", "HeartbeatRequest"):
        assert f"message {name} " in source
        assert name in fedlab_pb2.DESCRIPTOR.message_types_by_name
    assert fedlab_pb2.DESCRIPTOR.package == "fedlab.v1"


def test_only_the_flower_package_imports_flwr() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            rel = path.relative_to(REPO)
            if rel.parts[:2] == ("fedlab", "flower"):
                continue
            if any(n == "flwr" or n.startswith("flwr.") for n in _imports(path)):
                offenders.append(str(rel))
    assert not offenders, f"only fedlab/flower/ may import flwr: {offenders}"
    # Not vacuous: the bridge itself does import Flower.
    assert "flwr.serverapp" in _imports(REPO / "fedlab" / "flower" / "server.py")
