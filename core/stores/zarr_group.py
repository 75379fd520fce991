"""Opening and reading a validated Zarr store: shared by the radio-map and dataset readers.

Zarr v3 runs its I/O as asyncio tasks on one event loop in a background thread
(``zarr.core.sync``): reading an array gathers one task per chunk. When one chunk fails
(a corrupt file), the error comes back at once while the other chunk tasks are still
pending on that loop. Left alone, a process that then exits (the CLI printing its
one-line error) closes the loop under them and asyncio prints "Task was destroyed but
it is pending!" for each. :func:`settle_zarr` waits for such leftovers; the readers here
call it whenever a read fails, and the CLI calls it before the process exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from core.errors import StoreError

T = TypeVar("T")


async def _settle(timeout_s: float, cancel: bool) -> int:
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    if not pending:
        return 0
    _, late = await asyncio.wait(pending, timeout=timeout_s)
    if late and cancel:
        for task in late:
            task.cancel()
        await asyncio.wait(late, timeout=1.0)
    return len(pending)


def settle_zarr(timeout_s: float = 10.0, cancel: bool = False) -> int:
    """Wait (up to ``timeout_s``) until zarr's event loop runs no task; returns how many ran.

    With ``cancel`` the tasks still running after ``timeout_s`` are cancelled (for a
    process about to exit). Does nothing if zarr was never used in this process.
    """
    zsync = sys.modules.get("zarr.core.sync")
    loop = zsync.loop[0] if zsync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return 0
    if threading.current_thread() is zsync.iothread[0]:
        return 0  # called from a task on that loop: waiting for itself would deadlock
    future = asyncio.run_coroutine_threadsafe(_settle(timeout_s, cancel), loop)
    try:
        return future.result(timeout_s + 5.0)
    except (concurrent.futures.TimeoutError, RuntimeError):
        return -1


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The group attributes of the Zarr v3 store at ``path``, read from its ``zarr.json`` only.

    Cheap (no array is opened), for status checks and lineage. Raises ``OSError`` or
    ``ValueError`` when the file is missing or not JSON.
    """
    meta = json.loads((Path(path) / "zarr.json").read_text())
    if not isinstance(meta, dict):
        raise ValueError(f"{path}/zarr.json is not a JSON object")
    attrs = meta.get("attributes") or {}
    return attrs if isinstance(attrs, dict) else {}


def open_group(path: Path, label: str, kind: str, format_version: int, missing_hint: str,
               regenerate: Callable[[dict], str] | None = None,
               oldest_readable: int | None = None) -> tuple[Any, dict]:
    """Open the Zarr group at ``path`` read-only and check its ``kind`` and format version.

    Returns ``(group, attrs)``. Every failure is a :class:`StoreError` that starts with
    ``"{label} {path}:"`` and says what is wrong (``missing_hint`` tells how to make it).
    A store of an older format version names the command that remakes it,
    ``regenerate(attrs)``, when given; versions from ``oldest_readable`` (default: only
    ``format_version``) up to ``format_version`` are accepted.
    """
    import zarr

    if not path.exists():
        raise StoreError(f"{label} {path}: no such store ({missing_hint})")
    try:
        group = zarr.open_group(store=str(path), mode="r")
        meta = dict(group.attrs)
    except Exception as exc:
        settle_zarr()
        raise StoreError(f"{label} {path}: not a readable Zarr group ({type(exc).__name__}: {exc})") from None
    if meta.get("kind") != kind:
        what = label.replace(" ", "-")
        raise StoreError(f"{label} {path}: not a {what} store (attrs kind={meta.get('kind')!r}, expected {kind!r})")
    version = meta.get("format_version")
    oldest = format_version if oldest_readable is None else oldest_readable
    if isinstance(version, int) and not isinstance(version, bool) and oldest <= version <= format_version:
        return group, meta
    if isinstance(version, int) and version < oldest and regenerate is not None:
        raise StoreError(f"{label} {path}: format version {version} is older than this code's {format_version}; "
                         f"regenerate it with `{regenerate(meta)}`")
    if version != format_version:
        raise StoreError(f"{label} {path}: format version {version!r}, this code reads version {format_version}")
    return group, meta


def read_arrays(path: Path, label: str, read: Callable[[], T]) -> T:
    """``read()`` arrays of the store at ``path``; a failure becomes a :class:`StoreError`
    (``missing array`` or ``corrupt array data``) once zarr's leftover tasks have settled."""
    try:
        return read()
    except StoreError:
        settle_zarr()
        raise
    except KeyError as exc:
        settle_zarr()
        raise StoreError(f"{label} {path}: missing array {exc}") from None
    except Exception as exc:
        settle_zarr()
        raise StoreError(f"{label} {path}: corrupt array data ({type(exc).__name__}: {exc})") from None
