"""Atomic, durable writes: build the output under a temporary name, then swap it into place.

A crash at any point leaves either the previous output or the new one, never a half
one (where the gapless swap below is missing, a crash between its two renames leaves the
previous output at ``.<name>.old-<pid>-<token>``). Works for single files and for
directory stores such as Zarr groups.

* **Durable.** Before the swap every file of the new output and every directory in it
  is fsynced; after the swap the parent directory is fsynced, so the rename itself
  survives a power cut.
* **Gapless.** A file is swapped in with ``os.replace``. A directory that replaces
  another is swapped in with Linux's ``renameat2(RENAME_EXCHANGE)``, which exchanges the
  two names in one step: a reader always finds ``path``, old or new. Where that call
  is missing (another OS, a file system without it) the old directory is renamed aside
  and the new one renamed in; readers bridge that moment with :func:`read_consistently`.
* **Temporary names.** ``.<name>.tmp-<pid>-<token>`` beside ``path``: hidden from
  listings of finished outputs, and it names the writer's process. A writer killed
  with SIGKILL leaves its temporary behind; the next write to the same ``path`` removes
  every such sibling whose process is gone (same machine).
* **Special files.** A device, FIFO or socket at ``path`` (``--out /dev/null``) is
  written in place: it is never replaced by a regular file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import psutil

T = TypeVar("T")

_TEMP_RE = re.compile(r"\.(tmp|old)-(\d+)-[0-9a-f]+$")
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}
_renameat2: list = []  # [function or None], looked up once


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """``.<name>.<kind>-<pid>-<token>`` beside ``path``."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _temp_siblings(path: Path) -> Iterator[tuple[Path, str, int]]:
    """The temporary siblings of ``path``: each with its kind (``tmp``: a new output being
    built, ``old``: the old output renamed aside) and the pid of the process that made it."""
    prefix = f".{path.name}."
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(prefix):
            m = _TEMP_RE.fullmatch(entry.name[len(prefix) - 1:])
            if m:
                yield path.parent / entry.name, m.group(1), int(m.group(2))


def _process_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # exists, but we may not look at it


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``path`` whose writer process is gone; returns them."""
    removed = []
    for tmp, _kind, pid in _temp_siblings(Path(path)):
        if pid != os.getpid() and not _process_alive(pid):
            _remove(tmp)
            removed.append(tmp)
    return removed


def swap_in_progress(path: str | os.PathLike) -> bool:
    """True while a live process has renamed the old ``path`` aside and not yet put the new
    one in (only where no gapless swap exists). A new output still being built (a first
    map generation taking minutes) does not count: ``path`` is plainly missing then."""
    return any(kind == "old" and _process_alive(pid) for _, kind, pid in _temp_siblings(Path(path)))


# -- fsync --------------------------------------------------------------------------------
def _fsync_fd(path: Path, directory: bool) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if directory and sys.platform == "win32":
            return  # directories cannot be opened there
        raise OSError(exc.errno, f"cannot open for fsync: {exc.strerror}", str(path)) from None
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (directory and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise  # some file systems cannot fsync a directory: nothing more to do there
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync ``path``: a file, or a directory with every file and directory inside it."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        if not path.is_symlink():
            _fsync_fd(path, directory=False)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                _fsync_fd(Path(root, name), directory=False)
        _fsync_fd(Path(root), directory=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync directory ``path`` itself (makes renames inside it durable)."""
    _fsync_fd(Path(path), directory=True)


# -- the swap -----------------------------------------------------------------------------
def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange paths ``a`` and ``b`` (both exist); False if unsupported here."""
    if not _renameat2:
        fn = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                fn = ctypes.CDLL(None, use_errno=True).renameat2
        _renameat2.append(fn)
    fn = _renameat2[0]
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_EXCHANGE:
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path``; a directory replaces a directory without a gap where possible."""
    if tmp.is_dir() and path.exists():
        if _exchange(tmp, path):
            _remove(tmp)  # now the old output
            return
        old = temp_name(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


def is_special(path: Path) -> bool:
    """Whether ``path`` exists and is neither a regular file nor a folder (``/dev/null``, a pipe)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path``.

    The temporary name sits in the same directory (so the swap is a rename on one file
    system), starts with a dot, so listings of finished outputs skip it, and carries this
    process's id, so a later write can tell a dead writer's leftovers (removed then). On
    an exception the temporary output is removed and ``path`` is untouched. On success the
    new output is fsynced, swapped in (see the module docstring) and the parent fsynced.
    """
    path = Path(path)
    if is_special(path):
        yield path  # /dev/null and the like: nothing to swap, and they must stay what they are
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_tree(tmp)
        _swap_in(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# -- readers ------------------------------------------------------------------------------
def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def read_consistently(path: str | os.PathLike, read: Callable[[], T], retry_s: float = 5.0,
                      errors: tuple[type[BaseException], ...] = (Exception,)) -> T:
    """``read()`` the output at ``path``, again if ``path`` was replaced meanwhile.

    A directory swapped in while ``read()`` ran may have given it a mix of the old and the
    new output, and where no gapless swap exists ``path`` is briefly absent. So ``read()``
    is repeated (for up to ``retry_s``) while ``path`` changed identity during it, or is
    absent while a live writer is swapping it (:func:`swap_in_progress`). Other failures
    of ``read()`` (exceptions in ``errors``) are raised at once.
    """
    path = Path(path)
    deadline = time.monotonic() + retry_s
    pause = 0.005
    while True:
        before = _identity(path)
        try:
            result = read()
            failure = None
        except errors as exc:
            failure = exc
        after = _identity(path)
        settled = before is not None and before == after
        if settled and failure is None:
            return result
        swapping = not settled and (after is not None or swap_in_progress(path))
        if not swapping or time.monotonic() >= deadline:
            if failure is not None:
                raise failure
            return result
        time.sleep(pause)
        pause = min(2 * pause, 0.1)
