"""The seam between the engine and the clients.

The engine drives any :class:`Transport`: the simulation backends in :mod:`fedlab.sim` (virtual
clock) and the gRPC server (wall clock). This package is the only one that imports the
generated protocol code in :mod:`fedlab.proto`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fedlab.types import ClientId, State, Task, Update


@dataclass(frozen=True)
class Failure:
    """A client gave up on its task (crashed, disconnected, timed out on its side), or the
    transport refused the update it sent for it (``refused``: malformed, non-finite metrics,
    too large, or rejected by the engine's check). Either way the task is over: the engine
    counts a refused one as rejected."""

    client_id: ClientId
    version: int
    reason: str = ""
    refused: bool = False


@dataclass(frozen=True)
class Checked:
    """An update that passed the engine's check in the transport (see :class:`Transport`).

    ``update`` is what the client sent; ``decoded`` is the same update with its payload
    decoded by that check, so the engine does not decode it twice (it validates it again).
    """

    update: Update
    decoded: Update


UpdateCheck = Callable[[Update], Update | str]
"""The engine's check of an update as received: its decoded form, or why it is rejected."""


class Transport(Protocol):
    """What the engine needs from whatever carries tasks and updates.

    A transport that answers its clients (the gRPC server) may also define
    ``check_updates(check: UpdateCheck)``, where ``check`` is the engine's own update check
    (:meth:`fedlab.engine.Engine.check`): the engine installs it at construction, and the
    transport runs it on each update before it answers the client. On a reason it refuses the
    update (and reports a ``refused`` :class:`Failure`) instead of handing it over; otherwise
    it hands over a :class:`Checked` with the decoded update. Optional, so not a member of
    this protocol: a transport that cannot answer clients (simulation, Flower) leaves it out,
    and the engine validates whatever it receives anyway.
    """

    def clients(self) -> int:
        """Size of the client population (ids ``0 .. n - 1``)."""
        ...

    def submit(self, client_id: ClientId, task: Task) -> None:
        """Hand ``task`` to ``client_id``."""
        ...

    def next_update(self, timeout: float | None) -> Update | Checked | Failure | None:
        """The next finished task, or ``None`` once ``timeout`` seconds pass with none.

        With ``timeout=None`` wait as long as any task is outstanding; return ``None`` at once
        when none is.
        """
        ...

    def now(self) -> float:
        """Seconds on this transport's clock."""
        ...

    def state_dict(self) -> State:
        """What a checkpoint must hold to continue bit-identically."""
        ...

    def load_state_dict(self, state: State) -> None:
        """Restore from :meth:`state_dict` before in-flight tasks are submitted again."""
        ...

    def close(self) -> None:
        """Release workers, actors or sockets."""
        ...
