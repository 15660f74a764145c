"""The arithmetic precision of local training: ``fp32``, or ``bf16`` autocast for GPUs.

With ``bf16`` the forward and the loss of every local step run under
``torch.autocast(device_type, dtype=torch.bfloat16)``: matrix products and convolutions in
bfloat16, while the parameters, their gradients and the optimizer state (momentum) stay
fp32 ("master params"), as in mixed-precision training (Micikevicius et al., ICLR 2018).
Updates sent to the server are fp32 deltas, so strategies and codecs see no difference but
the rounding. Both training loops (:meth:`fedlab.clients.LocalSGD.train` and its batched form)
enter :func:`autocast` the same way, and compute with :func:`lowered` forwards.

Autocast alone does not reach every operation inside ``torch.func.vmap``: a convolution's
batching rule (a grouped convolution) runs below the autocast dispatch key, so in the batched
loop, and in DP-SGD's per-record gradients, it would silently stay fp32, and a linear layer's
bias would be added in fp32 after its product. :func:`lowered` therefore also casts the
floating parameters and inputs to bfloat16 itself, a differentiable cast, so gradients still
reach the fp32 parameters in fp32; outside ``vmap`` this computes what autocast computes for
convolutions and linear layers, and autocast still runs its fp32 operations (softmax, norms,
losses) in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from fedlab.config import PRECISIONS

__all__ = ["PRECISIONS", "autocast", "check", "lowered", "unsupported"]

Forward = Callable[[Sequence[torch.Tensor], torch.Tensor], torch.Tensor]


def check(precision: str) -> str:
    """``precision`` when it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: one line naming the valid values.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def unsupported(precision: str, device: torch.device) -> str:
    """Why ``device`` cannot train at ``precision`` ("" when it can).

    A CUDA device needs native bfloat16 (compute capability 8.0 or later: A100, H100, RTX 30xx
    and newer); emulated bfloat16 on older GPUs is slower than fp32. The CPU always can, though
    only CPUs with AVX512-BF16 or AMX gain speed from it: on CPU it is for testing.
    """
    if check(precision) == "fp32":
        return ""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            return f"device {device} ({torch.cuda.get_device_name(device)}) has no native bfloat16"
        return ""
    if device.type != "cpu" and not torch.amp.is_autocast_available(device.type):
        return f"torch has no autocast for device type {device.type!r}"
    return ""


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The context the forward and loss of a local step run in, at ``precision`` on ``device``.

    Raises:
        ValueError: an unknown precision, or a device that cannot train at it (one line).
    """
    if check(precision) == "fp32":
        return contextlib.nullcontext()
    why = unsupported(precision, device)
    if why:
        raise ValueError(f"precision {precision!r} refused: {why}; this device trains in 'fp32'")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lowered(precision: str, forward: Forward) -> Forward:
    """``forward(tensors, x)`` at ``precision``: under ``bf16`` the floating ``tensors`` and
    ``x`` go in as bfloat16 and the output comes back as fp32, for the loss; ``fp32``: as is.

    Call it inside :func:`autocast`.
    """
    if check(precision) == "fp32":
        return forward

    def forward_bf16(tensors: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        low = [_bf16(t) for t in tensors]
        return forward(low, _bf16(x)).float()

    return forward_bf16


def _bf16(t: torch.Tensor) -> torch.Tensor:
    # Integer inputs (token ids) stay as they are.
    return t.to(torch.bfloat16) if t.is_floating_point() else t
