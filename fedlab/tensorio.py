"""Pickle-free serialization of nested state with tensors, for checkpoints and stores.

A file is ``MAGIC | header length | JSON header | tensor bytes | SHA-256 of all before``. The
header describes the tree (dicts, lists, numbers, strings, booleans, ``None``) with tensors
replaced by references into the byte area. Loading never executes code, checks every offset
and the checksum, and raises :class:`CorruptFileError` with a reason on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

MAGIC = b"FEDLAB\x00\x01"
_EMPTY = memoryview(b"")
_DIGEST = 32
# The dtypes a file (or the wire) may carry, by name without "torch.".
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    )
}


class CorruptFileError(ValueError):
    """A serialized blob is truncated, tampered with or not a fedlab file."""


def dumps(obj: Any, *, share: bool = False) -> bytes:
    """Serialize a nested structure of containers, scalars and tensors.

    With ``share``, a tensor that appears more than once (the same memory, shape and strides:
    the same object, or a view of it made by ``detach()``) is written once and every place
    refers to it; :func:`loads` then returns one tensor object for all of them. Without it
    each place gets its own bytes and, once loaded, its own tensor.
    """
    head, chunks = _encode(obj, share)
    body = head + b"".join(chunks)
    return body + hashlib.sha256(body).digest()


def _encode(obj: Any, share: bool) -> tuple[bytes, list[memoryview]]:
    """The file's start (magic, header length, header) and the tensors' bytes, uncopied."""
    chunks: list[memoryview] = []
    metas: list[dict[str, Any]] = []
    offset = 0
    seen: dict[tuple[Any, ...], int] = {}

    def enc(o: Any, path: str = "") -> Any:
        nonlocal offset
        if isinstance(o, torch.Tensor):
            key = _identity(o) if share else None
            if key is not None and key in seen:
                return {"t": seen[key]}
            t = o.detach().to("cpu").contiguous()
            # A view of the tensor's own memory (kept alive by the view): no copy until written.
            raw = t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else _EMPTY
            metas.append(
                {
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "shape": list(t.shape),
                    "offset": offset,
                    "nbytes": raw.nbytes,
                }
            )
            chunks.append(raw)
            offset += raw.nbytes
            if key is not None:
                seen[key] = len(metas) - 1
            return {"t": len(metas) - 1}
        if isinstance(o, bool) or o is None or isinstance(o, str | int):
            return {"v": o}
        if isinstance(o, float):
            # JSON has no NaN/Inf literal in strict mode; keep them exact as strings.
            return {"f": repr(o)} if not math.isfinite(o) else {"v": o}
        if isinstance(o, dict):
            if all(isinstance(k, str) for k in o):
                return {"d": {k: enc(v, f"{path}/{k}") for k, v in o.items()}}
            if all(isinstance(k, int) and not isinstance(k, bool) for k in o):
                return {"di": [[k, enc(v, f"{path}/{k}")] for k, v in o.items()]}
            raise TypeError(f"dict keys at {path or '/'} must be all str or all int")
        if isinstance(o, list | tuple):
            return {"l": [enc(v, f"{path}/{i}") for i, v in enumerate(o)]}
        raise TypeError(f"cannot serialize {type(o).__name__} at {path or '/'}")

    tree = enc(obj)
    header = json.dumps({"tree": tree, "tensors": metas}, allow_nan=False).encode()
    return MAGIC + struct.pack("<Q", len(header)) + header, chunks


def _identity(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same bytes: the memory they view and how they view it."""
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        tuple(t.stride()),
        t.dtype,
    )


def loads(data: bytes | bytearray | memoryview) -> Any:
    """Inverse of :func:`dumps`; raises :class:`CorruptFileError` on any inconsistency."""
    buf = memoryview(data)
    fixed = len(MAGIC) + 8
    if len(buf) < fixed + _DIGEST or bytes(buf[: len(MAGIC)]) != MAGIC:
        raise CorruptFileError("not a fedlab file (bad magic or too short)")
    if hashlib.sha256(buf[:-_DIGEST]).digest() != bytes(buf[-_DIGEST:]):
        raise CorruptFileError("checksum mismatch: the file is truncated or corrupted")
    (hlen,) = struct.unpack("<Q", buf[len(MAGIC) : fixed])
    if fixed + hlen > len(buf) - _DIGEST:
        raise CorruptFileError("header length exceeds the file")
    try:
        header = json.loads(bytes(buf[fixed : fixed + hlen]))
        metas = header["tensors"]
        tree = header["tree"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptFileError(f"malformed header: {e}") from e
    area = bytearray(buf[fixed + hlen : len(buf) - _DIGEST])
    tensors = [_tensor(area, m) for m in metas]

    def dec(node: Any) -> Any:
        if not isinstance(node, dict) or len(node) != 1:
            raise CorruptFileError("malformed tree node")
        ((kind, val),) = node.items()
        if kind == "v":
            return val
        if kind == "f":
            return float(val)
        if kind == "t":
            if not isinstance(val, int) or not 0 <= val < len(tensors):
                raise CorruptFileError("tensor reference out of range")
            return tensors[val]
        if kind == "d":
            return {str(k): dec(v) for k, v in val.items()}
        if kind == "di":
            return {int(k): dec(v) for k, v in val}
        if kind == "l":
            return [dec(v) for v in val]
        raise CorruptFileError(f"unknown tree node kind {kind!r}")

    try:
        return dec(tree)
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CorruptFileError):
            raise
        raise CorruptFileError(f"malformed tree: {e}") from e


def _tensor(area: bytearray, meta: Any) -> torch.Tensor:
    try:
        dtype = DTYPES[meta["dtype"]]
        shape = [int(s) for s in meta["shape"]]
        offset, nbytes = int(meta["offset"]), int(meta["nbytes"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"malformed tensor entry: {e}") from e
    numel = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if min(shape, default=0) < 0 or numel * itemsize != nbytes:
        raise CorruptFileError("tensor shape does not match its byte count")
    if offset < 0 or offset + nbytes > len(area):
        raise CorruptFileError("tensor bytes lie outside the file")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(area, dtype=torch.uint8, count=nbytes, offset=offset)
    return raw.view(dtype).reshape(shape)


def save(path: str | os.PathLike[str], obj: Any, *, share: bool = False) -> None:
    """Write ``obj`` to ``path`` atomically: a crash leaves the old file or the new one.

    ``share`` writes a tensor that appears more than once only once (see :func:`dumps`).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    head, chunks = _encode(obj, share)
    digest = hashlib.sha256(head)
    with open(tmp, "wb") as f:
        # Streamed from the tensors' memory: no copy of the whole file is made.
        f.write(head)
        for chunk in chunks:
            digest.update(chunk)
            f.write(chunk)
        f.write(digest.digest())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike[str]) -> Any:
    """Read a file written by :func:`save`."""
    with open(path, "rb") as f:
        return loads(f.read())
