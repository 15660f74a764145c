"""Checkpoint files: their format, the atomic write, the background writer and resume's read.

A checkpoint is a :mod:`fedlab.tensorio` file holding :meth:`fedlab.engine.Engine.state_dict`.
Since format 2 every tensor is stored once however often the state refers to it (the global
params are also the params of the current version's tasks), so the file is about one model
large, not two; format 1 files (each place with its own copy) still load.

Writing one is atomic: the bytes go to ``checkpoint.fl.new`` (through a temporary file,
``fsync``-ed), the current ``checkpoint.fl`` becomes ``checkpoint.prev.fl``, the new file is
renamed into place and the directory is ``fsync``-ed. A crash at any point leaves at least one
complete checkpoint, and :func:`read` falls back to the previous one when the newest is missing
or damaged.

:class:`Writer` does the writing on a background thread, so training goes on meanwhile. What
it writes is a :func:`snapshot` taken on the engine's thread: tensors the engine replaces but
never changes in place (the params of each version) are shared with the live state, every
other tensor is copied, so the live state may change while the file is written.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlab import tensorio
from fedlab.types import State

CHECKPOINT = "checkpoint.fl"
PREVIOUS = "checkpoint.prev.fl"
NEW = CHECKPOINT + ".new"
FORMAT = 2
# 1: every tensor written wherever it appears (the params twice); 2: each tensor once.
FORMATS = (1, 2)

_LOG = logging.getLogger("fedlab.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or belongs to a different run configuration."""


def check(ckpt: State, fingerprint: str) -> None:
    """Refuse a checkpoint of an unknown format or of another run configuration.

    Raises:
        CheckpointError: what is wrong with it, in one line.
    """
    if ckpt.get("format") not in FORMATS:
        raise CheckpointError(f"unsupported checkpoint format {ckpt.get('format')!r}")
    if ckpt["fingerprint"] != fingerprint:
        raise CheckpointError(
            "the checkpoint belongs to a different run configuration "
            f"(checkpoint {ckpt['fingerprint'][:12]}, this run {fingerprint[:12]})"
        )


def read(run_dir: Path) -> tuple[State, Path, list[str]]:
    """The newest intact checkpoint in ``run_dir``, the file it came from, and why newer
    ones were passed over (each a short reason).

    Raises:
        CheckpointError: neither file holds a usable checkpoint.
    """
    errors = []
    for name in (CHECKPOINT, PREVIOUS):
        path = run_dir / name
        if not path.exists():
            errors.append(f"{path} does not exist")
            continue
        try:
            ckpt = tensorio.load(path)
        except tensorio.CorruptFileError as e:
            errors.append(f"{path} is corrupt: {e}")
            continue
        if not isinstance(ckpt, dict):
            errors.append(f"{path} is not a checkpoint")
            continue
        return ckpt, path, errors
    raise CheckpointError(f"no usable checkpoint in {run_dir}: " + "; ".join(errors))


@dataclass(frozen=True)
class Snapshot:
    """A state that later changes to the live one do not reach, ready to be written.

    Attributes:
        version: the version it is a checkpoint of.
        state: the tree to write.
        shared: tensors shared with the live state, each with its in-place version counter
            at the time of the snapshot (see :func:`snapshot`).
    """

    version: int
    state: State
    shared: tuple[tuple[torch.Tensor, int], ...]


