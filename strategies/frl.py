"""FRL: Federated Rank Learning, a supermask over frozen random weights trained by voting.

Mozaffari, Shejwalkar, Houmansadr. "Every Vote Counts: Ranking-Based Training of Federated
Learning to Resist Poisoning Attacks." USENIX Security 2023 (arXiv 2110.04350, "FRL: Federated
Rank Learning"). Reference code: SPIN-UMass/FRL (``FL_train.py``, ``utils.py::FRL_Vote``).

Every ``nn.Linear`` / ``nn.Conv2d`` weight of the workload model is replaced by a frozen
signed constant ``W`` and a trainable score tensor ``s`` of the same shape; the layer computes
with ``W * mask``, where ``mask`` keeps the top ``sparsity`` share of ``|s|``. Clients train
scores and upload, per layer, the permutation that sorts their **signed** scores; the server
sums every edge's rank position over the clients (one vote each) and re-places the sorted
initial scores in the order of the vote. As in the reference code, ranking uses signed scores
and the mask uses ``|s|``: since the initial scores are symmetric around 0, the kept edges are
both ends of the global ranking (ALGORITHMS.md §6, code subtlety).

Biases: the paper's layers have none. The workload model's biases are kept as entries of the
state (so the ordinary evaluator loads the model unchanged) but are zero and never trained.
Other entries (normalisation affine parameters, buffers) keep their initial values.

Where ``W`` comes from: the strategy contract's ``init`` sees only the initial params, which the
workload generates from the run seed, so the key of the ``W`` and score streams is a digest of
them. It travels to clients in the task config (``frl_key``), like the paper's one-off seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedlab import seeding
from fedlab.strategy import Strategy, UpdateRejected
from fedlab.types import ClientId, Metrics, Params, Round, State, Task, Update

_W_STREAM = 1
_SCORE_STREAM = 2


def maskable(params: Params) -> list[str]:
    """Names of the weights FRL masks: floating ``*.weight`` entries of a Linear (2-D) or
    Conv2d (4-D) layer, in state order; a model that is itself such a layer has ``weight``."""
    return [
        k
        for k, v in params.items()
        if (k == "weight" or k.endswith(".weight")) and v.is_floating_point() and v.dim() in (2, 4)
    ]


def bias_name(weight: str) -> str:
    """The bias entry that belongs to the layer of ``weight``."""
    return weight[: -len("weight")] + "bias"


def signed_constant(key: int, index: int, shape: torch.Size) -> torch.Tensor:
    """Frozen weights: ``sign(kaiming_uniform(a=sqrt 5)) * sqrt(2) / sqrt(fan_in)``.

    Only the sign of the uniform draw matters, so it is drawn directly.
    """
    fan_in = math.prod(shape[1:])
    g = seeding.torch_generator(key, seeding.MODEL, _W_STREAM, index)
    u = torch.rand(shape, generator=g) - 0.5
    # A zero draw has probability 2^-24; it becomes +1 so that W has no dead edge.
    return torch.where(u >= 0, 1.0, -1.0) * (math.sqrt(2.0) / math.sqrt(fan_in))


def initial_scores(key: int, index: int, shape: torch.Size) -> torch.Tensor:
    """Scores drawn like kaiming_uniform(a=sqrt 5): ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    g = seeding.torch_generator(key, seeding.MODEL, _SCORE_STREAM, index)
    return (torch.rand(shape, generator=g) * 2.0 - 1.0) * bound


def kept(n: int, sparsity: float) -> int:
    """How many of ``n`` edges the mask keeps: ``round(sparsity * n)``."""
    return max(0, min(n, round(sparsity * n)))


def top_k_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """1 for the ``kept`` edges of largest ``|s|`` (ties to the lower index), else 0."""
    flat = scores.detach().abs().flatten()
    order = torch.argsort(flat, descending=True, stable=True)
    mask = torch.zeros_like(flat)
    mask[order[: kept(flat.numel(), sparsity)]] = 1.0
    return mask.view_as(scores)


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """A client's vote: edge indices from the lowest to the highest signed score."""
    return torch.argsort(scores.detach().flatten(), stable=True)


