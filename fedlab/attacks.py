"""Simulated Byzantine clients: who is malicious, and what they send instead of honest work.

A model-poisoning :class:`Attack` replaces the updates of the malicious clients in a buffer just
before the strategy aggregates it. The attacks that need the honest updates (ALIE, IPM, min-max)
are *omniscient*: they see the benign updates of the same aggregation. When a buffer holds no
benign update (possible with small asynchronous buffers) they fall back to the malicious
clients' own, honestly trained updates as their estimate of the benign ones.

A :class:`DataAttack` poisons the training data of the malicious clients instead (label
flipping); the clients then train honestly on it.

Attacks, with the papers they come from:

* ``sign-flip``: ``-c * Δ`` (the "sign flipping" baseline of the robust-aggregation literature).
* ``scaling``: ``λ * Δ``; FRL (Mozaffari et al., USENIX Security 2023) attacks FedAvg with a
  huge factor.
* ``gaussian``: an update of ``N(0, σ²)`` noise.
* ``alie``: Baruch, Baruch, Goldberg. "A Little Is Enough: Circumventing Defenses For Distributed
  Learning." NeurIPS 2019. ``mean - z * std`` of the benign updates.
* ``ipm``: Xie, Koyejo, Gupta. "Fall of Empires: Breaking Byzantine-tolerant SGD by Inner
  Product Manipulation." UAI 2020. ``-ε * mean`` of the benign updates.
* ``min-max``: Shejwalkar, Houmansadr. "Manipulating the Byzantine: Optimizing Model Poisoning
  Attacks and Defenses for Federated Learning." NDSS 2021.
* ``label-flip``: labels ``y -> C - 1 - y`` on the malicious clients' data.
* ``reversed-ranking``: FRL's rank attack (see :mod:`fedlab.strategies.frl`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fedlab import seeding
from fedlab.data import ClientData, Workload
from fedlab.registry import import_builtin, load_dotted
from fedlab.types import Params, Round, Update

__all__ = [
    "ALIE",
    "ATTACKS",
    "IPM",
    "Adversary",
    "Attack",
    "DataAttack",
    "Gaussian",
    "LabelFlip",
    "MinMax",
    "PoisonedWorkload",
    "Scaling",
    "SignFlip",
    "build_adversary",
    "choose_malicious",
]

# Stream purposes, clear of fedlab.seeding's and fedlab.data's numbers.
MALICIOUS = 301
NOISE = 302

ATTACKS: dict[str, str] = {
    "sign-flip": "fedlab.attacks:SignFlip",
    "scaling": "fedlab.attacks:Scaling",
    "gaussian": "fedlab.attacks:Gaussian",
    "alie": "fedlab.attacks:ALIE",
    "ipm": "fedlab.attacks:IPM",
    "min-max": "fedlab.attacks:MinMax",
    "label-flip": "fedlab.attacks:LabelFlip",
    "reversed-ranking": "fedlab.strategies.frl:ReversedRanking",
}
"""Attack names and the ``module:Class`` behind each, imported when first used."""


@runtime_checkable
class Attack(Protocol):
    """A model-poisoning attack."""

    def corrupt(
        self, malicious: Sequence[Update], benign: Sequence[Update], params: Params, round: Round
    ) -> list[Update]:
        """Replace the malicious clients' updates (same client ids and versions, same order).

        Args:
            malicious: the honestly computed updates of the malicious clients.
            benign: the other updates of this aggregation (omniscient attackers read them).
            params: the current global params.
            round: the aggregation's context; ``round.seed`` seeds any randomness.
        """
        ...


@runtime_checkable
class DataAttack(Protocol):
    """A data-poisoning attack on the malicious clients' training data."""

    def poison(self, data: ClientData, client_id: int, seed: int) -> ClientData:
        """The poisoned version of ``client_id``'s training data."""
        ...


# --------------------------------------------------------------------------- helpers


def _replace(updates: Sequence[Update], payloads: Sequence[Params]) -> list[Update]:
    return [dataclasses.replace(u, payload=dict(p)) for u, p in zip(updates, payloads, strict=True)]


def _flatten(updates: Sequence[Update], names: Sequence[str]) -> torch.Tensor:
    """One float64 row per update: its payload entries concatenated in ``names`` order."""
    return torch.stack(
        [torch.cat([u.payload[k].detach().double().reshape(-1) for k in names]) for u in updates]
    )


