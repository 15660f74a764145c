"""``fedlab export``: a run's final model in a format other tools load."""

from __future__ import annotations

import argparse

from fedlab import interchange


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the subcommand."""
    p = sub.add_parser(
        "export",
        help="write a run's final model as safetensors or a PyTorch state dict",
        description="Write the final model of RUN_DIR (model.fl, or the checkpoint of a run "
        "that stopped early) as safetensors or a PyTorch state dict.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    p.add_argument(
        "--format",
        choices=list(interchange.FORMATS),
        default="safetensors",
        help="safetensors (default; safetensors.torch.load_file reads it) or pt-state-dict "
        "(torch.load reads it)",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="where to write (default: RUN_DIR/model.safetensors or RUN_DIR/model.pt)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export the model; say where it went and what it came from."""
    _, source = interchange.final_params(args.run_dir)
    path = interchange.export(args.run_dir, args.format, args.output)
    print(f"wrote {path} (from {source})")
    return 0
