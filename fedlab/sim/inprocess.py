"""The sequential backend: clients trained one after another in this process, on one model
(``--backend inprocess``, or what ``--backend auto`` picks where batching would not pay)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlab.client import ClientRuntime
from fedlab.sim.transport import Job
from fedlab.types import ClientId, State, Update

if TYPE_CHECKING:
    from fedlab.evaluation import EvalTask, LocalEvaluation, Scores


class InProcessExecutor:
    """Runs each job lazily when its result is asked for, on one persistent runtime."""

    def __init__(self, runtime: ClientRuntime) -> None:
        self.runtime = runtime
        self._queued: dict[ClientId, Job] = {}
        self._evaluation: LocalEvaluation | None = None

    def submit(self, job: Job) -> None:
        self._queued[job.client_id] = job

    def result(self, client_id: ClientId) -> tuple[Update, State]:
        job = self._queued.pop(client_id)
        return self.runtime.run(job.client_id, job.task, job.state)

    def evaluate(self, task: EvalTask) -> Scores:
        """``task``'s clients one after another, on a model of their own: the training model
        (and its train/eval mode) stays as training left it."""
        from fedlab.evaluation import LocalEvaluation

        if self._evaluation is None:
            self._evaluation = LocalEvaluation.of(self.runtime)
        return self._evaluation(task)

    def close(self) -> None:
        self._queued.clear()