def snapshot(version: int, state: State, shared: Collection[torch.Tensor]) -> Snapshot:
    """Copy ``state`` so that the engine may go on while it is written.

    Containers are copied; a tensor of ``shared`` (matched by identity) is kept as it is,
    every other tensor is cloned. ``shared`` must hold only tensors nobody changes in place:
    the engine's params, which each version replaces. That promise is checked when the file
    has been written (torch counts in-place changes), so a broken one fails loudly instead of
    leaving a torn checkpoint.

    Raises:
        CheckpointError: ``state`` holds something a checkpoint cannot (an object, a set).
    """
    keep = {id(t) for t in shared}
    kept: dict[int, torch.Tensor] = {}

    def copy(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            if id(o) in keep:
                kept[id(o)] = o
                return o
            return o.detach().clone()
        if isinstance(o, Mapping):
            return {k: copy(v, f"{path}/{k}") for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [copy(v, f"{path}/{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, bool | int | float | str):
            return o
        raise CheckpointError(
            f"cannot checkpoint version {version}: state must hold only tensors, numbers, "
            f"strings, booleans, None, lists and dicts (cannot serialize "
            f"{type(o).__name__} at {path or '/'})"
        )

    tree = copy(state, "")
    return Snapshot(version, tree, tuple((t, t._version) for t in kept.values()))


def write(run_dir: Path, snap: Snapshot) -> None:
    """Write ``snap`` as the checkpoint of ``run_dir`` atomically, keeping the previous one.

    Raises:
        CheckpointError: a tensor the snapshot shares changed while it was written, or the
            state cannot be serialized.
        OSError: the run directory cannot be written (full, read-only...).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CHECKPOINT
    try:
        tensorio.save(run_dir / NEW, snap.state, share=True)
    except TypeError as e:
        raise CheckpointError(
            f"cannot checkpoint version {snap.version}: state must hold only tensors, "
            f"numbers, strings, booleans, None, lists and dicts ({e})"
        ) from e
    changed = sum(t._version != seen for t, seen in snap.shared)
    if changed:
        (run_dir / NEW).unlink(missing_ok=True)
        raise CheckpointError(
            f"cannot checkpoint version {snap.version}: {changed} tensor(s) of the global "
            "params were changed in place while being written; a strategy or client must "
            "return new tensors instead of changing the params it was given"
        )
    if path.exists():
        os.replace(path, run_dir / PREVIOUS)
    os.replace(run_dir / NEW, path)
    _sync_dir(run_dir)  # the renames are durable before the caller forgets older files


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Writer:
    """Writes checkpoints of one run directory on a background thread, one at a time.

    :meth:`submit` starts a write once the previous one is reported; :meth:`wait` and
    :meth:`poll` report a finished write by calling ``on_written`` on the caller's thread (the
    engine's client store then forgets files only older checkpoints referred to), or raise
    the exception it failed with there.
    """

    def __init__(self, run_dir: Path, on_written: Callable[[], None] = lambda: None) -> None:
        self.run_dir = run_dir
        self.on_written = on_written
        self._thread: threading.Thread | None = None
        self._version: int | None = None
        self._error: BaseException | None = None
        self.written: int | None = None  # the version of the newest finished checkpoint

    def submit(self, snap: Snapshot) -> None:
        """Start writing ``snap`` on a new thread.

        Raises:
            RuntimeError: the previous write has not been reported by :meth:`wait` yet.
        """
        if self._thread is not None:
            raise RuntimeError("a checkpoint write is still under way: wait() for it first")
        self._version = snap.version
        self._error = None
        # Not a daemon: an interpreter that exits (Ctrl-C included) finishes the write first.
        self._thread = threading.Thread(
            target=self._write, args=(snap,), name=f"fedlab-checkpoint-{snap.version}"
        )
        self._thread.start()

    def _write(self, snap: Snapshot) -> None:
        try:
            write(self.run_dir, snap)
        except BaseException as e:  # handed to the engine's thread by wait()
            self._error = e

    def poll(self) -> int | None:
        """The version of a write that finished since the last report, without waiting.

        Raises:
            BaseException: what the finished write failed with.
        """
        if self._thread is None or self._thread.is_alive():
            return None
        return self.wait()

    def wait(self) -> int | None:
        """Wait for the write under way; the version it wrote (``None``: there was none).

        Raises:
            BaseException: what the write failed with (an ``OSError`` for a full or
                read-only disk, as a synchronous write would raise it).
        """
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        self.written = self._version
        self.on_written()
        return self._version

    def settle(self) -> None:
        """Wait for the write under way and log, instead of raising, how it failed: for a
        run already stopping on another error, which stays the one reported."""
        try:
            self.wait()
        except Exception as e:
            _LOG.warning(
                "fedlab: warning: the checkpoint of version %s was not written: %s",
                self._version,
                e,
            )
