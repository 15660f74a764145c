"""Command-line flags generated from :class:`RunConfig`, so every flag has a config key."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import MISSING, fields
from typing import Any, Literal

from fedlab.config import ConfigError, RunConfig, from_mapping, load_toml, parse_option

Bound = Literal["positive", ">= 0"]

HELP = {
    "clients": "number of clients in the federation",
    "rounds": "versions (aggregations) to run",
    "strategy": "aggregation strategy name (see `fedlab strategies`) or pkg.mod:Class",
    "client": "client half name or pkg.mod:Class (default: the strategy's own)",
    "workload": (
        "built-in workload: synthetic, digits or digits-shift (pretrained, then fine-tuned on "
        "turned digits); from files: femnist, shakespeare, cifar10, cifar100 (with --data-dir) "
        "or hf (with --dataset); or 'custom' with --data (see `fedlab datasets`)"
    ),
    "model": (
        "model: default, logreg/mlp (synthetic), cnn/mlp (digits; mlp is digits-shift's "
        "default), or pkg.mod:Net"
    ),
    "data": "pkg.mod:load_client, the user's per-client data function",
    "partition": "natural, iid, dirichlet, shards or lognormal; hf: iid, dirichlet, "
    "pathological, shards or natural (empty: the workload's default)",
    "data_dir": "folder holding the downloaded files of femnist, shakespeare, cifar10 or cifar100",
    "dataset": "hf: a local Hugging Face dataset (save_to_disk folder, parquet, csv, image folder)",
    "features": "hf: the feature column (or numeric columns, comma-separated)",
    "label": "hf: the label column",
    "partition_by": "hf with --partition natural: the column holding each example's client id",
    "classes_per_client": "hf with --partition pathological: labels per client",
    "label_swap": "digits: share of labels swapped (0<->1 on even clients, 8<->9 on odd)",
    "alpha": "Dirichlet concentration for --partition dirichlet",
    "synthetic_alpha": "Synthetic(alpha, beta) model heterogeneity (with --partition natural)",
    "synthetic_beta": "Synthetic(alpha, beta) feature heterogeneity (with --partition natural)",
    "fraction": "share of clients per version (or in flight, for asynchronous strategies)",
    "participation": "who is available each version: uniform (server samples --fraction), "
    "bernoulli, cyclic, markov or trace",
    "buffer": "updates per aggregation for buffered asynchronous strategies (FedBuff's K)",
    "period": "seconds of simulated time between aggregations for FedFix",
    "memory": "where the server keeps per-client state: memory, or disk (in the run directory)",
    "min_clients": "fewest clients per version",
    "concurrency": "clients in flight for asynchronous strategies (0: from --fraction)",
    "round_timeout": "seconds a synchronous version waits before aggregating what arrived "
    "(0: wait for every client); simulated seconds in simulation, wall seconds when deployed",
    "min_updates": "fewest updates a synchronous version aggregates once --round-timeout passed",
    "over_selection": "extra share of clients given a synchronous task; the version aggregates "
    "as soon as the planned number answered (0.2: select 20%% more)",
    "local_steps": "local SGD steps per task",
    "local_epochs": "local epochs per task (overrides --local-steps when > 0)",
    "lr": "client learning rate",
    "batch_size": "client minibatch size (0: full batch)",
    "seed": "run seed; every random stream derives from it",
    "backend": "auto (vmap for a synchronous strategy whose client half and model are "
    "batched, and on the CPU a model of at most 1M parameters, else inprocess; says which), "
    "inprocess (one client after another), vmap (all queued clients trained as one batched "
    "computation; see docs/how-to-vmap-backend.md) or ray",
    "workers": "Ray actors (each holds one model and serves many clients)",
    "ray_address": "join the running Ray cluster at this address (its head's host:port) "
    "instead of starting a local Ray; fedlab only disconnects from it at the end",
    "cpus_per_worker": "CPUs reserved per Ray actor",
    "gpus_per_worker": "GPU fraction reserved per Ray actor",
    "device": "torch device for client training (cpu, cuda, cuda:1)",
    "threads": "torch threads per worker; 1 avoids oversubscription with small models",
    "cache_mb": "MiB of client data each worker keeps between tasks (0: regenerate every time)",
    "speed": "client compute-speed distribution for the virtual clock",
    "speed_mean": "mean seconds per unit of work (a local step, or an epoch with "
    "--local-epochs) on the virtual clock",
    "speed_spread": "spread of client speeds (lognormal sigma, uniform half-width, fx: X/100)",
    "latency": "upload-latency distribution for the virtual clock: constant, uniform, lognormal, "
    "halfnormal or exponential",
    "latency_mean": "mean upload latency in seconds (0: none)",
    "latency_spread": "spread of upload latencies",
    "byzantine": "share of clients that are malicious, in [0, 0.5) (needs --attack)",
    "attack": "attack of the malicious clients: sign-flip, scaling, gaussian, alie, ipm, "
    "min-max, label-flip, reversed-ranking, or pkg.mod:Class",
    "compress": "codec applied to every client update: fedzip, float16, int8, topk, or "
    "pkg.mod:Class (empty: none)",
    "eval_every": "evaluate the global model every N versions",
    "checkpoint_every": "write the checkpoint every N versions and at the last (1: every "
    "version); a resumed run repeats the versions after its checkpoint, with the same results",
    "eval_clients": "federated evaluation: test the global model on N sampled clients' own "
    "test splits (or all), every --eval-every versions; 0: off",
    "personalize": "with --eval-clients: also fine-tune K local SGD steps on each evaluated "
    "client's training split and test again (FedAvg+FT); 0: off",
    "log": "also log the run to experiment trackers: tensorboard, mlflow, or both "
    "(comma-separated; each needs its extra, e.g. pip install 'fedlab[tensorboard]')",
    "mlflow_uri": "MLflow tracking URI for --log mlflow (default: an SQLite store in the run "
    "directory)",
    "out": "run directory (default: runs/<strategy>-<workload>-<time>)",
    "dp": "differential privacy: sample (DP-SGD on every client's records), client "
    "(DP-FedAvg: clipped updates plus noise); empty: none",
    "noise_multiplier": "DP noise multiplier (noise std over the clipping norm)",
    "max_grad_norm": "DP-SGD per-record gradient clipping norm C (--dp sample)",
    "delta": "DP delta (0: 1/(10 n) per client for --dp sample, 1/(10 clients) for --dp client)",
    "target_epsilon": "DP budget: --dp sample solves each client's sigma for it; --dp client "
    "solves z for it when --noise-multiplier is 0, and stops the run before exceeding it",
    "dp_noise": "--dp client: central (the server adds noise to the sum) or local (each client)",
    "clip_norm": "--dp client: the update clipping norm S (the initial one with --adaptive-clip)",
    "adaptive_clip": "--dp client (central): adapt S to the --clip-quantile of update norms",
    "clip_quantile": "adaptive clipping's target quantile of the update norms",
    "clip_lr": "adaptive clipping's geometric step size",
    "drop_last": "leave out the partial last batch of each pass over a client's data",
    "precision": "local training arithmetic: fp32, or bf16 (forward and loss under bfloat16 "
    "autocast, fp32 params and optimizer state; for GPUs with native bfloat16, such as A100 "
    "and H100; allowed on CPU, where it is slower)",
    "vmap_chunk": "--backend vmap: clients per batched call (0: sized from a memory budget)",
    "vectorize": "--backend ray: each actor trains its share of the queued clients as one "
    "batched computation, as --backend vmap does",
    "clip_count_stddev": "adaptive clipping's noise std on the count of unclipped updates "
    "(0: updates per version / 20)",
    "max_update_norm": "refuse an update whose L2 norm exceeds this (0: no bound); bounds one "
    "client's influence, not a malicious majority's (use a robust strategy)",
    "max_num_examples": "refuse an update claiming more training examples than this",
}


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`RunConfig` field, plus ``--config`` and the option tables."""
    parser.add_argument("--config", metavar="TOML", help="read settings from a TOML file")
    for f in fields(RunConfig):
        if f.default is MISSING:
            continue  # option tables get KEY=VALUE flags below
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{HELP.get(f.name, '')} (default: {f.default!r})",
            )
            continue
        parser.add_argument(
            flag,
            type=_count_or_all if f.name == "eval_clients" else kind,
            default=None,
            metavar="N|all" if f.name == "eval_clients" else f.name.upper(),
            help=f"{HELP.get(f.name, '')} (default: {f.default!r})",
        )
    parser.add_argument(
        "--strategy-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a strategy hyperparameter, e.g. server_lr=1.0 (repeatable)",
    )
    parser.add_argument(
        "--participation-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a participation-model option, e.g. p=0.3 (repeatable)",
    )
    parser.add_argument(
        "--client-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a client-half option, e.g. momentum=0.9 (repeatable)",
    )
    parser.add_argument(
        "--attack-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an attack option, e.g. factor=1e5 (repeatable)",
    )
    parser.add_argument(
        "--compress-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a codec option, e.g. z=0.05 or error_feedback=true (repeatable)",
    )


