"""Fed-SB: federated LoRA-SB, where only the small ``r x r`` adapter core ``R`` travels.

Singhal, Ponkshe, Vartak, Varshney, Vepakomma. "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning." arXiv
2502.15436, 2025; the adapter is LoRA-SB (Ponkshe et al., arXiv 2411.19557).

Every ``nn.Linear`` weight ``W0`` (``out x in``) whose layer name fully matches ``target``
becomes ``W = W0 + B R A`` (scale ``alpha / r = 1``) with ``B`` (``out x r``) and ``A``
(``r x in``) frozen and shared by every client, and ``R`` (``r x r``) the only trainable tensor
besides an optional head. Clients upload ``R_i``; the server averages them. Because ``B`` and
``A`` are shared and frozen, ``B mean(R_i) A = mean(B R_i A)``: the aggregate is exactly the
average of the clients' full weight updates (ALGORITHMS.md §7). The adapter plumbing shared with
FedIT is :mod:`fedlab.lora`.

Initialization, ``initialization`` option:

* ``"weights"`` (default): the data-free variant of the LoRA-SB code (``find_and_initialize``,
  weight SVD): ``B`` and ``A`` are the top-``r`` left and right singular vectors of ``W0`` and
  ``R0 = 0``, so the run starts exactly at the initial model. No data is touched.
* ``"gradient"``: the paper's "update approximation". ``G`` is the gradient of the loss summed
  over batches of ``init_batch_size`` of the first ``init_samples`` examples of the workload's
  *public* sample, ``dW = -init_lr * sign(G)``, and from the rank-``r`` SVD ``dW^T = U S V^T``,
  ``A = U^T``, ``B = V``, ``R0 = S``: the run starts at ``W0 + trunc_r(dW)``. The paper computes
  ``G`` on private training examples without noise, which leaks them (ALGORITHMS.md §7,
  [BUG/privacy]); here it never sees client data: the simulator hands the strategy a public
  sample that the workload keeps disjoint from every client's data (``public`` below), and a
  workload without one is refused. The SVD is exact (float64), not the paper's randomized
  ``svd_lowrank``, so the init is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.func import functional_call

from fedlab.data import PublicSample
from fedlab.lora import LoRAStrategy
from fedlab.objectives import objective_of
from fedlab.types import Params

INITIALIZATIONS = ("weights", "gradient")


def weight_svd_init(w0: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)``: the top-``rank`` left singular vectors (``out x r``) and right singular
    vectors transposed (``r x in``) of ``w0``. Exact SVD in float64, so the result does not
    depend on a random sketch; signs are fixed by LAPACK, deterministic on CPU."""
    u, _, vh = torch.linalg.svd(w0.detach().double(), full_matrices=False)
    return u[:, :rank].to(w0.dtype).contiguous(), vh[:rank].to(w0.dtype).contiguous()


