"""The run configuration: one key per command-line flag, read from TOML, checked in one place.

``fedlab simulate --config run.toml --lr 0.1`` reads the file, then lets flags override it. The
resolved configuration is saved as ``config.toml`` in the run directory, and ``--resume``
reads it back; a fingerprint of the keys that change results guards the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("inprocess", "ray", "vmap", "auto")
DP_LEVELS = ("", "sample", "client")
DP_NOISES = ("central", "local")
MEMORIES = ("memory", "disk")
TRACKERS = ("tensorboard", "mlflow")
PRECISIONS = ("fp32", "bf16")  # fedlab.precision.PRECISIONS (this module imports no torch)
# ``eval_clients = "all"``: every client (stored as the number of clients).
ALL = "all"

# Keys that do not change the numbers a run produces: they may differ on resume.
NOT_FINGERPRINTED = frozenset(
    {
        "rounds",
        "out",
        "backend",
        "workers",
        "ray_address",
        "cpus_per_worker",
        "gpus_per_worker",
        "eval_every",
        "checkpoint_every",
        "eval_clients",
        "personalize",
        "progress",
        "config",
        "threads",
        "cache_mb",
        "log",
        "mlflow_uri",
        "vmap_chunk",
        "vectorize",
    }
)


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Every setting of a simulation run. Field names are the TOML keys and, with ``-`` for
    ``_``, the command-line flags."""

    clients: int = 1000
    rounds: int = 20
    strategy: str = "fedavg"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    client: str = ""
    client_options: Mapping[str, Any] = field(default_factory=dict)
    workload: str = "synthetic"
    model: str = "default"
    data: str = ""
    partition: str = ""
    alpha: float = 0.5
    label_swap: float = 0.0
    synthetic_alpha: float = 0.5
    synthetic_beta: float = 0.5
    # Data read from disk (femnist, shakespeare, cifar10, cifar100; hf).
    data_dir: str = ""
    dataset: str = ""
    features: str = ""
    label: str = ""
    partition_by: str = ""
    classes_per_client: int = 2
    fraction: float = 0.1
    participation: str = "uniform"
    participation_options: Mapping[str, Any] = field(default_factory=dict)
    buffer: int = 0
    period: float = 0.0
    memory: str = "memory"
    min_clients: int = 1
    concurrency: int = 0
    round_timeout: float = 0.0
    min_updates: int = 1
    over_selection: float = 0.0
    local_steps: int = 10
    local_epochs: float = 0.0
    lr: float = 0.1
    batch_size: int = 32
    seed: int = 0
    backend: str = "auto"
    workers: int = 1
    ray_address: str = ""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    device: str = "cpu"
    threads: int = 1
    cache_mb: float = 256.0
    speed: str = "lognormal"
    speed_mean: float = 1.0
    speed_spread: float = 0.5
    latency: str = "constant"
    latency_mean: float = 0.0
    latency_spread: float = 0.5
    byzantine: float = 0.0
    attack: str = ""
    attack_options: Mapping[str, Any] = field(default_factory=dict)
    compress: str = ""
    compress_options: Mapping[str, Any] = field(default_factory=dict)
    eval_every: int = 1
    # Checkpoint every N versions (and the last); a resume repeats the versions after it.
    checkpoint_every: int = 1
    # Federated evaluation (fedlab.evaluation): clients tested on their own test splits per
    # evaluation (0: off; "all" becomes ``clients``), and local steps of fine-tuning first.
    eval_clients: int = 0
    personalize: int = 0
    out: str = ""
    # Experiment tracking (fedlab.tracking): where else the metrics rows go.
    log: str = ""
    mlflow_uri: str = ""
    dp: str = ""
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    delta: float = 0.0
    target_epsilon: float = 0.0
    dp_noise: str = "central"
    clip_norm: float = 1.0
    adaptive_clip: bool = False
    clip_quantile: float = 0.5
    clip_lr: float = 0.2
    clip_count_stddev: float = 0.0
    max_update_norm: float = 0.0
    max_num_examples: int = 2**31 - 1
    # Local training loop and the vectorised backend (issue 11).
    drop_last: bool = False
    precision: str = "fp32"
    vmap_chunk: int = 0
    vectorize: bool = False

    def __post_init__(self) -> None:
        # Types first, however the config was made (TOML, flags, or RunConfig(...) in code):
        # a boolean is not a count and a string is not a number.
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name)))
        if self.eval_clients == ALL:  # type: ignore[comparison-overlap]
            object.__setattr__(self, "eval_clients", self.clients)
        _positive_int(
            self,
            "clients",
            "rounds",
            "workers",
            "eval_every",
            "checkpoint_every",
            "min_clients",
            "threads",
            "min_updates",
            "classes_per_client",
        )
        _non_negative(
            self,
            "local_epochs",
            "batch_size",
            "concurrency",
            "local_steps",
            "gpus_per_worker",
            "alpha",
            "synthetic_alpha",
            "synthetic_beta",
            "speed_spread",
            "latency_mean",
            "latency_spread",
            "cache_mb",
            "buffer",
            "period",
            "noise_multiplier",
            "target_epsilon",
            "round_timeout",
            "over_selection",
            "clip_lr",
            "clip_count_stddev",
            "vmap_chunk",
            "eval_clients",
            "personalize",
        )
        _positive(self, "lr", "cpus_per_worker", "speed_mean", "max_grad_norm", "clip_norm")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ConfigError("one of local_steps or local_epochs must be positive")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.vectorize and self.backend != "ray":
            raise ConfigError(
                "vectorize batches the clients of each Ray actor: it needs backend = 'ray' "
                "(the vmap backend is vectorised already)"
            )
        if not 0 <= self.label_swap <= 1:
            raise ConfigError(f"label_swap must be in [0, 1], got {self.label_swap}")
        if self.memory not in MEMORIES:
            raise ConfigError(f"memory must be one of {MEMORIES}, got {self.memory!r}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not (math.isfinite(self.byzantine) and 0 <= self.byzantine < 0.5):
            raise ConfigError(f"byzantine must be in [0, 0.5), got {self.byzantine}")
        if bool(self.attack) != (self.byzantine > 0):
            raise ConfigError(
                "attack and byzantine go together: name an attack and a positive byzantine "
                f"fraction, or neither (got attack {self.attack!r}, byzantine {self.byzantine})"
            )
        if self.eval_clients > self.clients:
            raise ConfigError(
                f"eval_clients must be at most clients ({self.clients}), got "
                f"{self.eval_clients}; 'all' evaluates every client"
            )
        if self.personalize and not self.eval_clients:
            raise ConfigError(
                "personalize fine-tunes the clients that federated evaluation tests: "
                "give eval_clients too (a number of clients, or 'all')"
            )
        if self.compress_options and not self.compress:
            raise ConfigError("compress_options given without compress: name a codec (--compress)")
        self._check_dp()
        self._check_update_bounds()
        self._check_log()

    def _check_dp(self) -> None:
        if self.dp not in DP_LEVELS:
            raise ConfigError(f"dp must be one of {DP_LEVELS[1:]} (or empty), got {self.dp!r}")
        if not 0 <= self.delta < 1:
            raise ConfigError(f"delta must be in [0, 1) (0: the default), got {self.delta}")
        if self.dp == "sample" and (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise ConfigError(
                "dp = 'sample' needs exactly one of noise_multiplier > 0 (a fixed sigma) or "
                "target_epsilon > 0 (sigma solved per client for the planned versions)"
            )
        if self.dp == "client" and self.noise_multiplier == 0 and self.target_epsilon == 0:
            raise ConfigError(
                "dp = 'client' needs noise_multiplier > 0, target_epsilon > 0 (z solved for the "
                "planned versions), or both (z given, the run stops at the budget)"
            )
        if self.dp_noise not in DP_NOISES:
            raise ConfigError(f"dp_noise must be one of {DP_NOISES}, got {self.dp_noise!r}")
        if not 0 <= self.clip_quantile <= 1:
            raise ConfigError(f"clip_quantile must be in [0, 1], got {self.clip_quantile}")
        if self.adaptive_clip and (self.dp != "client" or self.dp_noise != "central"):
            raise ConfigError("adaptive_clip needs dp = 'client' with dp_noise = 'central'")

    def _check_update_bounds(self) -> None:
        # The server's bounds on one update (fedlab.guard): a typo must not refuse every update.
        if not (math.isfinite(self.max_update_norm) and self.max_update_norm >= 0):
            raise ConfigError(
                f"max_update_norm must be a finite number >= 0 (0: no bound), "
                f"got {self.max_update_norm}"
            )
        if not 1 <= self.max_num_examples <= 2**53:
            raise ConfigError(
                f"max_num_examples must be in [1, 2**53], got {self.max_num_examples}"
            )

    def _check_log(self) -> None:
        unknown = [t for t in self.trackers if t not in TRACKERS]
        if unknown:
            raise ConfigError(
                f"log takes a comma-separated list of {', '.join(TRACKERS)}; got {self.log!r}"
            )
        if self.mlflow_uri and "mlflow" not in self.trackers:
            raise ConfigError("mlflow_uri given without mlflow in log: add --log mlflow")

    @property
    def trackers(self) -> tuple[str, ...]:
        """The experiment trackers named by ``log``, in order, without repeats."""
        names = (t.strip() for t in self.log.split(","))
        return tuple(dict.fromkeys(t for t in names if t))

    @property
    def task_config(self) -> dict[str, Any]:
        """Settings every task carries to the client."""
        config: dict[str, Any] = {
            "lr": self.lr,
            "local_steps": self.local_steps,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
        }
        if self.drop_last:  # sent only when set: clients default to the partial last batch
            config["drop_last"] = True
        if self.precision != "fp32":  # likewise: clients train in fp32 unless told otherwise
            config["precision"] = self.precision
        if self.dp == "sample":
            config.update(
                dp=True,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                delta=self.delta,
                target_epsilon=self.target_epsilon,
                dp_versions=self.rounds,
            )
        return config

    def fingerprint(self) -> str:
        """A hash of every key that changes the numbers the run produces.

        Keys at their default value are left out, so a release that adds a setting (whose
        default keeps the old behaviour) can still resume the checkpoints of earlier ones.
        """
        default = RunConfig().to_dict()
        keep = {
            k: v
            for k, v in self.to_dict().items()
            if k not in NOT_FINGERPRINTED and v != default[k]
        }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, tables included."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with ``changes`` applied and checked."""
        return from_mapping({**self.to_dict(), **changes})

    def to_toml(self) -> str:
        """The configuration as TOML (flat keys first, then the option tables)."""
        d = self.to_dict()
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if k not in tables]
        for name, table in tables.items():
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines) + "\n"


