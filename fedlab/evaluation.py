"""Federated evaluation: the global model on sampled clients' own test splits, and after
personalisation.

Researchers report how a federated model does for each client, not only on one pooled test
set: its mean over clients, the tail (10th percentile) and the worst client, weighted by
examples and unweighted (for the workload's declared objective: accuracy and loss for
classification, ``mae`` and loss for regression). :class:`FederatedEvaluator` is a callback, like
:class:`~fedlab.callbacks.Evaluator`: evaluation is never strategy code, and it runs every
``eval_every`` versions and at the last one.

With ``personalize = K``, each evaluated client also fine-tunes the global model for ``K`` local
SGD steps on its own training split (the run's learning rate and batch size, the client half's
:class:`~fedlab.clients.sgd.LocalSGD` loop) and is tested again: the FedAvg+FT baseline. The
figures of that model carry the prefix ``personalized_``.

Which clients are evaluated at version ``v`` is drawn from the stream
``(seed, EVAL_SAMPLE, v)``; the minibatch order of client ``k``'s personalisation from
``(seed, PERSONALIZE, v, k)``. Neither touches a training stream, so turning evaluation on
changes no trained number.

During a simulation the clients are evaluated by the run's executor (``--backend``), the one
that trains them: it receives one :class:`EvalTask` per evaluation. The in-process backend
evaluates one client after another on one model (:class:`LocalEvaluation`); the vmap backend
tests every client's split through one model in large batches and, with ``personalize``,
fine-tunes all clients at once with the batched training loop and tests them with stacked
per-client params (:mod:`fedlab.clients.eval_vmap`, equal to the sequential figures to
floating-point rounding); the Ray backend sends each actor an equal share of the clients in one
call. Outside a run (:meth:`FederatedEvaluator.evaluate` on its own, or a version the run did
not evaluate) the clients are evaluated in this process by :class:`LocalEvaluation`.
"""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fedlab import seeding
from fedlab.callbacks import evaluate_model
from fedlab.client import ClientContext, ClientRuntime, load_params
from fedlab.data.base import ClientData
from fedlab.objectives import CLASSIFICATION, Objective, objective_of
from fedlab.types import Params, Task

if TYPE_CHECKING:
    from fedlab.clients.sgd import LocalSGD
    from fedlab.data import Workload
    from fedlab.engine import Engine

PERSONALIZED = "personalized_"
CLIENT_METRICS = "client_metrics.jsonl"
"""Each evaluated client's figures, one JSON line per client per evaluation, in the run
directory: what ``fedlab plot --clients`` draws distributions from."""


@dataclass(frozen=True)
class ClientScore:
    """One client's test figures.

    Attributes:
        client_id: the client.
        examples: its test examples.
        values: the mean of each of the objective's metrics over them (classification:
            ``accuracy``) and their mean ``loss``.
    """

    client_id: int
    examples: int
    values: Mapping[str, float]