def update_svd_init(
    delta: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, R0, A)`` with ``B R0 A`` the best rank-``rank`` approximation of ``delta``.

    As the LoRA-SB code: ``delta^T = U S V^T``, ``A = U^T``, ``B = V``, ``R0 = diag(S)``, so
    ``B^T B = I`` and ``A A^T = I``. Exact SVD in float64.
    """
    u, s, vh = torch.linalg.svd(delta.detach().double().T, full_matrices=False)
    b, r0, a = vh[:rank].T, torch.diag(s[:rank]), u[:, :rank].T
    return tuple(t.to(delta.dtype).contiguous() for t in (b, r0, a))  # type: ignore[return-value]


def public_gradient(
    public: PublicSample, params: Params, names: Sequence[str], samples: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """``G = sum over batches of grad(mean batch loss)`` for ``names``, on the first ``samples``
    public examples; the loss is the workload's objective (``public.objective``: cross-entropy
    for classification, mean squared error for regression), as in the local training loop."""
    n = min(samples, len(public.data))
    if n < 1:
        raise ValueError("the public sample is empty: gradient initialization needs examples")
    objective = objective_of(public)
    weights = {k: params[k].detach().clone().requires_grad_(True) for k in names}
    rest = {k: v.detach() for k, v in params.items() if k not in weights}
    grads = {k: torch.zeros_like(w) for k, w in weights.items()}
    public.model.eval()  # dropout off: the gradient of the model the clients start from
    for start in range(0, n, batch_size):
        x = public.data.x[start : min(start + batch_size, n)]
        y = public.data.y[start : min(start + batch_size, n)]
        out = functional_call(public.model, {**rest, **weights}, (x,))
        loss = objective.loss(out, y)
        for k, g in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
            grads[k] += g
    return grads


@dataclass(frozen=True, kw_only=True)
class FedSB(LoRAStrategy):
    """Fed-SB: clients train the LoRA-SB core ``R`` per layer (and the head); the server
    averages them.

    Args:
        rank: ``r``, the adapter rank; each adapted layer sends ``r^2`` numbers (the paper: 200
            for 7B LLMs, which no small model here has room for).
        target: regex that the adapted layers' names must fully match (default: every Linear).
        head: regex of layers trained in full and averaged (the paper's classifier head).
        weighting: ``"examples"`` (``n_i / sum n_j``) or ``"uniform"`` (the reference's mean).
        initialization: ``"weights"`` (SVD of ``W0``) or ``"gradient"`` (SVD of the
            approximated first update on the public sample).
        init_samples: public examples the gradient is accumulated on (paper: 50 to 550).
        init_batch_size: examples per batch of that accumulation (the paper's ``eg_bs``).
        init_lr: ``eta`` of ``dW = -eta * sign(G)``.
        public: the public sample and model for ``"gradient"``; the simulator sets it from the
            workload (``build_engine``), never from client data.
    """

    client: ClassVar[str] = "fed-sb"
    factors: ClassVar[tuple[str, ...]] = ("b", "a", "r")
    trained: ClassVar[tuple[str, ...]] = ("r",)

    initialization: str = "weights"
    init_samples: int = 64
    init_batch_size: int = 16
    init_lr: float = 0.001
    public: PublicSample | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.initialization not in INITIALIZATIONS:
            raise ValueError(
                f"initialization must be one of {INITIALIZATIONS}, got {self.initialization!r}"
            )
        if self.init_samples < 1 or self.init_batch_size < 1:
            raise ValueError("init_samples and init_batch_size must be >= 1")
        if not self.init_lr > 0:
            raise ValueError(f"init_lr must be positive, got {self.init_lr}")
        if self.public is not None and not isinstance(self.public, PublicSample):
            raise ValueError("public is set by the simulator from the workload's public sample")

    @property
    def needs_public_data(self) -> bool:
        """True while gradient initialization still waits for the workload's public sample."""
        return self.initialization == "gradient" and self.public is None

    def init_factors(
        self, params: Params, layers: Sequence[str]
    ) -> dict[str, dict[str, torch.Tensor]]:
        if self.initialization == "weights":
            factors: dict[str, dict[str, torch.Tensor]] = {"b": {}, "a": {}, "r": {}}
            for name in layers:
                b, a = weight_svd_init(params[name], self.rank)
                factors["b"][name], factors["a"][name] = b, a
                factors["r"][name] = torch.zeros(self.rank, self.rank, dtype=b.dtype)
            return factors
        if self.public is None:
            raise ValueError(
                "initialization 'gradient' needs a public sample: run it on a workload that "
                "has one (e.g. digits-shift), or pass public=PublicSample(...)"
            )
        grads = public_gradient(
            self.public, params, layers, self.init_samples, self.init_batch_size
        )
        factors = {"b": {}, "a": {}, "r": {}}
        for name in layers:
            b, r0, a = update_svd_init(-self.init_lr * torch.sign(grads[name]), self.rank)
            factors["b"][name], factors["r"][name], factors["a"][name] = b, r0, a
        return factors