def _plain(v: Any) -> Any:
    return dict(v) if isinstance(v, Mapping) else v


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"cannot write non-finite value {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} to TOML")


def _check(cfg: RunConfig, names: tuple[str, ...], ok: Any, what: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if not (math.isfinite(v) and ok(v)):
            raise ConfigError(f"{n} must be {what}, got {v}")


def _positive_int(cfg: RunConfig, *names: str) -> None:
    _check(cfg, names, lambda v: v >= 1, "at least 1")


def _positive(cfg: RunConfig, *names: str) -> None:
    _check(cfg, names, lambda v: v > 0, "positive")


def _non_negative(cfg: RunConfig, *names: str) -> None:
    _check(cfg, names, lambda v: v >= 0, ">= 0")


_FIELDS = {f.name: f for f in fields(RunConfig)}


def _coerce(name: str, value: Any) -> Any:
    default = _FIELDS[name].default
    if default is dataclasses.MISSING:  # the option tables
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return dict(value)
    if name == "eval_clients" and value == ALL:
        return value  # RunConfig makes it the number of clients
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        raise ConfigError(f"{name} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


_SCALARS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


def _scalar_types(annotation: Any) -> tuple[type, ...] | None:
    """The scalar types (and ``NoneType``) an annotation allows, or ``None`` when it allows
    anything else too (tuples, mappings, models, ``Any``): those are left to the class."""
    if isinstance(annotation, str):  # ``from __future__ import annotations``: the source text
        out: list[type] = []
        for part in (p.strip() for p in annotation.split("|")):
            if part == "None":
                out.append(type(None))
            elif part in _SCALARS:
                out.append(_SCALARS[part])
            else:
                return None
        return tuple(out)
    if annotation in _SCALARS.values():
        return (annotation,)
    return None


def coerce_options(cls: type, options: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``options`` (``--strategy-opt KEY=VALUE`` pairs, a TOML table) converted to the field
    types of the dataclass ``cls``: an int where a float is expected becomes a float, a whole
    float where an int is expected an int, an int where only a string is expected a string.

    A boolean is never a number and a string never a number, as in :func:`from_mapping`.
    Options of other types (tuples, mappings, ``Any``) are passed on unchanged.

    Raises:
        ConfigError: an option whose value does not fit its field's type, by name.
    """
    types = {f.name: _scalar_types(f.type) for f in fields(cls)}
    out = dict(options)
    for key, value in options.items():
        allowed = types.get(key)
        if allowed is None:
            continue  # unknown options are the caller's to report; other types the class's
        if value is None and type(None) in allowed:
            continue
        if isinstance(value, bool):
            if bool in allowed:
                continue
        elif isinstance(value, int) and int in allowed:
            continue
        elif isinstance(value, int) and float in allowed:
            out[key] = float(value)
            continue
        elif isinstance(value, float) and float in allowed:
            continue
        elif isinstance(value, float) and int in allowed and value.is_integer():
            out[key] = int(value)
            continue
        elif isinstance(value, str) and str in allowed:
            continue
        elif isinstance(value, int) and str in allowed:
            out[key] = str(value)  # ``head=2`` reads as a number: a layer name after all
            continue
        names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(
            f"{what} option {key!r} must be {names}, got {type(value).__name__} {value!r}"
        )
    return out


def from_mapping(values: Mapping[str, Any]) -> RunConfig:
    """A checked :class:`RunConfig` from a mapping (TOML table or flags).

    Raises:
        ConfigError: unknown key (with the closest known keys), wrong type or bad value.
    """
    import difflib

    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            close = difflib.get_close_matches(name, list(_FIELDS), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown configuration key {key!r}.{hint}")
        out[name] = _coerce(name, value)
    try:
        return RunConfig(**out)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML run file into a mapping (not yet checked)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as TOML when it parses (numbers, booleans), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().replace("-", "_"), value