def quantile(values: Sequence[float], weights: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``values`` under ``weights``: the smallest value whose cumulative
    weight share reaches ``q`` (NumPy's ``inverted_cdf``; with equal weights, the
    ``ceil(q n)``-th smallest value). Always the figure of a real client, never interpolated.
    """
    order = np.argsort(np.asarray(values, dtype=np.float64), kind="stable")
    v = np.asarray(values, dtype=np.float64)[order]
    w = np.asarray(weights, dtype=np.float64)[order]
    share = np.cumsum(w) / w.sum()
    # A tolerance so that, e.g., 3 of 30 equal weights counts as reaching 0.1 exactly.
    return float(v[int(np.searchsorted(share, q - 1e-12, side="left"))])


def summarize(
    scores: Sequence[ClientScore], objective: Objective = CLASSIFICATION, prefix: str = ""
) -> dict[str, float]:
    """The columns a metrics row gets for ``scores`` (see the module docstring).

    Classification: ``client_accuracy_mean`` (over clients), ``client_accuracy_wmean`` (over
    examples), ``client_accuracy_p10`` / ``_wp10`` (10th percentile over clients / examples)
    and ``client_accuracy_min`` (the worst client). Loss, whose bad tail is the high one:
    ``client_loss_mean``, ``_wmean``, ``_p90``, ``_wp90`` and ``client_loss_max``. Every
    metric of the objective gets the same five columns, its tail on its bad side (regression's
    ``mae`` like the loss). ``clients_evaluated`` counts the clients with at least one test
    example; clients without any are left out.
    """
    kept = [s for s in scores if s.examples > 0]
    out: dict[str, float] = {f"{prefix}clients_evaluated": len(kept)}
    if not kept:
        return out
    ones = [1.0] * len(kept)
    n = [float(s.examples) for s in kept]
    tails = [(name, 0.1 if higher else 0.9) for name, higher in objective.metrics]
    for name, tail in [*tails, ("loss", 0.9)]:
        worst = min if tail < 0.5 else max
        values = [s.values[name] for s in kept]
        pct = round(100 * tail)
        col = f"{prefix}client_{name}"
        out[f"{col}_mean"] = sum(values) / len(values)
        out[f"{col}_wmean"] = sum(v * k for v, k in zip(values, n, strict=True)) / sum(n)
        out[f"{col}_p{pct}"] = quantile(values, ones, tail)
        out[f"{col}_wp{pct}"] = quantile(values, n, tail)
        out[f"{col}_{worst.__name__}"] = worst(values)
    return out


@dataclass(frozen=True)
class _PersonalizeContext(ClientContext):
    """A client context whose minibatch stream is ``(seed, PERSONALIZE, version, client)``."""

    def generator(self, version: int) -> torch.Generator:
        return seeding.torch_generator(self.seed, seeding.PERSONALIZE, version, self.client_id)


def personalize_context(
    client_id: int, seed: int, device: torch.device, objective: Objective
) -> ClientContext:
    """The context a personalised client fine-tunes with: its minibatches come from
    ``(seed, PERSONALIZE, version, client_id)``, never from a training stream."""
    return _PersonalizeContext(client_id=client_id, seed=seed, device=device, objective=objective)


def sample_clients(seed: int, version: int, num_clients: int, count: int) -> list[int]:
    """The clients evaluated at ``version``: all when ``count >= num_clients``, else ``count``
    drawn without replacement from ``(seed, EVAL_SAMPLE, version)``, sorted."""
    if count >= num_clients:
        return list(range(num_clients))
    rng = seeding.numpy_rng(seed, seeding.EVAL_SAMPLE, version)
    return seeding.sample_without_replacement(rng, num_clients, count)


Scores = tuple[list[ClientScore], list[ClientScore]]
"""Each evaluated client's figures, in the task's client order: for the global params, and
after personalisation (empty without it)."""


@dataclass(frozen=True)
class EvalTask:
    """One federated evaluation, as an executor receives it.

    Attributes:
        version: the version of ``params``; with ``seed`` it names every client's
            personalisation stream.
        params: the global params every client starts from (not to be mutated).
        clients: the clients to evaluate, in the order of the returned :data:`Scores`.
        seed: the run seed.
        personalize: local SGD steps of fine-tuning before the personalised test (0: none).
        lr: the personalisation learning rate.
        batch_size: the personalisation batch size (0: full batch).
        drop_last: leave out a pass's partial last batch while fine-tuning.
        eval_batch: test examples per forward pass (one client after another).
    """

    version: int
    params: Params
    clients: tuple[int, ...]
    seed: int
    personalize: int = 0
    lr: float = 0.1
    batch_size: int = 32
    drop_last: bool = False
    eval_batch: int = 1024

    def sgd(self) -> LocalSGD:
        """The fine-tuning loop: ``personalize`` plain SGD steps with the run's settings."""
        from fedlab.clients.sgd import LocalSGD

        return LocalSGD(
            lr=self.lr,
            local_steps=max(self.personalize, 1),
            local_epochs=0,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    def settings(self) -> dict[str, Any]:
        """Everything but ``params``, as a :mod:`fedlab.tensorio` tree (for Ray actors)."""
        tree = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del tree["params"]
        tree["clients"] = list(self.clients)
        return tree

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], params: Params) -> EvalTask:
        """The task :meth:`settings` was taken from, with ``params``."""
        return cls(**{**settings, "clients": tuple(settings["clients"]), "params": params})


def scores_tree(scores: Scores) -> dict[str, Any]:
    """``scores`` as a :mod:`fedlab.tensorio` tree (for Ray actors)."""
    return {
        part: [[s.client_id, s.examples, dict(s.values)] for s in group]
        for part, group in zip(("global", "personal"), scores, strict=True)
    }


def scores_from_tree(tree: Mapping[str, Any]) -> Scores:
    """The scores :func:`scores_tree` was made from."""
    parts = [
        [ClientScore(int(c), int(n), {str(k): float(v) for k, v in values.items()})
         for c, n, values in tree[part]]
        for part in ("global", "personal")
    ]  # fmt: skip
    return parts[0], parts[1]


