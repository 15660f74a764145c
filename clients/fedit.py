"""The client half of FedIT: train LoRA's ``B`` and ``A`` (and the head), upload them.

Zhang et al., ICASSP 2024; see :mod:`fedlab.strategies.fedit` and :mod:`fedlab.lora`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedlab.lora import AdapterClient


@dataclass(frozen=True, kw_only=True)
class FedITClient(AdapterClient):
    """Trains ``B`` and ``A`` of every adapted layer (``W0`` frozen); uploads them."""

    trained: ClassVar[tuple[str, ...]] = ("b", "a")
