"""Update codecs: the byte container every compressed tensor travels in, and baseline codecs.

A codec turns each floating-point tensor of a payload into one flat ``uint8`` tensor, stored
under the key ``NAME#CODEC``: a small header (the original dtype and shape) and then the codec's
own body. The bytes are the real message, so the same tensor travels unchanged over the network
as ``{name, dtype, shape, codec, bytes}``, and the bytes counted in ``metrics.jsonl`` are the
bytes a deployed client would send. Tensors that are not floating point (FRL's rankings) pass
through untouched.

With ``error_feedback`` a client adds what its previous encodings did not send (the residual,
kept in the client-state store) to its next update before encoding, so the compression error
is delayed rather than lost.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fedlab.transforms import TransformContext, UpdateTransform
from fedlab.types import Params, State

SEP = "#"
"""Separates an entry's name from the codec that encoded it (``conv1.weight#fedzip``)."""

DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def header(x: torch.Tensor) -> bytes:
    """The container header of ``x``: dtype code, number of dims, each dim as uint32."""
    if x.dtype not in DTYPES:
        raise ValueError(f"cannot encode dtype {x.dtype}; codecs take {DTYPES}")
    return struct.pack(f"<BB{x.dim()}I", DTYPES.index(x.dtype), x.dim(), *x.shape)


def read_header(data: bytes) -> tuple[torch.dtype, tuple[int, ...], int]:
    """``(dtype, shape, offset of the body)`` of a container; ``ValueError`` when malformed."""
    try:
        code, ndim = struct.unpack_from("<BB", data, 0)
        shape = struct.unpack_from(f"<{ndim}I", data, 2)
    except struct.error as e:
        raise ValueError(f"truncated tensor header: {e}") from e
    if code >= len(DTYPES):
        raise ValueError(f"unknown dtype code {code} in tensor header")
    return DTYPES[code], tuple(shape), 2 + 4 * ndim


def to_uint8(data: bytes) -> torch.Tensor:
    """``data`` as a flat ``uint8`` tensor (a copy, so the tensor owns writable memory)."""
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


