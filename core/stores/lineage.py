"""Data lineage: which saved store is which, and which radio map a dataset was made with.

Every radio-map and dataset store carries in its group attributes::

    lineage: {"id": "<32 hex>", "digest": "sha256:<64 hex>"}
    lineage: {"id": ..., "digest": ..., "radio_map": StoreRef | null}     (datasets)

* ``id``: a uuid4, new at every save: two stores with one id are one save.
* ``digest``: sha256 over the arrays (name, dtype, shape, bytes, with NaN and -0.0 made
  canonical) and the key metadata (:func:`content_digest`); loading checks it.
* ``radio_map``: the map the dataset was made with, a :class:`StoreRef`
  ``{"path", "scene", "id", "digest"}``.

A training run records the refs of its dataset and map (``lineage.json``, see
:mod:`core.stores.run`). The scene of a run is the dataset's; its map is
``<radio_maps_dir>/<scene>.zarr`` (:func:`map_path_for`) and must be the one the dataset
records (:func:`check_map_of_dataset`). Refusals are one :class:`StoreError` line that
names both stores. Stores saved before lineage existed have none: only their scenes
are compared.

Where a dataset's map is looked up without a training config (``evaluate --scene S
--dataset D``, a held-out scene in the app): at the path it records
(:func:`recorded_map_path`), else in the run's maps folder.

A map that ``correct-map`` derived from the recorded one (its attrs ``twin_correction.twin`` name that save)
stands in for it: ``radio_maps_dir: radio_maps/corrected`` trains and evaluates against the corrected maps
(:func:`corrected_twin_id`).

A dataset made WITHOUT a map (``make-dataset --no-map``, attrs ``without_radio_map: true``;
its walks cover the scene's square, its sites are the automatic layout) records no map,
and it is not read against an arbitrary one: a map is accepted for it only when it has the
very sites (names and positions) and propagation settings the dataset was traced with, so
the map describes the same transmitters and physics (:func:`check_map_of_dataset`).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import resolve_path
from core.errors import ConfigError, StoreError
from core.stores.zarr_group import read_attrs


@dataclass(frozen=True)
class Lineage:
    """The identity of one saved store: ``id`` (uuid4 hex) and ``digest`` (``sha256:<hex>``)."""

    id: str
    digest: str

    @classmethod
    def new(cls, digest: str) -> Lineage:
        """A fresh id for content with ``digest`` (one per save)."""
        return cls(uuid.uuid4().hex, digest)

    @classmethod
    def from_attrs(cls, raw: Any) -> Lineage | None:
        """The ``lineage`` group attribute, or None when absent or malformed."""
        if isinstance(raw, Mapping) and isinstance(raw.get("id"), str) and isinstance(raw.get("digest"), str):
            return cls(raw["id"], raw["digest"])
        return None

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "digest": self.digest}


@dataclass(frozen=True)
class StoreRef:
    """A pointer to one saved store: where it is, its scene, and which save (id, digest)."""

    path: str
    scene: str | None = None
    id: str | None = None
    digest: str | None = None

    def describe(self) -> str:
        """``"<path> (scene <scene>, id <first 8 hex>)"`` for error messages."""
        scene = f"scene {self.scene}" if self.scene else "no scene"
        ident = f"id {self.id[:8]}" if self.id else "no lineage id"
        return f"{self.path} ({scene}, {ident})"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> StoreRef | None:
        """A ref from its dict form, or None when ``raw`` is not one."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str):
            return None
        text = lambda key: raw[key] if isinstance(raw.get(key), str) else None  # noqa: E731
        return cls(raw["path"], text("scene"), text("id"), text("digest"))


