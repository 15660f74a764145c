"""The simulation transport: a virtual clock in front of an executor that trains clients.

Tasks finish in virtual-time order (ties broken by client id), whatever order the executor
computes them in, so a run gives the same result with one worker or fifty.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fedlab.sim.clock import LatencyModel, SpeedModel
from fedlab.store import MemoryStore
from fedlab.transport import Failure
from fedlab.types import ClientId, State, Task, Update

if TYPE_CHECKING:
    from fedlab.evaluation import EvalTask, Scores


@dataclass(frozen=True)
class Job:
    """One client's training task as given to an executor."""

    client_id: ClientId
    task: Task
    state: State | None


class Executor(Protocol):
    """Computes jobs, possibly in parallel; results are fetched by client id. Federated
    evaluation (``--eval-clients``) runs on the same workers, between versions."""

    def submit(self, job: Job) -> None:
        """Queue ``job``; a client has at most one job at a time."""
        ...

    def result(self, client_id: ClientId) -> tuple[Update, State]:
        """Block until ``client_id``'s job is done; return its update and new client state."""
        ...

    def evaluate(self, task: EvalTask) -> Scores:
        """Each of ``task``'s clients' test figures, in its client order (blocks)."""
        ...

    def close(self) -> None:
        """Release workers."""
        ...


class SimTransport:
    """A :class:`~fedlab.transport.Transport` with a virtual clock.

    Args:
        executor: trains the clients.
        num_clients: population size.
        speeds: per-client compute speed.
        store: per-client state kept between versions on the clients' behalf.
        latency: per-task upload latency added to the compute time (``None``: none).
    """

    def __init__(
        self,
        *,
        executor: Executor,
        num_clients: int,
        speeds: SpeedModel,
        store: MemoryStore | None = None,
        latency: LatencyModel | None = None,
    ) -> None:
        self.executor = executor
        self.num_clients = num_clients
        self.speeds = speeds
        self.latency = latency
        self.store = store if store is not None else MemoryStore()
        self._now = 0.0
        self._heap: list[tuple[float, ClientId]] = []
        self._jobs: dict[ClientId, int] = {}  # client -> version of its job
        self._restored: dict[ClientId, float] = {}

    def clients(self) -> int:
        return self.num_clients

    def now(self) -> float:
        return self._now

    def submit(self, client_id: ClientId, task: Task) -> None:
        if client_id in self._jobs:
            raise RuntimeError(f"client {client_id} already has a task")
        finish = self._restored.pop(client_id, None)
        if finish is None:
            # Work is in the unit the task trains for: epochs when given, otherwise steps.
            epochs = float(task.config.get("local_epochs") or 0)
            work = epochs if epochs > 0 else float(task.config.get("local_steps") or 1)
            duration = self.speeds.duration(client_id, work)
            if self.latency is not None:
                duration += self.latency.delay(client_id, task.version)
            finish = self._now + duration
        heapq.heappush(self._heap, (finish, client_id))
        self._jobs[client_id] = task.version
        self.executor.submit(Job(client_id, task, self.store.get(client_id)))

    def next_update(self, timeout: float | None) -> Update | Failure | None:
        if not self._heap:
            if timeout is not None:
                self._now += timeout
            return None
        finish, cid = self._heap[0]
        if timeout is not None and finish > self._now + timeout:
            self._now += timeout
            return None
        heapq.heappop(self._heap)
        self._now = max(self._now, finish)
        del self._jobs[cid]
        update, state = self.executor.result(cid)
        self.store.put(cid, state)
        return update

    def state_dict(self) -> State:
        return {
            "now": self._now,
            "schedule": {cid: finish for finish, cid in self._heap},
            "store": self.store.state_dict(),
        }

    def load_state_dict(self, state: State) -> None:
        if self._heap:
            raise RuntimeError("load_state_dict must come before any submit")
        self._now = float(state["now"])
        self._restored = {int(c): float(f) for c, f in state["schedule"].items()}
        self.store.load_state_dict(state["store"])

    def close(self) -> None:
        self.executor.close()
