"""LEAF's FEMNIST and Shakespeare from LEAF's own preprocessed JSON (``--data-dir``).

LEAF (Caldas et al., 2018) writes each split as many JSON files of the form
``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``,
under ``train/`` and ``test/`` (its per-user split, ``preprocess.sh ... -t sample``). The
natural partition is LEAF's: one client per writer (FEMNIST) or speaking role (Shakespeare),
with that user's own train and test examples.

Parsing JSON is slow and its Python objects are large, so the files are converted once into a
compact cache beside them (``DIR/.fedlab-cache/NAME-...``; the user's home cache when ``DIR``
is read-only): one flat binary array of examples per split plus per-user offsets, written to a
temporary folder and renamed into place (a crash leaves no half cache). Later loads map the
arrays into memory, so a client costs memory only while its examples are in use. The cache's
name holds a digest of the JSON files' names, sizes and modification times: new files make a
new cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlab.data.base import (
    P_CLIENT_SUBSET,
    ClientData,
    cache_root,
    check_client_id,
    check_split,
    concat,
    rng,
    seeded_model,
)

# LEAF's Shakespeare vocabulary (leaf/models/utils/language_utils.py): 80 characters; a
# character outside it maps to the space, as LEAF's own preprocessing keeps none.
SHAKESPEARE_CHARS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
SHAKESPEARE_SEQ = 80
FEMNIST_CLASSES = 62
FEMNIST_PIXELS = 28 * 28
_CACHE_VERSION = 1
# The global test set: the test splits of at most this many clients (a fixed, seeded subset),
# so that evaluating every version stays affordable; every client's own test split is
# ``client_data(k, "test")``.
LEAF_TEST_CLIENTS = 200

_CHAR_INDEX = np.full(256, SHAKESPEARE_CHARS.index(" "), dtype=np.uint8)
for _i, _c in enumerate(SHAKESPEARE_CHARS):
    _CHAR_INDEX[ord(_c)] = _i


def femnist_cnn() -> nn.Module:
    """LEAF's FEMNIST CNN: two 5x5 conv layers (32, 64) each with 2x2 max-pooling, a dense
    layer of 2048 units and 62 outputs, on ``(1, 28, 28)`` images."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 2048),
        nn.ReLU(),
        nn.Linear(2048, FEMNIST_CLASSES),
    )


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model: an 8-dimensional character embedding, a 2-layer LSTM of 256
    units and a linear layer to 80 characters, predicting the character after the sequence.

    ``x`` is ``(batch, 80)`` character indices (any numeric dtype); the output is the logits
    of the last position only, ``(batch, 80)``, so the ordinary cross-entropy loss and
    accuracy apply unchanged.
    """

    def __init__(
        self, vocab: int = len(SHAKESPEARE_CHARS), embed: int = 8, hidden: int = 256
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x.long()))
        logits: torch.Tensor = self.out(h[:, -1])
        return logits


@dataclass(frozen=True)
class LeafSource:
    """What one LEAF data set looks like on disk and in the cache."""

    name: str
    num_classes: int
    feature_shape: tuple[int, ...]
    models: dict[str, Callable[[], nn.Module]]
    how_to_get: str


SOURCES = {
    "femnist": LeafSource(
        name="femnist",
        num_classes=FEMNIST_CLASSES,
        feature_shape=(1, 28, 28),
        models={"cnn": femnist_cnn},
        how_to_get=(
            "get them from the LEAF benchmark's femnist folder: run its preprocess.sh with a "
            "per-user split (for example -s niid --sf 1.0 -k 0 -t sample) and pass its data/ "
            "folder"
        ),
    ),
    "shakespeare": LeafSource(
        name="shakespeare",
        num_classes=len(SHAKESPEARE_CHARS),
        feature_shape=(SHAKESPEARE_SEQ,),
        models={"lstm": CharLSTM},
        how_to_get=(
            "get them from the LEAF benchmark's shakespeare folder: run its preprocess.sh "
            "with a per-user split (for example -s niid --sf 1.0 -k 0 -t sample) and pass its "
            "data/ folder"
        ),
    ),
}


def split_dirs(source: LeafSource, data_dir: str | Path) -> tuple[Path, Path]:
    """``(train, test)`` folders of LEAF JSON under ``data_dir`` (or ``data_dir/data``).

    Raises:
        FileNotFoundError: one line naming the folders expected and where to get them.
    """
    root = Path(data_dir).expanduser()
    for base in (root, root / "data"):
        train, test = base / "train", base / "test"
        if any(train.glob("*.json")) and any(test.glob("*.json")):
            return train, test
    raise FileNotFoundError(
        f"{source.name} data not found: expected LEAF's preprocessed JSON files in "
        f"{root / 'train'}/*.json and {root / 'test'}/*.json (or under {root / 'data'}); "
        f"{source.how_to_get}"
    )


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.parent.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


class _NotQuantizable(Exception):
    """FEMNIST pixels that are not multiples of 1/255: store float32 instead of bytes."""


def _user_records(path: Path, source: LeafSource) -> Iterator[tuple[str, Any, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            blob = json.load(f)
        users, counts, data = blob["users"], blob["num_samples"], blob["user_data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is not a LEAF {source.name} JSON file with users, num_samples and "
            f"user_data ({type(e).__name__}: {e})"
        ) from None
    if len(users) != len(counts):
        raise ValueError(f"{path}: {len(users)} users but {len(counts)} num_samples entries")
    for user, count in zip(users, counts, strict=True):
        record = data.get(user)
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise ValueError(f"{path}: user {user!r} has no x and y in user_data")
        if len(record["x"]) != count or len(record["y"]) != count:
            raise ValueError(
                f"{path}: user {user!r} has {len(record['x'])} x and {len(record['y'])} y "
                f"but num_samples says {count}"
            )
        yield str(user), record["x"], record["y"]


def _encode(
    source: LeafSource, x: Any, y: Any, quantize: bool, where: str
) -> tuple[npt.NDArray[Any], npt.NDArray[np.uint8]]:
    if source.name == "shakespeare":
        if any(not isinstance(s, str) or len(s) != SHAKESPEARE_SEQ for s in x):
            raise ValueError(f"{where}: every x must be a string of {SHAKESPEARE_SEQ} characters")
        if any(not isinstance(s, str) or len(s) != 1 for s in y):
            raise ValueError(f"{where}: every y must be one character")
        raw = np.frombuffer("".join(x).encode("latin-1", "replace"), dtype=np.uint8)
        xs = _CHAR_INDEX[raw].reshape(len(x), SHAKESPEARE_SEQ)
        ys = _CHAR_INDEX[np.frombuffer("".join(y).encode("latin-1", "replace"), np.uint8)]
        return xs, ys
    arr = np.asarray(x, dtype=np.float32) if len(x) else np.zeros((0, FEMNIST_PIXELS))
    if arr.ndim != 2 or arr.shape[1] != FEMNIST_PIXELS or not np.isfinite(arr).all():
        raise ValueError(f"{where}: every x must be {FEMNIST_PIXELS} finite pixel values")
    labels = np.asarray(y, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= FEMNIST_CLASSES):
        raise ValueError(f"{where}: labels must be in [0, {FEMNIST_CLASSES})")
    if not quantize:
        return arr.astype(np.float32), labels.astype(np.uint8)
    scaled = arr * np.float32(255)
    q = np.rint(scaled)
    if arr.size and (np.abs(scaled - q).max() > 1e-3 or q.min() < 0 or q.max() > 255):
        raise _NotQuantizable
    return q.astype(np.uint8), labels.astype(np.uint8)


def _convert_split(
    source: LeafSource, files: list[Path], out: Path, split: str, quantize: bool
) -> tuple[dict[str, tuple[int, int]], int, str]:
    """Append every user's examples of ``files`` to ``out/SPLIT_x.bin`` and ``_y.bin``."""
    spans: dict[str, tuple[int, int]] = {}
    total = 0
    dtype = "uint8"
    fx: BinaryIO
    with open(out / f"{split}_x.bin", "wb") as fx, open(out / f"{split}_y.bin", "wb") as fy:
        for path in files:
            for user, x, y in _user_records(path, source):
                if user in spans:
                    raise ValueError(f"{path}: user {user!r} appears twice in the {split} split")
                xs, ys = _encode(source, x, y, quantize, f"{path} user {user!r}")
                dtype = str(xs.dtype)
                fx.write(np.ascontiguousarray(xs).tobytes())
                fy.write(ys.tobytes())
                spans[user] = (total, total + len(ys))
                total += len(ys)
    return spans, total, dtype


