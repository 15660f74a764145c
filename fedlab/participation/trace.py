"""Participation traces: the CSV files of the ``trace`` model."""

from __future__ import annotations

import csv
import math
from pathlib import Path


def read_trace(
    path: str | Path, *, num_clients: int, period: float | None = None
) -> list[tuple[int, int, int]]:
    """Rows ``(client_id, version, line)`` of a participation trace.

    The file is CSV with a header: ``client_id,version`` (the client is available at that
    version), or ``client_id,time`` together with ``period`` (version ``floor(time / period)``).

    Raises:
        ValueError: unreadable file, unknown or missing columns, a malformed row, a client id
            outside ``[0, num_clients)`` or a negative version or time, naming the line.
    """
    try:
        with open(path, newline="") as f:
            lines = list(csv.reader(f))
    except OSError as e:
        raise ValueError(f"cannot read trace {path}: {e}") from e
    if not lines:
        raise ValueError(f"{path}: empty file; expected a header client_id,version")
    header = [h.strip() for h in lines[0]]
    known = ("client_id", "version", "time")
    for h in header:
        if h not in known:
            raise ValueError(
                f"{path}, line 1: unknown column {h!r}; expected client_id,version "
                "or client_id,time (with the period option)"
            )
    if sorted(header) == ["client_id", "version"]:
        if period is not None:
            raise ValueError(f"{path}: 'period' applies only to a trace with a time column")
    elif sorted(header) == ["client_id", "time"]:
        if period is None:
            raise ValueError(f"{path}: a trace with a time column needs the 'period' option")
    else:
        raise ValueError(
            f"{path}, line 1: columns {header} are not client_id,version or client_id,time"
        )
    col_id, col_when = header.index("client_id"), 1 - header.index("client_id")
    rows: list[tuple[int, int, int]] = []
    for line, fields in enumerate(lines[1:], start=2):
        if not any(x.strip() for x in fields):
            continue
        if len(fields) != 2:
            raise ValueError(f"{path}, line {line}: expected 2 fields, got {len(fields)}")
        where = f"{path}, line {line}"
        try:
            cid = int(fields[col_id])
        except ValueError:
            raise ValueError(f"{where}: client_id {fields[col_id]!r} is not an integer") from None
        if not 0 <= cid < num_clients:
            raise ValueError(f"{where}: client_id {cid} is outside [0, {num_clients})")
        raw = fields[col_when].strip()
        if period is None:
            try:
                version = int(raw)
            except ValueError:
                raise ValueError(f"{where}: version {raw!r} is not an integer") from None
        else:
            try:
                t = float(raw)
            except ValueError:
                raise ValueError(f"{where}: time {raw!r} is not a number") from None
            if not math.isfinite(t):
                raise ValueError(f"{where}: time {raw!r} is not finite")
            version = math.floor(t / period) if t >= 0 else -1
        if version < 0:
            raise ValueError(f"{where}: negative {'version' if period is None else 'time'}")
        rows.append((cid, version, line))
    return rows
