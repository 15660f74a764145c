"""LoRA adapters on selected ``nn.Linear`` layers: the pieces Fed-SB and FedIT share.

Every adapted weight ``W0`` (``out x in``) becomes ``W = W0 + scale * B R A`` with ``B``
(``out x r``), ``A`` (``r x in``) and, for LoRA-SB, ``R`` (``r x r``; plain LoRA has none).
Which factors the clients train and upload is the strategy's choice (Fed-SB: ``R``; FedIT:
``B`` and ``A``); an optional *head* (layers named by a second regex, e.g. the classifier) is
trained in full and averaged, as the Fed-SB paper does for classification.

Layers are found from the params alone: a layer is adapted when its ``*.weight`` entry is a
floating 2-D tensor (``nn.Linear``; Conv2d weights are 4-D) whose layer name fully matches
``target`` and does not match ``head``. A model that is itself an ``nn.Linear`` is one layer
named ``""`` (its entry is ``weight``), which the default ``target`` ``.*`` matches. ``W0`` is
the initial model and is never trained; the engine's params are the effective model, so the
ordinary evaluator runs unchanged.

Tasks carry ``W0`` under the weight's own name and the factors under ``lora.B/NAME``,
``lora.A/NAME`` and ``lora.R/NAME`` (``/`` never occurs in a module's state-dict names).
Payloads carry the trained factors under the same keys and the head entries under their names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from fedlab.client import ClientContext, Fit
from fedlab.clients.sgd import LocalSGD
from fedlab.data import ClientData
from fedlab.strategy import Strategy, UpdateRejected, all_finite, floating, weighted_mean
from fedlab.types import ClientId, Metrics, Params, Round, State, Task, Update

B_KEY = "lora.B/"
A_KEY = "lora.A/"
R_KEY = "lora.R/"
KEYS = {"b": B_KEY, "a": A_KEY, "r": R_KEY}
"""State entry of each factor -> its task and payload key prefix."""
# Task config keys: the adapter scale and the head regex reach the client half with the task.
SCALE = "lora_scale"
HEAD = "lora_head"
WEIGHTINGS = ("examples", "uniform")


def layer_of(name: str) -> str:
    """``"0.weight" -> "0"``: the module that owns a state entry (``""``: the root module,
    as for a model that is a bare ``nn.Linear``)."""
    return name.rpartition(".")[0]


def is_weight(name: str) -> bool:
    """Whether ``name`` is a layer's ``weight`` entry, the root module's included."""
    return name == "weight" or name.endswith(".weight")


def head_entries(params: Params, head: str) -> list[str]:
    """Floating entries of the layers whose name fully matches ``head`` (none for ``""``)."""
    if not head:
        return []
    pattern = re.compile(head)
    return [
        k
        for k, v in params.items()
        if "/" not in k and v.is_floating_point() and pattern.fullmatch(layer_of(k))
    ]


def adapted(params: Params, target: str = ".*", head: str = "") -> list[str]:
    """Weight names of the adapted layers, in state order: floating 2-D ``*.weight`` entries
    whose layer name fully matches the regex ``target`` and that are not head entries."""
    pattern = re.compile(target)
    heads = set(head_entries(params, head))
    return [
        k
        for k, v in params.items()
        if is_weight(k)
        and "/" not in k
        and v.is_floating_point()
        and v.dim() == 2
        and k not in heads
        and pattern.fullmatch(layer_of(k)) is not None
    ]


def factor_shape(factor: str, weight: torch.Size, rank: int) -> tuple[int, int]:
    """Shape of factor ``"b"``, ``"a"`` or ``"r"`` for a weight of shape ``(out, in)``."""
    out, inp = int(weight[0]), int(weight[1])
    return {"b": (out, rank), "a": (rank, inp), "r": (rank, rank)}[factor]


def effective(
    w0: torch.Tensor,
    b: torch.Tensor,
    a: torch.Tensor,
    r: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``W0 + scale * B R A`` (``R`` omitted for plain LoRA)."""
    core = a if r is None else r @ a
    return w0 + scale * (b @ core)


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors' values."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True, kw_only=True)
class LoRAStrategy(Strategy):
    """The server half shared by adapter strategies; subclasses choose factors and their init.

    Subclasses set ``factors`` (the state entries of every layer, e.g. ``("b", "a", "r")``) and
    ``trained`` (the ones clients train and upload), and implement :meth:`init_factors`.

    Args:
        rank: ``r``, the adapter rank (at most ``min(out, in)`` of every adapted layer).
        target: regex the adapted Linear layers' names must fully match.
        head: regex of layers trained in full and averaged (``""``: none); never adapted.
        weighting: ``"examples"`` (``n_i / sum n_j``) or ``"uniform"`` (the plain mean).
    """

    factors: ClassVar[tuple[str, ...]]
    trained: ClassVar[tuple[str, ...]]

    rank: int = 4
    target: str = ".*"
    head: str = ""
    weighting: str = "examples"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        for option in ("target", "head"):
            value = getattr(self, option)
            if isinstance(value, int) and not isinstance(value, bool):
                # --strategy-opt head=2 reads as TOML, so a layer index arrives as an int.
                object.__setattr__(self, option, str(value))
            elif not isinstance(value, str):
                raise ValueError(f"{option} must be a regex string, got {value!r}")
            try:
                re.compile(getattr(self, option))
            except re.error as e:
                raise ValueError(f"{option} is not a valid regex: {e}") from e

    @property
    def adapter_scale(self) -> float:
        """The adapter scale (``alpha / r``); 1 unless a subclass says otherwise."""
        return 1.0

    def layers(self, params: Params) -> list[str]:
        """The adapted weights of ``params``."""
        return adapted(params, self.target, self.head)

    def init_factors(
        self, params: Params, layers: Sequence[str]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``{factor: {layer: tensor}}`` for every factor in ``factors``."""
        raise NotImplementedError

    def init(self, params: Params) -> State:
        layers = self.layers(params)
        if not layers:
            raise ValueError(
                f"{type(self).__name__} found no nn.Linear layer whose name matches "
                f"{self.target!r} (and not the head {self.head!r})"
            )
        for name in layers:
            if self.rank > min(params[name].shape):
                raise ValueError(
                    f"rank {self.rank} exceeds min(out, in) = {min(params[name].shape)} "
                    f"of layer {name!r}"
                )
        state: dict[str, dict[str, torch.Tensor]] = {
            "w0": {name: params[name].detach().clone() for name in layers}
        }
        state.update({f: dict(t) for f, t in self.init_factors(params, layers).items()})
        return state

    def model_params(self, state: State, params: Params) -> dict[str, torch.Tensor]:
        """The global model the evaluator sees: ``W0 + scale * B R A`` on adapted layers."""
        out = dict(params)
        for name, w0 in state["w0"].items():
            r = state["r"][name] if "r" in state else None
            out[name] = effective(w0, state["b"][name], state["a"][name], r, self.adapter_scale)
        return out

    def configure(self, state: State, params: Params, round: Round) -> dict[ClientId, Task]:
        tasks = super().configure(state, params, round)
        # The model entries carry the frozen base W0 (not the effective weights); the factors
        # ride along under keys no module has. Frozen factors would be sent once in deployment.
        sent = dict(params)
        for name, w0 in state["w0"].items():
            sent[name] = w0
            for f in self.factors:
                sent[KEYS[f] + name] = state[f][name]
        config = {SCALE: self.adapter_scale, HEAD: self.head}
        return {
            c: Task(version=t.version, params=sent, config={**t.config, **config})
            for c, t in tasks.items()
        }

    def expected(self, params: Params) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """``{payload key: (shape, dtype)}`` of a valid update for the model ``params``."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name in self.layers(params):
            for f in self.trained:
                out[KEYS[f] + name] = (
                    factor_shape(f, params[name].shape, self.rank),
                    params[name].dtype,
                )
        for name in head_entries(params, self.head):
            out[name] = (tuple(params[name].shape), params[name].dtype)
        return out

    def validate(self, update: Update, params: Params) -> None:
        what = f"update from client {update.client_id}"
        expected = self.expected(params)
        if set(update.payload) != set(expected):
            raise UpdateRejected(f"{what}: expected exactly the entries {sorted(expected)}")
        for key, (shape, dtype) in expected.items():
            got = update.payload[key]
            if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape or got.dtype != dtype:
                raise UpdateRejected(f"{what}: {key!r} must be a {dtype} tensor of shape {shape}")
            if not all_finite(got):
                raise UpdateRejected(f"{what}: {key!r} contains NaN or Inf")

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            return self.model_params(state, params), state, {}
        weights = [float(u.num_examples) for u in updates]
        if self.weighting == "uniform" or sum(weights) <= 0:
            weights = [1.0] * len(updates)
        mean = weighted_mean(updates, weights)
        new_state = dict(state)
        for f in self.trained:
            new_state[f] = {name: mean[KEYS[f] + name] for name in state[f]}
        new_params = self.model_params(new_state, params)
        heads = head_entries(params, self.head)
        new_params.update({name: mean[name] for name in heads})
        # What travels each version per client, both ways: the trained factors and the head.
        travel = nbytes(mean.values())
        metrics = {
            "upload_bytes": float(travel * len(updates)),
            "download_bytes": float(travel * len(updates)),
            # What full FedAvg would upload: every floating entry of the model.
            "fedavg_upload_bytes": float(nbytes(floating(params).values()) * len(updates)),
        }
        return new_params, new_state, metrics


@dataclass(frozen=True, kw_only=True)
class AdapterClient(LocalSGD):
    """The client half shared by adapter strategies: trains the factors named in ``trained``
    (and the head entries) by the one local training loop, uploads them.

    ``W0`` and the frozen factors come in the task params and are never trained, nor is any
    other model entry. Settings in ``task.config`` win over the fields, as in :class:`LocalSGD`;
    with ``dp`` the loop is DP-SGD on exactly the trained tensors (Fed-SB's private variant:
    ``R`` and the head), and the client's accountant lives in its state.
    """

    trained: ClassVar[tuple[str, ...]]

    def fit(
        self,
        model: nn.Module,
        data: ClientData,
        task: Task,
        state: State | None,
        ctx: ClientContext,
    ) -> Fit:
        names = [k[len(A_KEY) :] for k in task.params if k.startswith(A_KEY)]
        if not names:
            raise ValueError(
                f"{type(self).__name__} needs the adapter tensors of a LoRA strategy in its task"
            )
        dev = ctx.device
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for f, prefix in KEYS.items():
            got = {
                n: task.params[prefix + n].detach().to(dev)
                for n in names
                if prefix + n in task.params
            }
            if f in self.trained:
                got = {n: t.clone().requires_grad_(True) for n, t in got.items()}
            if got:
                factors[f] = got
        missing = [f for f in self.trained if f not in factors]
        if missing:
            raise ValueError(f"{type(self).__name__}: the task lacks the factors {missing}")
        heads = {
            k: task.params[k].detach().to(dev).clone().requires_grad_(True)
            for k in head_entries(task.params, str(task.config.get(HEAD, "")))
        }
        scale = float(task.config.get(SCALE, 1.0))
        w0 = {n: task.params[n].detach().to(dev) for n in names}
        # The trained tensors in one order: factors layer by layer, then the head entries.
        slots = [(f, n) for f in self.trained for n in names] + [("head", k) for k in heads]
        trainable = [factors[f][n] if f != "head" else heads[n] for f, n in slots]

        def forward(tensors: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            # Computes with ``tensors`` in place of ``trainable`` (DP-SGD differentiates this
            # per record); materialising ``B R A`` costs less than three thin matmuls here.
            now = {f: dict(d) for f, d in factors.items()}
            overrides: dict[str, torch.Tensor] = {}
            for (f, n), t in zip(slots, tensors, strict=True):
                if f == "head":
                    overrides[n] = t
                else:
                    now[f][n] = t
            for n in names:
                r = now["r"][n] if "r" in now else None
                overrides[n] = effective(w0[n], now["b"][n], now["a"][n], r, scale)
            out: torch.Tensor = functional_call(model, overrides, (x,))
            return out

        model.train()
        metrics, state = self.train(data, task, ctx, trainable, forward, state)
        payload = {KEYS[f] + n: factors[f][n].detach().cpu() for f in self.trained for n in names}
        payload.update({k: t.detach().cpu() for k, t in heads.items()})
        return Fit(payload=payload, num_examples=len(data), metrics=metrics, state=state)