def unpoisoned(workload: Workload) -> Workload:
    """``workload`` without a simulated data attack: a malicious client is evaluated (and
    personalised) on its own data, as the run's driver holds it."""
    from fedlab.attacks import PoisonedWorkload

    inner: Workload = workload.inner if isinstance(workload, PoisonedWorkload) else workload
    return inner


class LocalEvaluation:
    """Evaluates :class:`EvalTask` s in this process, one client after another on one model.

    The in-process backend's evaluation, the Ray actors' and the driver's outside a run; the
    vmap backend falls back to it where it cannot batch (and borrows its data).

    Args:
        workload: the model architecture and each client's ``train`` and ``test`` splits (a
            poisoned workload is evaluated on its clean data).
        device: where to evaluate.
        cache_mb: client splits kept in memory between evaluations (0: none); a client's data
            is a function of the run seed, so the cache changes no figure.
    """

    def __init__(
        self, workload: Workload, device: str | torch.device = "cpu", cache_mb: float = 256
    ) -> None:
        self.workload = unpoisoned(workload)
        self.objective = objective_of(self.workload)
        self.device = torch.device(device)
        self.model = self.workload.make_model().to(self.device)
        self._slots = dict(self.model.state_dict())
        self._cache_bytes = int(cache_mb * 2**20)
        self._cache: OrderedDict[tuple[int, str], ClientData] = OrderedDict()
        self._cached = 0

    @classmethod
    def of(cls, runtime: ClientRuntime) -> LocalEvaluation:
        """The evaluation a worker's ``runtime`` does: its workload (unpoisoned), its device,
        a data cache as large as its training cache."""
        return cls(runtime.workload, runtime.device, runtime.cache_bytes / 2**20)

    def data(self, client_id: int, split: str) -> ClientData:
        """``client_id``'s ``split`` on the evaluation device, from a least-recently-used cache."""
        key = (client_id, split)
        data = self._cache.get(key)
        if data is not None:
            self._cache.move_to_end(key)
            return data
        data = self.workload.client_data(client_id, split)
        if self.device.type != "cpu":
            data = dataclasses.replace(data, x=data.x.to(self.device), y=data.y.to(self.device))
        size = data.x.nbytes + data.y.nbytes
        if size <= self._cache_bytes:
            self._cache[key] = data
            self._cached += size
            while self._cached > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.x.nbytes + old.y.nbytes
        return data

    def _score(self, client_id: int, data: ClientData, batch: int) -> ClientScore:
        """The model as it stands, on ``data``."""
        values = evaluate_model(self.model, data.x, data.y, self.objective, batch)
        return ClientScore(client_id=client_id, examples=len(data), values=values)

    def __call__(self, task: EvalTask) -> Scores:
        """Each of ``task``'s clients' figures, global and personalised."""
        global_scores: list[ClientScore] = []
        personal: list[ClientScore] = []
        sgd = task.sgd()
        for cid in task.clients:
            load_params(self._slots, task.params)
            test = self.data(cid, "test")
            global_scores.append(self._score(cid, test, task.eval_batch))
            if not task.personalize:
                continue
            train = self.data(cid, "train")
            if len(train):
                ctx = personalize_context(cid, task.seed, self.device, self.objective)
                sgd.fit(
                    self.model, train, Task(version=task.version, params=task.params), None, ctx
                )
            personal.append(self._score(cid, test, task.eval_batch))
        return global_scores, personal


class Evaluating(Protocol):
    """An executor that evaluates clients (every simulation backend)."""

    def evaluate(self, task: EvalTask) -> Scores:
        """Each of ``task``'s clients' figures, in its client order."""
        ...


