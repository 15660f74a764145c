"""Update transforms: encode on the client, decode on the server.

Clipping, DP noise and compression are all transforms. A :class:`Pipeline` encodes in order and
decodes in reverse, and the same pipeline object runs in simulation and deployment, so what a
simulated client sends is byte-for-byte what a deployed one would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlab.types import ClientId, Params, State


def payload_bytes(payload: Params) -> int:
    """Bytes of the tensors in ``payload`` as they travel (names and framing not counted)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


@dataclass(frozen=True)
class TransformContext:
    """Whose update is being transformed; transforms derive randomness from it.

    ``config`` is the task's config on the client (a server-chosen setting such as an adaptive
    clipping norm reaches a transform this way); it is empty on the server.
    """

    client_id: ClientId
    version: int
    seed: int
    config: Mapping[str, Any] = field(default_factory=dict)


class UpdateTransform:
    """Base class: override both halves. ``encode`` may keep per-client state (error feedback)."""

    def encode(
        self, payload: Params, ctx: TransformContext, state: State | None
    ) -> tuple[Params, State | None]:
        """Client side: return the transformed payload and this client's new state."""
        raise NotImplementedError

    def decode(self, payload: Params, ctx: TransformContext) -> Params:
        """Server side: undo what :meth:`encode` did as far as it can be undone.

        The deployed server calls it on several threads at once (it checks each update before
        answering its client): it must not change shared state.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Pipeline:
    """A chain of transforms; an empty pipeline passes payloads through untouched."""

    transforms: Sequence[UpdateTransform] = ()

    def encode(
        self, payload: Params, ctx: TransformContext, state: State | None
    ) -> tuple[Params, State | None]:
        """Apply every transform in order; ``state`` maps transform index to its state."""
        if not self.transforms:
            return payload, state
        old = state or {}
        new: State = {}
        for i, t in enumerate(self.transforms):
            payload, s = t.encode(payload, ctx, old.get(str(i)))
            if s is not None:
                new[str(i)] = s
        return payload, new or None

    def decode(self, payload: Params, ctx: TransformContext) -> Params:
        """Undo the transforms in reverse order."""
        for t in reversed(self.transforms):
            payload = t.decode(payload, ctx)
        return payload