# -- digests ------------------------------------------------------------------------------
def _canonical_array(arr: np.ndarray) -> np.ndarray:
    """C-contiguous ``arr``; floats with every NaN one bit pattern and -0.0 as +0.0."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        arr = np.where(np.isnan(arr), np.array(np.nan, dtype=arr.dtype), arr + arr.dtype.type(0))
    return np.ascontiguousarray(arr)


def content_digest(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of ``arrays`` (by name: dtype, shape, bytes) and JSON ``meta``.

    Equal for a store's content before saving and after loading (JSON turns tuples into
    lists and keys into strings; zarr may restore -0.0 or NaN with other bits), so the
    metadata goes through a JSON round trip and the floats are made canonical first.
    """
    digest = hashlib.sha256()
    plain = json.loads(json.dumps(meta, default=str))
    digest.update(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(arrays):
        arr = _canonical_array(np.asarray(arrays[name]))
        digest.update(f"\n{name}:{arr.dtype.str}:{list(arr.shape)}\n".encode())
        digest.update(arr.reshape(-1).view(np.uint8))
    return f"sha256:{digest.hexdigest()}"


def check_digest(label: str, path: str | os.PathLike, lineage: Lineage | None, actual: str) -> None:
    """Refuse a store whose content no longer matches the digest written when it was saved."""
    if lineage is not None and lineage.digest != actual:
        raise StoreError(f"{label} {path}: content does not match the digest written at save "
                         f"({lineage.digest[:15]}… vs {actual[:15]}…): it changed afterwards; make it again")


# -- cheap reads of a store's lineage (zarr.json only) ---------------------------------------
def _attrs_or_error(path: Path, label: str) -> dict[str, Any]:
    if not path.exists():
        raise StoreError(f"{label} {path}: no such store")
    try:
        return read_attrs(path)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{label} {path}: unreadable store metadata ({type(exc).__name__})") from None


def store_ref(path: str | os.PathLike, label: str = "store") -> StoreRef:
    """The :class:`StoreRef` of the radio map or dataset at ``path``, from its ``zarr.json``."""
    path = Path(path)
    attrs = _attrs_or_error(path, label)
    lineage = Lineage.from_attrs(attrs.get("lineage"))
    free = attrs.get("attrs") if isinstance(attrs.get("attrs"), Mapping) else {}
    scene = free.get("scene") if isinstance(free.get("scene"), str) else None
    return StoreRef(str(path), scene, lineage.id if lineage else None, lineage.digest if lineage else None)


def recorded_map(dataset_path: str | os.PathLike) -> StoreRef | None:
    """The radio map the dataset at ``dataset_path`` records it was made with (None if none)."""
    raw = _attrs_or_error(Path(dataset_path), "dataset").get("lineage")
    return StoreRef.from_dict(raw.get("radio_map")) if isinstance(raw, Mapping) else None


def recorded_map_path(dataset_path: str | os.PathLike) -> Path | None:
    """Where the map the dataset at ``dataset_path`` records is: its path as given to ``make-dataset``
    (absolute, or relative to the folder it ran in: looked up with :func:`core.resolve_path`); None when
    the dataset records no map."""
    ref = recorded_map(dataset_path)
    return resolve_path(ref.path) if ref is not None else None


def maps_folder_of(dataset_path: str | os.PathLike, maps_dir: str | os.PathLike) -> Path:
    """The maps folder to read the dataset's map from when no training config names it (``evaluate --scene
    S --dataset D``): the folder of the map the dataset records when that store is there (it was made
    with ``make-dataset --radio-maps M``), else ``maps_dir``. Either way the map must then be that very
    save (:func:`check_map_of_dataset`)."""
    try:
        recorded = recorded_map_path(dataset_path)
    except StoreError:
        return Path(maps_dir)  # no readable dataset: loading it names the problem
    return recorded.parent if recorded is not None and recorded.exists() else Path(maps_dir)


#: the dataset attribute that says it was made without a radio map (``make-dataset --no-map``)
WITHOUT_MAP = "without_radio_map"


def _free_attrs(path: Path) -> dict[str, Any]:
    """The store's free attributes (``attrs``; {} when it is not a readable store: e.g. in memory)."""
    try:
        attrs = read_attrs(path).get("attrs") if path.exists() else None
    except (OSError, ValueError):
        return {}
    return dict(attrs) if isinstance(attrs, Mapping) else {}


def _transmitters(attrs: Mapping[str, Any]) -> tuple[list[tuple[str, tuple[float, ...]]], Any]:
    """``([(site name, position rounded to mm)], propagation)`` of a store's attrs; the propagation without the
    settings that are off (0, false, null), so a setting added after a store was made (absent there, off by
    default) does not tell two stores of the same physics apart."""
    sites = [(str(q.get("name")), tuple(round(float(v), 3) for v in q.get("position", ())))
             for q in attrs.get("sites") or [] if isinstance(q, Mapping)]
    prop = attrs.get("propagation")
    if isinstance(prop, Mapping):
        prop = {k: v for k, v in prop.items() if v is not None and v is not False
                and not (type(v) in (int, float) and v == 0)} or None
    return sites, prop


def _check_map_of_mapless(dataset: StoreRef, radio_map: StoreRef) -> None:
    """Refuse a map for a dataset made without one unless it has the dataset's sites and propagation."""
    ds_attrs = _free_attrs(Path(dataset.path))
    if ds_attrs.get(WITHOUT_MAP) is not True:
        return  # not marked: made before the mark existed, or in memory (only the scene is compared)
    ds_sites, ds_prop = _transmitters(ds_attrs)
    map_sites, map_prop = _transmitters(_free_attrs(Path(radio_map.path)))
    why = ("other sites (names or positions)" if ds_sites != map_sites else
           "other propagation settings" if ds_prop != map_prop else "")
    if why:
        raise StoreError(f"dataset {dataset.describe()} was made without a radio map (make-dataset --no-map), and "
                         f"radio map {radio_map.describe()} has {why} than it was traced with: make the dataset "
                         f"again with --radio-maps FOLDER holding that map")


# -- the rules ----------------------------------------------------------------------------------
def _describe_path(path: Path, label: str) -> str:
    try:
        return store_ref(path, label).describe()
    except StoreError:
        return f"{path} (missing or unreadable)"


def map_path(folder: str | os.PathLike, scene: str) -> Path:
    """``<folder>/<scene>.zarr``: THE path of a scene's radio map in a maps folder (the one builder)."""
    return Path(folder) / f"{scene}.zarr"


#: the maps folder of the corrected maps inside a maps folder (``python -m core correct-map``:
#: :mod:`core.physics.twin_correction`), so the twin keeps its place
CORRECTED_FOLDER = "corrected"


def corrected_map_path(radio_maps: str | os.PathLike, scene: str) -> Path:
    """``<radio_maps>/corrected/<scene>.zarr``: THE path of a scene's corrected map (``correct-map``'s default
    ``--out``; what the app offers to ``evaluate --radio-map``)."""
    return map_path(Path(radio_maps) / CORRECTED_FOLDER, scene)


def map_scene(path: str | os.PathLike) -> str:
    """The scene whose map :func:`map_path` names ``path`` (``<folder>/<scene>.zarr`` -> ``scene``)."""
    return Path(path).name.removesuffix(".zarr")


def map_paths(folder: str | os.PathLike) -> list[Path]:
    """The radio-map stores in a maps folder (sorted; hidden and temporary names skipped)."""
    folder = Path(folder)
    return sorted(p for p in folder.glob("*.zarr") if not p.name.startswith(".")) if folder.is_dir() else []


def map_path_for(dataset: StoreRef, radio_maps_dir: str | os.PathLike, scene: str | None = None) -> Path:
    """``<radio_maps_dir>/<scene>.zarr`` with the scene of ``dataset``.

    ``scene`` is an optional pin (``data.scene`` of a config): when given it must be the
    dataset's scene, or a :class:`ConfigError` names the pinned map and the dataset.
    """
    maps = Path(radio_maps_dir)
    if not dataset.scene:
        raise StoreError(f"dataset {dataset.path}: its attrs name no scene, so its radio map is unknown")
    if scene and scene != dataset.scene:
        raise ConfigError(f"data.scene {scene!r} selects radio map {_describe_path(map_path(maps, scene), 'radio map')}"
                          f" but dataset {dataset.describe()} is of scene {dataset.scene!r}: the scene comes from the "
                          f"dataset; drop data.scene or set it to {dataset.scene!r}")
    return map_path(maps, dataset.scene)


def check_map_of_dataset(dataset: StoreRef, recorded: StoreRef | None, radio_map: StoreRef) -> None:
    """Refuse ``radio_map`` unless it is of the dataset's scene and, when the dataset
    records its map (``recorded``), that very save (same id); for a dataset made without a map,
    unless it has the dataset's sites and propagation (module docstring)."""
    if dataset.scene and radio_map.scene != dataset.scene:
        raise StoreError(f"radio map {radio_map.describe()} is not of the scene of dataset {dataset.describe()}")
    if recorded is not None and recorded.id and radio_map.id != recorded.id and corrected_twin_id(radio_map) != recorded.id:
        raise StoreError(f"radio map {radio_map.describe()} is not the map dataset {dataset.describe()} was made "
                         f"with ({recorded.describe()}): make the dataset again, or restore that map")
    if recorded is None:
        _check_map_of_mapless(dataset, radio_map)


def corrected_twin_id(radio_map: StoreRef) -> str | None:
    """The id of the map a ``correct-map`` store was corrected from (``attrs["twin_correction"]["twin"]``), else
    None. A dataset accepts that correction wherever it accepts the twin (:func:`check_map_of_dataset`): the same
    sites, propagation and grid, with the per-site layers fitted to labelled walks (docs/world.md)."""
    record = _free_attrs(Path(radio_map.path)).get("twin_correction")
    twin = record.get("twin") if isinstance(record, Mapping) else None
    return twin.get("id") if isinstance(twin, Mapping) and isinstance(twin.get("id"), str) else None


def check_map_override(dataset: StoreRef, radio_map: StoreRef) -> None:
    """Accept ``radio_map`` IN PLACE OF the map ``dataset`` records, explicitly (``--radio-map PATH``), only when
    it is of the dataset's scene and was traced with the dataset's sites and propagation settings (its attrs
    ``sites``, ``propagation``): another save of the same physics, e.g. a k-path map whose path-0 layers the
    generator makes exactly as the recorded map's. The caller records both refs in its output; nothing else
    about the lineage is relaxed (the run's dataset is still checked)."""
    if dataset.scene and radio_map.scene != dataset.scene:
        raise StoreError(f"--radio-map {radio_map.describe()} is not of the scene of dataset {dataset.describe()}")
    ds_sites, ds_prop = _transmitters(_free_attrs(Path(dataset.path)))
    map_sites, map_prop = _transmitters(_free_attrs(Path(radio_map.path)))
    why = ("other sites (names or positions)" if ds_sites != map_sites else
           "other propagation settings" if ds_prop != map_prop else "")
    if why:
        raise StoreError(f"--radio-map {radio_map.describe()} has {why} than dataset {dataset.describe()} was "
                         f"traced with: generate it with the dataset's map settings (attrs propagation, sites)")


def check_map_of_scene(radio_map: StoreRef, scene: str, flag: str = "--scene") -> None:
    """Refuse a map store that is not of ``scene`` (e.g. another scene's map copied to ``<scene>.zarr``)."""
    if radio_map.scene != scene:
        raise StoreError(f"radio map {radio_map.describe()} is not a map of scene {scene!r} ({flag} {scene}): "
                         f"its attrs name scene {radio_map.scene!r}; generate the map of {scene} there")


def check_scene_stores(dataset_path: str | os.PathLike, map_path: str | os.PathLike) -> None:
    """:func:`check_map_of_dataset` on the stores at the two paths, from their metadata only."""
    check_map_of_dataset(store_ref(dataset_path, "dataset"), recorded_map(dataset_path),
                         store_ref(map_path, "radio map"))
