from __future__ import annotations

import dataclasses

import pytest

from fedlab import registry
from fedlab.strategies import FedAvg


def test_builtin_names_and_dotted_paths() -> None:
    assert "fedavg" in registry.names("strategies")
    assert registry.resolve("strategies", "fedavg") is FedAvg
    assert registry.resolve("strategies", "fedlab.strategies.fedavg:FedAvg") is FedAvg
    assert registry.resolve("clients", "sgd").__name__ == "LocalSGD"


def test_unknown_name_suggests_close_ones() -> None:
    with pytest.raises(ValueError, match="Did you mean 'fedavg'"):
        registry.resolve("strategies", "fedagv")
    with pytest.raises(ValueError, match=r"unknown client 'sdg'.*'sgd'"):
        registry.resolve("clients", "sdg")
    with pytest.raises(ValueError, match="unknown registry group"):
        registry.resolve("models", "x")  # type: ignore[arg-type]


def test_register_in_process_and_create_with_options() -> None:
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Mine(FedAvg):
        extra: int = 1

    registry.register("strategies", "mine-test", Mine)
    assert "mine-test" in registry.names("strategies")
    made = registry.create("strategies", "mine-test", {"extra": 3, "server_lr": 0.5})
    assert made == Mine(extra=3, server_lr=0.5)
    with pytest.raises(ValueError, match=r"has no option 'nope'; valid options: .*extra"):
        registry.create("strategies", "mine-test", {"nope": 1})
    with pytest.raises(ValueError, match="server_lr must be positive"):
        registry.create("strategies", "mine-test", {"server_lr": -1.0})
