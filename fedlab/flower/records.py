"""How fedlab's tasks, updates and params travel in Flower's records.

Tensors travel as NumPy arrays (Flower's ``Array``, loaded without pickle); bfloat16, which
NumPy lacks, travels widened to float32, which is exact, and is narrowed back on arrival.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    MessageType,
    RecordDict,
)

from fedlab.types import ClientId, Task

log = logging.getLogger("flwr")

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
META = "fedlab"
PAYLOAD = "fedlab.payload"
STATE = "fedlab.state"
NUM_EXAMPLES = "num-examples"
QUERY = f"{MessageType.QUERY}.fedlab"
# Flower's error code for a message whose node is offline (flwr.common.constant.ErrorCode).
NODE_UNAVAILABLE = 5


def params_to_record(params: Mapping[str, torch.Tensor]) -> tuple[ArrayRecord, list[str]]:
    """Named tensors as an ArrayRecord, and the names of those widened from bfloat16."""
    record = ArrayRecord()
    widened: list[str] = []
    for name, t in params.items():
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()  # exact: every bfloat16 is a float32
            widened.append(name)
        record[name] = Array(np.ascontiguousarray(t.numpy()))
    return record, widened


def params_from_record(record: ArrayRecord, widened: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors of ``record``; raises ValueError on anything that is not a plain array."""
    narrow = set(widened)
    out: dict[str, torch.Tensor] = {}
    for name, array in record.items():
        try:
            a = array.numpy()  # np.load(allow_pickle=False): no code runs
        except (TypeError, ValueError) as e:
            raise ValueError(f"array {name!r} cannot be read: {e}") from e
        if a.dtype.kind not in "biuf":
            raise ValueError(f"array {name!r} has dtype {a.dtype}, not a tensor dtype")
        t = torch.from_numpy(a.astype(a.dtype.newbyteorder("="), copy=True))
        out[name] = t.to(torch.bfloat16) if name in narrow else t
    return out


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    try:
        return ConfigRecord(dict(values))
    except TypeError as e:
        raise ValueError(
            f"a Flower ConfigRecord cannot carry {dict(values)!r} ({e}); task config values "
            "must be numbers, strings, booleans or lists of one of them"
        ) from e


def meta_of(content: RecordDict) -> Mapping[str, Any]:
    return content.config_records.get(META, ConfigRecord())


def widened_names(content: RecordDict) -> list[str]:
    names = meta_of(content).get("bfloat16", [])
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def task_content(cid: ClientId, task: Task) -> RecordDict:
    arrays, widened = params_to_record(task.params)
    config = config_record({**task.config, "server-round": task.version + 1})
    meta = ConfigRecord({"version": task.version, "client-id": cid, "bfloat16": widened})
    return RecordDict({ARRAYS: arrays, CONFIG: config, META: meta})


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def examples_of(content: RecordDict) -> tuple[int, dict[str, float]]:
    """``num-examples`` and the other scalar metrics of a reply."""
    for record in content.metric_records.values():
        if NUM_EXAMPLES in record:
            metrics = scalars(record)
            n = metrics.pop(NUM_EXAMPLES)
            if n != int(n):
                raise ValueError(f"{NUM_EXAMPLES} must be a whole number, got {n}")
            return int(n), metrics
    raise ValueError(f"the reply has no MetricRecord with {NUM_EXAMPLES!r}")
