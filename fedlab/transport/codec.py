"""Tensors on the wire: named tensors to and from streams of ``Tensor`` pieces.

A payload travels as a header, then pieces of at most :data:`PIECE_BYTES` bytes of tensor data,
then a CRC-32 of every data byte in stream order. :class:`Assembler` rebuilds the tensors one
piece at a time, checking names, dtypes, shapes, offsets, sizes and the checksum against limits
set before the first byte arrives, so a malformed or oversized stream is refused early and
never allocates more than it declared. Nothing is unpickled: bytes become tensors through
plain byte copies only.

Tensor bytes are the bulk of every payload, so they bypass protobuf's message objects, which
would copy each piece several times: :func:`encode` writes the protobuf wire format of a chunk
(``TaskChunk`` and ``UpdateChunk`` share it) straight from the tensors' memory with a single
copy, and :func:`decode` hands the received data fields on as views into the message buffer;
protobuf still parses every field but the data.
"""

from __future__ import annotations

import math
import os
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from google.protobuf.message import DecodeError

from fedlab.proto import fedlab_pb2 as pb
from fedlab.tensorio import DTYPES
from fedlab.types import Params

PIECE_BYTES = 2 << 20
"""Tensor bytes per message: well under gRPC's default 4 MiB message limit."""

RAW = "raw"
MAX_TENSORS = 100_000
MAX_NAME = 1024
MAX_DIMS = 32

# Field numbers and wire types of the chunk messages in protos/fedlab/proto/fedlab.proto.
_CHUNK_HEADER, _CHUNK_TENSORS, _CHUNK_CHECKSUM = 1, 2, 3
_TENSOR_DATA, _TENSOR_OFFSET = 5, 6
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5
# protobuf's own parser gives up on deeper nesting too (its recursion limit is 100).
_MAX_GROUP_DEPTH = 100


class WireError(ValueError):
    """A stream is malformed, oversized, or does not match its header or checksum."""


def checksum(data: bytes | memoryview, running: int = 0) -> int:
    """CRC-32 of ``data``, continuing ``running``.

    The checksum guards against bugs and corruption between the two ends' memory (a wrong
    offset, a truncated or reordered stream), not against attackers: TLS already authenticates
    every byte in transit, and a hostile peer could compute any digest it liked. CRC-32 catches
    every error burst up to 32 bits and misses random corruption with probability 2^-32, at a
    fraction of SHA-256's cost, which bounded the transfer rate of large models.
    """
    return zlib.crc32(data, running)


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return t.reshape(-1).view(torch.uint8).numpy().data.cast("B")


def payload_bytes(params: Params) -> int:
    """Total tensor bytes of ``params`` on the wire."""
    return sum(t.numel() * t.element_size() for t in params.values())


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def encode(params: Params, *, piece_bytes: int = PIECE_BYTES) -> Iterator[bytes]:
    """Serialized chunk messages carrying ``params``, the last one with the checksum.

    Each chunk holds at most ``piece_bytes`` tensor bytes: small tensors share a chunk, a large
    one spans several. Empty tensors travel as one piece with no data. The bytes equal
    protobuf's own serialization of the same message; only one chunk is in memory at a time.
    """
    parts: list[bytes | memoryview] = []
    room = piece_bytes
    crc = 0
    for name, tensor in params.items():
        if tensor.dtype not in DTYPES.values():
            raise WireError(f"tensor {name!r} has dtype {tensor.dtype}, which cannot travel")
        meta = pb.Tensor(
            name=name,
            dtype=str(tensor.dtype).removeprefix("torch."),
            shape=list(tensor.shape),
            codec=RAW,
        ).SerializeToString()
        raw = _raw(tensor)
        offset = 0
        while True:
            n = min(room, len(raw) - offset)
            data = raw[offset : offset + n]
            crc = checksum(data, crc)
            # Fields in number order, zeros omitted, as protobuf writes them.
            tail = _tag(_TENSOR_OFFSET, _VARINT) + _varint(offset) if offset else b""
            head = _tag(_TENSOR_DATA, _LEN) + _varint(n) if n else b""
            size = len(meta) + len(head) + n + len(tail)
            parts += (_tag(_CHUNK_TENSORS, _LEN) + _varint(size), meta, head, data, tail)
            offset += n
            room -= n
            if room <= 0:
                yield b"".join(parts)
                parts, room = [], piece_bytes
            if offset >= len(raw):
                break
    digest = crc.to_bytes(4, "big")
    parts += (_tag(_CHUNK_CHECKSUM, _LEN) + _varint(len(digest)), digest)
    yield b"".join(parts)


H = TypeVar("H", pb.TaskHeader, pb.UpdateHeader)


