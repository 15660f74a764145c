"""``fedlab certs``: a CA plus server and client certificates for a deployment."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "certs",
        help="create a CA and server and client certificates",
        description="Write DIR/ca.pem, ca.key, server.pem, server.key and client-ID.pem/.key "
        "for ids 0 .. N-1. Keep ca.key offline; give each client only its own key.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP address clients use for the server (repeatable; localhost and "
        "127.0.0.1 are always included)",
    )
    p.add_argument(
        "--clients", type=int, default=0, metavar="N", help="client certificates to make"
    )
    p.add_argument("--days", type=int, default=365, metavar="DAYS", help="validity (default: 365)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the certificates."""
    from fedlab.transport.security import SecurityError, make_certs

    if args.clients < 0 or args.days < 1:
        raise SecurityError("--clients must be >= 0 and --days >= 1")
    out = make_certs(args.out, server_names=args.server_name, clients=args.clients, days=args.days)
    print(f"wrote a CA, a server certificate and {args.clients} client certificates to {out}")
    return 0
