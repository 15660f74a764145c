"""Per-client state kept between versions (FedStale memory, momenta, duals, error feedback).

In simulation the runtime keeps it here on the clients' behalf; a deployed client keeps its
own. The store is part of every checkpoint.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

from fedlab import tensorio
from fedlab.types import ClientId, ClientStore, State

__all__ = ["ClientStore", "DiskStore", "MemoryStore", "StoreError"]


class MemoryStore:
    """Client states in a dict; only clients that have state cost memory."""

    def __init__(self) -> None:
        self._states: dict[ClientId, State] = {}

    def get(self, client_id: ClientId) -> State | None:
        """The state last put for ``client_id``, or ``None``."""
        return self._states.get(client_id)

    def put(self, client_id: ClientId, state: State | None) -> None:
        """Keep ``state`` for ``client_id``; an empty or ``None`` state removes the entry."""
        if state:
            self._states[client_id] = state
        else:
            self._states.pop(client_id, None)

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._states

    def state_dict(self) -> State:
        """Everything needed to restore the store."""
        return {"states": dict(self._states)}

    def load_state_dict(self, state: State) -> None:
        """Restore from :meth:`state_dict`."""
        self._states = {int(k): v for k, v in state["states"].items()}

    def checkpointed(self) -> None:
        """Nothing to do: the checkpoint holds every state."""


class StoreError(RuntimeError):
    """A state file the store's index refers to is missing or corrupt."""


_STATE_FILE = re.compile(r"^(\d+)\.(\d+)\.fl$")


class DiskStore:
    """Client states in files under a directory; only a small LRU of states is held in RAM.

    Every :meth:`put` writes a new file ``{client}.{generation}.fl`` (a per-store counter that
    only grows), so a file a checkpoint refers to is never overwritten. The checkpoint holds
    just the index ``{client: generation}`` and the counter. After :meth:`checkpointed`, files
    referenced by neither of the last two checkpoints (the engine keeps the previous one as a
    fallback) nor by the live index are deleted; :meth:`load_state_dict` deletes the files a
    crash left behind after the checkpoint it restores.

    Args:
        directory: where the files go; created if missing.
        cache_size: how many recently used states to keep in RAM (0 keeps none).
    """

    def __init__(self, directory: str | os.PathLike[str], *, cache_size: int = 16) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cache_size = cache_size
        self._index: dict[ClientId, int] = {}
        self._cache: OrderedDict[ClientId, State] = OrderedDict()
        # Start past every file already here, so a put before load_state_dict never
        # overwrites a file an existing checkpoint may refer to.
        self._next = max((gen for _, gen in self._files()), default=-1) + 1
        # Indexes of the last two checkpoints (oldest first), and the one state_dict handed
        # out most recently, which becomes the latest when checkpointed() confirms it.
        self._checkpoints: list[tuple[dict[ClientId, int], int]] = []
        self._pending: tuple[dict[ClientId, int], int] | None = None

    @property
    def cached(self) -> int:
        """How many states are held in RAM right now (at most ``cache_size``)."""
        return len(self._cache)

    def _path(self, client_id: ClientId, generation: int) -> Path:
        return self.directory / f"{client_id}.{generation}.fl"

    def _files(self) -> list[tuple[Path, int]]:
        out = []
        for path in self.directory.iterdir():
            m = _STATE_FILE.match(path.name)
            if m:
                out.append((path, int(m.group(2))))
        return out

    def _remember(self, client_id: ClientId, state: State) -> None:
        if self.cache_size == 0:
            return
        self._cache[client_id] = state
        self._cache.move_to_end(client_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _unreferenced(self, generation: int) -> bool:
        # Files written after the newest snapshot handed out cannot be in any checkpoint.
        newest = max(
            [n for _, n in self._checkpoints] + ([self._pending[1]] if self._pending else [0])
        )
        return generation >= newest

    def _drop(self, client_id: ClientId) -> None:
        old = self._index.pop(client_id, None)
        self._cache.pop(client_id, None)
        if old is not None and self._unreferenced(old):
            self._path(client_id, old).unlink(missing_ok=True)

    def get(self, client_id: ClientId) -> State | None:
        """The state last put for ``client_id``, or ``None``.

        Raises:
            StoreError: the file the index names is missing or corrupt.
        """
        generation = self._index.get(client_id)
        if generation is None:
            return None
        cached = self._cache.get(client_id)
        if cached is not None:
            self._cache.move_to_end(client_id)
            return cached
        path = self._path(client_id, generation)
        try:
            state = tensorio.load(path)
        except FileNotFoundError:
            raise StoreError(f"state of client {client_id}: file {path} is missing") from None
        except tensorio.CorruptFileError as e:
            raise StoreError(f"state of client {client_id}: file {path} is corrupt: {e}") from e
        if not isinstance(state, dict):
            raise StoreError(f"state of client {client_id}: file {path} holds no state dict")
        self._remember(client_id, state)
        return state

    def put(self, client_id: ClientId, state: State | None) -> None:
        """Write ``state`` for ``client_id`` to a new file; an empty or ``None`` state removes
        the entry (its file stays while a checkpoint may refer to it)."""
        self._drop(client_id)
        if not state:
            return
        generation = self._next
        self._next += 1
        tensorio.save(self._path(client_id, generation), state)
        self._index[client_id] = generation
        self._remember(client_id, state)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._index

    def state_dict(self) -> State:
        """The index ``{client: generation}`` and the counter: small, whatever the states."""
        self._pending = (dict(self._index), self._next)
        return {"index": dict(self._index), "next": self._next}

    def load_state_dict(self, state: State) -> None:
        """Restore the index of a checkpoint and delete files written after it.

        Raises:
            StoreError: ``state`` is not a :class:`DiskStore` state.
        """
        if "index" not in state or "next" not in state:
            raise StoreError(
                "the checkpoint holds no DiskStore index (was it written with memory='memory'?)"
            )
        self._index = {int(c): int(g) for c, g in state["index"].items()}
        self._next = int(state["next"])
        self._cache.clear()
        self._checkpoints = [(dict(self._index), self._next)]
        self._pending = None
        for path, generation in self._files():
            if generation >= self._next:  # a crash left it after the checkpoint
                path.unlink(missing_ok=True)
        for tmp in self.directory.glob("*.fl.tmp"):
            tmp.unlink(missing_ok=True)

    def checkpointed(self) -> None:
        """Keep the files of the last two checkpoints and the live index; delete the rest."""
        if self._pending is None:
            return
        self._checkpoints = [*self._checkpoints, self._pending][-2:]
        self._pending = None
        keep = {g for index, _ in self._checkpoints for g in index.values()}
        keep.update(self._index.values())
        for path, generation in self._files():
            if generation not in keep:
                path.unlink(missing_ok=True)
        for tmp in self.directory.glob("*.fl.tmp"):
            tmp.unlink(missing_ok=True)