@dataclass
class Chunk(Generic[H]):
    """One received chunk: its header if it has one, its pieces, and the checksum if last.

    Each piece is the tensor's metadata with its data left out, and the data as a view into
    the received message.
    """

    header: H | None = None
    pieces: list[tuple[pb.Tensor, memoryview]] = field(default_factory=list)
    checksum: bytes = b""


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview, memoryview]]:
    """(field number, wire type, value, the field's whole encoding) for each field of ``buf``."""
    pos, end = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise WireError("truncated or overlong varint")
            b = buf[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return value

    def skip_group(number: int) -> None:
        nonlocal pos
        open_groups = [number]
        while open_groups:
            if pos >= end:
                raise WireError("a group runs past the end of its message")
            key = varint()
            inner, wire_type = key >> 3, key & 7
            if wire_type == _VARINT:
                varint()
            elif wire_type in (_I64, _I32, _LEN):
                n = varint() if wire_type == _LEN else 8 if wire_type == _I64 else 4
                if n > end - pos:
                    raise WireError("a field runs past the end of its message")
                pos += n
            elif wire_type == _SGROUP:
                if len(open_groups) >= _MAX_GROUP_DEPTH:
                    raise WireError("groups nested too deeply")
                open_groups.append(inner)
            elif wire_type == _EGROUP and inner == open_groups[-1]:
                open_groups.pop()
            else:
                raise WireError(f"unsupported wire type {wire_type} inside a group")

    while pos < end:
        start = pos
        key = varint()
        number, wire_type = key >> 3, key & 7
        value: int | memoryview
        if wire_type == _VARINT:
            value = varint()
        elif wire_type in (_I64, _I32, _LEN):
            n = varint() if wire_type == _LEN else 8 if wire_type == _I64 else 4
            if n > end - pos:
                raise WireError("a field runs past the end of its message")
            value = buf[pos : pos + n]
            pos += n
        elif wire_type == _SGROUP:
            # A (deprecated) group: protobuf keeps it as an unknown field, so skip to its end.
            skip_group(number)
            value = buf[start:pos]
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if number == 0:
            raise WireError("field number 0")
        yield number, wire_type, value, buf[start:pos]


def decode(buf: bytes, header: type[H]) -> Chunk[H]:
    """Parse a serialized ``TaskChunk`` (``header=pb.TaskHeader``) or ``UpdateChunk``.

    Field semantics follow protobuf's: a repeated message field merges, the last scalar wins,
    unknown fields are skipped.

    Raises:
        WireError: ``buf`` is not a well-formed chunk.
    """
    chunk: Chunk[H] = Chunk()
    try:
        for number, wire_type, value, _ in _fields(memoryview(buf)):
            if wire_type != _LEN or not isinstance(value, memoryview):
                continue
            if number == _CHUNK_HEADER:
                chunk.header = chunk.header or header()
                chunk.header.MergeFromString(bytes(value))
            elif number == _CHUNK_TENSORS:
                chunk.pieces.append(_piece(value))
            elif number == _CHUNK_CHECKSUM:
                chunk.checksum = bytes(value)
    except DecodeError as e:
        raise WireError(f"malformed chunk: {e}") from e
    return chunk


def _piece(buf: memoryview) -> tuple[pb.Tensor, memoryview]:
    rest: list[memoryview] = []
    data = memoryview(b"")
    for number, wire_type, value, whole in _fields(buf):
        if number == _TENSOR_DATA and wire_type == _LEN and isinstance(value, memoryview):
            data = value
        else:
            rest.append(whole)
    return pb.Tensor.FromString(b"".join(rest)), data


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
        self._crc = 0

    def add(self, piece: pb.Tensor, data: bytes | memoryview | None = None) -> None:
        """Take the next piece, in stream order, with its data (default: ``piece.data``)."""
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
        if data is None:
            data = piece.data
        end = self._filled + len(data)
        if end > nbytes:
            raise WireError(f"tensor {name[:64]!r}: more bytes than its shape holds")
        self._flat[self._filled : end] = np.frombuffer(data, dtype=np.uint8)
        self._filled = end
        self._received += len(data)
        self._crc = checksum(data, self._crc)

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

    def finish(self, digest: bytes) -> dict[str, torch.Tensor]:
        """Check the announced totals and the checksum; return the tensors."""
        self._close()
        if len(self.out) != self.tensors or self._received != self.total_bytes:
            raise WireError(
                f"stream ended after {len(self.out)} tensors and {self._received} bytes, "
                f"announced {self.tensors} and {self.total_bytes}"
            )
        if self._crc.to_bytes(4, "big") != digest:
            raise WireError("checksum mismatch: the payload was corrupted in transit")
        return self.out
