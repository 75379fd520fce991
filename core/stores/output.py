"""Where a command may write, and what ``--force`` may replace.

* **Shipped outputs are read-only** (:func:`is_shipped`, :func:`check_writable`): a path under
  ``assets/`` (of the repository, or of the workspace ``$CORE_WORKSPACE``), or a path of the
  repository that git tracks, itself or anything below it (``radio_maps/etoile.zarr``,
  ``datasets/etoile``, the repository root). Every command that writes a run, an evaluation,
  a radio map, a dataset or an ablation refuses them with one line. ``CORE_WRITE_SHIPPED=1``
  lifts the rule for the maintainers' targets that rebuild the shipped stores
  (``make default-data``, ``make scenes``). Without git (an unpacked archive), ``assets/``
  alone is shipped.
* **--force replaces only the command's own output** (:func:`check_replaceable`): a run
  directory holding run files only, a store of the same kind. Anything else is refused with
  one line listing what would have been deleted; nothing is deleted.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from core import REPO_ROOT
from core.errors import CoreError
from core.stores.atomic import is_special
from core.stores.lock import output_lock
from core.stores.zarr_group import read_attrs

SHIPPED_ENV = "CORE_WRITE_SHIPPED"


@functools.lru_cache(maxsize=1)
def _tracked() -> frozenset[str]:
    """Every path git tracks in the repository and every folder above one (POSIX, relative; "." the root)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, timeout=30,
                             check=True).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    found = set()
    for name in filter(None, out.split("\0")):
        parts = name.split("/")
        found.update("/".join(parts[:k]) for k in range(1, len(parts) + 1))
    return frozenset(found | {"."}) if found else frozenset()


def _assets_roots() -> list[Path]:
    roots = [REPO_ROOT / "assets"]
    if os.environ.get("CORE_WORKSPACE"):
        roots.append(Path(os.environ["CORE_WORKSPACE"]) / "assets")
    return [r.resolve() for r in roots]


def is_shipped(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a shipped output (see the module doc): under ``assets/``, or tracked by git."""
    p = Path(path).resolve()
    if any(p == root or p.is_relative_to(root) for root in _assets_roots()):
        return True
    try:
        rel = p.relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return False
    return rel in _tracked()


def check_writable(path: str | os.PathLike, label: str = "--out") -> None:
    """Refuse, BEFORE any work, an output ``path`` a command may not or cannot write: one
    :class:`CoreError` line naming ``label``, the path and the cause; nothing is created.

    * shipped (:func:`is_shipped`; ``CORE_WRITE_SHIPPED=1`` lifts this);
    * not writable: :func:`~core.stores.atomic.atomic_path` writes a temporary beside ``path``
      (creating missing parent folders), so a probe file is created and removed in the nearest
      existing folder above ``path`` (permission bits alone do not tell: root ignores them, a
      read-only mount does not). A device such as ``/dev/null`` is always writable here.
    """
    path = Path(path)
    if os.environ.get(SHIPPED_ENV) != "1" and is_shipped(path):
        raise CoreError(f"{label} {path}: shipped with the project and read-only (assets/ and the stores git "
                        "tracks); write to another path")
    if is_special(path):
        return
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CoreError(f"{label} {path}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=folder)
    except OSError as exc:
        raise CoreError(f"{label} {path}: cannot write in {folder} ({exc.strerror or type(exc).__name__}); "
                        "pick a writable place") from None
    os.close(fd)
    os.unlink(probe)


def check_new(path: str | os.PathLike, force: bool, label: str = "--out") -> None:
    """Refuse, BEFORE any work, an output ``path`` that exists when ``force`` is not given: one
    :class:`CoreError` line, the same for every command (``--force`` then replaces only the command's
    own kind of output: :func:`check_replaceable`)."""
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        raise CoreError(f"{label} {path} exists (use --force to replace it)")


def listing(path: str | os.PathLike, limit: int = 8) -> str:
    """``a, b/, c … and N more``: the entries of folder ``path`` (folders with a slash)."""
    entries = sorted(f"{e.name}/" if e.is_dir() else e.name for e in os.scandir(path))
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def is_store_of_kind(path: str | os.PathLike, kind: str) -> bool:
    """Whether ``path`` is a Zarr store whose metadata says ``kind`` (``radio_map``, ``measurement_dataset``)."""
    try:
        return read_attrs(path).get("kind") == kind
    except (OSError, ValueError):
        return False


def holds_only(path: str | os.PathLike, own: Callable[[str], bool]) -> bool:
    """Whether every entry of folder ``path`` is ``own`` (a name test)."""
    return all(own(e.name) for e in os.scandir(path))


def check_replaceable(path: str | os.PathLike, own: bool | Callable[[str], bool], what: str,
                      label: str = "--out", action: str = "--force replaces") -> None:
    """Refuse ``--force`` on an existing ``path`` that is not the command's own output: ``own`` says so for the
    whole path (a store of the right kind), or names the entries of a folder the command writes (a run's
    files). ``what``: what the command replaces (``action``: how it says so). One line: what is foreign, and what would have been deleted."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if callable(own):
        foreign = [e.name for e in os.scandir(path) if not own(e.name)] if path.is_dir() else [path.name]
        if not foreign:
            return
        shown = ", ".join(sorted(foreign)[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        why = f"it also holds {shown}, which this command did not make"
    elif own:
        return
    else:
        why = "this is not one"
    held = listing(path) if path.is_dir() else f"the file {path.name}"
    raise CoreError(f"{label} {path}: {action} only {what}, but {why}; nothing was deleted "
                    f"(it would have deleted {held}): move them away or pick another path")


@contextlib.contextmanager
def writing_store(path: str | os.PathLike, kind: str, force: bool, label: str = "--out") -> Iterator[None]:
    """The guard of a command writing the Zarr store ``path`` of ``kind``: refuse a shipped path, hold
    the writer's lock (:func:`~core.stores.lock.output_lock`) for the ``with`` block, and let ``force``
    replace only a store of the same kind."""
    check_writable(path, label)
    with output_lock(path, label):
        if force:
            check_replaceable(path, is_store_of_kind(path, kind), f"a {kind.replace('_', ' ')} store", label)
        yield
