"""Differential-privacy building blocks shared by every private client half and strategy.

Per-record gradients (``torch.func``: ``vmap(grad(...))`` over a functional forward, so models
need no wrapping and no hooks), per-record clipping, and the accountant: Opacus's RDP
accountant, kept here as a plain history of ``(noise_multiplier, sample_rate, steps)`` entries
so that it lives in checkpointable client or strategy state and survives every version and
resume. Opacus is a core dependency (a private run must never silently report no ``ε``); it
is imported only when ``ε`` is computed or a model is checked, and :func:`require_opacus`
turns an installation that lacks it into one clear line at start-up.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

__all__ = [
    "NOISE",
    "History",
    "PrivacyBudgetExhausted",
    "check_model",
    "clip_per_record",
    "compose",
    "epsilon",
    "noise_multiplier_for",
    "per_record_grads",
    "require_opacus",
]

NOISE = 0x4450
"""The seeding purpose of DP noise streams (``seeding.torch_generator(seed, NOISE, ...)``)."""

History = list[list[float]]
"""An accountant's history: ``[[noise_multiplier, sample_rate, steps], ...]`` (plain lists, so
it can be stored in a checkpoint)."""


class PrivacyBudgetExhausted(RuntimeError):
    """The next version would take the run's ``ε`` past its ``target_epsilon``.

    Raised before that version's tasks go out, so nothing of it is computed or released and
    the last checkpoint holds the run's final model.
    """


def require_opacus() -> None:
    """Refuse to start a private run in an installation without Opacus.

    Raises:
        ValueError: Opacus cannot be imported; the message says what to install.
    """
    try:
        import opacus  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"differential privacy (--dp) needs Opacus, a fedlab dependency this installation "
            f"lacks ({e}): pip install 'opacus>=1.5' (or reinstall fedlab)"
        ) from e


# Modules whose output for one record depends on the other records of its batch: per-record
# gradients (and so DP-SGD's guarantee) are undefined for them in training mode. Opacus's other
# validators (LSTM, MultiheadAttention) concern its hooks, which fedlab does not use.
_BATCH_MIXING = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def check_model(model: nn.Module) -> None:
    """Refuse a model that record-level DP cannot train, with Opacus's ``ModuleValidator``
    verdict and its fix, instead of the error ``torch.func`` would raise mid-run.

    Raises:
        ValueError: the model holds BatchNorm (or InstanceNorm with running statistics).
    """
    require_opacus()
    from opacus.validators import ModuleValidator

    found = [
        (name or type(model).__name__, m)
        for name, m in model.named_modules()
        if isinstance(m, _BATCH_MIXING)
    ]
    verdicts = []
    for name, module in found:
        for error in ModuleValidator.validate(module, strict=False):
            verdicts.append(f"layer {name!r}: " + " ".join(str(error).split()))
    if verdicts:
        raise ValueError(
            "--dp sample cannot train this model; Opacus's ModuleValidator says: "
            + " | ".join(verdicts)
            + ". Fix: build the model with opacus.validators.ModuleValidator.fix(model), "
            "which replaces BatchNorm with GroupNorm, or use a model without it"
        )


Forward = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]
"""``forward(tensors, x) -> logits``, computing with ``tensors`` in place of the trained ones."""


def per_record_grads(
    forward: Forward,
    params: Sequence[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-record gradients of ``loss_fn(out, y)`` (default: cross-entropy; the workload's
    objective's loss) with respect to ``params``.

    Returns ``(grads, losses, logits)``: ``grads[i]`` has a leading record dimension, and the
    per-record losses and logits come from the same forward passes. Per-record gradients are
    undefined for BatchNorm in training mode (:func:`check_model` refuses such models).
    """

    def loss(
        ps: tuple[torch.Tensor, ...], xr: torch.Tensor, yr: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        out = forward(ps, xr.unsqueeze(0))
        value = loss_fn(out, yr.unsqueeze(0))
        return value, (value.detach(), out.detach().squeeze(0))

    detached = tuple(p.detach() for p in params)
    fn = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    grads, (losses, logits) = fn(detached, x, y)
    return list(grads), losses, logits


def clip_per_record(
    grads: Sequence[torch.Tensor], clip: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Scale every record's gradient (dim 0 of each tensor) to total norm at most ``clip``.

    Returns the clipped gradients and the per-record norms before clipping (float64).
    """
    sq = torch.zeros(grads[0].shape[0], dtype=torch.float64, device=grads[0].device)
    for g in grads:
        sq += g.detach().double().reshape(g.shape[0], -1).pow(2).sum(1)
    norms = sq.sqrt()
    if math.isinf(clip):
        return list(grads), norms
    scale = torch.where(norms > clip, clip / norms.clamp_min(1e-300), torch.ones_like(norms))
    out = [g * scale.to(g.dtype).reshape(-1, *([1] * (g.dim() - 1))) for g in grads]
    return out, norms


def compose(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """``history`` followed by ``steps`` more subsampled Gaussian steps (a new list)."""
    out = [list(h) for h in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1][2] += steps
    else:
        out.append([float(noise_multiplier), float(sample_rate), float(steps)])
    return out


def _orders() -> list[float]:
    from opacus.accountants import RDPAccountant

    return [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """One step's RDP at Opacus's default orders. A client's ``(σ, q)`` never changes, so
    caching it makes each version's ``ε`` cost a sum instead of a fresh series evaluation."""
    from opacus.accountants.analysis import rdp

    per: Any = rdp.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=_orders()
    )
    return tuple(float(v) for v in per)


def epsilon(history: History, delta: float) -> float:
    """``ε`` at ``delta`` of the composition in ``history`` (0 for no steps).

    Exactly what Opacus's ``RDPAccountant.get_epsilon(delta)`` returns for the same history
    (its default orders and conversion); ``inf`` when a step had no noise.

    Raises:
        ImportError: Opacus is not installed (:func:`require_opacus` says so at start-up).
    """
    steps = [(z, q, s) for z, q, s in history if s > 0]
    if not steps:
        return 0.0
    if any(z <= 0 for z, _, _ in steps):
        return math.inf
    import numpy as np
    from opacus.accountants.analysis import rdp

    total = sum(np.asarray(_rdp_per_step(float(z), float(q))) * int(s) for z, q, s in steps)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is valid, only not the tightest.
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp.get_privacy_spent(orders=_orders(), rdp=total, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=1024)
def noise_multiplier_for(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The smallest noise multiplier (within 1% of ``target_epsilon``) whose ``steps`` steps
    at ``sample_rate`` cost at most ``target_epsilon`` at ``delta`` by :func:`epsilon`.

    Opacus's ``get_noise_multiplier`` over the integer orders only (fractional orders cost
    twenty times more; fewer orders can only overstate ``ε``) gives an upper bound ``σ_int``;
    a few false-position steps with every order then recover the budget the integer orders
    leave unused (often 10-15%). The result always satisfies ``ε <= target_epsilon``.
    """
    if not (target_epsilon > 0 and 0 < delta < 1 and 0 < sample_rate <= 1 and steps >= 1):
        raise ValueError(
            f"cannot solve the noise multiplier for target_epsilon={target_epsilon}, "
            f"delta={delta}, sample_rate={sample_rate}, steps={steps}"
        )
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        high: Any = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.01 * target_epsilon,
            alphas=[a for a in _orders() if a == int(a)],
        )
    hi = float(high)

    def cost(z: float) -> float:
        return epsilon([[z, sample_rate, float(steps)]], delta)

    e_hi = cost(hi)  # <= target: fewer orders can only overstate ε
    # ε falls roughly like 1/σ, so the first guess lands close; keep a bracket after that.
    lo, e_lo = hi * e_hi / target_epsilon, math.inf
    for _ in range(12):
        if e_hi >= 0.99 * target_epsilon:
            break
        mid = lo if math.isinf(e_lo) else lo + (hi - lo) * (e_lo - target_epsilon) / (e_lo - e_hi)
        e_mid = cost(mid)
        if e_mid <= target_epsilon:
            hi, e_hi = mid, e_mid
            if math.isinf(e_lo):
                lo = hi * e_hi / target_epsilon
        else:
            lo, e_lo = mid, e_mid
    return hi
