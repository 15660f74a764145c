"""Client stores: DiskStore round trips, memory bound, crash consistency, garbage collection."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from fedlab import tensorio
from fedlab.store import ClientStore, DiskStore, MemoryStore, StoreError
from fedlab.types import State


def state(value: float, size: int = 4) -> State:
    return {"h": {"w": torch.full((size,), value)}, "n": int(value) % 7, "tag": "x"}


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def referenced(index: State) -> set[str]:
    return {f"{c}.{g}.fl" for c, g in index["index"].items()}


def assert_same_state(a: State | None, b: State | None) -> None:
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    assert a["n"] == b["n"] and a["tag"] == b["tag"]
    assert torch.equal(a["h"]["w"], b["h"]["w"])


def test_round_trip(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    store.put(3, state(1.5))
    store.put(7, state(2.0))
    store.put(3, state(4.0))
    assert len(store) == 2
    assert_same_state(store.get(3), state(4.0))
    assert_same_state(store.get(7), state(2.0))
    assert store.get(5) is None
    store.put(7, None)
    store.put(3, {})
    assert len(store) == 0 and store.get(7) is None and store.get(3) is None
    # Nothing was checkpointed, so no file can be needed any more.
    assert files(tmp_path) == set()


def test_states_are_not_all_held_in_ram(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, cache_size=4)
    for c in range(100):
        store.put(c, state(float(c), size=256))
    assert store.cached <= 4
    for c in range(100):
        assert_same_state(store.get(c), state(float(c), size=256))
        assert store.cached <= 4
    assert len(list(tmp_path.glob("*.fl"))) == 100
    assert DiskStore(tmp_path / "none", cache_size=0).cached == 0


def test_crash_after_a_checkpoint_restores_it_and_cleans_stray_files(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    for c in range(5):
        store.put(c, state(float(c)))
    ckpt = tensorio.loads(tensorio.dumps(store.state_dict()))  # the checkpoint on disk
    store.checkpointed()
    for c in range(3):
        store.put(c, state(100.0 + c))  # newer states, never checkpointed
    store.put(4, None)
    store.put(9, state(9.0))
    # Crash: a new process opens the same directory and resumes from the checkpoint.
    resumed = DiskStore(tmp_path)
    resumed.load_state_dict(ckpt)
    assert len(resumed) == 5
    for c in range(5):
        assert_same_state(resumed.get(c), state(float(c)))
    assert resumed.get(9) is None
    assert files(tmp_path) == referenced(ckpt)
    # The resumed store writes new generations without clobbering the checkpointed ones.
    resumed.put(0, state(50.0))
    assert_same_state(resumed.get(1), state(1.0))
    fresh = DiskStore(tmp_path)
    fresh.load_state_dict(ckpt)
    assert_same_state(fresh.get(0), state(0.0))


def test_a_put_before_load_never_overwrites_a_checkpointed_file(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    store.put(0, state(1.0))
    ckpt = store.state_dict()
    store.checkpointed()
    other = DiskStore(tmp_path)
    other.put(0, state(2.0))
    again = DiskStore(tmp_path)
    again.load_state_dict(ckpt)
    assert_same_state(again.get(0), state(1.0))


def test_garbage_collection_keeps_exactly_the_last_two_checkpoints(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    rng = random.Random(0)
    history: list[State] = []
    for _ in range(8):
        for _ in range(6):
            c = rng.randrange(8)
            store.put(c, state(rng.random()) if rng.random() < 0.85 else None)
        history.append(store.state_dict())
        store.checkpointed()
        expected = referenced(history[-1]) | (
            referenced(history[-2]) if len(history) > 1 else set()
        )
        assert files(tmp_path) == expected
    # Both checkpoints still restore (the newest first: restoring the older one deletes the
    # files only the newer one refers to, as after a fallback to checkpoint.prev.fl).
    for ckpt in reversed(history[-2:]):
        other = DiskStore(tmp_path)
        other.load_state_dict(ckpt)
        assert {c for c in range(8) if other.get(c) is not None} == set(ckpt["index"])


def test_missing_or_corrupt_file_names_client_and_file(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, cache_size=0)
    store.put(4, state(1.0))
    ckpt = store.state_dict()
    store.checkpointed()
    (path,) = tmp_path.glob("4.*.fl")
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(StoreError, match=rf"client 4.*{path.name}.*corrupt"):
        store.get(4)
    path.unlink()
    with pytest.raises(StoreError, match=rf"client 4.*{path.name}.*missing"):
        store.get(4)
    with pytest.raises(StoreError, match="no DiskStore index"):
        DiskStore(tmp_path).load_state_dict({"states": {}})
    assert ckpt["index"] == {4: 0}


def test_memory_and_disk_stores_behave_identically(tmp_path: Path) -> None:
    rng = random.Random(42)
    stores: list[ClientStore] = [MemoryStore(), DiskStore(tmp_path / "a", cache_size=3)]
    saved: list[State] = []
    for step in range(400):
        op = rng.random()
        c = rng.randrange(12)
        if op < 0.45:
            value = state(float(step))
            for s in stores:
                s.put(c, value)
        elif op < 0.55:
            for s in stores:
                s.put(c, None)
        elif op < 0.9:
            a, b = (s.get(c) for s in stores)
            assert_same_state(a, b)
        elif op < 0.95:
            saved = [tensorio.loads(tensorio.dumps(s.state_dict())) for s in stores]
            for s in stores:
                s.checkpointed()
        elif saved:  # crash and resume both from their last checkpoint
            stores = [MemoryStore(), DiskStore(tmp_path / "a", cache_size=3)]
            for s, ckpt in zip(stores, saved, strict=True):
                s.load_state_dict(ckpt)
        assert len(stores[0]) == len(stores[1])
    for c in range(12):
        assert_same_state(stores[0].get(c), stores[1].get(c))
