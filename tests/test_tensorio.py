from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedlab import tensorio


def test_round_trip_keeps_values_dtypes_and_structure() -> None:
    obj = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": [
            torch.tensor(3, dtype=torch.int64),
            torch.ones(0),
            torch.zeros(2, dtype=torch.bfloat16),
        ],
        "c": {"x": 1, "y": 2.5, "z": None, "w": True, "s": "text", "n": float("nan")},
        "ints": {3: torch.ones(2, dtype=torch.float16), 10: "v"},
    }
    back = tensorio.loads(tensorio.dumps(obj))
    assert torch.equal(back["a"], obj["a"]) and back["a"].dtype == torch.float32
    assert back["b"][0].item() == 3 and back["b"][0].dtype == torch.int64
    assert back["b"][1].shape == (0,)
    assert back["b"][2].dtype == torch.bfloat16
    assert back["c"]["x"] == 1 and back["c"]["y"] == 2.5 and back["c"]["z"] is None
    assert back["c"]["w"] is True and back["c"]["s"] == "text" and math.isnan(back["c"]["n"])
    assert set(back["ints"]) == {3, 10} and back["ints"][3].dtype == torch.float16


@pytest.mark.parametrize("cut", [1, 10, 40, -1, -33])
def test_truncated_or_flipped_bytes_are_rejected(cut: int) -> None:
    data = bytearray(tensorio.dumps({"w": torch.randn(4, 4)}))
    with pytest.raises(tensorio.CorruptFileError):
        tensorio.loads(data[:cut])
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(tensorio.CorruptFileError, match="checksum"):
        tensorio.loads(flipped)


def test_random_bytes_never_crash_differently() -> None:
    gen = torch.Generator().manual_seed(0)
    good = tensorio.dumps({"w": torch.randn(3)})
    for i in range(200):
        noise = (
            torch.randint(
                0,
                256,
                (int(torch.randint(0, 200, (1,), generator=gen)),),
                generator=gen,
                dtype=torch.uint8,
            )
            .numpy()
            .tobytes()
        )
        blob = good[: i % len(good)] + noise
        with pytest.raises(tensorio.CorruptFileError):
            tensorio.loads(blob)


def test_no_pickle_objects_accepted() -> None:
    with pytest.raises(TypeError):
        tensorio.dumps({"f": object()})


def test_save_is_atomic_and_loadable(tmp_path: Path) -> None:
    p = tmp_path / "x.fl"
    tensorio.save(p, {"v": 1})
    tensorio.save(p, {"v": 2})
    assert tensorio.load(p) == {"v": 2}
    assert not list(tmp_path.glob("*.tmp"))


def test_unserializable_value_is_named_by_its_path() -> None:
    with pytest.raises(TypeError, match="cannot serialize object at /a/1/b"):
        tensorio.dumps({"a": [1, {"b": object()}]})