def convert(source: LeafSource, train_dir: Path, test_dir: Path, cache: Path) -> None:
    """Convert LEAF's JSON of ``train_dir`` and ``test_dir`` into the cache folder ``cache``.

    Written into a temporary sibling and renamed, so ``cache`` either holds a complete
    conversion or does not exist.
    """
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        quantize = source.name == "femnist"
        while True:
            try:
                meta: dict[str, Any] = {"version": _CACHE_VERSION, "name": source.name}
                spans = {}
                for split, folder in (("train", train_dir), ("test", test_dir)):
                    span, total, dtype = _convert_split(
                        source, _files(folder), tmp, split, quantize
                    )
                    spans[split] = span
                    meta[split] = {"examples": total, "dtype": dtype}
                break
            except _NotQuantizable:
                quantize = False  # pixels not on the 1/255 grid: keep them exactly
        meta["scale"] = 1 / 255 if quantize else 1.0
        users = sorted(set(spans["train"]) | set(spans["test"]))
        if not users:
            raise ValueError(f"{train_dir} and {test_dir} hold no LEAF users")
        for split in ("train", "test"):
            table = np.array([spans[split].get(u, (0, 0)) for u in users], dtype=np.int64)
            np.save(tmp / f"{split}_spans.npy", table)
        (tmp / "users.json").write_text(json.dumps(users))
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, cache)
        except OSError:
            if not (cache / "meta.json").exists():
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class LeafData:
    """A converted LEAF data set: memory-mapped examples and per-user spans.

    Opening one reads the user list and the span tables only; examples are read from the
    mapped files when a client's data is asked for.
    """

    def __init__(self, source: LeafSource, data_dir: str | Path) -> None:
        self.source = source
        train_dir, test_dir = split_dirs(source, data_dir)
        files = _files(train_dir) + _files(test_dir)
        root = cache_root(Path(data_dir).expanduser())
        self.cache = root / f"{source.name}-{_digest(files)}"
        self.converted = False
        if not (self.cache / "meta.json").exists():
            convert(source, train_dir, test_dir, self.cache)
            self.converted = True
        meta = json.loads((self.cache / "meta.json").read_text())
        self.users: list[str] = json.loads((self.cache / "users.json").read_text())
        self.scale = float(meta["scale"])
        self._x: dict[str, npt.NDArray[Any]] = {}
        self._y: dict[str, npt.NDArray[np.uint8]] = {}
        self.spans: dict[str, npt.NDArray[np.int64]] = {}
        row = int(np.prod(source.feature_shape))
        for split in ("train", "test"):
            n, dtype = int(meta[split]["examples"]), np.dtype(meta[split]["dtype"])
            self.spans[split] = np.load(self.cache / f"{split}_spans.npy")
            # np.memmap refuses empty files; an empty split needs no mapping.
            self._x[split] = (
                np.memmap(self.cache / f"{split}_x.bin", dtype=dtype, mode="r", shape=(n, row))
                if n
                else np.zeros((0, row), dtype=dtype)
            )
            self._y[split] = (
                np.memmap(self.cache / f"{split}_y.bin", dtype=np.uint8, mode="r", shape=(n,))
                if n
                else np.zeros(0, dtype=np.uint8)
            )

    def sizes(self, split: str) -> npt.NDArray[np.int64]:
        """Examples per user (in :attr:`users` order) in ``split``."""
        table = self.spans[split]
        out: npt.NDArray[np.int64] = table[:, 1] - table[:, 0]
        return out

    def user_data(self, user: int, split: str) -> ClientData:
        """User number ``user``'s examples of ``split`` as tensors (a copy, not a mapping)."""
        start, end = (int(v) for v in self.spans[split][user])
        x = np.array(self._x[split][start:end])
        y = torch.from_numpy(np.array(self._y[split][start:end], dtype=np.int64))
        shape = (end - start, *self.source.feature_shape)
        if self.source.name == "shakespeare":
            return ClientData(torch.from_numpy(x.astype(np.int64)).reshape(shape), y)
        pixels = x.astype(np.float32)
        if self.scale != 1.0:
            # In NumPy: one thread, where torch's pool stalls on a busy machine.
            np.multiply(pixels, np.float32(self.scale), out=pixels)
        return ClientData(torch.from_numpy(pixels).reshape(shape), y)


