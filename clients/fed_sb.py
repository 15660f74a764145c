"""The client half of Fed-SB: train only the LoRA-SB cores ``R`` (and the head), upload them.

Singhal et al., arXiv 2502.15436; see :mod:`fedlab.strategies.fed_sb` and :mod:`fedlab.lora`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from fedlab.lora import AdapterClient


@dataclass(frozen=True, kw_only=True)
class FedSBClient(AdapterClient):
    """Trains ``R`` of every adapted layer (``W0``, ``B`` and ``A`` frozen); uploads them."""

    trained: ClassVar[tuple[str, ...]] = ("r",)
