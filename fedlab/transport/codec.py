"""Tensors on the wire: named tensors to and from streams of ``Tensor`` pieces.

A payload travels as a header, then pieces of at most :data:`PIECE_BYTES` bytes of tensor data,
then the SHA-256 of every data byte in stream order. :class:`Assembler` rebuilds the tensors one
piece at a time, checking names, dtypes, shapes, offsets, sizes and the checksum against limits
set before the first byte arrives, so a malformed or oversized stream is refused early and
never allocates more than it declared. Nothing is unpickled: bytes become tensors through
plain byte copies only.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from fedlab.proto import fedlab_pb2 as pb
from fedlab.tensorio import DTYPES
from fedlab.types import Params

PIECE_BYTES = 2 << 20
"""Tensor bytes per message: well under gRPC's default 4 MiB message limit."""

RAW = "raw"
MAX_TENSORS = 100_000
MAX_NAME = 1024
MAX_DIMS = 32


class WireError(ValueError):
    """A stream is malformed, oversized, or does not match its header or checksum."""


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def payload_bytes(params: Params) -> int:
    """Total tensor bytes of ``params`` on the wire."""
    return sum(t.numel() * t.element_size() for t in params.values())


def pieces(params: Params, *, piece_bytes: int = PIECE_BYTES) -> Iterator[list[pb.Tensor]]:
    """Split ``params`` into lists of pieces, each list holding at most ``piece_bytes`` bytes.

    Small tensors share a message; a large one spans several. Empty tensors travel as one
    piece with no data. Only the bytes of one message are copied at a time.
    """
    batch: list[pb.Tensor] = []
    room = piece_bytes
    for name, tensor in params.items():
        if tensor.dtype not in DTYPES.values():
            raise WireError(f"tensor {name!r} has dtype {tensor.dtype}, which cannot travel")
        dtype = str(tensor.dtype).removeprefix("torch.")
        shape = list(tensor.shape)
        raw = _raw(tensor)
        offset = 0
        while True:
            n = min(room, len(raw) - offset)
            batch.append(
                pb.Tensor(
                    name=name,
                    dtype=dtype,
                    shape=shape,
                    codec=RAW,
                    data=bytes(raw[offset : offset + n]),
                    offset=offset,
                )
            )
            offset += n
            room -= n
            if room <= 0:
                yield batch
                batch, room = [], piece_bytes
            if offset >= len(raw):
                break
    if batch:
        yield batch


def digest(chunks: Iterator[list[pb.Tensor]]) -> Iterator[tuple[list[pb.Tensor], bytes]]:
    """Pass ``chunks`` through, pairing the last one with the SHA-256 of all their data.

    Every chunk but the last is paired with ``b""``; an empty stream yields one empty chunk.
    """
    h = hashlib.sha256()
    previous: list[pb.Tensor] | None = None
    for chunk in chunks:
        if previous is not None:
            yield previous, b""
        for t in chunk:
            h.update(t.data)
        previous = chunk
    yield previous or [], h.digest()


