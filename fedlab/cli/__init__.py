"""The ``fedlab`` command: one module per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedlab.cli import certs, client, datasets, export, plot, server, simulate, strategies
from fedlab.client import TrainingError


def build_parser() -> argparse.ArgumentParser:
    """The ``fedlab`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedlab", description="Federated learning for PyTorch: simulate, deploy, extend."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (simulate, server, client, certs, strategies, datasets, plot, export):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlab`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileExistsError, FileNotFoundError, TrainingError) as e:
        # ConfigError, CheckpointError and registry errors are ValueErrors with a message
        # written for the user; a traceback would only bury it. A client's training error
        # names the client, the version, the error and where in the user's code it arose.
        print(f"fedlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
