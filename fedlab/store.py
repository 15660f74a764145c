"""Per-client state kept between versions (FedStale memory, momenta, duals, error feedback).

In simulation the runtime keeps it here on the clients' behalf; a deployed client keeps its
own. The store is part of every checkpoint.
"""

from __future__ import annotations

from typing import Protocol

from fedlab.types import ClientId, State


class ClientStore(Protocol):
    """Per-client state, keyed by client id."""

    def get(self, client_id: ClientId) -> State | None:
        """The state last put for ``client_id``, or ``None``."""
        ...

    def put(self, client_id: ClientId, state: State | None) -> None:
        """Keep ``state`` for ``client_id``; an empty or ``None`` state removes the entry."""
        ...

    def __len__(self) -> int: ...

    def state_dict(self) -> State:
        """What a checkpoint must hold to restore the store as it is now."""
        ...

    def load_state_dict(self, state: State) -> None:
        """Restore from :meth:`state_dict`."""
        ...

    def checkpointed(self) -> None:
        """Called once a checkpoint holding :meth:`state_dict` is safely on disk."""
        ...


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

    def state_dict(self) -> State:
        """Everything needed to restore the store."""
        return {"states": dict(self._states)}

    def load_state_dict(self, state: State) -> None:
        """Restore from :meth:`state_dict`."""
        self._states = {int(k): v for k, v in state["states"].items()}

    def checkpointed(self) -> None:
        """Nothing to do: the checkpoint holds every state."""