@dataclass(frozen=True, kw_only=True)
class TensorCodec(UpdateTransform):
    """Base of the codecs: applies :meth:`compress` to every floating-point tensor.

    Subclasses set ``codec`` and implement :meth:`compress` and :meth:`expand`.

    Args:
        error_feedback: carry each client's residual (what was not sent) into its next update.
    """

    codec: ClassVar[str] = ""
    error_feedback: bool = False

    def compress(self, name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """The body encoding ``x`` (on the CPU), and exactly what :meth:`expand` will return."""
        raise NotImplementedError

    def expand(self, body: bytes, n: int, dtype: torch.dtype) -> torch.Tensor:
        """The ``n`` values of dtype ``dtype`` (flat) that ``body`` encodes."""
        raise NotImplementedError

    def encode(
        self, payload: Params, ctx: TransformContext, state: State | None
    ) -> tuple[Params, State | None]:
        """Encode every floating-point tensor; the state holds the residuals."""
        if payload and not any(v.is_floating_point() for v in payload.values()):
            # An empty payload (a client that uploads nothing this version) passes; one with
            # only integer tensors means the strategy's updates cannot be compressed at all.
            kinds = ", ".join(sorted({str(v.dtype) for v in payload.values()}))
            raise ValueError(
                f"--compress {self.codec} compresses floating-point updates, and this client's "
                f"payload holds only {kinds}: the strategy sends no plain float updates "
                "(run it without --compress)"
            )
        residuals = dict((state or {}).get("residual", {})) if self.error_feedback else {}
        out: dict[str, torch.Tensor] = {}
        kept: dict[str, torch.Tensor] = {}
        for name, x in payload.items():
            if SEP in name:
                raise ValueError(f"payload entry {name!r}: names may not contain {SEP!r}")
            if not x.is_floating_point():
                out[name] = x
                continue
            target = x.detach().cpu()
            old = residuals.get(name)
            if old is not None and old.shape == target.shape:
                target = target + old.to(target.dtype)
            body, sent = self.compress(name, target)
            out[name + SEP + self.codec] = to_uint8(header(target) + body)
            if self.error_feedback:
                kept[name] = target - sent
        return out, ({"residual": kept} if self.error_feedback else None)

    def decode(self, payload: Params, ctx: TransformContext) -> Params:
        """Expand every ``NAME#CODEC`` entry; refuse entries of another codec or malformed."""
        out: dict[str, torch.Tensor] = {}
        for key, v in payload.items():
            name, sep, codec = key.rpartition(SEP)
            if not sep:
                out[key] = v
                continue
            if codec != self.codec:
                raise ValueError(f"entry {key!r} is encoded with {codec!r}, not {self.codec!r}")
            if v.dtype != torch.uint8 or v.dim() != 1:
                raise ValueError(f"entry {key!r} must be a flat uint8 tensor, got {v.dtype}")
            data = v.cpu().numpy().tobytes()
            dtype, shape, offset = read_header(data)
            n = math.prod(shape)
            try:
                flat = self.expand(data[offset:], n, dtype)
            except (struct.error, IndexError, KeyError) as e:
                raise ValueError(f"entry {key!r} is malformed: {e}") from e
            if flat.numel() != n:
                raise ValueError(f"entry {key!r} decodes to {flat.numel()} values, not {n}")
            out[name] = flat.reshape(shape)
        return out


def _values(body: bytes, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` values of ``dtype`` stored at ``body[offset:]``."""
    size = torch.empty(0, dtype=dtype).element_size()
    chunk = body[offset : offset + count * size]
    if len(chunk) != count * size:
        raise ValueError(f"body holds {len(chunk)} bytes, {count * size} expected")
    return to_uint8(chunk).view(dtype)


@dataclass(frozen=True, kw_only=True)
class Float16(TensorCodec):
    """Half precision: 16 bits per entry; values beyond float16's range saturate at +-65504."""

    codec: ClassVar[str] = "float16"

    def compress(self, name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        finfo = torch.finfo(torch.float16)
        h = x.clamp(finfo.min, finfo.max).to(torch.float16).contiguous()
        return h.reshape(-1).view(torch.uint8).numpy().tobytes(), h.to(x.dtype)

    def expand(self, body: bytes, n: int, dtype: torch.dtype) -> torch.Tensor:
        return _values(body, 0, n, torch.float16).to(dtype)


@dataclass(frozen=True, kw_only=True)
class Int8(TensorCodec):
    """Symmetric 8-bit quantization with one float32 scale per tensor (max |x| / 127)."""

    codec: ClassVar[str] = "int8"

    def compress(self, name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        peak = float(x.abs().max()) if x.numel() else 0.0
        scale = np.float32(peak / 127.0 if math.isfinite(peak) and peak > 0 else 1.0)
        q = torch.round(x.to(torch.float32) / float(scale)).clamp(-127, 127).to(torch.int8)
        body = struct.pack("<f", scale) + q.reshape(-1).view(torch.uint8).numpy().tobytes()
        return body, (q.to(torch.float32) * float(scale)).to(x.dtype)

    def expand(self, body: bytes, n: int, dtype: torch.dtype) -> torch.Tensor:
        scale = float(struct.unpack_from("<f", body, 0)[0])
        return (_values(body, 4, n, torch.int8).to(torch.float32) * scale).to(dtype)


@dataclass(frozen=True, kw_only=True)
class TopK(TensorCodec):
    """The ``fraction`` of entries largest in magnitude, per tensor, as int32 indices and values.

    Args:
        fraction: share of each tensor's entries sent, in (0, 1] (at least one entry).
        error_feedback: carry the unsent entries into the client's next update.
    """

    codec: ClassVar[str] = "topk"
    fraction: float = 0.01

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"topk fraction must be in (0, 1], got {self.fraction}")

    def compress(self, name: str, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        flat = x.reshape(-1)
        k = min(flat.numel(), max(1, math.ceil(self.fraction * flat.numel())))
        idx = (
            torch.topk(flat.abs(), k, sorted=False).indices.sort().values
            if k
            else flat.new_empty(0, dtype=torch.long)
        )
        vals = flat[idx].contiguous()
        sent = torch.zeros_like(flat)
        sent[idx] = vals
        body = (
            struct.pack("<I", k)
            + idx.to(torch.int32).numpy().tobytes()
            + vals.view(torch.uint8).numpy().tobytes()
        )
        return body, sent.reshape(x.shape)

    def expand(self, body: bytes, n: int, dtype: torch.dtype) -> torch.Tensor:
        (k,) = struct.unpack_from("<I", body, 0)
        idx = _values(body, 4, k, torch.int32).to(torch.long)
        vals = _values(body, 4 + 4 * k, k, dtype)
        if k and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"topk index out of range for {n} entries")
        out = torch.zeros(n, dtype=dtype)
        out[idx] = vals
        return out