class LeafWorkload:
    """FEMNIST or Shakespeare over LEAF's natural partition (one client per user).

    Client ``k`` is LEAF user ``users[k]`` in sorted order; with ``num_clients`` below the
    number of users, a fixed seeded subset of users (kept in sorted order) takes part.
    ``client_data(k, "train"|"test")`` is that user's LEAF train or test split;
    ``test_data()`` concatenates the test splits of at most ``LEAF_TEST_CLIENTS`` clients (a
    fixed seeded subset).
    """

    def __init__(
        self,
        *,
        name: str,
        data_dir: str | Path,
        num_clients: int,
        seed: int,
        model: Callable[[], nn.Module],
    ) -> None:
        self.name = name
        self.source = SOURCES[name]
        self.num_classes = self.source.num_classes
        self.seed = seed
        self.data = LeafData(self.source, data_dir)
        total = len(self.data.users)
        if num_clients > total:
            raise ValueError(
                f"{name} in {data_dir} has {total} users; --clients must be at most {total} "
                "(LEAF's natural partition has one client per user)"
            )
        self.num_clients = num_clients
        if num_clients == total:
            self._users = np.arange(total, dtype=np.int64)
        else:
            picked = rng(seed, P_CLIENT_SUBSET).choice(total, size=num_clients, replace=False)
            self._users = np.sort(picked).astype(np.int64)
        self._model = model
        self._test: ClientData | None = None

    def make_model(self) -> nn.Module:
        return seeded_model(self.seed, self._model)

    def user(self, client_id: int) -> str:
        """The LEAF user name of ``client_id``."""
        return self.data.users[int(self._users[check_client_id(client_id, self.num_clients)])]

    def client_sizes(self, split: str = "train") -> npt.NDArray[np.int64]:
        """Examples per client in ``split`` (client order)."""
        out: npt.NDArray[np.int64] = self.data.sizes(check_split(split))[self._users]
        return out

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        k = check_client_id(client_id, self.num_clients)
        return self.data.user_data(int(self._users[k]), check_split(split))

    def test_clients(self) -> list[int]:
        """The (sorted) clients whose test splits form ``test_data``."""
        count = min(LEAF_TEST_CLIENTS, self.num_clients)
        if count == self.num_clients:
            return list(range(count))
        gen = rng(self.seed, P_CLIENT_SUBSET, self.num_clients)
        return sorted(int(c) for c in gen.choice(self.num_clients, size=count, replace=False))

    def test_data(self) -> ClientData:
        if self._test is None:
            parts = [self.client_data(k, "test") for k in self.test_clients()]
            self._test = concat(parts)
        return self._test
