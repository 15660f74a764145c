"""Real on-disk formats: tiny LEAF JSON trees, CIFAR binary archives and Hugging Face datasets.

Each test writes files exactly as the official sources lay them out, checks the partition
statistics against what the files hold, and runs ``fedlab simulate`` on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlab.cli import main
from fedlab.data import make_workload
from fedlab.data.leaf import SHAKESPEARE_CHARS

# --------------------------------------------------------------------------- writers


def write_leaf(
    root: Path, name: str, sizes: dict[str, tuple[int, int]], files: int = 2, seed: int = 0
) -> dict[str, dict[str, tuple[list[object], list[object]]]]:
    """LEAF's ``train/`` and ``test/`` JSON for users ``{user: (n_train, n_test)}``; returns
    what was written, ``{split: {user: (x, y)}}``."""
    gen = np.random.default_rng(seed)
    written: dict[str, dict[str, tuple[list[object], list[object]]]] = {"train": {}, "test": {}}
    users = sorted(sizes)
    for s, split in enumerate(("train", "test")):
        (root / split).mkdir(parents=True, exist_ok=True)
        for f in range(files):
            chunk = users[f::files]
            blob: dict[str, object] = {"users": chunk, "num_samples": [], "user_data": {}}
            for user in chunk:
                n = sizes[user][s]
                if name == "femnist":
                    x: list[object] = (gen.integers(0, 256, (n, 784)) / 255).tolist()
                    y: list[object] = gen.integers(0, 62, n).tolist()
                else:
                    text = "".join(gen.choice(list(SHAKESPEARE_CHARS), n + 80))
                    x = [text[i : i + 80] for i in range(n)]
                    y = [text[i + 80] for i in range(n)]
                blob["num_samples"].append(n)  # type: ignore[attr-defined]
                blob["user_data"][user] = {"x": x, "y": y}  # type: ignore[index]
                written[split][user] = (x, y)
            (root / split / f"all_data_{f}_niid_1_keep_0_{split}_9.json").write_text(
                json.dumps(blob)
            )
    return written


CIFAR_TRAIN = 5 * 60
CIFAR_TEST = 100


def write_cifar(root: Path, name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The binary archive's files (small), in the folder the archive extracts to; returns the
    training labels and images written."""
    gen = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-bin" if name == "cifar10" else "cifar-100-binary")
    folder.mkdir(parents=True)
    n_label = 1 if name == "cifar10" else 2

    def records(n: int) -> tuple[bytes, np.ndarray, np.ndarray]:
        labels = gen.integers(0, classes, n).astype(np.uint8)
        pixels = gen.integers(0, 256, (n, 3072)).astype(np.uint8)
        head = labels[:, None] if n_label == 1 else np.stack([labels // 5, labels], axis=1)
        return np.concatenate([head, pixels], axis=1).tobytes(), labels, pixels

    ys, xs = [], []
    if name == "cifar10":
        for i in range(1, 6):
            blob, y, x = records(CIFAR_TRAIN // 5)
            (folder / f"data_batch_{i}.bin").write_bytes(blob)
            ys.append(y)
            xs.append(x)
        (folder / "test_batch.bin").write_bytes(records(CIFAR_TEST)[0])
    else:
        blob, y, x = records(CIFAR_TRAIN)
        (folder / "train.bin").write_bytes(blob)
        ys.append(y)
        xs.append(x)
        (folder / "test.bin").write_bytes(records(CIFAR_TEST)[0])
    return np.concatenate(ys).astype(np.int64), np.concatenate(xs)


def simulate(tmp_path: Path, *flags: str) -> dict[str, object]:
    out = tmp_path / "run"
    code = main(
        ["simulate", "--rounds", "2", "--local-steps", "2", "--batch-size", "8",
         "--fraction", "0.5", "--no-progress", "--out", str(out), *flags]
    )  # fmt: skip
    assert code == 0
    summary: dict[str, object] = json.loads((out / "summary.json").read_text())
    return summary


# --------------------------------------------------------------------------- LEAF


LEAF_SIZES = {"f0001_12": (7, 2), "f0002_40": (3, 1), "f0107_03": (11, 3), "f3012_77": (5, 0)}


def test_femnist_natural_partition_matches_the_json(tmp_path: Path) -> None:
    written = write_leaf(tmp_path / "femnist", "femnist", LEAF_SIZES)
    w = make_workload("femnist", num_clients=4, seed=0, data_dir=str(tmp_path / "femnist"))
    assert (w.num_clients, w.num_classes) == (4, 62)
    users = sorted(LEAF_SIZES)
    for k, user in enumerate(users):
        for split, s in (("train", 0), ("test", 1)):
            data = w.client_data(k, split)
            x, y = written[split][user]
            assert len(data) == LEAF_SIZES[user][s]
            assert data.x.shape[1:] == (1, 28, 28) and data.x.dtype == torch.float32
            expected = torch.tensor(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
            assert torch.allclose(data.x, expected, atol=1e-6)
            assert data.y.tolist() == y
    assert len(w.test_data()) == sum(t for _, t in LEAF_SIZES.values())
    model = w.make_model()
    assert model(w.client_data(0).x).shape == (7, 62)


def test_leaf_cache_is_reused_and_renewed_when_files_change(tmp_path: Path) -> None:
    root = tmp_path / "femnist"
    write_leaf(root, "femnist", LEAF_SIZES)
    first = make_workload("femnist", num_clients=2, seed=1, data_dir=str(root))
    assert first.data.converted  # type: ignore[attr-defined]
    again = make_workload("femnist", num_clients=2, seed=1, data_dir=str(root))
    assert not again.data.converted  # type: ignore[attr-defined]
    assert torch.equal(first.client_data(1).x, again.client_data(1).x)
    caches = list((root / ".fedlab-cache").iterdir())
    assert len(caches) == 1 and not [p for p in caches if p.name.startswith(".")]
    write_leaf(root, "femnist", {**LEAF_SIZES, "f9999_00": (4, 1)}, seed=5)
    grown = make_workload("femnist", num_clients=5, seed=1, data_dir=str(root))
    assert grown.data.converted  # type: ignore[attr-defined]
    # A subset of users is a seeded choice, the same for the same seed.
    assert first.user(0) == again.user(0)  # type: ignore[attr-defined]


def test_shakespeare_next_character_from_the_json(tmp_path: Path) -> None:
    sizes = {"THE_TEMPEST_PROSPERO": (9, 2), "HAMLET_HAMLET": (4, 1), "KING_LEAR_FOOL": (6, 2)}
    written = write_leaf(tmp_path / "data", "shakespeare", sizes)
    w = make_workload("shakespeare", num_clients=3, seed=0, data_dir=str(tmp_path))
    k = sorted(sizes).index("HAMLET_HAMLET")
    data = w.client_data(k)
    x, y = written["train"]["HAMLET_HAMLET"]
    assert data.x.shape == (4, 80) and data.x.dtype == torch.int64
    assert "".join(SHAKESPEARE_CHARS[i] for i in data.x[0].tolist()) == x[0]
    assert [SHAKESPEARE_CHARS[i] for i in data.y.tolist()] == y
    logits = w.make_model()(data.x)
    assert logits.shape == (4, 80)


@pytest.mark.parametrize("name", ["femnist", "shakespeare"])
def test_simulate_runs_on_leaf_files(tmp_path: Path, name: str) -> None:
    write_leaf(tmp_path / "leaf", name, LEAF_SIZES)
    summary = simulate(
        tmp_path, "--workload", name, "--data-dir", str(tmp_path / "leaf"), "--clients", "4"
    )
    assert summary["workload"] == name and summary["versions"] == 2
    assert 0 <= float(summary["accuracy"]) <= 1  # type: ignore[arg-type]


def test_missing_leaf_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--workload", "femnist", "--data-dir", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "femnist data not found" in err and "train" in err and "LEAF" in err
    assert not (tmp_path / "run").exists()


def test_more_clients_than_leaf_users_is_refused(tmp_path: Path) -> None:
    write_leaf(tmp_path, "femnist", LEAF_SIZES)
    with pytest.raises(ValueError, match="has 4 users; --clients must be at most 4"):
        make_workload("femnist", num_clients=5, seed=0, data_dir=str(tmp_path))


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary_archives_partition_by_label(tmp_path: Path, name: str) -> None:
    labels, pixels = write_cifar(tmp_path, name)
    w = make_workload(name, num_clients=6, seed=2, data_dir=str(tmp_path), alpha=0.1)
    assert w.num_classes == (10 if name == "cifar10" else 100)
    seen = []
    for k in range(6):
        idx = w.client_indices(k)  # type: ignore[attr-defined]
        data = w.client_data(k)
        assert data.y.tolist() == labels[idx].tolist()  # labels as the files hold them
        # Pixels are the file's, channel-major, normalised per channel.
        raw = torch.from_numpy(pixels[idx].reshape(-1, 3, 32, 32).astype(np.float32) / 255)
        mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
        std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
        assert torch.allclose(data.x, (raw - mean) / std, atol=1e-5)
        seen.append(np.bincount(labels[idx], minlength=w.num_classes))
        assert len(w.client_data(k, "test")) == max(1, len(data) // 4)
    assert len(w.test_data()) == CIFAR_TEST
    # Dirichlet(0.1) label skew: clients are far from the pool's label mix.
    pool = np.bincount(labels, minlength=w.num_classes) / len(labels)
    gaps = [np.abs(c / c.sum() - pool).sum() / 2 for c in seen]
    assert np.mean(gaps) > 0.4


def test_cifar_augmentation_crops_and_flips_from_the_training_stream(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    w = make_workload("cifar10", num_clients=3, seed=0, data_dir=str(tmp_path), partition="iid")
    data = w.client_data(0)
    assert data.augment is not None and w.client_data(0, "test").augment is None
    batch = data.x[:16]
    a = data.augment(batch, torch.Generator().manual_seed(1))
    b = data.augment(batch, torch.Generator().manual_seed(1))
    c = data.augment(batch, torch.Generator().manual_seed(2))
    assert a.shape == batch.shape and torch.equal(a, b) and not torch.equal(a, c)
    # Every output image is a shifted (and maybe mirrored) window of its zero-padded input.
    padded = torch.nn.functional.pad(batch, (4, 4, 4, 4))
    for i in range(16):
        windows = [padded[i, :, r : r + 32, s : s + 32] for r in range(9) for s in range(9)]
        assert any(torch.equal(a[i], v) or torch.equal(a[i], v.flip(2)) for v in windows)


def test_cifar_model_trains_with_dp_sgd(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    summary = simulate(
        tmp_path, "--workload", "cifar10", "--data-dir", str(tmp_path), "--clients", "4",
        "--dp", "sample", "--noise-multiplier", "1.0",
    )  # fmt: skip
    assert summary["versions"] == 2


def test_simulate_runs_on_cifar100(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar100")
    summary = simulate(
        tmp_path, "--workload", "cifar100", "--data-dir", str(tmp_path), "--clients", "4"
    )
    assert summary["workload"] == "cifar100"


def test_missing_cifar_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["simulate", "--workload", "cifar10", "--data-dir", str(tmp_path),
                 "--out", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "data_batch_1.bin" in err and "binary version" in err


def test_truncated_cifar_file_is_refused(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10")
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="not a multiple of its 3073-byte records"):
        make_workload("cifar10", num_clients=2, seed=0, data_dir=str(tmp_path))


# --------------------------------------------------------------------------- Hugging Face


def _hf_images(root: Path) -> Path:
    """A DatasetDict with 8x8 grey images and a ClassLabel, written by ``save_to_disk``."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("flwr_datasets")
    from PIL import Image

    gen = np.random.default_rng(0)

    def split(n: int) -> object:
        labels = gen.integers(0, 3, n).tolist()
        images = [Image.fromarray(gen.integers(0, 256, (8, 8)).astype(np.uint8)) for _ in labels]
        features = datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])}
        )
        return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)

    path = root / "saved"
    datasets.DatasetDict({"train": split(120), "test": split(30)}).save_to_disk(str(path))
    return path


def _hf_table(root: Path, kind: str) -> tuple[Path, dict[str, int]]:
    """``train`` and ``test`` parquet (or csv) files with three numeric columns, a string
    label and a writer id; returns the folder and the training examples per writer."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("datasets")
    pytest.importorskip("flwr_datasets")
    gen = np.random.default_rng(1)
    folder = root / kind
    folder.mkdir()
    counts: dict[str, int] = {}
    for split, n in (("train", 150), ("test", 40)):
        writers = [f"w{int(i)}" for i in gen.integers(0, 7, n)]
        frame = pd.DataFrame(
            {
                "f1": gen.normal(size=n),
                "f2": gen.normal(size=n),
                "f3": gen.normal(size=n),
                "species": gen.choice(["setosa", "versicolor", "virginica"], n),
                "writer": writers,
            }
        )
        if kind == "parquet":
            frame.to_parquet(folder / f"{split}.parquet")
        else:
            frame.to_csv(folder / f"{split}.csv", index=False)
        if split == "train":
            counts = {w: writers.count(w) for w in set(writers)}
    return folder, counts


def test_hf_saved_dataset_with_images_and_dirichlet(tmp_path: Path) -> None:
    path = _hf_images(tmp_path)
    w = make_workload(
        "hf", num_clients=4, seed=0, dataset=str(path), features="image", label="label",
        partition="dirichlet", alpha=0.3,
    )  # fmt: skip
    assert w.num_classes == 3
    sizes = w.partition_sizes()  # type: ignore[attr-defined]
    assert sizes.sum() == 120  # Flower's Dirichlet partition covers the training split
    for k in range(4):
        train, test = w.client_data(k), w.client_data(k, "test")
        assert len(train) + len(test) == sizes[k] and len(test) == sizes[k] // 5
        assert train.x.shape[1:] == (1, 8, 8) and float(train.x.max()) <= 1.0
    assert len(w.test_data()) == 30
    summary = simulate(
        tmp_path, "--workload", "hf", "--dataset", str(path), "--features", "image",
        "--label", "label", "--clients", "4", "--partition", "shards",
    )  # fmt: skip
    assert summary["workload"] == "hf"


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_hf_table_natural_partition_by_writer(tmp_path: Path, kind: str) -> None:
    folder, counts = _hf_table(tmp_path, kind)
    w = make_workload(
        "hf", num_clients=len(counts), seed=0, dataset=str(folder), features="f1,f2,f3",
        label="species", partition="natural", partition_by="writer",
    )  # fmt: skip
    assert w.num_classes == 3 and len(w.test_data()) == 40
    sizes = w.partition_sizes()  # type: ignore[attr-defined]
    assert sorted(sizes.tolist()) == sorted(counts.values())
    assert w.client_data(0).x.shape[1:] == (3,)
    with pytest.raises(ValueError, match="--clients must be at most 7"):
        make_workload(
            "hf", num_clients=8, seed=0, dataset=str(folder), features="f1,f2,f3",
            label="species", partition="natural", partition_by="writer",
        )  # fmt: skip


def test_simulate_runs_on_a_parquet_file(tmp_path: Path) -> None:
    folder, _ = _hf_table(tmp_path, "parquet")
    summary = simulate(
        tmp_path, "--workload", "hf", "--dataset", str(folder / "train.parquet"),
        "--features", "f1,f2,f3", "--label", "species", "--clients", "5",
        "--partition", "pathological", "--classes-per-client", "2",
    )  # fmt: skip
    assert summary["workload"] == "hf"


def test_hf_missing_dataset_and_column_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = _hf_table(tmp_path, "parquet")
    for dataset, features, expect in (
        (str(tmp_path / "absent"), "f1", "not found"),
        (str(folder), "f9", "has no column 'f9'"),
    ):
        code = main(["simulate", "--workload", "hf", "--dataset", dataset, "--features",
                     features, "--label", "species", "--out", str(tmp_path / "run"),
                     "--no-progress", "--clients", "3"])  # fmt: skip
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and expect in err


# --------------------------------------------------------------------------- catalogue


def test_catalogue_matches_the_factory(capsys: pytest.CaptureFixture[str]) -> None:
    from fedlab.data import DATASETS, DEFAULT_PARTITION, WORKLOADS
    from fedlab.data.catalogue import CATALOGUE
    from fedlab.data.factory import _MODELS

    names = [e.name for e in CATALOGUE]
    assert set(names) == {*WORKLOADS, *DATASETS, "digits-shift", "wls", "custom"}
    for entry in CATALOGUE:
        assert entry.partitions[0] == DEFAULT_PARTITION[entry.name]
        builtin = _MODELS.get(entry.name.removesuffix("-shift"))
        if builtin is not None:
            assert set(entry.models) == set(builtin)
            if entry.name != "digits-shift":  # its default is mlp, named first
                assert entry.models[0] == next(iter(builtin))
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}:" in out for name in names)


def test_commands_in_the_datasets_guide_parse() -> None:
    import re
    import shlex

    from fedlab.cli import build_parser
    from fedlab.cli.flags import resolve_config

    guide = Path(__file__).resolve().parents[1] / "docs" / "how-to-use-federated-datasets.md"
    lines = [ln for ln in re.findall(r"^fedlab simulate .*$", guide.read_text(), re.M)]
    assert len(lines) >= 6
    for line in lines:
        args = build_parser().parse_args(shlex.split(line)[1:])
        config = resolve_config(args)
        assert config.workload in ("femnist", "shakespeare", "cifar10", "cifar100", "hf")


def test_missing_hf_extra_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "flwr_datasets", None)  # import fails as if not installed
    code = main(["simulate", "--workload", "hf", "--dataset", str(tmp_path), "--features", "x",
                 "--label", "y", "--out", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        "fedlab: error: workload 'hf' needs Hugging Face datasets and Flower Datasets: "
        "pip install 'fedlab[hf-data]'"
    )


def test_augmented_data_trains_sequentially_on_the_vmap_backend(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The batched loop cannot draw CIFAR's crops and flips from the clients' streams as the
    sequential loop does: the vmap backend says so and trains them one by one (the same run as
    in-process, bit for bit), and auto picks in-process for it."""
    import fedlab

    write_cifar(tmp_path, "cifar10")
    settings = dict(
        workload="cifar10", data_dir=str(tmp_path), clients=4, fraction=0.5, rounds=2,
        local_steps=2, batch_size=8,
    )  # fmt: skip
    runs = {
        backend: fedlab.simulate(out=str(tmp_path / backend), backend=backend, **settings)
        for backend in ("inprocess", "vmap", "auto")
    }
    for backend in ("vmap", "auto"):
        for k, v in runs["inprocess"].params.items():
            assert torch.equal(v, runs[backend].params[k]), (backend, k)
    assert "data is augmented" in caplog.text
