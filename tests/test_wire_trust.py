"""Nothing that arrives over the wire chooses code: a deployed client imports only built-ins,
installed entry points and the dotted paths its own command line names."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.abc
import secrets
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from deploy import Proc

from fedlab import registry
from fedlab.cli.client import runtime_builder
from fedlab.config import RunConfig, _toml_value
from fedlab.transport.client import Joined
from fedlab.transport.security import Policy
from fedlab.transport.server import GrpcTransport

# Settings that make other settings live: custom data reaches the data function, a byzantine
# fraction reaches the attack (which a client drops anyway). Four clients keep builds cheap.
BASES: tuple[dict[str, Any], ...] = (
    {"clients": 4},
    {"clients": 4, "workload": "custom"},
    {"clients": 4, "byzantine": 0.25},
)


class _Recorder(importlib.abc.MetaPathFinder):
    """Sees every attempt to import a module not imported yet, and finds nothing itself."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.seen: list[str] = []

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: Any = None) -> None:
        if fullname.split(".")[0] in self.names:
            self.seen.append(fullname)
        return None


@dataclasses.dataclass
class Sentinel:
    """A module that leaves a file behind when imported, another when its ``boom`` is called."""

    name: str
    marks: Path
    recorder: _Recorder
    import_calls: list[str]

    @property
    def path(self) -> str:
        return f"{self.name}:boom"

    def touched(self) -> list[str]:
        return sorted(p.name for p in self.marks.iterdir())


@pytest.fixture
def sentinel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sentinel]:
    name = f"fedlab_wire_sentinel_{secrets.token_hex(4)}"
    marks = tmp_path / "marks"
    marks.mkdir()
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{name}.py").write_text(
        "import pathlib\n"
        f"MARKS = pathlib.Path({str(marks)!r})\n"
        "(MARKS / 'imported').touch()\n"
        "def boom(*args, **kwargs):\n"
        "    (MARKS / 'called').touch()\n"
        "    raise RuntimeError('the sentinel ran')\n"
    )
    monkeypatch.syspath_prepend(str(code))
    recorder = _Recorder({name, "os"})
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    calls: list[str] = []
    real = importlib.import_module

    def recording(module: str, package: str | None = None) -> ModuleType:
        calls.append(module)
        return real(module, package)

    monkeypatch.setattr(importlib, "import_module", recording)
    yield Sentinel(name, marks, recorder, calls)
    sys.modules.pop(name, None)


def _toml(values: dict[str, Any]) -> str:
    flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in flat.items()]
    for table, items in values.items():
        if isinstance(items, dict):
            lines += [f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in items.items()]
    return "\n".join(lines) + "\n"


def _server_configs(path: str, touch: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """For every RunConfig field: server configurations that put ``path`` in it.

    A string field gets the path itself, with its ``<field>_options`` table (if any) asking
    for ``os.system``'s ``command``; an option table gets the path as its values.
    """
    names = {f.name for f in dataclasses.fields(RunConfig)}
    for f in dataclasses.fields(RunConfig):
        for base in BASES:
            server = dict(base)
            if f.default is dataclasses.MISSING:  # an option table
                server[f.name] = {"command": path, "factory": path, "fn": path}
            else:
                server[f.name] = path
                if f"{f.name}_options" in names:
                    server[f"{f.name}_options"] = {"command": f"touch {touch}"}
            yield f.name, server


def _build(local: dict[str, Any], server: dict[str, Any]) -> None:
    # Refused, or failed for another reason: either way after the check that matters here.
    with contextlib.suppress(Exception):
        runtime_builder(local)(Joined("run", _toml(server), 5.0))


def test_no_setting_from_the_server_reaches_an_import(sentinel: Sentinel, tmp_path: Path) -> None:
    touch = tmp_path / "os-system-ran"
    cases = 0
    for path in (sentinel.path, "os:system"):
        for field, server in _server_configs(path, touch):
            _build({}, server)
            cases += 1
            assert not sentinel.recorder.seen, (field, server)
            assert sentinel.name not in sentinel.import_calls, (field, server)
            assert "os" not in sentinel.import_calls, (field, server)
            assert not sentinel.touched() and not touch.exists(), (field, server)
    assert cases == 2 * len(BASES) * len(dataclasses.fields(RunConfig))


def test_the_same_paths_named_on_the_clients_command_line_are_imported(
    sentinel: Sentinel,
) -> None:
    # The control: the walk above reaches every setting that can name code, and those are
    # imported once the client's own command line names the same path.
    reached = set()
    for field, server in _server_configs(sentinel.path, Path("/nonexistent")):
        _build({field: server[field]}, server)
        if sentinel.touched():
            reached.add(field)
            for mark in sentinel.marks.iterdir():
                mark.unlink()
    assert {"strategy", "client", "compress", "model", "data"} <= reached


def test_the_refusal_names_the_setting_and_how_to_accept_it(sentinel: Sentinel) -> None:
    server = {"clients": 4, "compress": sentinel.path}
    with pytest.raises(ValueError, match=r"compress.*pass --compress " + sentinel.path):
        runtime_builder({})(Joined("run", _toml(server), 5.0))
    assert not sentinel.touched() and not sentinel.recorder.seen


def test_trusted_paths_refuse_before_importing(sentinel: Sentinel) -> None:
    with registry.trusted_paths({"other.module:Thing"}):
        with pytest.raises(registry.UntrustedCode):
            registry.load_dotted(sentinel.path)
        with pytest.raises(registry.UntrustedCode):
            registry.create("transforms", sentinel.path)
        # Built-ins and their lazy module attributes are not dotted paths from a setting.
        assert registry.resolve("transforms", "int8").__name__ == "Int8"
        # Nested blocks only narrow.
        with registry.trusted_paths({sentinel.path}), pytest.raises(registry.UntrustedCode):
            registry.load_dotted(sentinel.path)
    assert not sentinel.recorder.seen and not sentinel.touched()
    assert callable(registry.load_dotted(sentinel.path))  # outside: the user's own code
    assert sentinel.touched() == ["imported"]


def test_a_server_sending_os_system_as_codec_runs_nothing_on_the_client(tmp_path: Path) -> None:
    touch = tmp_path / "os-system-ran"
    config = (
        f'clients = 2\nrounds = 1\ncompress = "os:system"\n'
        f'[compress_options]\ncommand = "touch {touch}"\n'
    )
    # A malicious server: any program speaking the protocol can send any configuration.
    server = GrpcTransport(
        num_clients=2,
        address="127.0.0.1:0",
        policy=Policy(num_clients=2),
        credentials=None,
        config_toml=config,
        linger=0.0,
        log=None,
    )
    try:
        client = Proc(
            [
                "client",
                "--server",
                f"127.0.0.1:{server.port}",
                "--client-id",
                "0",
                "--insecure",
                "--give-up",
                "60",
            ],
            cwd=tmp_path,
        )
        code = client.wait(120)
    finally:
        server.close()
    assert not touch.exists(), "the server made the client run a shell command"
    assert code == 2, client.output
    assert "fedlab: error: the server's run names code 'os:system' for compress" in client.output, (
        client.output
    )
    assert "pass --compress os:system to accept it" in client.output
    assert "Traceback" not in client.output