def _count_or_all(text: str) -> int | str:
    """``--eval-clients``: a number of clients, or ``all``."""
    if text.strip() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of clients or 'all', got {text!r}"
        ) from None


def given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings named on the command line (not their defaults)."""
    out: dict[str, Any] = {}
    for f in fields(RunConfig):
        if f.default is not MISSING and getattr(args, f.name, None) is not None:
            out[f.name] = getattr(args, f.name)
    if args.strategy_opt:
        out["strategy_options"] = dict(parse_option(o) for o in args.strategy_opt)
    if args.client_opt:
        out["client_options"] = dict(parse_option(o) for o in args.client_opt)
    if args.participation_opt:
        out["participation_options"] = dict(parse_option(o) for o in args.participation_opt)
    if getattr(args, "attack_opt", None):
        out["attack_options"] = dict(parse_option(o) for o in args.attack_opt)
    if getattr(args, "compress_opt", None):
        out["compress_options"] = dict(parse_option(o) for o in args.compress_opt)
    return out


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the TOML file, then flags; option tables merge key by key."""
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    flags = given_flags(args)
    for table in (
        "strategy_options",
        "client_options",
        "participation_options",
        "attack_options",
        "compress_options",
    ):
        if table in flags:
            flags[table] = {**values.get(table, {}), **flags[table]}
    config = from_mapping({**values, **flags})
    # A strategy that needs a particular setting (ADMM-WLS: workload wls) runs with it unless
    # the user named one; then building the strategy says why the named one does not fit.
    from fedlab.run import strategy_defaults

    named = {**values, **flags}
    defaults = {
        key: value
        for key, value in strategy_defaults(config.strategy).items()
        if key not in named and not (key == "workload" and config.data)
    }
    return config.replace(**defaults) if defaults else config


