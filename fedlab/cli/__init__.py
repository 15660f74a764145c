"""The ``fedlab`` command: one module per subcommand."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

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
    with _backend_lines():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
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


@contextlib.contextmanager
def _backend_lines() -> Iterator[None]:
    """Print the simulation backends' INFO lines (``--backend auto picked vmap``) on stderr
    while a command runs: Python's default shows only warnings, and that line is news, not a
    warning. The Python API stays quiet (``fedlab.simulate`` prints nothing unless asked)."""
    log = logging.getLogger("fedlab.sim")
    handler, level = _Stderr(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


class _Stderr(logging.Handler):
    """The message alone, on whatever ``sys.stderr`` is when it is logged (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(record.getMessage(), file=sys.stderr)
        except Exception:  # logging's own contract: report, never raise
            self.handleError(record)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
