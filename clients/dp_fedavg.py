"""The client half of client-level DP (DP-FedAvg): clip the update's norm, maybe add noise.

An :class:`~fedlab.transforms.UpdateTransform`, so the same clipping runs in simulation and in a
deployed client, before any compression. See :mod:`fedlab.strategies.dp_fedavg` for the server
half (central noise, accounting, adaptive clipping) and what each mode guarantees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedlab import optim, privacy, seeding
from fedlab.transforms import TransformContext, UpdateTransform
from fedlab.types import Params, State

__all__ = ["CLIP_KEY", "NORM_KEY", "ClipUpdate"]

CLIP_KEY = "dp_clip_norm"
"""The task setting with this version's clipping norm (the server's, when it adapts it)."""

NORM_KEY = "dp:update_norm"
"""The payload entry with the update's norm before clipping, for adaptive clipping (central
mode only: the trusted server reads it and takes it out before the strategy sees the update)."""


@dataclass(frozen=True, kw_only=True)
class ClipUpdate(UpdateTransform):
    """Scale the update to norm at most ``S``; with ``local``, add ``N(0, (z S)²)`` to it.

    Args:
        clip_norm: ``S``, unless the task's ``dp_clip_norm`` setting says otherwise.
        noise_multiplier: ``z`` of the local noise (used only with ``local``).
        local: add the noise here, on the client, instead of on the server's sum.
        send_norm: add the pre-clipping norm as the ``NORM_KEY`` entry (adaptive clipping).
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 0.0
    local: bool = False
    send_norm: bool = False

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and self.noise_multiplier >= 0):
            raise ValueError(
                f"clip-update needs clip_norm > 0 and noise_multiplier >= 0, got "
                f"{self.clip_norm}, {self.noise_multiplier}"
            )
        if self.local and self.send_norm:
            raise ValueError("clip-update: a locally private update cannot carry its norm")
        if self.local and self.noise_multiplier > 0 and math.isinf(self.clip_norm):
            raise ValueError("clip-update: local noise needs a finite clip_norm")

    def encode(
        self, payload: Params, ctx: TransformContext, state: State | None
    ) -> tuple[Params, State | None]:
        bad = [k for k, v in payload.items() if not v.is_floating_point()]
        if bad:
            raise ValueError(
                f"client-level DP clips floating-point deltas; the payload entry {bad[0]!r} is "
                f"{payload[bad[0]].dtype}"
            )
        clip = float(ctx.config.get(CLIP_KEY, self.clip_norm))
        norm = optim.norm(payload)
        scale = clip / norm if norm > clip else 1.0
        out = {k: v * scale if scale < 1.0 else v.clone() for k, v in payload.items()}
        if self.local and self.noise_multiplier > 0:
            gen = seeding.torch_generator(ctx.seed, privacy.NOISE, ctx.version, ctx.client_id, 1)
            std = self.noise_multiplier * clip
            for k in sorted(out):
                noise = torch.randn(out[k].shape, generator=gen, dtype=torch.float64) * std
                out[k] = out[k] + noise.to(out[k])
        if self.send_norm:
            out[NORM_KEY] = torch.tensor(norm, dtype=torch.float64)
        return out, None

    def decode(self, payload: Params, ctx: TransformContext) -> Params:
        """Nothing to undo: the server half reads ``NORM_KEY`` and clips again itself."""
        return payload
