"""fedlab: federated learning for PyTorch.

The public API is what ``__all__`` lists (a test keeps it that way). Strategies live in
:mod:`fedlab.strategies` and client halves in :mod:`fedlab.clients`; neither is imported here.
"""

from __future__ import annotations

from fedlab.checkpoint import CheckpointError
from fedlab.client import ClientAlgorithm, ClientContext, ClientRuntime, Fit
from fedlab.config import ConfigError, RunConfig
from fedlab.engine import Callback, Engine
from fedlab.experiment import History, simulate
from fedlab.registry import register, resolve
from fedlab.strategy import Buffer, EveryRound, Period, Strategy, Trigger, UpdateRejected
from fedlab.transforms import Pipeline, TransformContext, UpdateTransform
from fedlab.transport import Failure, Transport
from fedlab.types import ClientId, Metrics, Params, Round, State, Task, Update

__version__ = "0.1.0"

__all__ = [
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
]
