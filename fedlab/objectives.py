"""What a workload's model is trained to do: its loss and the metrics it is judged by.

A workload declares its objective with an ``objective`` attribute, a name of
:data:`OBJECTIVES` (a custom data module declares it with a module-level ``objective``); a
workload without one is a classification workload. The built-in client half's training loop
(:class:`~fedlab.clients.sgd.LocalSGD`), the global evaluation and federated evaluation all
compute the loss and metrics through the declared objective, so a user's regression data
trains and evaluates without a client half of its own.

- ``classification``: ``y`` holds int64 class labels ``[N]``; the model's output is logits
  ``[N, classes]``; loss: cross-entropy; metric: ``accuracy``.
- ``regression``: ``y`` holds float targets ``[N]`` or ``[N, d]``; the output ``[N, d]``
  (``[N, 1]`` for ``[N]`` targets); loss: mean squared error; metric: ``mae`` (mean absolute
  error).
- ``next-token``: ``y`` holds int64 token ids ``[N, T]``; the output is logits
  ``[N, T, vocabulary]``; loss: cross-entropy per token; metric: ``accuracy`` per token. An
  example's loss and accuracy are its tokens' means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlab.data.base import unknown


@dataclass(frozen=True)
class Objective:
    """A loss and metrics. Subclasses override :meth:`example_losses` and :meth:`example_scores`.

    Attributes:
        name: the name a workload declares.
        metrics: the metric names :meth:`example_scores` returns, each with whether higher is
            better (``accuracy``) or lower (``mae``); ``loss`` is always lower-is-better.
    """

    name: str = ""
    metrics: tuple[tuple[str, bool], ...] = ()

    def example_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One loss per example, ``[N]``, differentiable."""
        raise NotImplementedError

    def example_scores(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each metric per example, ``[N]`` (not differentiated)."""
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch, the quantity local SGD minimises."""
        return self.example_losses(out, y).mean()


@dataclass(frozen=True)
class Classification(Objective):
    """Cross-entropy on integer labels; accuracy."""

    name: str = "classification"
    metrics: tuple[tuple[str, bool], ...] = (("accuracy", True),)

    def example_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    def example_scores(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": (out.detach().argmax(-1) == y).to(out.dtype)}

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # F.cross_entropy's own mean: bit-identical to what the loop computed before objectives.
        return F.cross_entropy(out, y)


def _targets(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` and ``y`` as ``[N, d]`` of ``out``'s dtype (a ``[N]`` target is ``[N, 1]``)."""
    y = y.to(out.dtype)
    if y.dim() == 1:
        y = y.unsqueeze(1)
    out = out.reshape(out.shape[0], -1)
    if out.shape != y.reshape(y.shape[0], -1).shape:
        raise ValueError(
            f"regression: the model's output {tuple(out.shape)} does not match the targets "
            f"{tuple(y.shape)} (one output per target value)"
        )
    return out, y.reshape(y.shape[0], -1)


@dataclass(frozen=True)
class Regression(Objective):
    """Mean squared error on float targets; mean absolute error."""

    name: str = "regression"
    metrics: tuple[tuple[str, bool], ...] = (("mae", False),)

    def example_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        o, t = _targets(out, y)
        return (o - t).pow(2).mean(1)

    def example_scores(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        o, t = _targets(out.detach(), y)
        return {"mae": (o - t).abs().mean(1)}


@dataclass(frozen=True)
class NextToken(Objective):
    """Cross-entropy per token of a sequence; per-token accuracy."""

    name: str = "next-token"
    metrics: tuple[tuple[str, bool], ...] = (("accuracy", True),)

    def example_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.dim() != 3 or y.shape != out.shape[:2]:
            raise ValueError(
                f"next-token: expected logits [N, T, vocabulary] and token ids [N, T], got "
                f"{tuple(out.shape)} and {tuple(y.shape)}"
            )
        per_token = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
        return per_token.view(y.shape).mean(1)

    def example_scores(self, out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": (out.detach().argmax(-1) == y).to(out.dtype).mean(1)}


CLASSIFICATION = Classification()
OBJECTIVES: dict[str, Objective] = {o.name: o for o in (CLASSIFICATION, Regression(), NextToken())}


def objective_of(workload: object) -> Objective:
    """The objective ``workload`` declares (its ``objective`` attribute), else classification.

    Raises:
        ValueError: the declared name is unknown.
    """
    declared = getattr(workload, "objective", None)
    if declared is None:
        return CLASSIFICATION
    if isinstance(declared, Objective):
        return declared
    if not isinstance(declared, str) or declared not in OBJECTIVES:
        raise unknown("objective", str(declared), tuple(OBJECTIVES))
    return OBJECTIVES[declared]
