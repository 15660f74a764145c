"""``fedlab server``: run a federation whose clients connect over gRPC.

The same flags and TOML keys as ``fedlab simulate`` set up the run; the flags below say how
clients reach the server and how they prove who they are. Security is on by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlab.cli.flags import Bound, add_run_flags, check_address, check_numbers
from fedlab.cli.simulate import execute, prepare_config
from fedlab.engine import Engine
from fedlab.types import Update

DEFAULT_ADDRESS = "0.0.0.0:50051"
# The deployment flags that are numbers, and their range (0 keeps its documented meaning).
NUMBERS: dict[str, Bound] = {
    "heartbeat": "positive",
    "stall_timeout": "positive",
    "max_uploads": "positive",
    "max_update_mb": ">= 0",
    "spool_mb": ">= 0",
    "linger": ">= 0",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "server",
        help="serve a federation to clients over gRPC",
        description="Serve a federation to `fedlab client` processes over gRPC. The run flags "
        "are those of `fedlab simulate`; --min-clients clients must join before it starts.",
    )
    add_run_flags(p)
    add_security_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_security_flags(p: argparse.ArgumentParser) -> None:
    """The deployment flags: address, credentials, admission and liveness."""
    p.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        metavar="HOST:PORT",
        help=f"where to listen (default: {DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--certs",
        metavar="DIR",
        help="certificates from `fedlab certs`: TLS, with client certificates required "
        "(mutual TLS) unless --tls-only",
    )
    p.add_argument(
        "--tls-only",
        action="store_true",
        help="server-authenticated TLS without client certificates; needs --tokens",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext, no authentication of the channel; only on a loopback address",
    )
    p.add_argument(
        "--tokens",
        metavar="FILE",
        help="'CLIENT_ID TOKEN' lines: only these clients, each with its token",
    )
    p.add_argument("--allow", metavar="IDS", help="only these client ids, e.g. 0-9,12")
    p.add_argument("--revoke", metavar="IDS", help="refuse these client ids, e.g. 3,7")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between a training client's heartbeats (default: 5)",
    )
    p.add_argument(
        "--stall-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a task whose client shows no sign of life this long fails, and a call that "
        "waits this long for the client's next message (or for it to take the next one) is "
        "cut (default: 30)",
    )
    p.add_argument(
        "--max-update-mb",
        type=float,
        default=0.0,
        metavar="MB",
        help="largest update accepted (default 0: four times the model, plus 1 MiB)",
    )
    p.add_argument(
        "--max-uploads",
        type=int,
        default=16,
        metavar="N",
        help="updates received or waiting for the engine at the same time; the rest wait, "
        "which bounds upload memory (default: 16)",
    )
    p.add_argument(
        "--spool-mb",
        type=float,
        default=16.0,
        metavar="MB",
        help="updates larger than this are received into memory-mapped files under "
        "RUN_DIR/spool, so held updates do not fill the server's memory (0: always in RAM)",
    )
    p.add_argument(
        "--linger",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after the last version, wait this long for clients to hear the run is over",
    )


def run(args: argparse.Namespace) -> int:
    """Serve the run until its last version; write the run directory like ``simulate``."""
    from fedlab.transport.security import (
        Policy,
        SecurityError,
        is_loopback,
        parse_ids,
        read_tokens,
        server_credentials,
    )
    from fedlab.transport.server import GrpcTransport

    check_numbers(args, NUMBERS)
    check_address("--address", args.address, listen=True)
    config = prepare_config(args)
    if args.insecure and args.certs:
        raise SecurityError("choose --certs DIR or --insecure, not both")
    if not args.insecure and not args.certs:
        raise SecurityError(
            "the server needs certificates (--certs DIR, made by `fedlab certs`); "
            "plaintext only with --insecure on a loopback address"
        )
    if args.insecure and not is_loopback(args.address):
        raise SecurityError(
            f"--insecure refused on {args.address}: plaintext is allowed only on a loopback "
            "address (e.g. --address 127.0.0.1:50051); use --certs for anything else"
        )
    if args.tls_only and not args.tokens:
        raise SecurityError("--tls-only needs --tokens: clients must prove who they are")
    mutual = bool(args.certs) and not args.tls_only
    policy = Policy(
        num_clients=config.clients,
        mutual=mutual,
        tokens=read_tokens(args.tokens) if args.tokens else None,
        allowed=parse_ids(args.allow) if args.allow else None,
        revoked=parse_ids(args.revoke) if args.revoke else frozenset(),
    )
    credentials = server_credentials(args.certs, mutual=mutual) if args.certs else None
    transport = GrpcTransport(
        num_clients=config.clients,
        address=args.address,
        policy=policy,
        credentials=credentials,
        run=config.fingerprint(),
        config_toml=config.to_toml(),
        heartbeat=args.heartbeat,
        stall_timeout=args.stall_timeout,
        max_update_bytes=int(args.max_update_mb * 2**20),
        linger=args.linger,
        max_uploads=args.max_uploads,
        spool=Path(config.out) / "spool" if args.spool_mb > 0 else None,
        spool_bytes=int(args.spool_mb * 2**20),
    )
    mode = "mutual TLS" if mutual else "TLS" if args.certs else "plaintext (insecure)"
    print(
        f"fedlab server: listening on {args.address.rsplit(':', 1)[0]}:{transport.port} "
        f"({mode}); run directory {Path(config.out)}",
        flush=True,
    )

    def ready(engine: Engine) -> None:
        def report(update: Update, reason: str) -> None:
            print(f"fedlab server: rejected update: {reason}", file=sys.stderr, flush=True)

        engine.on_reject = report
        need = min(config.min_clients, config.clients)
        print(f"fedlab server: waiting for {need} client(s) to join", flush=True)
        transport.wait_for_clients(need)
        print(f"fedlab server: starting at version {engine.version}", flush=True)

    try:
        return execute(args, config, command="server", transport=transport, ready=ready)
    finally:
        transport.close()  # no-op when the run closed it; stops the server after an error
