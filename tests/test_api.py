"""The public API is curated: ``fedlab.__all__`` is exactly this list, and each name resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys

import fedlab

PUBLIC = {
    "Buffer",
    "Callback",
    "CheckpointError",
    "ClientAlgorithm",
    "ClientContext",
    "ClientId",
    "ClientRuntime",
    "ConfigError",
    "Engine",
    "EveryRound",
    "Failure",
    "Fit",
    "History",
    "Metrics",
    "Params",
    "Period",
    "Pipeline",
    "Round",
    "RunConfig",
    "State",
    "Strategy",
    "Task",
    "TransformContext",
    "Transport",
    "Trigger",
    "Update",
    "UpdateRejected",
    "UpdateTransform",
    "__version__",
    "register",
    "resolve",
    "simulate",
}


def test_all_is_curated() -> None:
    assert set(fedlab.__all__) == PUBLIC
    assert sorted(fedlab.__all__) == fedlab.__all__
    for name in fedlab.__all__:
        assert getattr(fedlab, name) is not None


def test_import_fedlab_imports_no_strategy_or_client_module() -> None:
    code = (
        "import sys, fedlab; "
        "print([m for m in sys.modules if m.startswith(('fedlab.strategies.', "
        "'fedlab.clients.', 'fedlab.sim', 'ray', 'flwr', 'opacus'))])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_strategies_import_by_class_name() -> None:
    from fedlab.strategies import FedAvg

    assert FedAvg.__module__ == "fedlab.strategies.fedavg"
    assert importlib.import_module("fedlab.clients").LocalSGD.__name__ == "LocalSGD"
