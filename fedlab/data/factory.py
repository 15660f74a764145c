"""``make_workload``: one entry point from names and options to a workload."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from fedlab.data import digits, leaf, synthetic, vision
from fedlab.data.base import Workload, load_model_factory, unknown
from fedlab.data.custom import CustomWorkload
from fedlab.data.digits import DigitsWorkload
from fedlab.data.partition import PARTITIONS, LabelSplit
from fedlab.data.synthetic import SyntheticWorkload
from fedlab.data.wls import WLSWorkload

WORKLOADS: tuple[str, ...] = ("synthetic", "digits")
"""The generated classification workloads (no files needed)."""

DATASETS: tuple[str, ...] = ("femnist", "shakespeare", "cifar10", "cifar100", "hf")
"""The workloads read from files the user downloaded once (``data_dir`` / ``dataset``)."""

DEFAULT_PARTITION = {
    "synthetic": "iid",
    "digits": "iid",
    "digits-shift": "iid",
    "wls": "natural",
    "custom": "natural",
    "femnist": "natural",
    "shakespeare": "natural",
    "cifar10": "dirichlet",
    "cifar100": "dirichlet",
    "hf": "iid",
}

_MODELS: dict[str, dict[str, Callable[[], nn.Module]]] = {
    "synthetic": synthetic.MODELS,
    "digits": digits.MODELS,
    "femnist": leaf.SOURCES["femnist"].models,
    "shakespeare": leaf.SOURCES["shakespeare"].models,
    "cifar10": vision.cifar_models(10),
    "cifar100": vision.cifar_models(100),
}


def pick_model(
    name: str, model: str, builtins: dict[str, Callable[[], nn.Module]]
) -> Callable[[], nn.Module]:
    """The factory for ``model``: ``default`` (the first built-in), a built-in name, or a
    ``pkg.mod:Factory`` path."""
    if ":" in model:
        return load_model_factory(model)
    if model == "default":
        return next(iter(builtins.values()))
    if model in builtins:
        return builtins[model]
    raise unknown(f"model for {name}", model, (*builtins, "pkg.mod:Factory"))


def check_common(
    *,
    num_clients: int,
    seed: int,
    partition: str,
    alpha: float,
    sigma: float,
    shards_per_client: int,
) -> None:
    """Refuse out-of-range settings shared by every workload, with one clear message."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if partition not in PARTITIONS:
        raise unknown("partition", partition, PARTITIONS)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (Dirichlet concentration) must be > 0, got {alpha!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma (lognormal quantity skew) must be >= 0, got {sigma!r}")
    if (
        isinstance(shards_per_client, bool)
        or not isinstance(shards_per_client, int)
        or shards_per_client < 1
    ):
        raise ValueError(f"shards_per_client must be an integer >= 1, got {shards_per_client!r}")


def make_workload(
    name: str,
    *,
    num_clients: int,
    seed: int,
    model: str = "default",
    data: str | None = None,
    partition: str | None = None,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sigma: float = 1.0,
    synthetic_alpha: float = 0.5,
    synthetic_beta: float = 0.5,
    label_swap: float = 0.0,
    data_dir: str = "",
    dataset: str = "",
    features: str = "",
    label: str = "",
    partition_by: str = "",
    classes_per_client: int = 2,
) -> Workload:
    """Build a workload whose client data is generated lazily from ``(seed, client_id)``.

    Args:
        name: one of ``WORKLOADS``, ``"digits-shift"`` (digits turned 90 degrees, with a
            model pretrained centrally on upright digits: the fine-tuning demonstration; it
            also has a public sample, ``public_data()``) or ``"wls"``; with ``data`` any
            other label (conventionally
            ``"custom"``) names the user's workload.
        num_clients: number of clients, at least 1. Costs no memory per client.
        seed: non-negative seed that fixes data, partition and model initialisation.
        model: ``"default"``, a built-in name (synthetic: ``"logreg"`` (default), ``"mlp"``;
            digits: ``"cnn"`` (default), ``"mlp"``; custom data: ``"logreg"`` (default),
            ``"mlp"``) or ``"pkg.mod:Factory"``, called with no arguments.
        data: ``"pkg.mod:load_client"`` with signature
            ``load_client(client_id, num_clients, seed) -> ClientData | (x, y)``; the module
            may also define ``load_test(seed)``.
        partition: one of ``PARTITIONS``, or ``None`` for the workload's default
            (``DEFAULT_PARTITION``). Synthetic takes ``"iid"`` (Synthetic-IID) or
            ``"natural"`` (Synthetic(alpha, beta)); custom data takes only ``"natural"``.
        alpha: Dirichlet concentration for ``"dirichlet"`` (smaller is more label-skewed).
        shards_per_client: shards per client for ``"shards"``.
        sigma: lognormal sigma of client sizes for ``"lognormal"`` (0 gives equal sizes).
        synthetic_alpha: LEAF Synthetic alpha (model heterogeneity across clients).
        synthetic_beta: LEAF Synthetic beta (feature heterogeneity); both 0 gives the IID
            variant with one shared labelling model.
        label_swap: digits only, FedStale's label-swap heterogeneity ``h`` in ``[0, 1]``: even
            clients relabel a fraction ``h`` of their 0s as 1 and of their 1s as 0, odd
            clients do the same with 8 and 9 (which examples: from ``(seed, client)``). The
            test set keeps the true labels.
        data_dir: for ``femnist`` and ``shakespeare`` (LEAF's preprocessed JSON, natural
            partition only) and ``cifar10`` / ``cifar100`` (the binary archives): the folder
            holding the files (see ``docs/how-to-use-federated-datasets.md``).
        dataset: for ``hf``: a local Hugging Face dataset (``save_to_disk`` folder, parquet,
            csv or image folder).
        features: for ``hf``: the feature column (or numeric columns, comma-separated).
        label: for ``hf``: the label column.
        partition_by: for ``hf`` with ``partition="natural"``: the client-id column.
        classes_per_client: for ``hf`` with ``partition="pathological"``.

    Returns:
        The workload.

    Raises:
        ValueError: on unknown names (with close matches), out-of-range parameters, or a
            dotted path that cannot be imported.
    """
    if partition is None or partition == "":
        partition = DEFAULT_PARTITION.get(name if data is None else "custom", "natural")
    if name == "hf" and data is None:
        return _hf(
            num_clients=num_clients,
            seed=seed,
            model=model,
            partition=partition,
            alpha=alpha,
            dataset=dataset,
            features=features,
            label=label,
            partition_by=partition_by,
            classes_per_client=classes_per_client,
        )
    if (dataset or features or label or partition_by) and name != "hf":
        raise ValueError("dataset, features, label and partition_by apply to workload 'hf' only")
    check_common(
        num_clients=num_clients,
        seed=seed,
        partition=partition,
        alpha=alpha,
        sigma=sigma,
        shards_per_client=shards_per_client,
    )
    for label, value in (("synthetic_alpha", synthetic_alpha), ("synthetic_beta", synthetic_beta)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{label} must be >= 0, got {value!r}")
    if not (math.isfinite(label_swap) and 0 <= label_swap <= 1):
        raise ValueError(f"label_swap must be in [0, 1], got {label_swap!r}")
    if label_swap and (name != "digits" or data is not None):
        raise ValueError(f"label_swap applies to the digits workload only, not {name!r}")

    if data is not None:
        if name in (*WORKLOADS, "digits-shift", "wls"):
            raise ValueError(
                f"data={data!r} supplies a custom workload, but name={name!r} is a built-in "
                "workload; pass name='custom' (--workload custom)"
            )
        if partition != "natural":
            raise ValueError(
                f"partition {partition!r} does not apply to custom data: load_client decides "
                "each client's examples; use partition='natural' (--partition natural)"
            )
        return CustomWorkload(name=name, data=data, num_clients=num_clients, seed=seed, model=model)
    if name == "custom":
        raise ValueError("workload 'custom' needs data='pkg.mod:load_client'")
    if name in DATASETS:
        if not data_dir:
            raise ValueError(
                f"workload {name!r} reads files from disk: pass data_dir (--data-dir DIR); "
                "see docs/how-to-use-federated-datasets.md for where to get them"
            )
        factory = pick_model(name, model, _MODELS[name])
        if name in leaf.SOURCES:
            if partition != "natural":
                raise ValueError(
                    f"{name} is split by LEAF's natural partition (one client per "
                    f"{'writer' if name == 'femnist' else 'speaking role'}); use "
                    "partition='natural' (--partition natural)"
                )
            return leaf.LeafWorkload(
                name=name, data_dir=data_dir, num_clients=num_clients, seed=seed, model=factory
            )
        _refuse_natural(name, partition)
        return vision.CifarWorkload(
            name=name,
            data_dir=data_dir,
            num_clients=num_clients,
            seed=seed,
            split=LabelSplit(partition, alpha, shards_per_client, sigma),
            model=factory,
        )
    if data_dir:
        raise ValueError(f"data_dir applies to {', '.join(DATASETS[:-1])} only, not {name!r}")
    if name == "wls":
        # Kept out of WORKLOADS (the classification workloads): it is a regression
        # benchmark for ADMM-WLS, evaluated by its own ``evaluate``.
        if model != "default" or partition != "natural":
            raise ValueError("workload 'wls' has one model (linear) and one split (natural)")
        return WLSWorkload(num_clients=num_clients, seed=seed)
    shift = name == "digits-shift"
    if shift:
        # Kept out of WORKLOADS like wls: the pretrain-then-fine-tune demonstration (digits
        # turned 90 degrees, the model pretrained centrally on upright digits).
        name = "digits"
    elif name not in WORKLOADS:
        raise unknown("workload", name, (*WORKLOADS, "digits-shift", "wls", *DATASETS))

    if shift and model == "default":
        model = "mlp"
    factory = pick_model(name, model, _MODELS[name])

    if name == "synthetic":
        if partition not in ("iid", "natural"):
            raise ValueError(
                f"partition {partition!r} does not apply to synthetic: use 'natural' for "
                "LEAF Synthetic(alpha, beta) (non-IID; tune synthetic_alpha and "
                "synthetic_beta) or 'iid' for Synthetic-IID"
            )
        return SyntheticWorkload(
            num_clients=num_clients,
            seed=seed,
            alpha=synthetic_alpha,
            beta=synthetic_beta,
            iid=partition == "iid",
            model=factory,
        )
    _refuse_natural(name, partition)
    return DigitsWorkload(
        num_clients=num_clients,
        seed=seed,
        split=LabelSplit(partition, alpha, shards_per_client, sigma),
        model=factory,
        flat_features=model == "mlp",
        label_swap=label_swap,
        shift=shift,
        model_name=model,
    )


def _hf(
    *,
    num_clients: int,
    seed: int,
    model: str,
    partition: str,
    alpha: float,
    dataset: str,
    features: str,
    label: str,
    partition_by: str,
    classes_per_client: int,
) -> Workload:
    # Imported here: the module is small, but its libraries are an optional extra.
    from fedlab.data.huggingface import HF_PARTITIONS, HFWorkload

    check_common(
        num_clients=num_clients,
        seed=seed,
        partition="natural",  # checked against HF_PARTITIONS below
        alpha=alpha,
        sigma=0.0,
        shards_per_client=1,
    )
    if partition not in HF_PARTITIONS:
        raise unknown("partition for workload 'hf'", partition, HF_PARTITIONS)
    if not dataset:
        raise ValueError("workload 'hf' needs dataset (--dataset PATH), features and label")
    if isinstance(classes_per_client, bool) or classes_per_client < 1:
        raise ValueError(f"classes_per_client must be >= 1, got {classes_per_client!r}")
    return HFWorkload(
        dataset=dataset,
        features=features,
        label=label,
        num_clients=num_clients,
        seed=seed,
        partition=partition,
        alpha=alpha,
        classes_per_client=classes_per_client,
        partition_by=partition_by,
        model=load_model_factory(model) if ":" in model else model,
    )


def _refuse_natural(name: str, partition: str) -> None:
    """Central datasets (digits, CIFAR) have no per-client split of their own to follow."""
    if partition == "natural":
        raise ValueError(
            f"{name} has no natural per-client split; use one of 'iid', 'dirichlet', "
            "'shards' or 'lognormal'"
        )
