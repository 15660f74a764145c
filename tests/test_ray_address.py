"""``--ray-address`` where nothing listens fails at once in one line, not after Ray's retries."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fedlab.cli import main

# fedlab itself does not need Ray; the probe runs only for the Ray backend.
ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


def _closed_port() -> int:
    """A loopback port nothing listens on: bound once to pick it, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_a_ray_address_where_nothing_listens_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not ray.is_initialized()  # else the executor would not join any address
    port = _closed_port()
    out = tmp_path / "run"
    argv = ["simulate", "--backend", "ray", "--ray-address", f"127.0.0.1:{port}"]
    assert main([*argv, "--clients", "4", "--rounds", "1", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert lines == [
        f"fedlab: error: cannot connect to --ray-address 127.0.0.1:{port} (Connection refused): "
        f"start the cluster's head there first (ray start --head --port {port}), correct the "
        "address, or leave --ray-address out to start a local Ray"
    ], err
    assert not ray.is_initialized()
    assert not out.exists()


def test_the_probe_passes_where_something_listens() -> None:
    from fedlab.sim.ray import check_ray_address

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_ray_address(f"127.0.0.1:{port}")
        check_ray_address(f"ray://127.0.0.1:{port}")
    with pytest.raises(ValueError, match="cannot connect to --ray-address ray://"):
        check_ray_address(f"ray://127.0.0.1:{port}")
    check_ray_address("auto")  # not HOST:PORT: left to Ray
