"""Opening a validated Zarr store: shared by the radio-map and dataset readers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import StoreError


def open_group(path: Path, label: str, kind: str, format_version: int, missing_hint: str,
               regenerate: Callable[[dict], str] | None = None) -> tuple[Any, dict]:
    """Open the Zarr group at ``path`` read-only and check its ``kind`` and format version.

    Returns ``(group, attrs)``. Every failure is a :class:`StoreError` that starts with
    ``"{label} {path}:"`` and says what is wrong (``missing_hint`` tells how to make it).
    A store of an older format version names the command that remakes it,
    ``regenerate(attrs)``, when given.
    """
    import zarr

    if not path.exists():
        raise StoreError(f"{label} {path}: no such store ({missing_hint})")
    try:
        group = zarr.open_group(store=str(path), mode="r")
        meta = dict(group.attrs)
    except Exception as exc:
        raise StoreError(f"{label} {path}: not a readable Zarr group ({type(exc).__name__}: {exc})") from None
    if meta.get("kind") != kind:
        what = label.replace(" ", "-")
        raise StoreError(f"{label} {path}: not a {what} store (attrs kind={meta.get('kind')!r}, expected {kind!r})")
    version = meta.get("format_version")
    if isinstance(version, int) and version < format_version and regenerate is not None:
        raise StoreError(f"{label} {path}: format version {version} is older than this code's {format_version}; "
                         f"regenerate it with `{regenerate(meta)}`")
    if version != format_version:
        raise StoreError(f"{label} {path}: format version {version!r}, this code reads version {format_version}")
    return group, meta
