"""User data from ``load_client(client_id, num_clients, seed)`` (``--workload custom``).

The data module may declare its objective (:mod:`fedlab.objectives`) with a module-level
``objective = "regression"`` (or ``"next-token"``); without one its data is classification data.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
from torch import nn

from fedlab.data.base import (
    CLIENT_TEST_RATIO,
    P_CLIENT_TEST,
    ClientData,
    check_client_id,
    check_split,
    concat,
    load_model_factory,
    matched_test_indices,
    rng,
    seeded_model,
    unknown,
)
from fedlab.objectives import OBJECTIVES
from fedlab.registry import load_dotted

_CUSTOM_TEST_CLIENTS = 50


def as_client_data(result: object, source: str, objective: str = "classification") -> ClientData:
    """``result`` (ClientData or an ``(x, y)`` tuple) checked for ``objective`` and as float32
    ClientData (regression targets float32 too)."""
    if isinstance(result, ClientData):
        x, y = result.x, result.y
    elif (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[0], torch.Tensor)
        and isinstance(result[1], torch.Tensor)
    ):
        x, y = result
    else:
        got = type(result).__name__
        if isinstance(result, tuple):
            got = f"tuple of ({', '.join(type(r).__name__ for r in result)})"
        raise ValueError(f"{source} must return ClientData or a (x, y) tuple of tensors, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{source} returned x of dtype {x.dtype}; expected floating point")
    if objective == "regression":
        if not y.is_floating_point():
            raise ValueError(
                f"{source} returned y of dtype {y.dtype}; regression expects float targets"
            )
        if y.dim() not in (1, 2):
            raise ValueError(
                f"{source} returned y of shape {tuple(y.shape)}; regression expects [N] or [N, d]"
            )
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{source} returned non-finite values in y")
    else:
        if y.dtype != torch.int64:
            hint = (
                " (for float targets, declare objective = 'regression' in the data module)"
                if y.is_floating_point() and objective == "classification"
                else ""
            )
            raise ValueError(f"{source} returned y of dtype {y.dtype}; expected torch.int64{hint}")
        rank = 2 if objective == "next-token" else 1
        if y.dim() != rank:
            raise ValueError(
                f"{source} returned y of shape {tuple(y.shape)}; {objective} expects "
                f"{'[N, T] token ids' if rank == 2 else '1-D labels'}"
            )
    if x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{source} returned x{tuple(x.shape)} and y{tuple(y.shape)}; "
            "expected the same number of examples"
        )
    if y.shape[0] == 0:
        raise ValueError(f"{source} returned no examples")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{source} returned non-finite values in x")
    if objective == "regression":
        return ClientData(x.to(torch.float32), y.to(torch.float32))
    if int(y.min()) < 0:
        raise ValueError(f"{source} returned negative labels")
    return ClientData(x.to(torch.float32), y)


class CustomWorkload:
    """User data from ``load_client(client_id, num_clients, seed)``.

    The test set is ``load_test(seed)`` from the same module when it defines one, otherwise
    the concatenated data of the first ``min(num_clients, 50)`` clients (then it is not
    held out: it measures fit, not generalisation). ``num_classes`` is the largest test
    label plus one, and client labels must stay below it. A client's own test data
    (``client_data(k, "test")``) is a label-matched share of that test set, so it is held out
    only when ``load_test`` is.

    A data module that declares ``objective = "regression"`` returns float targets ``[N]`` or
    ``[N, d]``: the default models then output ``d`` values (``num_classes`` is ``d``), and a
    client's own test data is a held-out fifth of what ``load_client`` returns for it (drawn
    from the ``(seed, client)`` stream; the other four fifths are its training data), since
    targets cannot be matched by label. ``objective = "next-token"`` (int64 token ids
    ``[N, T]``) needs a model of the user's (``--model pkg.mod:Net``) that outputs
    ``[N, T, vocabulary]``; ``num_classes`` is the largest token id plus one.
    """

    def __init__(
        self,
        *,
        name: str,
        data: str,
        num_clients: int,
        seed: int,
        model: str,
    ) -> None:
        self.name = name
        self.num_clients = num_clients
        self.seed = seed
        # Check the model choice before running user data code, which may be slow.
        user_model = load_model_factory(model) if ":" in model else None
        if user_model is None and model not in ("default", "logreg", "mlp"):
            raise unknown("model for custom data", model, ["logreg", "mlp", "pkg.mod:Factory"])
        loader = load_dotted(data)
        if not callable(loader):
            raise ValueError(f"data {data!r} is not callable (got {type(loader).__name__})")
        self._loader: Callable[..., object] = loader
        self._source = f"data function {data!r}"
        # load_dotted imported (and, in a deployed client, checked) this module just above.
        module = importlib.import_module(data.partition(":")[0])
        self.objective = str(getattr(module, "objective", "classification"))
        if self.objective not in OBJECTIVES:
            raise unknown(
                f"objective of module {module.__name__!r}", self.objective, tuple(OBJECTIVES)
            )
        if self.objective == "next-token" and user_model is None:
            raise ValueError(
                "custom next-token data needs a model of yours that outputs "
                "[N, T, vocabulary] logits: --model pkg.mod:Net"
            )
        load_test = getattr(module, "load_test", None)
        if callable(load_test):
            test_source = f"load_test in module {module.__name__!r}"
            self._test = as_client_data(load_test(seed), test_source, self.objective)
        else:
            parts = [self._load(k) for k in range(min(num_clients, _CUSTOM_TEST_CLIENTS))]
            for k, part in enumerate(parts):
                if part.x.shape[1:] != parts[0].x.shape[1:]:
                    raise ValueError(
                        f"{self._source}: client {k} has features of shape "
                        f"{tuple(part.x.shape[1:])}, client 0 has {tuple(parts[0].x.shape[1:])}"
                    )
            self._test = concat(parts)
        if self.objective == "regression":
            self.num_classes = 1 if self._test.y.dim() == 1 else int(self._test.y.shape[1])
        else:
            self.num_classes = int(self._test.y.max()) + 1
        self._feature_shape = tuple(self._test.x.shape[1:])
        features, classes = math.prod(self._feature_shape), self.num_classes
        if user_model is not None:
            self._model = user_model
        elif model == "mlp":
            self._model = lambda: nn.Sequential(
                nn.Flatten(), nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, classes)
            )
        else:
            self._model = lambda: nn.Sequential(nn.Flatten(), nn.Linear(features, classes))

    def _load(self, k: int) -> ClientData:
        return as_client_data(
            self._loader(k, self.num_clients, self.seed), self._source, self.objective
        )

    def make_model(self) -> nn.Module:
        return seeded_model(self.seed, self._model)

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        k = check_client_id(client_id, self.num_clients)
        test = check_split(split) == "test"
        data = self._load(k)
        if tuple(data.x.shape[1:]) != self._feature_shape:
            raise ValueError(
                f"{self._source} returned features of shape {tuple(data.x.shape[1:])} for "
                f"client {k}; the test set has {self._feature_shape}"
            )
        if self.objective == "regression":
            return self._own_split(data, k, test)
        if int(data.y.max()) >= self.num_classes:
            raise ValueError(
                f"{self._source} returned label {int(data.y.max())} for client {k}, but the "
                f"test set implies {self.num_classes} classes"
            )
        if test:
            idx = matched_test_indices(self._test.y.numpy(), data.y.numpy(), self.seed, k)
            pick = torch.from_numpy(idx)
            return ClientData(self._test.x[pick], self._test.y[pick])
        return data

    def _own_split(self, data: ClientData, k: int, test: bool) -> ClientData:
        """Client ``k``'s held-out fifth (``test``) or the rest of its data."""
        if tuple(data.y.shape[1:]) != tuple(self._test.y.shape[1:]):
            raise ValueError(
                f"{self._source} returned targets of shape {tuple(data.y.shape[1:])} per "
                f"example for client {k}; the test set has {tuple(self._test.y.shape[1:])}"
            )
        n = len(data)
        if n < 2:
            raise ValueError(
                f"{self._source} returned {n} example for client {k}; regression holds out a "
                "fifth of each client's data for its own test split, so each needs at least 2"
            )
        perm = torch.from_numpy(rng(self.seed, P_CLIENT_TEST, k).permutation(n))
        held = max(1, n // (CLIENT_TEST_RATIO + 1))
        pick = perm[:held] if test else perm[held:]
        return ClientData(data.x[pick], data.y[pick])

    def test_data(self) -> ClientData:
        return self._test
