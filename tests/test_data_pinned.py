"""Pins the exact data of built-in workloads, so restructuring ``fedlab.data`` cannot change it.

The hashes were taken from the single-module ``fedlab/data.py`` before it became a package:
every workload and partition must keep giving the same examples for the same seed.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from fedlab.data import ClientData, make_workload


def _digest(data: ClientData) -> str:
    h = hashlib.sha256()
    for t in (data.x, data.y):
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:10]


def _workload_digest(name: str, **kwargs: object) -> str:
    w = make_workload(name, **kwargs)  # type: ignore[arg-type]
    parts = [_digest(w.client_data(k)) for k in (0, 1, w.num_clients - 1)]
    parts.append(_digest(w.test_data()))
    with torch.random.fork_rng():
        model = w.make_model()
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    parts.append(h.hexdigest()[:10])
    return "/".join(parts)


CASES: dict[str, tuple[str, dict[str, object]]] = {
    "synthetic-iid": ("synthetic", {"num_clients": 30, "seed": 3}),
    "synthetic-natural": (
        "synthetic",
        {"num_clients": 30, "seed": 4, "partition": "natural", "synthetic_alpha": 1.0},
    ),
    "digits-iid": ("digits", {"num_clients": 20, "seed": 1}),
    "digits-iid-thin": ("digits", {"num_clients": 500, "seed": 1, "model": "mlp"}),
    "digits-dirichlet": ("digits", {"num_clients": 20, "seed": 2, "partition": "dirichlet"}),
    "digits-shards": ("digits", {"num_clients": 20, "seed": 5, "partition": "shards"}),
    "digits-lognormal": (
        "digits",
        {"num_clients": 20, "seed": 6, "partition": "lognormal", "sigma": 0.7},
    ),
    "digits-swap": ("digits", {"num_clients": 10, "seed": 7, "label_swap": 0.5}),
    "digits-shift": ("digits-shift", {"num_clients": 10, "seed": 9}),
    "wls": ("wls", {"num_clients": 5, "seed": 8}),
}

PINNED = {
    "digits-dirichlet": "d2dfd6148c/4abb3ddc21/12769428e3/502d49dba7/f0dfbf62e9",
    "digits-iid": "64a7d2b546/fe023bc5a5/aa6d4baf15/86d6c57038/37c329486c",
    "digits-iid-thin": "c44bedc297/c18fafb9ee/8dee5556d6/579bd77bde/e37ed2014a",
    "digits-lognormal": "e256630480/b2a7851038/110436ce46/1dfeb9bfc5/3b94bfbea0",
    "digits-shards": "7b5c347dbd/3aaaf02956/925506f025/ef5cd60238/5f3c6b6ce7",
    # The initial model (last part) is pretrained by LocalSGD: it changed once, on purpose, when
    # one local epoch became exactly one pass (a partial last batch, issue 11); the data did not.
    "digits-shift": "090963a3ba/394ebbe384/569e26910e/4d89b128e0/301377d290",
    "digits-swap": "b4f2c7b94d/fd4ca02420/bce0c0c579/9f5f536097/66ce02dbfe",
    "synthetic-iid": "5e3f99d6bb/fb57624f8c/45edbfc311/aa07052f41/8d10dcc502",
    "synthetic-natural": "efa1b26e56/bb5f6606cb/81ea841df5/d843b063a8/1206ec37ef",
    "wls": "aa6fa25243/eda2b9a055/fac423f1c1/aa6fa25243/9c53350e03",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_data_is_pinned(case: str) -> None:
    name, kwargs = CASES[case]
    assert _workload_digest(name, **kwargs) == PINNED[case]


if __name__ == "__main__":  # prints the table above, for a deliberate data change
    for case in sorted(CASES):
        print(f'    "{case}": "{_workload_digest(CASES[case][0], **CASES[case][1])}",')
