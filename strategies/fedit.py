"""FedIT: federated LoRA with plain averaging of both factors, the baseline Fed-SB improves on.

Zhang, Vahidian, Kuo, Li, Ruan, Wang, Chen, Kreis. "Towards Building the Federated GPT:
Federated Instruction Tuning." ICASSP 2024 (arXiv 2305.05644).

Every adapted ``nn.Linear`` weight ``W0`` becomes ``W = W0 + scale * B A`` (standard LoRA:
``A`` drawn like ``kaiming_uniform(a=sqrt 5)``, ``B = 0``, so the run starts at the initial
model). Clients train both ``B`` and ``A`` (and the optional head) and upload them; the server
averages each factor separately. ``mean(B_i) mean(A_i) != mean(B_i A_i)`` in general: the
aggregate is not the average of the clients' updates, which is the inexactness Fed-SB removes
(ALGORITHMS.md §7). Each version costs ``r (in + out)`` numbers per layer and client, each way.
The adapter plumbing shared with Fed-SB is :mod:`fedlab.lora`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab import seeding
from fedlab.lora import LoRAStrategy
from fedlab.types import Params


@dataclass(frozen=True, kw_only=True)
class FedIT(LoRAStrategy):
    """FedIT: clients train LoRA's ``B`` and ``A``; the server averages each.

    Args:
        rank: ``r``, the LoRA rank.
        target: regex that the adapted layers' names must fully match (default: every Linear).
        head: regex of layers trained in full and averaged.
        weighting: ``"examples"`` (``n_i / sum n_j``) or ``"uniform"``.
        scale: ``alpha / r``, the factor of ``B A``.
    """

    client: ClassVar[str] = "fedit"
    factors: ClassVar[tuple[str, ...]] = ("b", "a")
    trained: ClassVar[tuple[str, ...]] = ("b", "a")

    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be positive, got {self.scale}")

    @property
    def adapter_scale(self) -> float:
        return self.scale

    def init_factors(
        self, params: Params, layers: Sequence[str]
    ) -> dict[str, dict[str, torch.Tensor]]:
        # A stream keyed by the initial model (itself a function of the run seed), as FRL.
        key = seeding.params_key(params)
        factors: dict[str, dict[str, torch.Tensor]] = {"b": {}, "a": {}}
        for i, name in enumerate(layers):
            w0 = params[name]
            out, inp = w0.shape
            g = seeding.torch_generator(key, seeding.MODEL, i)
            bound = 1.0 / math.sqrt(inp)  # kaiming_uniform(a=sqrt 5), PEFT's default for A
            a = (torch.rand(self.rank, inp, generator=g, dtype=torch.float64) * 2 - 1) * bound
            factors["a"][name] = a.to(w0.dtype)
            factors["b"][name] = torch.zeros(out, self.rank, dtype=w0.dtype)
        return factors
