"""``fedlab client``: train tasks from a ``fedlab server`` until its run is finished.

The client learns the run's configuration from the server when it joins; the workload flags
given here override it (the client's own data and model, its device). Every name the server
sends resolves among fedlab's built-ins and installed entry points only: a dotted path to code
(``--model pkg.mod:Net``) is imported only when this client's own command line (or its
``--config`` file) names the same path, whichever setting the server put it in.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlab import registry
from fedlab.cli.flags import add_run_flags, check_address, check_numbers, given_flags
from fedlab.config import ConfigError, from_mapping, load_toml

if TYPE_CHECKING:
    from fedlab.client import ClientRuntime
    from fedlab.transport.client import Joined

# gRPC's C core logs every failed TLS handshake (``I1207 ... Handshake failed``) straight to
# stderr; the client explains those failures in one line of its own, so the core's lines are
# for debugging only (GRPC_VERBOSITY=DEBUG shows them). Set before anything imports grpc:
# the ``fedlab`` command imports this module before any subcommand runs.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

# Simulated attacks are the server's test device; a deployed client never poisons itself.
NOT_FROM_SERVER = ("byzantine", "attack", "attack_options", "out", "device", "threads")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "client",
        help="train for a `fedlab server` over gRPC",
        description="Join a `fedlab server`, train the tasks it hands out and push the updates "
        "back until the run is finished. Run flags override the configuration the server "
        "sends (built-in workloads use partition number --client-id).",
    )
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's address")
    p.add_argument("--client-id", required=True, type=int, metavar="ID", help="this client's id")
    p.add_argument(
        "--certs",
        metavar="DIR",
        help="directory with ca.pem and client-ID.pem/.key (mutual TLS; the client's own "
        "certificate is optional only with a token, for a --tls-only server)",
    )
    p.add_argument("--insecure", action="store_true", help="plaintext; only to a loopback address")
    p.add_argument("--token", metavar="TOKEN", help="this client's token")
    p.add_argument("--token-file", metavar="FILE", help="read this client's token from FILE")
    p.add_argument(
        "--server-name",
        metavar="NAME",
        help="name to expect in the server's certificate (default: the host of --server)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="where this client keeps its state between tasks (default: in memory)",
    )
    p.add_argument(
        "--give-up",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="exit after this long without reaching the server (default: 300)",
    )
    add_run_flags(p)
    p.set_defaults(func=run)


def resolve_device(device: str) -> str:
    """``auto``: the first GPU when one is present, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """``(setting, text)`` for every string in ``value``, option tables included."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v, where)


def trusted_paths(local: Mapping[str, Any]) -> frozenset[str]:
    """The dotted paths this client's own settings name: the only code it may import."""
    return frozenset(text for _, text in _strings(local, "") if ":" in text)


def _untrusted(path: str, server: Mapping[str, Any]) -> ConfigError:
    where = [key for key, text in _strings(server, "") if text == path] or ["a setting"]
    top = where[0].split(".", 1)[0]
    flag = "--" + top.replace("_", "-")
    accept = (
        f"pass {flag} {path} to accept it"
        if "." not in where[0]
        else f"name {path} for {where[0]} in this client's --config file to accept it"
    )
    return ConfigError(
        f"the server's run names code {path!r} for {', '.join(where)}; this client imports "
        f"only built-ins, installed plugins and code its own command line names: {accept}"
    )


def runtime_builder(local: dict[str, Any]) -> Callable[[Joined], ClientRuntime]:
    """Build the runtime from the server's configuration overridden by ``local`` settings.

    Every name is resolved under :func:`fedlab.registry.trusted_paths` with the dotted paths
    of ``local``: whichever setting of the server's configuration names code (a strategy,
    client, codec, model, data function, or any setting added later), only those paths are
    imported, and nothing is imported before that check.
    """
    trusted = trusted_paths(local)

    def build(joined: Joined) -> ClientRuntime:
        import tomllib

        from fedlab.run import build_runtime

        try:
            server = tomllib.loads(joined.config_toml)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"the server sent a configuration that is not TOML: {e}") from e
        values = {k: v for k, v in server.items() if k not in NOT_FROM_SERVER}
        values.update(local)
        values["device"] = resolve_device(str(local.get("device", "auto")))
        with registry.trusted_paths(trusted):
            try:
                return build_runtime(from_mapping(values))
            except registry.UntrustedCode as e:
                raise _untrusted(e.path, values) from None

    return build


def run(args: argparse.Namespace) -> int:
    """Serve tasks until the server's run is finished."""
    from fedlab.transport.client import ClientError, Connection, run_client
    from fedlab.transport.security import (
        SecurityError,
        client_cert_files,
        client_credentials,
        is_loopback,
    )

    check_numbers(args, {"give_up": "positive", "client_id": ">= 0"})
    check_address("--server", args.server, listen=False)
    if args.insecure == bool(args.certs):
        raise SecurityError(
            "choose one of --certs DIR (TLS, the default way) or --insecure (plaintext, "
            "loopback only)"
        )
    if args.insecure and not is_loopback(args.server):
        raise SecurityError(
            f"--insecure refused for {args.server}: plaintext is allowed only to a loopback "
            "address; use --certs"
        )
    if args.token and args.token_file:
        raise SecurityError("give --token or --token-file, not both")
    token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise SecurityError(f"cannot read token file {args.token_file}: {e}") from e
    local: dict[str, Any] = load_toml(args.config) if args.config else {}
    local.update(given_flags(args))
    credentials, cert = None, None
    if args.certs:
        # Without a token a client certificate is this client's only proof of identity.
        credentials = client_credentials(args.certs, args.client_id, require=not token)
        pem = client_cert_files(args.certs, args.client_id)[0]
        cert = str(pem) if pem.exists() else None
    conn = Connection(
        args.server,
        args.client_id,
        credentials=credentials,
        token=token,
        server_name=args.server_name,
        client_cert=cert,
    )
    try:
        # Also around training: a name resolved lazily is held to the same paths.
        with registry.trusted_paths(trusted_paths(local)):
            run_client(conn, runtime_builder(local), state_dir=args.state_dir, give_up=args.give_up)
    except ClientError as e:
        print(f"fedlab client: error: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    return 0
