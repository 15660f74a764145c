"""What keeps one enrolled client from destroying the global model.

Validation rejects non-finite updates, but finite values can still be hostile: every entry at
``3e38``, or ``1e20`` claiming ``2**62`` examples, overflows a float32 weighted sum. Three
defences meet here, at the engine's seams: bounds on each update (its claimed example count
and, optionally, the L2 norm of its payload), float64 accumulation in the strategies' sums,
and a check of every aggregate before the engine commits it (:func:`non_finite`), with
:class:`StagedStore` holding the strategy's writes to the per-client store until then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedlab.store import ClientStore
from fedlab.strategy import UpdateRejected, all_finite
from fedlab.types import ClientId, Params, State, Update

MAX_NUM_EXAMPLES = 2**31 - 1
"""The default largest ``num_examples`` an update may claim: far above any one client's data,
and small enough that float64 weights over a billion clients stay exact and finite."""

NUM_EXAMPLES_CEILING = 2**53
"""The largest ``max_num_examples`` allowed: every count up to it is an exact float64."""


def payload_norm(payload: Params) -> float:
    """The L2 norm over every floating entry of ``payload``, accumulated in float64.

    Integer entries (FRL's rankings) carry no magnitude and are left out.
    """
    total = 0.0
    for t in payload.values():
        if t.is_floating_point():
            total += float(t.detach().double().pow(2).sum())
    return math.sqrt(total)


def check_update(update: Update, *, max_num_examples: int, max_norm: float | None) -> None:
    """Raise :class:`UpdateRejected` when ``update`` breaks the server's bounds.

    Args:
        update: a decoded update whose payload the strategy has validated (finite entries).
        max_num_examples: the largest example count a client may claim.
        max_norm: the largest L2 norm of the payload (``None``: no bound).
    """
    what = f"update from client {update.client_id}"
    n = update.num_examples
    if n < 0:
        raise UpdateRejected(f"{what}: negative num_examples")
    if n > max_num_examples:
        raise UpdateRejected(
            f"{what}: num_examples {n} exceeds the server's max_num_examples {max_num_examples}"
        )
    if max_norm is not None:
        norm = payload_norm(update.payload)
        if not norm <= max_norm:  # an overflowing float64 norm is inf and refused too
            raise UpdateRejected(
                f"{what}: update norm {norm:.4g} exceeds the server's max_update_norm {max_norm:g}"
            )


def non_finite(new: Any, old: Any = None, path: str = "") -> str | None:
    """The path of the first NaN or Inf in ``new`` that ``old`` did not already hold there.

    Walks dicts, lists and tuples of tensors and numbers. A value that is the very object at
    the same path of ``old`` (an unchanged tensor) is skipped, and so is an infinite float
    equal to the one there: a strategy may hold ``inf`` as a setting from its ``init`` (an
    unclipped ``clip_norm``), which no update put there. NaN is never carried over.

    Returns:
        ``None`` when every new value is finite, else a path such as ``params['fc.weight']``.
    """
    if new is old and old is not None:
        return None
    if isinstance(new, torch.Tensor):
        return None if all_finite(new) else path
    if isinstance(new, float):
        if math.isfinite(new) or (math.isinf(new) and isinstance(old, float) and new == old):
            return None
        return path
    if isinstance(new, Mapping):
        for key, value in new.items():
            prev = old.get(key) if isinstance(old, Mapping) else None
            bad = non_finite(value, prev, f"{path}[{key!r}]")
            if bad is not None:
                return bad
        return None
    if isinstance(new, list | tuple):
        for i, value in enumerate(new):
            prev = old[i] if isinstance(old, list | tuple) and i < len(old) else None
            bad = non_finite(value, prev, f"{path}[{i}]")
            if bad is not None:
                return bad
    return None


class StagedStore:
    """A :class:`~fedlab.store.ClientStore` view whose writes wait for :meth:`commit`.

    The engine hands one to ``Strategy.aggregate``: when the aggregate is dropped, what the
    strategy wrote to the per-client store (FedStale's remembered updates) is dropped with it,
    so store and strategy state stay consistent with each other.
    """

    def __init__(self, base: ClientStore) -> None:
        self.base = base
        self._staged: dict[ClientId, State | None] = {}

    def get(self, client_id: ClientId) -> State | None:
        """The staged state of ``client_id`` if there is one, else the stored one."""
        if client_id in self._staged:
            return self._staged[client_id]
        return self.base.get(client_id)

    def put(self, client_id: ClientId, state: State | None) -> None:
        """Stage ``state`` for ``client_id`` (empty or ``None`` stages a removal)."""
        self._staged[client_id] = state or None

    def __contains__(self, client_id: object) -> bool:
        if client_id in self._staged:
            return self._staged[client_id] is not None
        return client_id in self.base

    def __len__(self) -> int:
        n = len(self.base)
        for cid, state in self._staged.items():
            n += (state is not None) - (cid in self.base)
        return n

    def state_dict(self) -> State:
        """Refused: only the engine checkpoints the store, after :meth:`commit`."""
        raise RuntimeError("a staged store is not checkpointed; commit it first")

    def load_state_dict(self, state: State) -> None:
        """Refused, like :meth:`state_dict`."""
        raise RuntimeError("a staged store is not restored; restore its base store")

    def checkpointed(self) -> None:
        """Refused, like :meth:`state_dict`."""
        raise RuntimeError("a staged store is not checkpointed; commit it first")

    def commit(self) -> None:
        """Write every staged state to the base store, in the order they were put."""
        for cid, state in self._staged.items():
            self.base.put(cid, state)
        self._staged.clear()
