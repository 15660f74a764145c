"""Fed-SB: federated LoRA-SB, where only the small ``r x r`` adapter core ``R`` travels.

Singhal, Ponkshe, Vartak, Varshney, Vepakomma. "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning." arXiv
2502.15436, 2025; the adapter is LoRA-SB (Ponkshe et al., arXiv 2411.19557).

Every ``nn.Linear`` weight ``W0`` (``out x in``) whose layer name fully matches ``target``
becomes ``W = W0 + B R A`` (scale ``alpha / r = 1``) with ``B`` (``out x r``) and ``A``
(``r x in``) frozen and shared by every client, and ``R`` (``r x r``) the only trainable tensor.
Clients upload ``R_i``; the server averages them. Because ``B`` and ``A`` are shared and frozen,
``B mean(R_i) A = mean(B R_i A)``: the aggregate is exactly the average of the clients' full
weight updates (ALGORITHMS.md §7).

Initialization (differs from the paper, on purpose): the paper takes ``B, A`` from the rank-``r``
SVD of an approximated first update ``-eta sign(G)``, where ``G`` is a gradient on training
examples; computed on client data without noise, that leaks private data (ALGORITHMS.md §7,
[BUG/privacy]), and the strategy contract's ``init`` sees no data. We use the data-free variant
of the LoRA-SB code (``find_and_initialize``, weight SVD): ``B`` and ``A`` are the top-``r``
left and right singular vectors of ``W0`` (so ``B^T B = I`` and ``A A^T = I``), and ``R0 = 0``,
so the run starts exactly at the initial model. No client data is touched before training.

Layers are found from the params alone: a layer is adapted when its ``*.weight`` entry is a
floating 2-D tensor (``nn.Linear``; Conv2d weights are 4-D). ``W0`` is the initial model and is
never trained; biases and other entries keep their initial values. The engine's params are the
effective model ``W0 + B R A``, so the ordinary evaluator runs unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab.strategy import Strategy, UpdateRejected, weighted_mean
from fedlab.types import ClientId, Metrics, Params, Round, State, Task, Update

WEIGHTINGS = ("examples", "uniform")
# Task-param keys of the adapter tensors; ``/`` never occurs in a module's state-dict names.
B_KEY = "fed_sb.B/"
A_KEY = "fed_sb.A/"
R_KEY = "fed_sb.R/"


def adapted(params: Params, target: str = ".*") -> list[str]:
    """Weight names of the adapted layers: floating 2-D ``*.weight`` entries whose layer name
    (the key without ``.weight``) fully matches the regex ``target``, in state order."""
    pattern = re.compile(target)
    return [
        k
        for k, v in params.items()
        if k.endswith(".weight")
        and v.is_floating_point()
        and v.dim() == 2
        and pattern.fullmatch(k[: -len(".weight")]) is not None
    ]


def weight_svd_init(w0: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)``: the top-``rank`` left singular vectors (``out x r``) and right singular
    vectors transposed (``r x in``) of ``w0``. Exact SVD in float64, so the result does not
    depend on a random sketch; signs are fixed by LAPACK, deterministic on CPU."""
    u, _, vh = torch.linalg.svd(w0.detach().double(), full_matrices=False)
    return u[:, :rank].to(w0.dtype).contiguous(), vh[:rank].to(w0.dtype).contiguous()


def effective(w0: torch.Tensor, b: torch.Tensor, r: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``W0 + B R A`` (scale 1)."""
    return w0 + b @ r @ a


@dataclass(frozen=True, kw_only=True)
class FedSB(Strategy):
    """Fed-SB: clients train the LoRA-SB core ``R`` per layer; the server averages ``R``.

    Args:
        rank: ``r``, the adapter rank; each adapted layer sends ``r^2`` numbers (the paper: 200
            for 7B LLMs, which no small model here has room for).
        target: regex that the adapted layers' names must fully match (default: every Linear).
        weighting: ``"examples"`` (``n_i / sum n_j``) or ``"uniform"`` (the reference's mean).
    """

    client: ClassVar[str] = "fed-sb"

    rank: int = 4
    target: str = ".*"
    weighting: str = "examples"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        try:
            re.compile(self.target)
        except re.error as e:
            raise ValueError(f"target is not a valid regex: {e}") from e

    def init(self, params: Params) -> State:
        layers = adapted(params, self.target)
        if not layers:
            raise ValueError(f"Fed-SB found no nn.Linear layer whose name matches {self.target!r}")
        for name in layers:
            if self.rank > min(params[name].shape):
                raise ValueError(
                    f"rank {self.rank} exceeds min(out, in) = {min(params[name].shape)} "
                    f"of layer {name!r}"
                )
        state: dict[str, dict[str, torch.Tensor]] = {"w0": {}, "b": {}, "a": {}, "r": {}}
        for name in layers:
            w0 = params[name].detach().clone()
            b, a = weight_svd_init(w0, self.rank)
            state["w0"][name] = w0
            state["b"][name] = b
            state["a"][name] = a
            state["r"][name] = torch.zeros(self.rank, self.rank, dtype=w0.dtype)
        return state

    def model_params(self, state: State, params: Params) -> dict[str, torch.Tensor]:
        """The global model the evaluator sees: ``W0 + B R A`` on adapted layers."""
        out = dict(params)
        for name, w0 in state["w0"].items():
            out[name] = effective(w0, state["b"][name], state["r"][name], state["a"][name])
        return out

    def configure(self, state: State, params: Params, round: Round) -> dict[ClientId, Task]:
        tasks = super().configure(state, params, round)
        # The model entries carry the frozen base W0 (not the effective weights); B, A and R
        # ride along under keys no module has. In deployment B and A would be sent once.
        sent = dict(params)
        for name, w0 in state["w0"].items():
            sent[name] = w0
            sent[B_KEY + name] = state["b"][name]
            sent[A_KEY + name] = state["a"][name]
            sent[R_KEY + name] = state["r"][name]
        return {c: Task(version=t.version, params=sent, config=t.config) for c, t in tasks.items()}

    def validate(self, update: Update, params: Params) -> None:
        what = f"update from client {update.client_id}"
        # ``params`` are the engine's (effective) params: same names, shapes and dtypes as W0.
        layers = adapted(params, self.target)
        if set(update.payload) != set(layers):
            raise UpdateRejected(f"{what}: expected an R for exactly {sorted(layers)}")
        for name in layers:
            got, dtype = update.payload[name], params[name].dtype
            shape = (self.rank, self.rank)
            if not isinstance(got, torch.Tensor) or got.shape != shape or got.dtype != dtype:
                raise UpdateRejected(f"{what}: {name!r} must be a {dtype} tensor of shape {shape}")
            if not bool(torch.isfinite(got).all()):
                raise UpdateRejected(f"{what}: {name!r} contains NaN or Inf")

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            return self.model_params(state, params), state, {}
        weights = [float(u.num_examples) for u in updates]
        if self.weighting == "uniform" or sum(weights) <= 0:
            weights = [1.0] * len(updates)
        r_mean = weighted_mean(updates, weights)
        new_state = {**state, "r": {name: r_mean[name] for name in state["r"]}}
        sent = sum(r.numel() * r.element_size() for r in state["r"].values())
        # What FedAvg would upload for the same layers: their full weight matrices.
        full = sum(w.numel() * w.element_size() for w in state["w0"].values())
        metrics = {
            "upload_bytes": float(sent * len(updates)),
            "fedavg_upload_bytes": float(full * len(updates)),
        }
        return self.model_params(new_state, params), new_state, metrics
