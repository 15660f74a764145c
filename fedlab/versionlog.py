"""What happened during a run: its running totals, and each version's metrics row.

The engine counts rejections, failures and bytes as they happen in a :class:`VersionLog`;
after each aggregation :meth:`VersionLog.row` turns them and the aggregated updates into the
row every callback receives (and ``metrics.jsonl`` holds). :class:`Counters` are the totals
over the whole run, part of every checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedlab.types import Update

_LOG = logging.getLogger("fedlab.engine")


@dataclass
class Counters:
    """Running totals over the whole run."""

    received: int = 0
    rejected: int = 0
    failed: int = 0
    stale_dropped: int = 0
    aggregates_dropped: int = 0  # versions whose aggregate held NaN or Inf and was not committed


@dataclass
class VersionLog:
    """What happened since the last aggregation, for the metrics row."""

    rejected: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)
    bytes_up: int = 0  # every update received, rejected ones included: they were sent
    bytes_down: int = 0  # the params of every task handed out
    decoded_bytes: int = 0  # received bytes of the updates that decoded...
    decoded_entries: int = 0  # ...and the entries they decoded to

    def reject(self, reason: str) -> None:
        """Count a rejected update; the first five reasons go into the row."""
        self.rejected += 1
        if len(self.reasons) < 5:
            self.reasons.append(reason)

    def row(
        self,
        version: int,
        time: float,
        wall: float,
        updates: Sequence[Update],
        metrics: Mapping[str, Any],
        dropped: str | None = None,
    ) -> dict[str, Any]:
        """The metrics row of ``version``, made from ``updates`` (aggregated into it);
        ``dropped`` says where the aggregate held NaN or Inf when it was not committed."""
        row: dict[str, Any] = {
            "version": version,
            "time": time,
            "wall": wall,
            "updates": len(updates),
            "rejected": self.rejected,
            "failed": self.failed,
        }
        n = sum(u.num_examples for u in updates)
        keys = sorted({k for u in updates for k in u.metrics})
        for k in keys:
            num = sum(u.metrics[k] * u.num_examples for u in updates if k in u.metrics)
            den = sum(u.num_examples for u in updates if k in u.metrics)
            if den > 0:
                row[f"train_{k}"] = num / den
        if updates:
            row["staleness"] = sum(version - 1 - u.version for u in updates) / len(updates)
        # Record-level DP: each client reports its own ε; the worst one is what a user asks.
        eps = [u.metrics["epsilon"] for u in updates if "epsilon" in u.metrics]
        if eps:
            row["client_epsilon_max"] = max(eps)
            row["client_epsilon_mean"] = sum(eps) / len(eps)
        row["examples"] = n
        row["bytes_up"] = self.bytes_up
        row["bytes_down"] = self.bytes_down
        if self.decoded_bytes:
            # 32 bits per entry (float32) over the bits actually received.
            row["compression_ratio"] = 32 * self.decoded_entries / (8 * self.decoded_bytes)
        row.update({f"strategy_{k}": float(v) for k, v in dict(metrics).items()})
        if self.reasons:
            row["reject_reasons"] = list(self.reasons)
        if dropped is not None:
            row["aggregate_dropped"] = f"NaN or Inf in {dropped}"
            row["dropped_updates"] = [[u.client_id, u.version] for u in updates]
        return row


def warn_dropped(version: int, bad: str, updates: Sequence[Update]) -> None:
    """Say that ``version`` was not committed (its aggregate held NaN or Inf in ``bad``) and
    which updates took part."""
    took_part = ", ".join(f"client {u.client_id} (version {u.version})" for u in updates[:50])
    more = f" and {len(updates) - 50} more" if len(updates) > 50 else ""
    _LOG.warning(
        "fedlab: warning: version %d not committed: its aggregate has NaN or Inf in %s; "
        "kept the model and strategy state of version %d; updates that took part: %s%s",
        version,
        bad,
        version - 1,
        took_part or "none",
        more,
    )
