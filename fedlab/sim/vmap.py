"""The vectorised backend: every queued client trained as one batched computation.

Where the in-process backend trains one client after another, this executor waits until the
transport asks for a result and then trains every job queued so far at once, with
:func:`fedlab.clients.sgd_vmap.fit_batched` (``torch.func``: each client has its own slice of
params stacked along a leading dimension, so jobs of different versions share a call). Jobs
go in chunks sized from a memory budget, and results are handed back one by one, so the
virtual clock, asynchronous triggers, resume and the update pipeline see exactly what the
in-process backend gives them, up to floating-point rounding.

Client halves and models that cannot be batched (see
:func:`~fedlab.clients.sgd_vmap.batchable` and
:func:`~fedlab.clients.sgd_vmap.unbatchable_model`) are trained by the sequential loop,
announced by one log line, never silently.

Federated evaluation (``--eval-clients``) is batched too: :meth:`VmapExecutor.evaluate` hands
it to :func:`fedlab.clients.eval_vmap.evaluate_batched`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedlab.client import ClientRuntime
from fedlab.sim.transport import Job
from fedlab.types import ClientId, State, Update

if TYPE_CHECKING:
    from fedlab.clients.sgd import LocalSGD
    from fedlab.clients.sgd_vmap import BatchItem
    from fedlab.evaluation import EvalTask, LocalEvaluation, Scores

__all__ = ["VmapExecutor", "auto_chunk", "why_not_batched"]

log = logging.getLogger(__name__)

# The CPU memory a chunk may take when nothing says otherwise: enough for hundreds of small
# models at once, little enough for a shared machine.
_CPU_BUDGET = 1 << 30
# Share of the free device memory a chunk may take on a GPU (the rest: data, allocator slack).
_GPU_SHARE = 0.5
# Copies of the params a client holds during a batched call: trained, start, gradient,
# momentum buffer and the delta handed back.
_PARAM_COPIES = 5
# Activation bytes per example are counted from one forward; backward keeps about as much
# again, and the per-record temporaries of the loss a little more.
_ACTIVATION_FACTOR = 3


class VmapExecutor:
    """Trains every queued job in one batched call when the first result is asked for.

    Args:
        runtime: the worker's runtime (model, data cache, client half, transforms).
        chunk: clients per batched call; 0 sizes chunks from ``budget`` bytes.
        budget: bytes a chunk may take (default: 1 GiB on CPU, or a quarter of the machine's
            memory if less; half the free GPU memory).
    """

    def __init__(self, runtime: ClientRuntime, chunk: int = 0, budget: int = 0) -> None:
        if chunk < 0 or budget < 0:
            raise ValueError(f"chunk and budget must be >= 0, got {chunk} and {budget}")
        self.runtime = runtime
        self.chunk = chunk
        self.budget = budget
        self._queued: dict[ClientId, Job] = {}
        self._done: dict[ClientId, tuple[Update, State]] = {}
        self._announced: set[str] = set()
        # Every line announced, in order: a Ray actor hands them to the driver, since actor
        # logs do not reach it.
        self.notices: list[str] = []
        self._announced_eval: set[str] = set()
        self._chunks: dict[tuple[object, ...], int] = {}
        self._model_reason = _objective_reason(runtime) or _model_reason(runtime.model)
        self._evaluation: LocalEvaluation | None = None

    def submit(self, job: Job) -> None:
        if job.client_id in self._queued or job.client_id in self._done:
            raise RuntimeError(f"client {job.client_id} already has a job")
        self._queued[job.client_id] = job

    def result(self, client_id: ClientId) -> tuple[Update, State]:
        if client_id not in self._done:
            if client_id not in self._queued:
                raise RuntimeError(f"client {client_id} has no job")
            self._run_queued()
        return self._done.pop(client_id)

    def evaluate(self, task: EvalTask) -> Scores:
        """``task``'s clients at once with :func:`fedlab.clients.eval_vmap.evaluate_batched`
        (chunked like training); one after another where personalisation cannot be batched
        (the reasons training has, or augmented data), announced by one log line."""
        from fedlab.clients.eval_vmap import evaluate_batched
        from fedlab.evaluation import LocalEvaluation

        if self._evaluation is None:
            self._evaluation = LocalEvaluation.of(self.runtime)
        # Without personalisation one model tests everybody: any model and objective batch.
        reason = self._model_reason if task.personalize else ""
        if not reason:
            try:
                return evaluate_batched(
                    self._evaluation, task, chunk=self.chunk, budget=self.budget
                )
            except (RuntimeError, NotImplementedError) as e:
                # As in training: nothing was changed, and an error of the evaluation itself
                # is raised again by the sequential loop.
                reason = (
                    f"batched evaluation failed ({(str(e).splitlines() or [type(e).__name__])[0]})"
                )
        if reason not in self._announced_eval:
            self._announced_eval.add(reason)
            self._notice(f"fedlab: vmap backend evaluates clients one by one: {reason}")
        return self._evaluation(task)

    def close(self) -> None:
        self._queued.clear()
        self._done.clear()

    def _run_queued(self) -> None:
        from fedlab.clients.sgd import LocalSGD
        from fedlab.clients.sgd_vmap import BatchItem, batchable, fit_batched

        jobs = list(self._queued.values())
        self._queued.clear()
        algorithm = self.runtime.algorithm
        reason = self._model_reason or (
            ""
            if batchable(algorithm)
            else f"client half {type(algorithm).__name__} trains "
            "with its own fit(), which is not batched"
        )
        if reason:
            self._one_by_one(jobs, reason)
            return
        assert isinstance(algorithm, LocalSGD)  # batchable() said so
        start = 0
        try:
            items = [
                BatchItem(
                    data=self.runtime.data(job.client_id),
                    task=job.task,
                    state=(job.state or {}).get("client"),
                    ctx=self.runtime.context(job.client_id),
                )
                for job in jobs
            ]
            augmented = any(it.data.augment is not None for it in items)
            if not augmented:
                size = self.chunk or self._auto_chunk(algorithm, items)
                for start in range(0, len(jobs), size):
                    fits = fit_batched(algorithm, self.runtime.model, items[start : start + size])
                    for job, fit in zip(jobs[start : start + size], fits, strict=True):
                        self._done[job.client_id] = self.runtime.complete(
                            job.client_id, job.task, job.state, fit
                        )
        except Exception as e:
            # A model torch.func cannot batch (data-dependent control flow, an op without a
            # batching rule), or an error of one task: nothing of the jobs not done yet was
            # changed, so the sequential loop takes them over, and raises a task's own error
            # again there, as the TrainingError that names its client and version.
            first = (str(e).splitlines() or [type(e).__name__])[0]
            self._model_reason = f"batched training of this model failed ({first})"
            self._one_by_one(jobs[start:], self._model_reason)
            return
        if augmented:  # outside the try: a task's own error is not a batching failure
            self._model_reason = AUGMENTED
            self._one_by_one(jobs, AUGMENTED)

    def _one_by_one(self, jobs: list[Job], reason: str) -> None:
        """Train ``jobs`` with the sequential loop, having said why (once per reason)."""
        self._announce(reason)
        for job in jobs:
            self._done[job.client_id] = self.runtime.run(job.client_id, job.task, job.state)

    def _auto_chunk(self, algorithm: LocalSGD, items: list[BatchItem]) -> int:
        width = max(algorithm.plan(it.task, max(len(it.data), 1)).batch_size for it in items)
        example = next((it.data.x[:1] for it in items if len(it.data)), None)
        if example is None:  # nobody has data: nothing is trained
            return len(items)
        private = any(algorithm.setting(it.task, "dp") for it in items)
        # The size depends on the model, the example's shape and the widest batch, which a
        # run keeps from version to version: measuring activations once per key suffices
        # (the free memory on a GPU is read once too, so chunks do not shrink as it fills).
        key = (tuple(example.shape), example.dtype, example.device, width, private)
        if key not in self._chunks:
            self._chunks[key] = auto_chunk(
                self.runtime.model, example, width, self.budget, records=width if private else 0
            )
        return self._chunks[key]

    def _notice(self, line: str) -> None:
        self.notices.append(line)
        log.warning("%s", line)

    def _announce(self, reason: str) -> None:
        if reason not in self._announced:
            self._announced.add(reason)
            self._notice(f"fedlab: vmap backend trains sequentially: {reason}")


AUGMENTED = (
    "the clients' training data is augmented (e.g. CIFAR's crop and flip), which the batched "
    "loop does not apply"
)
"""Why augmented data trains sequentially: the sequential loop draws each batch's augmentation
from the client's minibatch stream between its index draws, which the batched loop, drawing
every index first, cannot reproduce; training without it would silently change the run."""


def why_not_batched(runtime: ClientRuntime) -> str:
    """Why the vmap backend would train ``runtime``'s jobs sequentially ("" when it batches
    them): the client half has its own ``fit``, or the model cannot be batched."""
    from fedlab.clients.sgd_vmap import batchable

    algorithm = runtime.algorithm
    if not batchable(algorithm):
        return f"client half {type(algorithm).__name__} trains with its own fit()"
    return _objective_reason(runtime) or _model_reason(runtime.model)


def _objective_reason(runtime: ClientRuntime) -> str:
    # The batched loop computes cross-entropy and accuracy itself: another objective's loss
    # would silently be replaced by them.
    name = runtime.objective.name
    if name == "classification":
        return ""
    return f"the workload's objective is {name!r}; the batched loop trains classification only"


def _model_reason(model: nn.Module) -> str:
    from fedlab.clients.sgd_vmap import unbatchable_model

    why = unbatchable_model(model)
    return f"model {type(model).__name__} cannot be batched: {why}" if why else ""


def auto_chunk(
    model: nn.Module, example: torch.Tensor, batch: int, budget: int = 0, records: int = 0
) -> int:
    """Clients per batched call that fit in ``budget`` bytes (0: the device's default).

    A client costs :data:`_PARAM_COPIES` copies of the params, ``records`` more for DP-SGD's
    per-record gradients, plus the activations of a ``batch``-example step, counted from one
    forward of ``example`` (one record, on the model's device).
    """
    device = example.device
    if not budget:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * _GPU_SHARE)
        else:
            # The machine's memory, not what happens to be free: the chunk, and so the
            # batched kernels' rounding, is then the same for a run and its resume.
            budget = min(_CPU_BUDGET, _physical_memory() // 4 or _CPU_BUDGET)
    per_param = sum(p.numel() * p.element_size() for p in model.parameters())
    per_client = (_PARAM_COPIES + records) * per_param + _ACTIVATION_FACTOR * batch * (
        _activation_bytes(model, example)
    )
    return max(1, budget // max(per_client, 1))


def _activation_bytes(model: nn.Module, example: torch.Tensor) -> int:
    """Bytes of every module output in one forward of one example."""
    total = 0

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            out: torch.Tensor = model(example)
        total += int(out.numel() * out.element_size())
    finally:
        for h in handles:
            h.remove()
    return total


def _physical_memory() -> int:
    """The machine's physical memory in bytes (0 when the platform does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0
