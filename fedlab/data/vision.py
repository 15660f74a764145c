"""CIFAR-10 and CIFAR-100 from the official binary archives (``--data-dir``).

The files are parsed here rather than through torchvision: the binary version is a flat
sequence of fixed-size records (CIFAR-10: one label byte and 3072 pixel bytes; CIFAR-100: a
coarse and a fine label byte, then the pixels, channel-major 32x32), so reading it needs no
unpickling and no optional dependency, and the tests can write tiny files in the same layout
that go through the very code real files take. The python-pickle version of the archives is
not read (unpickling runs code named by the file).

Clients split the 50,000 training images with the central-data partitioners
(:class:`~fedlab.data.partition.LabelPartition`; Dirichlet label skew by default); the 10,000
test images are the global test set, and a client's own test data is a label-matched share of
them. Client batches are augmented as usual for CIFAR (random 32x32 crop of the image padded
by 4, random horizontal flip), drawn from the client's training stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedlab.data.base import (
    ClientData,
    IntArray,
    seeded_model,
)
from fedlab.data.partition import LabelPartitioned, LabelSplit

_PIXELS = 3 * 32 * 32
# Per-channel mean and standard deviation of the CIFAR-10 training images, the usual
# normalisation (CIFAR-100's differ in the second decimal; one pair keeps the code simple).
_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
_STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)
_PAD = 4


@dataclass(frozen=True)
class CifarSource:
    """The layout of one CIFAR binary archive."""

    name: str
    num_classes: int
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_bytes: int  # bytes before the pixels; the last of them is the (fine) label


SOURCES = {
    "cifar10": CifarSource(
        name="cifar10",
        num_classes=10,
        folder="cifar-10-batches-bin",
        train=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test=("test_batch.bin",),
        label_bytes=1,
    ),
    "cifar100": CifarSource(
        name="cifar100",
        num_classes=100,
        folder="cifar-100-binary",
        train=("train.bin",),
        test=("test.bin",),
        label_bytes=2,
    ),
}


def find_files(source: CifarSource, data_dir: str | Path) -> Path:
    """The folder holding ``source``'s binary files: ``data_dir`` itself or its archive folder.

    Raises:
        FileNotFoundError: one line naming the files expected and where to get them.
    """
    root = Path(data_dir).expanduser()
    for base in (root / source.folder, root):
        if all((base / f).is_file() for f in (*source.train, *source.test)):
            return base
    names = ", ".join((*source.train, *source.test))
    raise FileNotFoundError(
        f"{source.name} data not found: expected {names} in {root / source.folder} (or in "
        f"{root}); download the CIFAR 'binary version' archive from the CIFAR dataset page of "
        "the University of Toronto and extract it into that folder"
    )


def read_records(source: CifarSource, paths: list[Path]) -> tuple[npt.NDArray[np.uint8], IntArray]:
    """``(images (n, 3, 32, 32) uint8, fine labels)`` from binary CIFAR files."""
    record = source.label_bytes + _PIXELS
    xs, ys = [], []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % record:
            raise ValueError(
                f"{path} is not a {source.name} binary file: {raw.size} bytes is not a "
                f"multiple of its {record}-byte records"
            )
        rows = raw.reshape(-1, record)
        labels = rows[:, source.label_bytes - 1].astype(np.int64)
        if labels.max() >= source.num_classes:
            raise ValueError(
                f"{path} has label {int(labels.max())}; {source.name} has "
                f"{source.num_classes} classes (is it the other CIFAR?)"
            )
        xs.append(rows[:, source.label_bytes :].reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def normalize(images: npt.NDArray[np.uint8]) -> torch.Tensor:
    """uint8 ``(n, 3, 32, 32)`` images as normalised float32."""
    # In NumPy: one thread, where torch's pool stalls on a busy machine.
    x = images.astype(np.float32) / np.float32(255)
    return torch.from_numpy(np.ascontiguousarray((x - _MEAN) / _STD))


def crop_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """CIFAR's standard augmentation of a batch ``(b, c, h, w)``: each image zero-padded by 4,
    a random ``h x w`` crop of it, flipped left-right with probability 1/2; every draw from
    ``generator`` (the client's training stream), so training stays reproducible."""
    b, c, h, w = x.shape
    if b == 0:
        return x
    padded = nn.functional.pad(x, (_PAD, _PAD, _PAD, _PAD))
    offsets = torch.randint(0, 2 * _PAD + 1, (b, 2), generator=generator).to(x.device)
    flips = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (b, h)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (b, w)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def _block(cin: int, cout: int) -> list[nn.Module]:
    # GroupNorm, not BatchNorm: it normalises each example on its own, so per-record DP-SGD
    # gradients stay per record, and small non-IID client batches need no running statistics.
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU()]


def image_cnn(channels: int, num_classes: int) -> nn.Module:
    """A VGG-style CNN with GroupNorm for small images of any size: 32-32, 64-64 and 128
    channels of 3x3 convolutions with 2x2 max-pooling between, global average pooling and a
    linear classifier (about 0.3 M parameters)."""
    return nn.Sequential(
        *_block(channels, 32),
        *_block(32, 32),
        nn.MaxPool2d(2),
        *_block(32, 64),
        *_block(64, 64),
        nn.MaxPool2d(2),
        *_block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def cifar_models(num_classes: int) -> dict[str, Callable[[], nn.Module]]:
    """The built-in models of a CIFAR workload."""
    return {"cnn": lambda: image_cnn(3, num_classes)}


class CifarWorkload(LabelPartitioned):
    """CIFAR-10 or CIFAR-100 partitioned by label over clients.

    The decoded archives stay in memory as uint8 (150 MB for the training split); client
    ``k``'s images are normalised when asked for. ``client_data(k)`` carries the crop-and-flip
    augmentation, applied by the training loop to each batch; ``client_data(k, "test")`` and
    ``test_data()`` are not augmented.
    """

    def __init__(
        self,
        *,
        name: str,
        data_dir: str | Path,
        num_clients: int,
        seed: int,
        split: LabelSplit,
        model: Callable[[], nn.Module],
    ) -> None:
        self.name = name
        source = SOURCES[name]
        self._model = model
        folder = find_files(source, data_dir)
        self._x_train, y_train = read_records(source, [folder / f for f in source.train])
        self._x_test, y_test = read_records(source, [folder / f for f in source.test])
        super().__init__(
            train_labels=y_train,
            test_labels=y_test,
            num_classes=source.num_classes,
            num_clients=num_clients,
            seed=seed,
            split=split,
        )
        self._test: ClientData | None = None

    def make_model(self) -> nn.Module:
        return seeded_model(self.seed, self._model)

    def _test_examples(self, idx: IntArray) -> ClientData:
        return ClientData(normalize(self._x_test[idx]), torch.from_numpy(self.y_test[idx]))

    def _train_examples(self, client_id: int, idx: IntArray) -> ClientData:
        return ClientData(
            normalize(self._x_train[idx]), torch.from_numpy(self.y_train[idx]), augment=crop_flip
        )

    def test_data(self) -> ClientData:
        if self._test is None:
            self._test = ClientData(normalize(self._x_test), torch.from_numpy(self.y_test))
        return self._test
