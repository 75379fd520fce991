"""One writer per output: an exclusive lock held for the writer's whole life.

Contract
--------
* Every command that writes an output (``train``: the run directory; ``evaluate``: its
  evaluation file; ``generate-maps``: each ``<scene>.zarr``; ``make-dataset``: each dataset
  store; ``ablate``: the ablation folder) holds :func:`output_lock` on that path from before
  it checks the path until it has finished writing it.
* The lock is ``.<name>.lock`` beside the output (never inside it, so an output that is
  swapped in whole keeps its lock), taken with :class:`filelock.FileLock` (``flock`` on
  POSIX). Beside it, ``.<name>.lock.json`` records the holder: ``{"pid", "host", "command",
  "started"}`` (``command``: the holder's ``argv``). A writer that ends removes both (the lock
  file while still holding it: filelock notices a lock taken on a removed file and retries),
  so a finished output has nothing beside it; a killed writer leaves them, hidden.
* A second writer is refused at once (no waiting) with :class:`OutputBusy`, one line naming
  the holder's pid and command.
* A stale lock is taken over: the operating system releases an ``flock`` when its process
  dies (also on SIGKILL), so the lock of a dead writer is free, and the next writer
  overwrites the dead one's record.
* One process takes one output's lock once: the lock is not re-entrant across
  :func:`output_lock` calls (a nested call on the same path is refused like a second writer).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from core.errors import CoreError


class OutputBusy(CoreError):
    """Another live process is writing the same output."""


def lock_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(lock file, holder record)`` of output ``path``: ``.<name>.lock`` and ``.<name>.lock.json`` beside it."""
    path = Path(os.path.abspath(path))
    return path.parent / f".{path.name}.lock", path.parent / f".{path.name}.lock.json"


def holder(path: str | os.PathLike) -> dict:
    """The record of the process holding ``path``'s lock ({} when none was written)."""
    try:
        record = json.loads(lock_paths(path)[1].read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict) -> str:
    if not record:
        return "another process (its record is not written yet)"
    command = " ".join(str(a) for a in record.get("command") or []) or "?"
    host = record.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"pid {record.get('pid')}{where} ({command})"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, label: str = "output") -> Iterator[Path]:
    """Hold the writer's lock on output ``path`` for the ``with`` block; yields the lock file.

    Raises :class:`OutputBusy` (one line: ``<label> <path>: being written by pid N (command);
    wait for it or stop it``) when a live process holds it. The parent folder is created.
    """
    lock_file, record_file = lock_paths(path)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_file, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        record = {}
        deadline = time.monotonic() + 1.0  # the holder writes its record right after taking the lock
        while not record and time.monotonic() < deadline:
            record = holder(path)
            time.sleep(0.02)
        raise OutputBusy(f"{label} {path}: being written by {_describe(record)}; wait for it to finish "
                         "or stop it, or write to another path") from None
    try:
        record_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "command": ["python -m core", *sys.argv[1:]], "started": time.time()}))
        yield lock_file
    finally:
        with contextlib.suppress(OSError):
            if holder(path).get("pid") == os.getpid():
                record_file.unlink()
        with contextlib.suppress(OSError):
            lock_file.unlink()  # while held: filelock retries a peer that locked the unlinked file
        lock.release()
