"""The final model in the formats other tools load: safetensors and a PyTorch state dict.

fedlab's own ``model.fl`` (:mod:`fedlab.tensorio`) carries a checksum and reads back without
pickle, but nothing else reads it. ``model.safetensors`` is what the ecosystem loads
(``safetensors.torch.load_file``, Hugging Face ``from_pretrained``). The format is small and
documented (https://github.com/huggingface/safetensors#format), so it is written here without
the ``safetensors`` package:

* 8 bytes: ``N``, the header length, an unsigned little-endian 64-bit integer;
* ``N`` bytes: a UTF-8 JSON object ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
  plus an optional ``"__metadata__"`` object of strings, padded with spaces to a multiple of 8;
* the tensors' raw little-endian bytes, back to back, offsets counted from the end of the header.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

from fedlab import tensorio
from fedlab.checkpoint import CHECKPOINT

MODEL = "model.fl"
SAFETENSORS = "model.safetensors"
STATE_DICT = "model.pt"
FORMATS = {"safetensors": SAFETENSORS, "pt-state-dict": STATE_DICT}

# torch attribute -> safetensors name; unsigned 16/32/64 appeared in torch 2.3, so the table
# keeps only the dtypes this torch has.
_NAMES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}
DTYPES: dict[torch.dtype, str] = {
    getattr(torch, a): n
    for a, n in _NAMES.items()
    if isinstance(getattr(torch, a, None), torch.dtype)
}
_FROM_NAME = {v: k for k, v in DTYPES.items()}
# A header larger than this is not a model file (the reference reader's own limit).
_MAX_HEADER = 100_000_000


def _raw(t: torch.Tensor) -> bytes:
    """The tensor's bytes, row-major and little-endian."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    data = flat.view(torch.uint8).numpy().tobytes()
    if sys.byteorder == "big" and flat.element_size() > 1:  # pragma: no cover
        data = flat.numpy().byteswap().tobytes()
    return data


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """``tensors`` (and string ``metadata``) in the safetensors format.

    Raises:
        ValueError: a value is not a tensor, has a dtype safetensors lacks, or a name is the
            reserved ``__metadata__``.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named '__metadata__' in safetensors")
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name!r} has dtype {t.dtype}, which safetensors cannot store")
        data = _raw(t)
        header[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a safetensors file (any writer's) into CPU tensors.

    Raises:
        ValueError: the file is truncated, its header is not the format's JSON, or a tensor's
            offsets do not match its dtype and shape.
    """
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file: shorter than its 8-byte header size")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ValueError(f"{path} is not a safetensors file: header size {n} is impossible")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    body = memoryview(data)[8 + n :]
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _FROM_NAME[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry") from e
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if any(s < 0 for s in shape) or not 0 <= begin <= end <= len(body) or end - begin != size:
            raise ValueError(f"{path}: tensor {name!r} does not fit its offsets")
        raw = bytearray(body[begin:end])
        flat = (
            torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
            if raw
            else torch.empty(0, dtype=dtype)
        )
        out[name] = flat.reshape(shape)
    return out


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically."""
    _atomic_write(Path(path), safetensors_bytes(tensors, metadata))


def save_state_dict(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` as a plain PyTorch state dict (``torch.load(path)`` reads it back)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def final_params(run_dir: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str]:
    """The run's final model and the file it came from.

    ``model.fl`` is written when a run ends; a run that was stopped early has only its
    checkpoint, whose params are the model of the last finished version.

    Raises:
        FileNotFoundError: ``run_dir`` holds neither.
    """
    run_dir = Path(run_dir)
    model = run_dir / MODEL
    if model.exists():
        params = tensorio.load(model)
        return dict(params), MODEL
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.exists():
        return dict(tensorio.load(checkpoint)["params"]), CHECKPOINT
    raise FileNotFoundError(
        f"{run_dir} holds neither {MODEL} nor {CHECKPOINT}: is it a fedlab run directory?"
    )


def export(
    run_dir: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the run's final model in format ``fmt`` (default path: inside ``run_dir``).

    Raises:
        ValueError: unknown format.
        FileNotFoundError: no model in ``run_dir``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    params, _ = final_params(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / FORMATS[fmt]
    if fmt == "safetensors":
        save_safetensors(path, params, metadata)
    else:
        save_state_dict(path, params)
    return path
