"""The client half of an algorithm, and the runtime that drives it on one worker.

A :class:`ClientAlgorithm` says how a client turns a :class:`~fedlab.types.Task` into a payload.
A :class:`ClientRuntime` owns one persistent model and loads every task's params into it in
place, so a worker that serves thousands of clients allocates one model, not thousands. The
same runtime serves in-process simulation, Ray actors and the deployed gRPC client.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fedlab import seeding
from fedlab.data.base import ClientData
from fedlab.objectives import CLASSIFICATION, Objective, objective_of
from fedlab.transforms import Pipeline, TransformContext
from fedlab.types import ClientId, Metrics, Params, State, Task, Update

if TYPE_CHECKING:
    from fedlab.data.base import Workload


class TrainingError(RuntimeError):
    """A client's training raised: which client, which version, and the error, in one line.

    Args:
        client_id: the client that was training.
        version: the version of its task.
        detail: ``"TypeName: message"`` of the error.
        where: ``"file.py:LINE in function"``, the innermost frame outside torch and fedlab
            (the user's model or data code), or ``""``.

    The arguments are the exception's ``args``, so it survives pickling (Ray actors).
    """

    def __init__(self, client_id: ClientId, version: int, detail: str, where: str = "") -> None:
        super().__init__(client_id, version, detail, where)
        self.client_id = client_id
        self.version = version
        self.detail = detail
        self.where = where

    def __str__(self) -> str:
        at = f" (at {self.where})" if self.where else ""
        return f"client {self.client_id} failed training version {self.version}: {self.detail}{at}"

    @classmethod
    def wrap(cls, client_id: ClientId, version: int, error: BaseException) -> TrainingError:
        """``error`` raised while ``client_id`` trained ``version``."""
        import fedlab.clients
        import fedlab.strategies

        frames = traceback.extract_tb(error.__traceback__)
        library = tuple(
            os.path.dirname(str(m.__file__)) + os.sep
            for m in (torch, fedlab.clients, fedlab.strategies, sys.modules[__name__])
        )
        own = [f for f in frames if not f.filename.startswith(library)]
        where = ""
        if own:
            f = own[-1]
            where = f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
        message = " ".join(str(error).split()) or repr(error)
        return cls(client_id, version, f"{type(error).__name__}: {message}", where)


@dataclass(frozen=True)
class ClientContext:
    """Who is training and which random stream to use.

    Attributes:
        client_id: the client being simulated or served.
        seed: the run seed; ``generator()`` derives the stream for ``(seed, version, client)``.
        device: where the model lives.
        objective: the loss and metrics the workload declares (classification by default).
    """

    client_id: ClientId
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    objective: Objective = CLASSIFICATION

    def generator(self, version: int) -> torch.Generator:
        """The training stream of this client at ``version`` (CPU generator)."""
        return seeding.torch_generator(self.seed, seeding.TRAIN, version, self.client_id)


@dataclass(frozen=True)
class Fit:
    """What :meth:`ClientAlgorithm.fit` returns."""

    payload: Params
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    state: State | None = None


class ClientAlgorithm:
    """Base class of client halves. Subclasses override :meth:`fit` (and maybe :meth:`setup`)."""

    def setup(self, model: nn.Module, task: Task) -> nn.Module:
        """Return the module to train for ``task``; wrappers (supermasks, adapters) go here."""
        return model

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        """Train ``model`` (already holding ``task.params``) on ``data``."""
        raise NotImplementedError

    def setting(self, task: Task, name: str) -> Any:
        """``task.config[name]`` when the server sent one, else this algorithm's own ``name``.

        The server decides per task (``--lr``, ``--local-steps`` arrive in every task's config);
        the client half's fields are the defaults for anything it was not sent.
        """
        return task.config.get(name, getattr(self, name))


def load_params(slots: dict[str, torch.Tensor], params: Params) -> None:
    """Copy ``params`` into a model's state tensors in place."""
    with torch.no_grad():
        for name, dst in slots.items():
            src = params.get(name)
            if src is None:
                raise KeyError(f"task params have no entry {name!r} for this model")
            dst.copy_(src)


def minibatches(
    n: int,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    *,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """Index batches for ``steps`` SGD steps, reshuffling after each pass over ``n`` examples.

    Each pass is one ``randperm`` from ``generator`` cut into batches of ``batch_size`` (0:
    full batch); the last batch of a pass is partial, as PyTorch's ``DataLoader`` makes it,
    unless ``drop_last`` leaves it out. So ``batches_per_pass(n, batch_size, drop_last)`` steps
    are exactly one pass over the data.
    """
    bs = min(batch_size, n) if batch_size > 0 else n
    per_pass = batches_per_pass(n, batch_size, drop_last)
    perm = torch.randperm(n, generator=generator)
    i = 0
    for _ in range(steps):
        if i == per_pass:
            perm = torch.randperm(n, generator=generator)
            i = 0
        yield perm[i * bs : (i + 1) * bs]
        i += 1


def minibatch_grid(
    n: int,
    batch_size: int,
    steps: int,
    generator: torch.Generator,
    *,
    drop_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`minibatches` as one ``[steps, width]`` index tensor and its boolean mask.

    Row ``s`` holds batch ``s`` (a partial batch padded with index 0, masked out); the same
    ``randperm`` draws from ``generator`` in the same order, so the batches are identical.
    """
    bs = min(batch_size, n) if batch_size > 0 else n
    per_pass = batches_per_pass(n, batch_size, drop_last)
    passes = -(-steps // per_pass)
    slots = per_pass * bs
    grid = torch.zeros(passes, slots, dtype=torch.long)
    valid = torch.zeros(passes, slots, dtype=torch.bool)
    used = min(n, slots)
    for p in range(passes):
        grid[p, :used] = torch.randperm(n, generator=generator)[:used]
        valid[p, :used] = True
    return grid.view(-1, bs)[:steps], valid.view(-1, bs)[:steps]


def batches_per_pass(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches in one pass over ``n >= 1`` examples (0: one full batch); at least 1."""
    bs = min(batch_size, n) if batch_size > 0 else n
    return n // bs if drop_last else -(-n // bs)


class ClientRuntime:
    """One worker's client side: persistent model, data access, algorithm and transforms.

    Args:
        workload: where models and client data come from.
        algorithm: the client half to run.
        pipeline: update transforms applied to every payload before it leaves the client.
        seed: the run seed.
        device: where to train.
        cache_mb: client data kept in memory between tasks (0 disables the cache).
    """

    def __init__(
        self,
        *,
        workload: Workload,
        algorithm: ClientAlgorithm,
        pipeline: Pipeline | None = None,
        seed: int,
        device: str | torch.device = "cpu",
        cache_mb: float = 256,
    ) -> None:
        self.workload = workload
        self.algorithm = algorithm
        self.pipeline = pipeline or Pipeline()
        self.seed = seed
        self.device = torch.device(device)
        self.objective = objective_of(workload)
        self.model = workload.make_model().to(self.device)
        self._slots = dict(self.model.state_dict(keep_vars=False))
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[ClientId, ClientData] = OrderedDict()
        self._cached = 0

    def _data(self, client_id: ClientId) -> ClientData:
        """The client's data on the training device, from a least-recently-used cache.

        Client data is a pure function of ``(seed, client_id)``, so caching it changes no
        result; it only saves regenerating (or re-loading) clients sampled again.
        """
        data = self._cache.get(client_id)
        if data is not None:
            self._cache.move_to_end(client_id)
            return data
        data = self.workload.client_data(client_id)
        if self.device.type != "cpu":
            data = dataclasses.replace(data, x=data.x.to(self.device), y=data.y.to(self.device))
        size = data.x.nbytes + data.y.nbytes
        if size <= self.cache_bytes:
            self._cache[client_id] = data
            self._cached += size
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.x.nbytes + old.y.nbytes
        return data

    def run(self, client_id: ClientId, task: Task, state: State | None) -> tuple[Update, State]:
        """Train ``client_id`` on ``task``; return the encoded update and the client's new state.

        ``state`` is what the previous call returned for this client (``None`` at first): it
        holds both the algorithm's and the transforms' per-client state.
        """
        state = state or {}
        try:
            model = self.algorithm.setup(self.model, task)
            load_params(self._slots, task.params)
            data = self._data(client_id)
            ctx = self.context(client_id)
            fit = self.algorithm.fit(model, data, task, state.get("client"), ctx)
        except Exception as e:
            # The user's model or data raising deep in a training loop: say which client and
            # version, not only where in torch.
            raise TrainingError.wrap(client_id, task.version, e) from e
        return self.complete(client_id, task, state, fit)

    def context(self, client_id: ClientId) -> ClientContext:
        """The :class:`ClientContext` this runtime trains ``client_id`` with."""
        return ClientContext(
            client_id=client_id, seed=self.seed, device=self.device, objective=self.objective
        )

    def data(self, client_id: ClientId) -> ClientData:
        """``client_id``'s training data on this runtime's device (cached)."""
        return self._data(client_id)

    def complete(
        self, client_id: ClientId, task: Task, state: State | None, fit: Fit
    ) -> tuple[Update, State]:
        """The update and new client state of ``fit``, the result of ``client_id``'s ``task``
        trained from ``state``: the payload goes through the transforms here.

        Batched executors train many clients at once and finish each with this, so the
        update pipeline is the same for every backend.
        """
        state = state or {}
        tctx = TransformContext(
            client_id=client_id, version=task.version, seed=self.seed, config=task.config
        )
        payload, tstate = self.pipeline.encode(fit.payload, tctx, state.get("transforms"))
        update = Update(
            client_id=client_id,
            version=task.version,
            payload=payload,
            num_examples=fit.num_examples,
            metrics=dict(fit.metrics),
        )
        new_state: dict[str, Any] = {}
        if fit.state is not None:
            new_state["client"] = fit.state
        if tstate is not None:
            new_state["transforms"] = tstate
        return update, new_state