def positions(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: the rank position of every edge (0 = lowest)."""
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(perm.numel(), dtype=perm.dtype)
    return pos


def vote(rankings: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global order: edges by ascending sum of rank positions (ties to the lower index)."""
    total = torch.stack([positions(r) for r in rankings]).sum(0)
    return torch.argsort(total, stable=True)


def rank_bits(n: int) -> int:
    """Bits to send one permutation of ``n`` edges: ``n * ceil(log2 n)``."""
    return n * max(1, math.ceil(math.log2(n))) if n > 1 else 0


@dataclass(frozen=True, kw_only=True)
class FRL(Strategy):
    """Federated Rank Learning: majority vote over the clients' edge rankings.

    Args:
        sparsity: share ``k`` of each layer's edges the mask keeps (the paper's 0.5).
    """

    client: ClassVar[str] = "frl"

    sparsity: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in (0, 1], got {self.sparsity}")

    def init(self, params: Params) -> State:
        key = seeding.params_key(params)
        layers = maskable(params)
        if not layers:
            raise ValueError("FRL needs a model with at least one nn.Linear or nn.Conv2d layer")
        scores = {name: initial_scores(key, i, params[name].shape) for i, name in enumerate(layers)}
        return {
            "key": key,
            "scores": scores,
            # The values every vote re-places, ascending, kept for the whole run.
            "sorted": {name: s.flatten().sort().values for name, s in scores.items()},
        }

    def weights(self, state: State, params: Params) -> dict[str, torch.Tensor]:
        """The frozen signed-constant weights ``W`` of every masked layer."""
        return {
            name: signed_constant(int(state["key"]), i, params[name].shape)
            for i, name in enumerate(maskable(params))
        }

    def model_params(self, state: State, params: Params) -> dict[str, torch.Tensor]:
        """The global model the evaluator sees: ``W * mask(s_g)``, biases zero."""
        out = {k: v.clone() for k, v in params.items()}
        for name, w in self.weights(state, params).items():
            out[name] = (w * top_k_mask(state["scores"][name], self.sparsity)).to(out[name].dtype)
            if bias_name(name) in out:
                out[bias_name(name)] = torch.zeros_like(out[bias_name(name)])
        return out

    def configure(self, state: State, params: Params, round: Round) -> dict[ClientId, Task]:
        tasks = super().configure(state, params, round)
        # Clients load the full state (the runtime model needs every entry), with scores in
        # place of the masked weights and zero biases; W is regenerated from ``frl_key``.
        sent = {k: v for k, v in params.items()}
        for name in maskable(params):
            sent[name] = state["scores"][name]
            if bias_name(name) in sent:
                sent[bias_name(name)] = torch.zeros_like(sent[bias_name(name)])
        config = {"frl_key": int(state["key"]), "sparsity": self.sparsity}
        return {c: Task(version=t.version, params=sent, config=config) for c, t in tasks.items()}

    def validate(self, update: Update, params: Params) -> None:
        what = f"update from client {update.client_id}"
        layers = maskable(params)
        if set(update.payload) != set(layers):
            raise UpdateRejected(f"{what}: expected rankings for exactly {sorted(layers)}")
        for name in layers:
            r = update.payload[name]
            n = params[name].numel()
            if not isinstance(r, torch.Tensor) or r.dtype != torch.int64 or r.shape != (n,):
                raise UpdateRejected(f"{what}: {name!r} must be a 1-D int64 tensor of length {n}")
            if n and (int(r.min()) < 0 or int(r.max()) >= n):
                raise UpdateRejected(f"{what}: {name!r} has indices outside [0, {n})")
            if not bool((torch.bincount(r, minlength=n) == 1).all()):
                raise UpdateRejected(f"{what}: {name!r} is not a permutation (repeated indices)")

    def aggregate(
        self, state: State, params: Params, updates: Sequence[Update], round: Round
    ) -> tuple[Params, State, Metrics]:
        if not updates:
            return self.model_params(state, params), state, {}
        scores: dict[str, torch.Tensor] = {}
        for name, values in state["sorted"].items():
            order = vote([u.payload[name] for u in updates])
            s = torch.empty_like(values)
            s[order] = values  # the edge with the j-th smallest vote gets the j-th smallest value
            scores[name] = s.view_as(state["scores"][name])
        new_state = {**state, "scores": scores}
        sizes = [v.numel() for v in state["sorted"].values()]
        metrics = {
            "upload_bits": float(sum(rank_bits(n) for n in sizes) * len(updates)),
            "fedavg_upload_bits": float(32 * sum(sizes) * len(updates)),
        }
        return self.model_params(new_state, params), new_state, metrics


@dataclass(frozen=True)
class ReversedRanking:
    """FRL's worst-case rank attack: malicious clients vote their joint order reversed.

    The malicious clients train benignly, sum their own rank positions per layer, and each
    submits the reversed aggregate order, so the edges they find most important get the
    lowest votes. Client ids, versions and example counts are unchanged.
    """

    def corrupt(
        self,
        malicious: Sequence[Update],
        benign: Sequence[Update],
        params: Params,
        round: Round,
    ) -> list[Update]:
        if not malicious:
            return []
        payload = {
            name: vote([u.payload[name] for u in malicious]).flip(0)
            for name in malicious[0].payload
        }
        return [
            Update(
                client_id=u.client_id,
                version=u.version,
                payload=payload,
                num_examples=u.num_examples,
                metrics=u.metrics,
            )
            for u in malicious
        ]
