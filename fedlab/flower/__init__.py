"""The bridge to Flower: fedlab strategies inside Flower apps, fedlab clients as ClientApps.

Server side, :class:`FlowerStrategy` is a Flower message-API strategy that runs any fedlab
:class:`~fedlab.strategy.Strategy`. It does not re-implement fedlab's rules inside Flower's round
loop: ``start`` drives fedlab's one :class:`~fedlab.engine.Engine` over a :class:`GridTransport`,
a :class:`~fedlab.transport.Transport` whose tasks are Flower messages pushed through the
``Grid`` and whose updates are the replies pulled as they arrive. Selection (``configure``),
task-config merging, decoding (the update pipeline), validation, triggers (``Buffer(k)``,
``Period(t)`` included), aggregation, checkpoints and metrics are the engine's.

Client side, :func:`make_client_app` and :func:`config_client_app` turn a fedlab
:class:`~fedlab.client.ClientRuntime` (workload, client half, update pipeline) into a Flower
``ClientApp``.

What travels, in each message's ``RecordDict``:

- a task (``train``): ``"arrays"`` (ArrayRecord, the params to start from), ``"config"``
  (ConfigRecord, the task config plus Flower's ``server-round``) and ``"fedlab"``
  (ConfigRecord: ``version``, ``client-id``, ``bfloat16``);
- a fedlab client's reply: ``"fedlab.payload"`` (ArrayRecord, the encoded payload: a delta,
  FRL rankings, Fed-SB R matrices, FedZip codes...), ``"metrics"`` (MetricRecord with
  ``num-examples``) and ``"fedlab"``;
- a plain Flower client's reply (Flower's convention): one ArrayRecord of trained weights and
  a MetricRecord with ``num-examples``; the transport turns the weights into the delta
  against the task's params, for strategies whose client half sends deltas.

This package is the only part of fedlab that imports ``flwr``.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fedlab.flower needs Flower; install it with: pip install 'fedlab[flower]'"
    ) from e

from fedlab.flower.client import config_client_app, make_client_app, partition_id, run_config
from fedlab.flower.records import params_from_record, params_to_record
from fedlab.flower.server import FlowerStrategy
from fedlab.flower.transport import GridTransport

__all__ = [
    "FlowerStrategy",
    "GridTransport",
    "config_client_app",
    "make_client_app",
    "params_from_record",
    "params_to_record",
    "partition_id",
    "run_config",
]