def _unflatten(vector: torch.Tensor, like: Params, names: Sequence[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    i = 0
    for k in names:
        ref = like[k]
        out[k] = vector[i : i + ref.numel()].reshape(ref.shape).to(ref.dtype)
        i += ref.numel()
    return out


def _reference(malicious: Sequence[Update], benign: Sequence[Update]) -> Sequence[Update]:
    # Omniscient attacks estimate the honest distribution from the benign updates; with none in
    # the buffer, the malicious clients' own honest updates are the best estimate they have.
    return benign if benign else malicious


def _omniscient(malicious: Sequence[Update], benign: Sequence[Update], craft: Any) -> list[Update]:
    """Every malicious client sends ``craft(rows)`` computed from the reference updates."""
    if not malicious:
        return []
    ref = _reference(malicious, benign)
    names = sorted(malicious[0].payload)
    vector = craft(_flatten(ref, names))
    payload = _unflatten(vector, malicious[0].payload, names)
    return _replace(malicious, [payload] * len(malicious))


def _check_finite(name: str, value: float, *, positive: bool = False) -> None:
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "positive and finite" if positive else "finite"
        raise ValueError(f"attack option {name} must be {kind}, got {value}")


# --------------------------------------------------------------------------- attacks


@dataclass(frozen=True, kw_only=True)
class SignFlip:
    """Send ``-scale * Δ`` instead of the honest delta ``Δ``.

    Args:
        scale: ``c``, the magnitude of the flipped update.
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_finite("scale", self.scale, positive=True)

    def corrupt(
        self, malicious: Sequence[Update], benign: Sequence[Update], params: Params, round: Round
    ) -> list[Update]:
        return _replace(
            malicious, [{k: -self.scale * v for k, v in u.payload.items()} for u in malicious]
        )


@dataclass(frozen=True, kw_only=True)
class Scaling:
    """Send ``factor * Δ`` (FRL attacks FedAvg with ``1e5``; 100 already dominates a mean).

    Args:
        factor: ``λ``.
    """

    factor: float = 100.0

    def __post_init__(self) -> None:
        _check_finite("factor", self.factor)

    def corrupt(
        self, malicious: Sequence[Update], benign: Sequence[Update], params: Params, round: Round
    ) -> list[Update]:
        return _replace(
            malicious, [{k: self.factor * v for k, v in u.payload.items()} for u in malicious]
        )


@dataclass(frozen=True, kw_only=True)
class Gaussian:
    """Send pure ``N(0, std²)`` noise, drawn per client from ``(round.seed, client)``.

    Args:
        std: ``σ``.
    """

    std: float = 1.0

    def __post_init__(self) -> None:
        _check_finite("std", self.std, positive=True)

    def corrupt(
        self, malicious: Sequence[Update], benign: Sequence[Update], params: Params, round: Round
    ) -> list[Update]:
        payloads = []
        for u in malicious:
            gen = seeding.torch_generator(round.seed, NOISE, u.client_id)
            payloads.append(
                {
                    k: (torch.randn(v.shape, generator=gen, dtype=torch.float64) * self.std).to(
                        v.dtype
                    )
                    for k, v in sorted(u.payload.items())
                }
            )
        return _replace(malicious, payloads)


def alie_z(n: int, m: int) -> float:
    """Baruch et al.'s ``z_max`` for ``n`` clients of which ``m`` are malicious.

    ``s = floor(n/2 + 1) - m`` benign clients must be won over; ``z = Φ⁻¹((n - s) / n)``.
    """
    s = max(1, math.floor(n / 2 + 1) - m)
    p = (n - s) / n
    # p is 0 for a single client; the attack then sends the mean (z = 0).
    return statistics.NormalDist().inv_cdf(p) if 0 < p < 1 else 0.0


@dataclass(frozen=True, kw_only=True)
class ALIE:
    """A Little Is Enough: every malicious client sends ``mean - z * std`` of the benign updates.

    ``z`` defaults to the paper's ``z_max`` from the number of updates in the aggregation and
    the number of malicious ones (:func:`alie_z`); ``std`` is the coordinate-wise population
    standard deviation.

    Args:
        z: a fixed ``z`` (0: the paper's formula).
    """

    z: float = 0.0

    def __post_init__(self) -> None:
        _check_finite("z", self.z)

    def corrupt(
        self, malicious: Sequence[Update], benign: Sequence[Update], params: Params, round: Round
    ) -> list[Update]:
        z = self.z or alie_z(len(malicious) + len(benign), len(malicious))

        def craft(rows: torch.Tensor) -> torch.Tensor:
            return rows.mean(0) - z * rows.std(0, unbiased=False)

        return _omniscient(malicious, benign, craft)


@dataclass(frozen=True, kw_only=True)
class IPM:
    """Inner-product manipulation: send ``-epsilon * mean`` of the benign updates.

    Args:
        epsilon: ``ε`` (DP-BREM's experiments use 1; Xie et al. also use 0.1 against Krum).
    """

    epsilon: float = 1.0

    def __post_init__(self) -> None:
        _check_finite("epsilon", self.epsilon, positive=True)

    def corrupt(
        self, malicious: Sequence[Update], benign: Sequence[Update], params: Params, round: Round
    ) -> list[Update]:
        return _omniscient(malicious, benign, lambda rows: -self.epsilon * rows.mean(0))


MINMAX_DIRECTIONS = ("std", "unit")


@dataclass(frozen=True, kw_only=True)
class MinMax:
    """Min-max: ``mean + γ p`` with the largest ``γ`` keeping the update inside the benign cloud.

    ``γ`` is the largest value (found by doubling then bisection, as the paper's binary search)
    such that the malicious update's largest distance to any benign update is at most the
    largest distance between two benign updates.

    Args:
        direction: ``p``: ``"std"`` (``-std``, the paper's strongest) or ``"unit"``
            (``-mean / ||mean||``).
        gamma: the first ``γ`` tried (the paper starts its search at 5-10).
        tolerance: the bisection stops when the bracket is narrower than this.
    """

    direction: str = "std"
    gamma: float = 10.0
    tolerance: float = 1e-5

    def __post_init__(self) -> None:
        if self.direction not in MINMAX_DIRECTIONS:
            raise ValueError(
                f"min-max direction must be one of {MINMAX_DIRECTIONS}, got {self.direction!r}"
            )
        _check_finite("gamma", self.gamma, positive=True)
        _check_finite("tolerance", self.tolerance, positive=True)

    def craft(self, rows: torch.Tensor) -> torch.Tensor:
        """The malicious vector for benign ``rows`` (one update per row, float64)."""
        mean = rows.mean(0)
        if self.direction == "std":
            p = -rows.std(0, unbiased=False)
        else:
            norm = float(mean.norm())
            p = -mean / norm if norm > 0 else torch.zeros_like(mean)
        bound = float(torch.cdist(rows, rows).max())

        def ok(gamma: float) -> bool:
            return float((rows - (mean + gamma * p)).norm(dim=1).max()) <= bound

        if float(p.norm()) == 0 or not ok(0.0):
            return mean
        lo, hi = 0.0, self.gamma
        while ok(hi):  # grow until the bound breaks; the distance grows without limit in γ
            lo, hi = hi, 2 * hi
        while hi - lo > self.tolerance:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        return mean + lo * p

    def corrupt(
        self, malicious: Sequence[Update], benign: Sequence[Update], params: Params, round: Round
    ) -> list[Update]:
        return _omniscient(malicious, benign, self.craft)


@dataclass(frozen=True, kw_only=True)
class LabelFlip:
    """Label flipping: the malicious clients train on labels ``y -> num_classes - 1 - y``.

    Args:
        num_classes: ``C`` (0: the workload's number of classes).
    """

    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.num_classes < 0:
            raise ValueError(f"label-flip num_classes must be >= 0, got {self.num_classes}")

    def poison(self, data: ClientData, client_id: int, seed: int) -> ClientData:
        if self.num_classes < 1:
            raise ValueError("label-flip needs num_classes (the workload sets it)")
        return ClientData(x=data.x, y=self.num_classes - 1 - data.y)


# --------------------------------------------------------------------------- the adversary


@dataclass(frozen=True)
class Adversary:
    """The malicious clients and what they do.

    Attributes:
        malicious: ids of the malicious clients.
        attack: the model-poisoning attack (``None``: they send what they trained).
        data_attack: the data-poisoning attack (``None``: they train on their own data).
    """

    malicious: frozenset[int]
    attack: Attack | None = None
    data_attack: DataAttack | None = None

    def corrupt(self, updates: Sequence[Update], params: Params, round: Round) -> list[Update]:
        """``updates`` with the malicious clients' replaced, in the original order."""
        bad = [u for u in updates if u.client_id in self.malicious]
        if self.attack is None or not bad:
            return list(updates)
        good = [u for u in updates if u.client_id not in self.malicious]
        corrupted = self.attack.corrupt(bad, good, params, round)
        if len(corrupted) != len(bad):
            raise RuntimeError(
                f"attack returned {len(corrupted)} updates for {len(bad)} malicious clients"
            )
        replaced = iter(corrupted)
        return [next(replaced) if u.client_id in self.malicious else u for u in updates]

    def count(self, updates: Sequence[Update]) -> int:
        """How many of ``updates`` come from malicious clients."""
        return sum(u.client_id in self.malicious for u in updates)


def choose_malicious(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """``round(fraction * num_clients)`` malicious clients (at least one when fraction > 0).

    Drawn uniformly from the stream ``(seed, MALICIOUS)``, so the same seed always corrupts the
    same clients, whatever else the run does.
    """
    if not 0 <= fraction < 0.5:
        raise ValueError(f"the byzantine fraction must be in [0, 0.5), got {fraction}")
    if fraction == 0:
        return frozenset()
    k = min(num_clients, max(1, math.floor(fraction * num_clients + 0.5)))
    rng = seeding.numpy_rng(seed, MALICIOUS)
    return frozenset(seeding.sample_without_replacement(rng, num_clients, k))


def _create(name: str, options: Mapping[str, Any]) -> object:
    if ":" in name:
        cls = load_dotted(name)
    elif name in ATTACKS:
        cls = import_builtin(ATTACKS[name])
    else:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    if dataclasses.is_dataclass(cls):
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"attack {name!r} has no option {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(valid) or 'none'}"
            )
    try:
        obj: object = cls(**options)
        return obj
    except TypeError as e:
        raise ValueError(f"cannot create attack {name!r} with {dict(options)}: {e}") from e


def build_adversary(
    name: str,
    *,
    num_clients: int,
    fraction: float,
    seed: int,
    options: Mapping[str, Any] | None = None,
) -> Adversary | None:
    """The adversary for attack ``name`` on ``fraction`` of ``num_clients`` clients.

    Returns ``None`` when there is no attack (empty name and fraction 0).

    Raises:
        ValueError: only one of name and fraction given, unknown attack or bad option.
    """
    if not name and fraction == 0:
        return None
    if not name or fraction == 0:
        raise ValueError("an attack needs both an attack name and a positive byzantine fraction")
    obj = _create(name, dict(options or {}))
    attack = obj if isinstance(obj, Attack) else None
    data_attack = obj if isinstance(obj, DataAttack) else None
    if attack is None and data_attack is None:
        raise ValueError(f"attack {name!r} has neither corrupt() nor poison()")
    return Adversary(
        malicious=choose_malicious(num_clients, fraction, seed),
        attack=attack,
        data_attack=data_attack,
    )


class PoisonedWorkload:
    """A workload whose malicious clients get data from a :class:`DataAttack`.

    Everything else (model, test set, benign clients) is the wrapped workload's.
    """

    def __init__(
        self, workload: Workload, malicious: frozenset[int], attack: DataAttack, seed: int
    ) -> None:
        if isinstance(attack, LabelFlip) and attack.num_classes == 0:
            attack = dataclasses.replace(attack, num_classes=workload.num_classes)
        self.inner = workload
        self.malicious = malicious
        self.attack = attack
        self.seed = seed
        self.name = workload.name
        self.num_clients = workload.num_clients
        self.num_classes = workload.num_classes

    def make_model(self) -> nn.Module:
        return self.inner.make_model()

    def client_data(self, client_id: int, split: str = "train") -> ClientData:
        data = self.inner.client_data(client_id, split)
        # A malicious client poisons what it trains on; its own test data stays as it is.
        if split == "train" and client_id in self.malicious:
            return self.attack.poison(data, client_id, self.seed)
        return data

    def test_data(self) -> ClientData:
        return self.inner.test_data()

    def __getattr__(self, name: str) -> Any:
        # Workload extras (test_clients, client_indices...) pass through unchanged.
        if name == "inner":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