class Assembler:
    """Rebuilds named tensors from pieces, within limits fixed by a header.

    Args:
        total_bytes: tensor bytes the header announced.
        tensors: number of tensors the header announced.
        max_bytes: the most tensor bytes this stream may carry.
        spool: a directory to receive the tensors into, as memory-mapped files unlinked at
            once (``None``: in RAM). Their pages belong to the page cache, which the kernel
            writes back and reclaims, so the server's own memory does not grow with the
            number of large updates it holds; the disk space goes with the tensors.

    Raises:
        WireError: from the constructor or :meth:`add` / :meth:`finish` on any violation.
    """

    def __init__(
        self, *, total_bytes: int, tensors: int, max_bytes: int, spool: Path | None = None
    ) -> None:
        if total_bytes > max_bytes:
            raise WireError(f"payload of {total_bytes} bytes exceeds the limit of {max_bytes}")
        if tensors > MAX_TENSORS:
            raise WireError(f"payload of {tensors} tensors exceeds the limit of {MAX_TENSORS}")
        self.total_bytes = total_bytes
        self.tensors = tensors
        self.out: dict[str, torch.Tensor] = {}
        self.spool = spool
        self._current: str | None = None
        self._tensor = torch.empty(0)
        self._flat: npt.NDArray[np.uint8] = np.empty(0, dtype=np.uint8)
        self._filled = 0
        self._meta: tuple[str, tuple[int, ...], int] = ("", (), 0)
        self._received = 0
        self._declared = 0
        self._hash = hashlib.sha256()

    def add(self, piece: pb.Tensor) -> None:
        """Take the next piece, in stream order."""
        name = piece.name
        if piece.codec != RAW:
            raise WireError(f"tensor {name[:64]!r}: unsupported codec {piece.codec[:32]!r}")
        if name != self._current:
            self._close()
            self._open(piece)
        dtype, shape, nbytes = self._meta
        if piece.dtype != dtype or tuple(piece.shape) != shape:
            raise WireError(f"tensor {name[:64]!r}: dtype or shape changed between pieces")
        if piece.offset != self._filled:
            raise WireError(
                f"tensor {name[:64]!r}: piece at offset {piece.offset}, expected {self._filled}"
            )
        data = piece.data
        end = self._filled + len(data)
        if end > nbytes:
            raise WireError(f"tensor {name[:64]!r}: more bytes than its shape holds")
        self._flat[self._filled : end] = np.frombuffer(data, dtype=np.uint8)
        self._filled = end
        self._received += len(data)
        self._hash.update(data)

    def _open(self, piece: pb.Tensor) -> None:
        name = piece.name
        if not name or len(name) > MAX_NAME:
            raise WireError("a tensor has an empty or overlong name")
        if name in self.out:
            raise WireError(f"tensor {name[:64]!r} appears twice")
        if len(self.out) >= self.tensors:
            raise WireError(f"more tensors than the {self.tensors} announced")
        dtype = DTYPES.get(piece.dtype)
        if dtype is None:
            raise WireError(f"tensor {name[:64]!r}: unknown dtype {piece.dtype[:32]!r}")
        shape = tuple(int(s) for s in piece.shape)
        if len(shape) > MAX_DIMS or any(s < 0 for s in shape):
            raise WireError(f"tensor {name[:64]!r}: invalid shape")
        itemsize = torch.empty((), dtype=dtype).element_size()
        # Python ints do not overflow: a huge shape is caught here, before any allocation.
        nbytes = math.prod(shape) * itemsize
        if self._declared + nbytes > self.total_bytes:
            raise WireError(f"tensor {name[:64]!r}: shape exceeds the announced payload size")
        self._declared += nbytes
        self._current = name
        self._meta = (piece.dtype, shape, nbytes)
        # Allocated once at its announced size, which the limits above have bounded.
        flat = self._allocate(nbytes)
        self._tensor = flat.view(dtype).reshape(shape)
        self._flat = flat.numpy()
        self._filled = 0

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.spool is None or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8)
        fd, path = tempfile.mkstemp(dir=self.spool, suffix=".part")
        try:
            os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
        try:
            return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        finally:
            os.unlink(path)  # the mapping keeps the file alive until the tensor is freed

    def _close(self) -> None:
        if self._current is None:
            return
        nbytes = self._meta[2]
        if self._filled != nbytes:
            raise WireError(
                f"tensor {self._current[:64]!r}: {self._filled} bytes for a shape of {nbytes}"
            )
        self.out[self._current] = self._tensor
        self._current = None
        self._tensor = torch.empty(0)
        self._flat = np.empty(0, dtype=np.uint8)

    def finish(self, sha256: bytes) -> dict[str, torch.Tensor]:
        """Check the announced totals and the checksum; return the tensors."""
        self._close()
        if len(self.out) != self.tensors or self._received != self.total_bytes:
            raise WireError(
                f"stream ended after {len(self.out)} tensors and {self._received} bytes, "
                f"announced {self.tensors} and {self.total_bytes}"
            )
        if self._hash.digest() != sha256:
            raise WireError("checksum mismatch: the payload was corrupted in transit")
        return self.out