def check_numbers(args: argparse.Namespace, bounds: Mapping[str, Bound]) -> None:
    """Refuse a deployment flag that is not a :class:`RunConfig` field and is out of range.

    ``bounds`` maps each flag's ``argparse`` destination to ``"positive"`` or ``">= 0"``.
    Checked at start-up: a negative ``--max-update-mb`` accepted silently would refuse every
    update of the run.

    Raises:
        ConfigError: the first flag out of range (NaN and infinities included), by name.
    """
    for dest, bound in bounds.items():
        value = getattr(args, dest)
        ok = math.isfinite(value) and (value > 0 if bound == "positive" else value >= 0)
        if not ok:
            raise ConfigError(f"--{dest.replace('_', '-')} must be {bound}, got {value}")


def check_address(flag: str, address: str, *, listen: bool) -> None:
    """Refuse an address that is not ``HOST:PORT`` with a valid port.

    A listening address may name port 0 (the system picks a free one); one to connect to may
    not.

    Raises:
        ConfigError: the address, the flag and what a valid one looks like.
    """
    host, sep, port = address.rpartition(":")
    low = 0 if listen else 1
    if not (sep and host and port.isdigit() and low <= int(port) <= 65535):
        raise ConfigError(
            f"{flag} must be HOST:PORT with PORT in {low}..65535 (e.g. 127.0.0.1:50051), "
            f"got {address!r}"
        )
