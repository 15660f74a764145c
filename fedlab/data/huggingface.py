"""Any Hugging Face dataset from local files, partitioned by Flower Datasets (``--workload hf``).

``--dataset PATH`` is a folder written by ``save_to_disk``, a parquet or csv file (or a folder
of them; files whose names start with ``test`` are the test split), or an image folder (one
sub-folder per class, as ``datasets``' ``imagefolder`` reads it). Nothing is downloaded: the
Hugging Face libraries run offline. ``--features`` names the feature column (an image, a list
or array of numbers, or several numeric columns separated by commas) and ``--label`` the label
column (a ``ClassLabel``, non-negative integers or strings, which are numbered in sorted
order).

Clients are the partitions of the training split by a Flower Datasets partitioner: ``iid``,
``dirichlet`` (over the label column, ``--alpha``), ``pathological`` (``--classes-per-client``
labels each), ``shards`` (two per client) or ``natural`` (one client per value of the
``--partition-by`` column). A client's own test data is a seeded fifth of its partition; the
global test set is the dataset's ``test`` split, or a seeded fifth of the data when it has
none. Requires the ``hf-data`` extra (``datasets`` and ``flwr-datasets``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlab import seeding
from fedlab.data.base import (
    P_CLIENT_SUBSET,
    P_HF_SPLIT,
    ClientData,
    MissingExtra,
    cache_root,
    check_client_id,
    check_split,
    rng,
    seeded_model,
    unknown,
)
from fedlab.data.vision import image_cnn

HF_PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "pathological", "shards", "natural")
_TEST_DENOM = 5  # a fifth held out, when the data has no test split / per client
_SHARDS_PER_CLIENT = 2


def libraries() -> tuple[Any, Any]:
    """``(datasets, flwr_datasets.partitioner)``, offline; one clear line when missing."""
    # Offline before the first import: both libraries read these once, and a local dataset
    # must never wait on the network.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
        from flwr_datasets import partitioner
    except ImportError as e:
        raise MissingExtra(
            "workload 'hf' needs Hugging Face datasets and Flower Datasets: "
            "pip install 'fedlab[hf-data]'"
        ) from e
    datasets.disable_progress_bars()
    return datasets, partitioner


def _not_found(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset {str(path)!r} not found: --dataset takes a local folder written by "
        "datasets' save_to_disk, a parquet or csv file (or a folder of them), or an image "
        "folder with one sub-folder per class; fedlab never downloads, so save the dataset "
        "once on a machine with network access and copy that folder here"
    )


def load_local(path: str | Path) -> tuple[Any, Any | None]:
    """``(train, test or None)`` ``datasets.Dataset`` objects read from local files."""
    datasets, _ = libraries()
    root = Path(path).expanduser()
    if not root.exists():
        raise _not_found(root)
    if root.is_dir() and ((root / "dataset_dict.json").exists() or (root / "state.json").exists()):
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.Dataset):
            return loaded, None
        splits = dict(loaded)
        if "train" not in splits:
            if len(splits) != 1:
                raise ValueError(f"{root} has splits {sorted(splits)}; expected one named train")
            return next(iter(splits.values())), None
        return splits["train"], splits.get("test")
    kinds = {".parquet": "parquet", ".csv": "csv"}
    if root.is_file():
        if root.suffix not in kinds:
            raise _not_found(root)
        files = {"train": [str(root)]}
        kind = kinds[root.suffix]
    else:
        found = [f for f in sorted(root.iterdir()) if f.suffix in kinds and f.is_file()]
        if found:
            kind = kinds[found[0].suffix]
            files = {
                "train": [str(f) for f in found if not f.name.startswith("test")],
                "test": [str(f) for f in found if f.name.startswith("test")],
            }
        else:
            kind, files = "imagefolder", {}
    cache = str(cache_root(root if root.is_dir() else root.parent) / "hf")
    try:
        if kind == "imagefolder":
            loaded = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache)
        else:
            loaded = datasets.load_dataset(
                kind, data_files={k: v for k, v in files.items() if v}, cache_dir=cache
            )
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot read {root} as a {kind} dataset: {e}") from None
    splits = dict(loaded)
    if "train" not in splits:
        raise _not_found(root)
    return splits["train"], splits.get("test")


class HFWorkload:
    """A local Hugging Face dataset partitioned over clients by a Flower Datasets partitioner.

    Args:
        dataset: the local path (see the module docstring).
        features: the feature column, or numeric columns separated by commas.
        label: the label column.
        num_clients: clients; with ``natural``, at most the number of distinct ids (a fixed
            seeded subset of them takes part when fewer).
        seed: fixes the held-out splits, the partition and the model's initialisation.
        partition: one of :data:`HF_PARTITIONS`.
        alpha: Dirichlet concentration.
        classes_per_client: labels per client for ``pathological``.
        partition_by: the id column for ``natural``.
        model: ``default`` (a GroupNorm CNN for images, logistic regression otherwise),
            ``cnn``, ``logreg``, ``mlp`` or a factory.
    """

    def __init__(
        self,
        *,
        dataset: str,
        features: str,
        label: str,
        num_clients: int,
        seed: int,
        partition: str,
        alpha: float,
        classes_per_client: int,
        partition_by: str,
        model: str | Callable[[], nn.Module],
    ) -> None:
        _datasets, partitioners = libraries()
        if partition not in HF_PARTITIONS:
            raise unknown("partition for workload 'hf'", partition, HF_PARTITIONS)
        if not features or not label:
            raise ValueError("workload 'hf' needs --features COLUMN and --label COLUMN")
        self.name = "hf"
        self.seed = seed
        train, test = load_local(dataset)
        self._columns = [c.strip() for c in features.split(",") if c.strip()]
        self._label = label
        for column in (*self._columns, label, *([partition_by] if partition_by else [])):
            if column not in train.column_names:
                raise ValueError(
                    f"{dataset} has no column {column!r}; its columns: "
                    f"{', '.join(train.column_names)}"
                )
        split_seed = seeding.derive(seed, P_HF_SPLIT) % 2**32
        if test is None:
            parts = train.train_test_split(test_size=1 / _TEST_DENOM, seed=split_seed)
            train, test = parts["train"], parts["test"]
        self._image = self._is_image(train)
        self._label_map = self._labels(train, test)
        self.num_classes = len(self._label_map) if self._label_map else 0
        if self._label_map is None:
            self.num_classes = int(max(max(train[label]), max(test[label]))) + 1
        self.partition = partition
        partitioner = self._make_partitioner(
            partitioners,
            partition,
            num_clients,
            alpha,
            classes_per_client,
            partition_by,
            train,
        )
        # IidPartitioner cuts the data in order: shuffle it first, by the seed.
        partitioner.dataset = train.shuffle(seed=split_seed) if partition == "iid" else train
        available = partitioner.num_partitions
        if num_clients > available:
            raise ValueError(
                f"{dataset} has {available} distinct {partition_by!r} values; --clients must "
                f"be at most {available} with --partition natural"
            )
        self._partitioner = partitioner
        self.num_clients = num_clients
        self._ids = np.arange(num_clients, dtype=np.int64)
        if num_clients < available:
            picked = rng(seed, P_CLIENT_SUBSET).choice(available, size=num_clients, replace=False)
            self._ids = np.sort(picked).astype(np.int64)
        self._test_ds = test
        self._test: ClientData | None = None
        probe = self._convert(test.select(range(min(1, len(test)))) if len(test) else train)
        self.feature_shape = tuple(probe.x.shape[1:])
        if callable(model):
            self._model: Callable[[], nn.Module] = model
        else:
            self._model = self._builtin_model(model)

    def _make_partitioner(
        self,
        partitioners: Any,
        partition: str,
        num_clients: int,
        alpha: float,
        classes_per_client: int,
        partition_by: str,
        train: Any,
    ) -> Any:
        fseed = seeding.derive(self.seed, P_HF_SPLIT, 1) % 2**32
        if partition == "natural":
            if not partition_by:
                raise ValueError("--partition natural on workload 'hf' needs --partition-by COLUMN")
            return partitioners.NaturalIdPartitioner(partition_by=partition_by)
        if partition == "iid":
            return partitioners.IidPartitioner(num_partitions=num_clients)
        if partition == "dirichlet":
            # Flower resamples until every client holds min_partition_size examples; cap it
            # at the fair share so that a small data set can still be split.
            return partitioners.DirichletPartitioner(
                num_partitions=num_clients,
                partition_by=self._label,
                alpha=alpha,
                min_partition_size=min(10, len(train) // num_clients),
                seed=fseed,
            )
        if partition == "pathological":
            return partitioners.PathologicalPartitioner(
                num_partitions=num_clients,
                partition_by=self._label,
                num_classes_per_partition=classes_per_client,
                seed=fseed,
            )
        return partitioners.ShardPartitioner(
            num_partitions=num_clients,
            partition_by=self._label,
            num_shards_per_partition=_SHARDS_PER_CLIENT,
            seed=fseed,
        )

    def _is_image(self, train: Any) -> bool:
        datasets, _ = libraries()
        kinds = [train.features[c] for c in self._columns]
        images = [isinstance(k, datasets.Image) for k in kinds]
        if any(images) and len(kinds) > 1:
            raise ValueError("--features takes one image column, or several numeric columns")
        return bool(images[0])

    def _labels(self, train: Any, test: Any) -> list[str] | None:
        datasets, _ = libraries()
        kind = train.features[self._label]
        if isinstance(kind, datasets.ClassLabel):
            return list(kind.names)
        values = set(train.unique(self._label)) | set(test.unique(self._label))
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
            if min(values) < 0:
                raise ValueError(f"label column {self._label!r} has negative values")
            return None
        return sorted(str(v) for v in values)

    def _label_array(self, values: list[Any]) -> torch.Tensor:
        if self._label_map is None:
            return torch.tensor([int(v) for v in values], dtype=torch.int64)
        index = {name: i for i, name in enumerate(self._label_map)}
        if all(isinstance(v, int | np.integer) for v in values):  # ClassLabel: already ids
            return torch.tensor([int(v) for v in values], dtype=torch.int64)
        return torch.tensor([index[str(v)] for v in values], dtype=torch.int64)

    def _convert(self, part: Any) -> ClientData:
        """A ``datasets.Dataset`` slice as tensors."""
        y = self._label_array(part[self._label])
        if self._image:
            images = part[self._columns[0]]
            arrays = [
                np.asarray(img.convert("L" if img.mode in ("L", "1", "I") else "RGB"))
                for img in images
            ]
            shapes = {a.shape for a in arrays}
            if len(shapes) > 1:
                raise ValueError(
                    f"images of column {self._columns[0]!r} differ in size ({sorted(shapes)}); "
                    "resize them to one size first"
                )
            stack = np.stack(arrays) if arrays else np.zeros((0, 1, 1), dtype=np.uint8)
            stack = stack[:, None] if stack.ndim == 3 else stack.transpose(0, 3, 1, 2)
            return ClientData(torch.from_numpy(stack.astype(np.float32) / 255), y)
        columns = []
        for column in self._columns:
            try:
                values = np.asarray(part.with_format("numpy")[column], dtype=np.float32)
            except (TypeError, ValueError):
                raise ValueError(
                    f"feature column {column!r} is not numeric; text needs a tokenizer: write "
                    "a load_client for --workload custom (docs/how-to-use-your-own-model-and-"
                    "data.md)"
                ) from None
            columns.append(values.reshape(len(part), -1))
        x = np.concatenate(columns, axis=1) if columns else np.zeros((len(part), 0))
        if not np.isfinite(x).all():
            raise ValueError(f"feature columns {self._columns} hold NaN or infinite values")
        return ClientData(torch.from_numpy(np.ascontiguousarray(x)), y)

    def _builtin_model(self, model: str) -> Callable[[], nn.Module]:
        classes = self.num_classes
        if self._image:
            if model not in ("default", "cnn"):
                raise unknown("model for hf images", model, ["cnn", "pkg.mod:Factory"])
            channels = self.feature_shape[0]
            return lambda: image_cnn(channels, classes)
        features = int(np.prod(self.feature_shape))
        if model == "mlp":
            return lambda: nn.Sequential(
                nn.Flatten(), nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, classes)
            )
        if model not in ("default", "logreg"):
            raise unknown("model for hf features", model, ["logreg", "mlp", "pkg.mod:Factory"])
        return lambda: nn.Sequential(nn.Flatten(), nn.Linear(features, classes))

    def make_model(self) -> nn.Module:
        return seeded_model(self.seed, self._model)

    def partition_sizes(self) -> npt.NDArray[np.int64]:
        """Examples per client before the per-client test fifth is held out."""
        return np.array(
            [len(self._partitioner.load_partition(int(i))) for i in self._ids], dtype=np.int64
        )

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        k = check_client_id(client_id, self.num_clients)
        test = check_split(split) == "test"
        part = self._partitioner.load_partition(int(self._ids[k]))
        order = rng(self.seed, P_HF_SPLIT, 2, k).permutation(len(part))
        n_test = len(part) // _TEST_DENOM
        pick = order[len(part) - n_test :] if test else order[: len(part) - n_test]
        data = self._convert(part.select(np.sort(pick).tolist()))
        if len(data) == 0:
            return ClientData(torch.zeros((0, *self.feature_shape)), data.y)
        return data

    def test_data(self) -> ClientData:
        if self._test is None:
            self._test = self._convert(self._test_ds)
        return self._test
