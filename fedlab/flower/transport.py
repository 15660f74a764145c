"""The engine's transport over a Flower ``Grid``: tasks pushed, replies pulled as they arrive."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from flwr.app import (
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid

from fedlab.flower.records import (
    NODE_UNAVAILABLE,
    PAYLOAD,
    examples_of,
    log,
    params_from_record,
    task_content,
    widened_names,
)
from fedlab.strategy import floating
from fedlab.transport import Failure
from fedlab.types import ClientId, State, Task, Update


class GridTransport:
    """A :class:`~fedlab.transport.Transport` over a Flower ``Grid``, on the wall clock.

    ``submit`` queues a ``train`` message; ``next_update`` pushes what is queued, then pulls
    replies of every outstanding message as they arrive, so the engine's asynchronous
    triggers work as in any deployment. An error reply (the ClientApp raised, the message's
    TTL expired, the node went offline) is a :class:`~fedlab.transport.Failure`.

    Args:
        grid: the ServerApp's grid.
        nodes: the node id of each client id (``nodes[cid]``).
        deltas: turn replies that carry trained weights (Flower's convention) into deltas
            against the task's params; otherwise only fedlab payloads are accepted.
        ttl: each message's time to live in seconds (``None``: Flower's default, 12 hours).
        poll_interval: seconds between pulls while waiting.
        retry_after: a failure because the node is offline is reported this many seconds
            late, so that an asynchronous engine does not re-task an offline node in a loop.
    """

    def __init__(
        self,
        grid: Grid,
        nodes: Sequence[int],
        *,
        deltas: bool = False,
        ttl: float | None = None,
        poll_interval: float = 0.1,
        retry_after: float = 5.0,
    ) -> None:
        self.grid = grid
        self.nodes = list(nodes)
        self.deltas = deltas
        self.ttl = ttl
        self.poll_interval = poll_interval
        self.retry_after = retry_after
        self._start = time.monotonic()
        self._offset = 0.0
        self._queued: list[tuple[Message, ClientId, Task]] = []
        self._outstanding: dict[str, tuple[ClientId, Task]] = {}
        self._ready: deque[Update | Failure] = deque()
        self._held: list[tuple[float, Failure]] = []

    def clients(self) -> int:
        return len(self.nodes)

    def now(self) -> float:
        return self._offset + time.monotonic() - self._start

    def submit(self, client_id: ClientId, task: Task) -> None:
        message = Message(
            task_content(client_id, task),
            dst_node_id=self.nodes[client_id],
            message_type=MessageType.TRAIN,
            ttl=self.ttl,
            group_id=str(task.version),
        )
        self._queued.append((message, client_id, task))

    def _flush(self) -> None:
        if not self._queued:
            return
        queued, self._queued = self._queued, []
        pushed = set(self.grid.push_messages([m for m, _, _ in queued]))
        for message, cid, task in queued:
            mid = message.metadata.message_id
            if mid and mid in pushed:
                self._outstanding[mid] = (cid, task)
            else:
                self._ready.append(Failure(cid, task.version, "the SuperLink refused the task"))

    def _event(self, reply: Message) -> Update | Failure | None:
        entry = self._outstanding.pop(reply.metadata.reply_to_message_id, None)
        if entry is None:
            return None
        cid, task = entry
        if reply.has_error():
            reason = f"Flower error {reply.error.code}: {reply.error.reason}"
            failure = Failure(cid, task.version, reason)
            if reply.error.code == NODE_UNAVAILABLE and self.retry_after > 0:
                self._held.append((self.now() + self.retry_after, failure))
                return None
            return failure
        try:
            return self._update(cid, task, reply.content)
        except ValueError as e:
            log.warning("fedlab: malformed reply from client %d: %s", cid, e)
            return Failure(cid, task.version, f"malformed reply: {e}")

    def _update(self, cid: ClientId, task: Task, content: RecordDict) -> Update:
        n, metrics = examples_of(content)
        records = content.array_records
        if PAYLOAD in records:
            payload = params_from_record(records[PAYLOAD], widened_names(content))
        elif self.deltas and len(records) == 1:
            weights = params_from_record(next(iter(records.values())))
            base = floating(task.params)
            # Entries the model does not train (integer buffers) are not part of a delta;
            # anything else unexpected stays in, for validation to name it.
            payload = {
                k: v.to(base[k].dtype) - base[k] if k in base and v.shape == base[k].shape else v
                for k, v in weights.items()
                if k in base or k not in task.params
            }
        else:
            raise ValueError(
                f"expected an ArrayRecord {PAYLOAD!r} (a fedlab ClientApp)"
                + (" or one ArrayRecord of trained weights" if self.deltas else "")
                + f", got {sorted(records)}"
            )
        return Update(cid, task.version, payload, n, metrics)

    def _release(self) -> None:
        now = self.now()
        due = [f for t, f in self._held if t <= now]
        self._held = [(t, f) for t, f in self._held if t > now]
        self._ready.extend(due)

    def next_update(self, timeout: float | None) -> Update | Failure | None:
        self._flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._release()
            if self._ready:
                return self._ready.popleft()
            if not self._outstanding and not self._held:
                if deadline is not None:
                    time.sleep(max(0.0, deadline - time.monotonic()))  # a Period's window
                return None
            if self._outstanding:
                replies = list(self.grid.pull_messages(list(self._outstanding)))
                events = [e for e in map(self._event, replies) if e is not None]
                # One pull may bring several replies: order them the same way every time.
                self._ready.extend(sorted(events, key=lambda e: e.client_id))
                if self._ready:
                    continue
            if deadline is not None and time.monotonic() >= deadline:
                return None
            wait = self.poll_interval
            if deadline is not None:
                wait = min(wait, max(0.0, deadline - time.monotonic()))
            time.sleep(wait)

    def state_dict(self) -> State:
        return {"now": self.now()}

    def load_state_dict(self, state: State) -> None:
        # The clock goes on from the checkpoint, so a Period's deadline still lies ahead.
        self._offset = float(state["now"])
        self._start = time.monotonic()

    def close(self) -> None:
        self._queued = []
        self._outstanding = {}
