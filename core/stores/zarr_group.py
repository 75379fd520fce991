"""Opening a validated Zarr store: shared by the radio-map and dataset readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import StoreError


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


def open_group(path: Path, label: str, kind: str, format_version: int, missing_hint: str) -> tuple[Any, dict]:
    """Open the Zarr group at ``path`` read-only and check its ``kind`` and format version.

    Returns ``(group, attrs)``. Every failure is a :class:`StoreError` that starts with
    ``"{label} {path}:"`` and says what is wrong (``missing_hint`` tells how to make it).
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
    if version != format_version:
        raise StoreError(f"{label} {path}: format version {version!r}, this code reads version {format_version}")
    return group, meta
