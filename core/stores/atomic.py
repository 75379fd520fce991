"""Atomic writes: build the output under a temporary name, then rename it into place.

A crash at any point leaves either the previous output or the new one, never a half
one. Works for single files and for directory stores such as Zarr groups.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path``.

    The temporary name sits in the same directory (so ``os.replace`` is a rename on
    one file system) and starts with a dot, so listings of finished outputs skip it.
    On an exception the temporary output is removed and ``path`` is untouched.
    For directories, the old directory is first renamed aside, the new one renamed
    in, and only then is the old one deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:8]
    tmp = path.parent / f".{path.name}.tmp-{token}"
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.exists():
        old = path.parent / f".{path.name}.old-{token}"
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