class FederatedEvaluator:
    """The global model on sampled clients' own test splits (and after personalisation).

    Args:
        workload: the model architecture and each client's ``train`` and ``test`` splits.
        clients: clients evaluated per evaluation (at least 1; all when it reaches the
            workload's ``num_clients``).
        seed: the run seed (the sampling and personalisation streams derive from it).
        personalize: local SGD steps of fine-tuning before the personalised test (0: none).
        lr: the personalisation learning rate (the run's).
        batch_size: the personalisation batch size (the run's; 0: full batch).
        drop_last: the run's ``drop_last``.
        every: evaluate every ``every`` versions (and always at ``final``).
        final: the last version of the run.
        device: where to evaluate in this process.
        eval_batch: test examples per forward pass.
        path: where to append each evaluated client's figures (:data:`CLIENT_METRICS` in the
            run directory; ``None``: nowhere).
        cache_mb: client splits kept in memory when evaluating in this process.

    Raises:
        ValueError: the workload evaluates itself (no classification accuracy), or the
            counts are out of range.
    """

    def __init__(
        self,
        workload: Workload,
        *,
        clients: int,
        seed: int,
        personalize: int = 0,
        lr: float = 0.1,
        batch_size: int = 32,
        drop_last: bool = False,
        every: int = 1,
        final: int = 0,
        device: str = "cpu",
        eval_batch: int = 1024,
        path: str | Path | None = None,
        cache_mb: float = 256,
    ) -> None:
        if callable(getattr(workload, "evaluate", None)):
            raise ValueError(
                f"workload {workload.name!r} evaluates itself (its own evaluate(), not per "
                "client): --eval-clients and --personalize need a workload whose clients have "
                "test splits (built-in or custom data)"
            )
        if clients < 1 or personalize < 0:
            raise ValueError(
                f"federated evaluation needs clients >= 1 and personalize >= 0, got "
                f"{clients} and {personalize}"
            )
        self.workload = workload
        self.objective = objective_of(workload)
        self.clients = min(clients, workload.num_clients)
        self.seed = seed
        self.personalize = personalize
        self.lr = lr
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.every = every
        self.final = final
        self.device = torch.device(device)
        self.eval_batch = eval_batch
        self.cache_mb = cache_mb
        self.path = Path(path) if path is not None else None
        self.executor: Evaluating | None = None
        self._local: LocalEvaluation | None = None  # built when first needed
        # The figures of the last evaluation, so the run's summary does not evaluate twice.
        self._last: tuple[int, dict[str, float], list[dict[str, Any]]] | None = None

    def bind(self, executor: Evaluating | None) -> None:
        """Evaluate the run's versions on ``executor`` (the run's simulation backend; ``None``:
        in this process). :func:`fedlab.run.build_engine` binds the executor it builds."""
        self.executor = executor

    def task(self, params: Params, version: int) -> EvalTask:
        """The evaluation of ``params`` at ``version``: the sampled clients and the settings."""
        clients = sample_clients(self.seed, version, self.workload.num_clients, self.clients)
        return EvalTask(
            version=version,
            params=params,
            clients=tuple(clients),
            seed=self.seed,
            personalize=self.personalize,
            lr=self.lr,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            eval_batch=self.eval_batch,
        )

    def scores(self, params: Params, version: int) -> Scores:
        """Each sampled client's figures for ``params`` at ``version``, computed in this process:
        global, and personalised (empty without ``personalize``)."""
        if self._local is None:
            self._local = LocalEvaluation(self.workload, self.device, self.cache_mb)
        return self._local(self.task(params, version))

    def evaluate(self, params: Params, version: int) -> dict[str, float]:
        """The metrics-row columns for ``params`` at ``version`` (see :func:`summarize`): those
        the run computed last if it evaluated ``version``, else computed in this process."""
        return dict(self._evaluate(params, version, None)[0])

    def _evaluate(
        self, params: Params, version: int, executor: Evaluating | None
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """The row's columns and each client's line for :data:`CLIENT_METRICS`."""
        if self._last is not None and self._last[0] == version:
            return self._last[1], self._last[2]
        if executor is None:
            global_scores, personal = self.scores(params, version)
        else:
            global_scores, personal = executor.evaluate(self.task(params, version))
        row = summarize(global_scores, self.objective)
        lines = [
            {"version": version, "client": s.client_id, "examples": s.examples, **s.values}
            for s in global_scores
        ]
        if self.personalize:
            row.update(summarize(personal, self.objective, PERSONALIZED))
            for line, s in zip(lines, personal, strict=True):
                line.update({PERSONALIZED + k: v for k, v in s.values.items()})
        lines = [line for line in lines if line["examples"] > 0]  # as summarize leaves them out
        self._last = (version, row, lines)
        return row, lines

    def on_version(self, engine: Engine, row: dict[str, Any]) -> None:
        v = engine.version
        if v % self.every == 0 or v == self.final:
            columns, lines = self._evaluate(engine.params, v, self.executor)
            row.update(columns)
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.writelines(json.dumps(line) + "\n" for line in lines)
