"""The sequential backend: clients trained one after another in this process, on one model
(``--backend inprocess``, or what ``--backend auto`` picks where batching would not pay)."""

from __future__ import annotations

from fedlab.client import ClientRuntime
from fedlab.sim.transport import Job
from fedlab.types import ClientId, State, Update


class InProcessExecutor:
    """Runs each job lazily when its result is asked for, on one persistent runtime."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self._queued: dict[ClientId, Job] = {}

    def submit(self, job: Job) -> None:
        self._queued[job.client_id] = job

    def result(self, client_id: ClientId) -> tuple[Update, State]:
        job = self._queued.pop(client_id)
        return self.runtime.run(job.client_id, job.task, job.state)

    def close(self) -> None:
        self._queued.clear()
