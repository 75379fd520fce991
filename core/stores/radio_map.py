"""The radio-map contract: a stack of per-cell feature maps on a regular grid.

Coordinates
-----------
``bounds = (x_min, y_min, x_max, y_max)`` are the OUTER EDGES of the grid, in scene
metres. Row ``i`` runs along +y and column ``j`` along +x. A value is the average over
its cell, and cell ``(i, j)`` is centred at::

    x_j = x_min + (j + 0.5) * cell_size
    y_i = y_min + (i + 0.5) * cell_size

with ``cell_size = (x_max - x_min) / W = (y_max - y_min) / H`` (cells are square).

Storage
-------
A Zarr v3 group (``RadioMap.save`` / ``RadioMap.load``)::

    <name>.zarr/
        values   float32 [F, H, W]   chunked (1, 128, 128), zstd-compressed
        valid    bool    [H, W]      coverage mask
        outdoor  bool    [H, W]      cell centre not under a roof (valid implies outdoor; optional,
                                     every generated map of format 3 has it)
        ground   float32 [H, W]      terrain height under the cell centre [m] (optional, likewise;
                                     the map is traced at ground + rx_height)
        layers/<name>  float32 [K, H, W]  extra layers on the same grid (the per-site layers below)
        attrs: format_version, features, units, bounds, attrs (free JSON: scene, sites, ...),
               lineage {id, digest} (see :mod:`core.stores.lineage`)

Cells outside ``valid`` may hold NaN or -inf (no coverage); covered cells must be finite.
Saving is atomic (see :mod:`core.stores.atomic`) and stamps a new lineage id and the
content digest (values, valid, outdoor, ground, layers, features, bounds, attrs); loading
checks the digest. Stores of format version 2 (no ``outdoor``/``ground``) still load, with
:attr:`RadioMap.outdoor` and :attr:`RadioMap.ground` None; older ones are refused with the
command that regenerates them.

Coverage
--------
:attr:`RadioMap.outdoor_coverage` is the fraction of OUTDOOR cells that are covered,
``sum(valid) / sum(outdoor)``: the figure maps are judged by (a map cannot cover the
inside of buildings). :attr:`RadioMap.coverage` is the fraction of all cells.

Per-site layers
---------------
``values`` describe the serving (strongest) site of each cell. Maps made by
``generate-maps`` (format version 2) also hold EVERY site's features, one plane per
site in the order of ``attrs["sites"]`` (``S`` sites), so a report's site slot with
site id ``s`` (``MeasurementDataset.site_ids``) is compared with plane ``s``:

==================  ====================  =====  ==============================================
layer               shape                 unit   meaning
==================  ====================  =====  ==============================================
``site_path_gain``  float32 ``[S, H, W]``  dB     10 log10 of the sum of the paths' ``|a|^2``
``site_toa``        float32 ``[S, H, W]``  ns     delay of the strongest path (max ``|a|^2``)
``site_aoa``        float32 ``[S, H, W]``  deg    azimuth of arrival of that path, in (-180, 180]
==================  ====================  =====  ==============================================

NaN where site ``s`` has no path to the cell (and under roofs); the three layers are
NaN at the same cells.

k-path layer (optional; ``attrs["paths_per_site"] = k > 1``, ``generate-maps
--paths-per-site k``): every site's ``k`` strongest paths at every cell as ANCHORS (the point
each path comes from once unfolded, and the length before it), evaluated at the query point
rather than interpolated (:mod:`core.stores.path_anchors`):

==================  ==============================  =====  =====================================
``site_anchor``     int16 ``[4 S k, H, W]``        m / Q  plane ``4 (s k + r) + c``: coordinate ``c``
                                                           of ``(q_x, q_y, q_z, L0)`` of site ``s``'s
                                                           path of rank ``r`` (0 = the strongest),
                                                           ``(v - origin) / quantum``; -32768: absent
==================  ==============================  =====  =====================================

with ``attrs["path_anchors"] = {"quantum_m", "origin_m", "layout"}``. Absent where the site has
fewer paths there (and wherever ``site_path_gain`` is NaN). Path 0's values stay in ``site_toa``
/ ``site_aoa``. A map without it reads as ``k = 1`` (:attr:`RadioMap.paths_per_site`). The first
k-path layout (``site_alt_toa``, ``site_alt_aoa``, ``site_alt_power`` float32 ``[S (k-1), H, W]``,
interpolated values) still loads, path 0 included, but its next paths are refused by the code that
would read them (:meth:`RadioMap.path_anchors`) with the command that regenerates it.
Where the serving site ``s*`` covers a valid cell,
``values[path_gain|toa|aoa]`` equal ``site_*[s*]``. Cell values are at the cell
centre (not cell averages), so the cell-centred bilinear lookup is exact at centres.
How they are made: :mod:`core.raytracing.generation`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import StoreError
from core.features import feature_spec
from core.stores.atomic import atomic_path, read_consistently
from core.stores.lineage import Lineage, StoreRef, check_digest, content_digest, map_scene
from core.stores.path_anchors import ANCHOR_LAYER, decode_anchors
from core.stores.zarr_group import open_group, read_arrays

FORMAT_VERSION = 3  # 3: outdoor mask and ground heights; 2: per-site layers, attrs["propagation"]
OLDEST_READABLE_VERSION = 2  # format 2 lacks only outdoor and ground
SITE_LAYERS: tuple[str, ...] = ("site_path_gain", "site_toa", "site_aoa")
#: the first k-path layout's layers (``[S (k-1), H, W]``, interpolated values): loaded, never read as paths
LEGACY_ALT_LAYERS: tuple[str, ...] = ("site_alt_toa", "site_alt_aoa", "site_alt_power")
_CHUNK = 128


@dataclass(frozen=True)
class FeatureStats:
    """Statistics of one feature over the covered cells, in the feature's unit.

    For angular features ``mean`` is the circular mean (deg, in (-180, 180]) and
    ``std`` the circular standard deviation ``sqrt(-2 ln R)`` in degrees, where ``R``
    is the mean resultant length.
    """

    mean: float
    std: float
    min: float
    max: float


def feature_stats(values: np.ndarray, angular: bool) -> FeatureStats:
    """Statistics of a 1-D array of covered-cell values (float64 accumulation)."""
    v = values.astype(np.float64)
    if v.size == 0:
        return FeatureStats(float("nan"), float("nan"), float("nan"), float("nan"))
    if angular:
        rad = np.deg2rad(v)
        c, s = np.cos(rad).mean(), np.sin(rad).mean()
        r = min(math.hypot(c, s), 1.0)
        mean = math.degrees(math.atan2(s, c))
        std = math.degrees(math.sqrt(-2.0 * math.log(r))) if r > 0 else float("inf")
        return FeatureStats(mean, std, float(v.min()), float(v.max()))
    return FeatureStats(float(v.mean()), float(v.std()), float(v.min()), float(v.max()))


def _check_site_layers(layers: dict[str, np.ndarray], attrs: dict[str, Any], where: str) -> None:
    """The per-site layers present share one site count, that of ``attrs["sites"]`` when listed."""
    counts = {name: layers[name].shape[0] for name in SITE_LAYERS if name in layers}
    sites = attrs.get("sites")
    if isinstance(sites, list) and counts and set(counts.values()) != {len(sites)}:
        raise StoreError(f"{where}: per-site layers {counts} must have one plane per site ({len(sites)} in attrs)")
    if len(set(counts.values())) > 1:
        raise StoreError(f"{where}: per-site layers {counts} disagree on the number of sites")
    k = attrs.get("paths_per_site", 1)
    legacy = {name: layers[name].shape[0] for name in LEGACY_ALT_LAYERS if name in layers}
    anchor = layers.get(ANCHOR_LAYER)
    if anchor is None and not legacy and k == 1:
        return
    n_sites = next(iter(counts.values()), None)
    if not isinstance(k, int) or k < 2 or n_sites is None:
        raise StoreError(f"{where}: k-path layers need attrs paths_per_site >= 2 and the per-site layers "
                         f"(paths_per_site = {k!r}, {n_sites} sites)")
    if anchor is not None:
        meta = attrs.get("path_anchors")
        if anchor.shape[0] != 4 * n_sites * k or not isinstance(meta, dict) or not {"quantum_m", "origin_m"} <= set(meta):
            raise StoreError(f"{where}: layer {ANCHOR_LAYER!r} must have 4 S k = {4 * n_sites * k} planes and attrs "
                             f"path_anchors {{quantum_m, origin_m}}, got {anchor.shape[0]} planes, {meta!r}")
    elif len(legacy) != len(LEGACY_ALT_LAYERS) or set(legacy.values()) != {n_sites * (k - 1)}:
        raise StoreError(f"{where}: k-path layers {legacy} must be {ANCHOR_LAYER!r}, or all of {list(LEGACY_ALT_LAYERS)} "
                         f"with S (k - 1) planes each (S = {n_sites} sites, attrs paths_per_site = {k!r})")


def regenerate_command(path: str | os.PathLike, meta: dict[str, Any]) -> str:
    """The ``generate-maps`` command that remakes the store at ``path`` (stored attrs ``meta``) in this format."""
    path = Path(path)
    scene = (meta.get("attrs") or {}).get("scene") or map_scene(path)
    cmd = f"python -m core generate-maps --scenes {scene} --radio-maps {path.parent}"
    try:
        x_min, y_min, x_max, y_max = (float(b) for b in meta["bounds"])
        cell = float(meta["cell_size"])
        cmd += (f" --resolution {cell:g} --map-size {round((y_max - y_min) / cell)} {round((x_max - x_min) / cell)}"
                f" --center {(x_min + x_max) / 2:g} {(y_min + y_max) / 2:g}")
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        pass
    return cmd + " --force"


def _check_terrain(outdoor, ground, valid: np.ndarray, where: str):
    """``(outdoor, ground)`` as bool / float32 ``[H, W]`` arrays (or None), checked against ``valid``."""
    shape = valid.shape
    if outdoor is not None:
        outdoor = np.asarray(outdoor)
        if outdoor.shape != shape or outdoor.dtype != np.bool_:
            raise StoreError(f"{where}: outdoor must be bool {list(shape)}, got {outdoor.dtype} {outdoor.shape}")
        if (valid & ~outdoor).any():
            raise StoreError(f"{where}: {int((valid & ~outdoor).sum())} covered cell(s) lie outside the outdoor mask")
    if ground is not None:
        ground = np.asarray(ground)
        if ground.shape != shape or ground.dtype != np.float32 or not np.isfinite(ground).all():
            raise StoreError(f"{where}: ground must be finite float32 {list(shape)}, got {ground.dtype} {ground.shape}")
    return outdoor, ground


class RadioMap:
    """Per-cell radio features of one scene.

    Args:
        values: float32 ``[F, H, W]``; channel ``f`` is feature ``features[f]``.
        features: feature names in channel order (see :mod:`core.features`).
        bounds: ``(x_min, y_min, x_max, y_max)``, the outer edges of the grid [m].
        valid: bool ``[H, W]`` coverage mask; all true if omitted.
        attrs: JSON-serialisable metadata: scene name, sites, generator settings...
        layers: extra named float32 ``[K, H, W]`` arrays on the same grid; the per-site
            layers :data:`SITE_LAYERS` (module docstring) share ``K = S`` sites.
        outdoor: bool ``[H, W]``, cells not under a roof (``valid`` must lie inside), or None.
        ground: float32 ``[H, W]`` terrain height under each cell centre [m], or None.
        source: where the map was loaded from, used in error messages.
        lineage: id and digest of the store it was loaded from (set by :meth:`save` too).
    """

    def __init__(
        self,
        values: np.ndarray,
        features: list[str] | tuple[str, ...],
        bounds: tuple[float, float, float, float],
        valid: np.ndarray | None = None,
        attrs: dict[str, Any] | None = None,
        layers: dict[str, np.ndarray] | None = None,
        source: str | os.PathLike | None = None,
        lineage: Lineage | None = None,
        outdoor: np.ndarray | None = None,
        ground: np.ndarray | None = None,
    ) -> None:
        where = f"radio map {source}" if source else "radio map"
        values = np.asarray(values)
        if values.ndim != 3:
            raise StoreError(f"{where}: values must be [F, H, W], got shape {values.shape}")
        if values.dtype != np.float32:
            raise StoreError(f"{where}: values must be float32, got {values.dtype}")
        n_feat, height, width = values.shape
        if height == 0 or width == 0:
            raise StoreError(f"{where}: empty grid {height}x{width}")
        features = [str(f) for f in features]
        if len(features) != n_feat:
            raise StoreError(f"{where}: {len(features)} feature names for {n_feat} channels")
        if len(set(features)) != len(features):
            raise StoreError(f"{where}: duplicate feature names in {features}")
        for name in features:
            try:
                feature_spec(name)
            except Exception as exc:
                raise StoreError(f"{where}: {exc}") from None

        bounds = tuple(float(b) for b in bounds)
        if len(bounds) != 4 or not all(math.isfinite(b) for b in bounds):
            raise StoreError(f"{where}: bounds must be 4 finite numbers, got {bounds}")
        x_min, y_min, x_max, y_max = bounds
        if not (x_max > x_min and y_max > y_min):
            raise StoreError(f"{where}: bounds {bounds} must have x_max > x_min and y_max > y_min")
        dx, dy = (x_max - x_min) / width, (y_max - y_min) / height
        if not math.isclose(dx, dy, rel_tol=1e-5):
            raise StoreError(f"{where}: cells must be square, got {dx:g} m x {dy:g} m from bounds {bounds}")

        if valid is None:
            valid = np.ones((height, width), dtype=bool)
        valid = np.asarray(valid)
        if valid.shape != (height, width) or valid.dtype != np.bool_:
            raise StoreError(f"{where}: valid must be bool [{height}, {width}], got {valid.dtype} {valid.shape}")

        covered = values[:, valid]
        if covered.size and not np.isfinite(covered).all():
            bad = [features[f] for f in range(n_feat) if not np.isfinite(covered[f]).all()]
            raise StoreError(f"{where}: NaN or inf inside the coverage mask in feature(s) {', '.join(bad)}")

        layers = {str(k): np.asarray(v) for k, v in (layers or {}).items()}
        for name, layer in layers.items():
            dtype = np.int16 if name == ANCHOR_LAYER else np.float32
            if layer.ndim != 3 or layer.shape[1:] != (height, width) or layer.dtype != dtype:
                raise StoreError(
                    f"{where}: layer {name!r} must be {np.dtype(dtype).name} [K, {height}, {width}], "
                    f"got {layer.dtype} {layer.shape}"
                )

        _check_site_layers(layers, attrs or {}, where)
        outdoor, ground = _check_terrain(outdoor, ground, valid, where)
        try:
            json.dumps(attrs or {})
        except TypeError as exc:
            raise StoreError(f"{where}: attrs are not JSON-serialisable ({exc})") from None

        self._values = values
        self._features = tuple(features)
        self._bounds = bounds
        self._valid = valid
        self._outdoor = outdoor
        self._ground = ground
        self._attrs = dict(attrs or {})
        self._layers = layers
        self._source = source
        self._lineage = lineage
        self._stats = {
            name: feature_stats(values[f][valid], feature_spec(name).angular) for f, name in enumerate(features)
        }

    # -- properties -------------------------------------------------------------------
    @property
    def values(self) -> np.ndarray:
        """float32 ``[F, H, W]``."""
        return self._values

    @property
    def features(self) -> tuple[str, ...]:
        return self._features

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)``, outer edges [m]."""
        return self._bounds

    @property
    def valid(self) -> np.ndarray:
        """bool ``[H, W]`` coverage mask."""
        return self._valid

    @property
    def outdoor(self) -> np.ndarray | None:
        """bool ``[H, W]``: cell centres not under a roof; None in a format-2 store."""
        return self._outdoor

    @property
    def ground(self) -> np.ndarray | None:
        """float32 ``[H, W]``: terrain height under each cell centre [m]; None in a format-2 store."""
        return self._ground

    @property
    def coverage(self) -> float:
        """Fraction of ALL cells that are covered."""
        return float(self._valid.mean())

    @property
    def outdoor_coverage(self) -> float | None:
        """Fraction of the OUTDOOR cells that are covered (None without an outdoor mask; 0 without outdoor cells)."""
        if self._outdoor is None:
            return None
        n_out = int(self._outdoor.sum())
        return float(self._valid.sum() / n_out) if n_out else 0.0

    def coverage_text(self) -> str:
        """``"95.1 % of outdoor cells"``, or ``"51.0 % of all cells"`` for a store without an outdoor mask."""
        cov = self.outdoor_coverage
        return f"{cov:.1%} of outdoor cells" if cov is not None else f"{self.coverage:.1%} of all cells"

    @property
    def attrs(self) -> dict[str, Any]:
        return self._attrs

    @property
    def layers(self) -> dict[str, np.ndarray]:
        return self._layers

    @property
    def paths_per_site(self) -> int:
        """``k``: the paths per site and cell the map keeps (1 without k-path layers)."""
        return int(self._attrs.get("paths_per_site", 1))

    def path_anchors(self, relative: bool = True) -> np.ndarray:
        """float64 ``[S, k, 4, H, W]``: every site's ``k`` paths' anchors ``(q_x, q_y, q_z, L0)`` [m] per cell,
        NaN where absent (:mod:`core.stores.path_anchors`). ``relative``: ``q_z`` minus the cell's receiver
        height (``ground`` + ``attrs["radio"]["rx_height_m"]``, 1.5 m without them), as the lookup evaluates it.

        Raises :class:`StoreError` for a map of one path per site, and -- one line, with the command
        that regenerates it -- for the first k-path layout (interpolated ``site_alt_*`` values)."""
        if ANCHOR_LAYER not in self._layers:
            where = f"radio map {self.source or self._attrs.get('scene', '')}"
            if self.paths_per_site > 1:
                meta = {"attrs": self._attrs, "bounds": list(self._bounds), "cell_size": self.cell_size}
                cmd = regenerate_command(self.source or "radio_maps/map.zarr", meta).replace(
                    " --force", f" --paths-per-site {self.paths_per_site} --force")
                raise StoreError(f"{where}: its next paths are in the first k-path layout (site_alt_* values, "
                                 f"interpolated across paths), which this code no longer reads; regenerate it: {cmd}")
            raise StoreError(f"{where}: holds one path per site (no {ANCHOR_LAYER!r} layer)")
        sites = self._layers["site_toa"].shape[0]
        anchors = decode_anchors(self._layers[ANCHOR_LAYER], self._attrs["path_anchors"], sites)
        if relative:
            rx = float((self._attrs.get("radio") or {}).get("rx_height_m", 1.5))
            ground = self._ground if self._ground is not None else np.zeros(self.shape, np.float32)
            anchors[:, :, 2] -= ground.astype(np.float64)[None, None] + rx
        return anchors

    @property
    def source(self) -> str | None:
        return None if self._source is None else str(self._source)

    @property
    def lineage(self) -> Lineage | None:
        """Id and digest of the store this map was loaded from or last saved to."""
        return self._lineage

    @property
    def ref(self) -> StoreRef:
        """This map as a :class:`~core.stores.lineage.StoreRef` (path, scene, id, digest)."""
        lineage = self._lineage
        return StoreRef(self.source or "(radio map in memory)", self._attrs.get("scene"),
                        lineage.id if lineage else None, lineage.digest if lineage else None)

    def digest(self) -> str:
        """The content digest: arrays plus features, bounds and attrs."""
        arrays = {"values": self._values, "valid": self._valid,
                  **{f"layers/{name}": layer for name, layer in self._layers.items()}}
        for name, arr in (("outdoor", self._outdoor), ("ground", self._ground)):
            if arr is not None:  # a format-2 store's digest has neither
                arrays[name] = arr
        return content_digest(arrays, {"features": list(self._features), "bounds": list(self._bounds),
                                       "attrs": self._attrs})

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self._values.shape[1], self._values.shape[2]

    @property
    def cell_size(self) -> float:
        """Edge length of a (square) cell [m]."""
        return (self._bounds[2] - self._bounds[0]) / self._values.shape[2]

    @property
    def stats(self) -> dict[str, FeatureStats]:
        """Per-feature statistics over covered cells (circular for angles)."""
        return self._stats

    @property
    def units(self) -> dict[str, str]:
        return {name: feature_spec(name).unit for name in self._features}

    def index(self, name: str) -> int:
        """Channel index of feature ``name``."""
        try:
            return self._features.index(name)
        except ValueError:
            raise StoreError(f"{self.source or 'radio map'}: has no feature {name!r} (it has {list(self._features)})") from None

    def feature(self, name: str) -> np.ndarray:
        """``[H, W]`` map of one feature."""
        return self._values[self.index(name)]

    def cell_centers(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x [W], y [H])``: cell-centre coordinates along each axis [m]."""
        x_min, y_min, _, _ = self._bounds
        height, width = self.shape
        cell = self.cell_size
        return x_min + (np.arange(width) + 0.5) * cell, y_min + (np.arange(height) + 0.5) * cell

    def cell_of(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row and column ``(i [N], j [N])`` of the cells that contain points ``xy [N, 2]``, clipped to the grid."""
        xy = np.asarray(xy, dtype=np.float64)
        x_min, y_min, _, _ = self._bounds
        height, width = self.shape
        j = np.clip(np.floor((xy[:, 0] - x_min) / self.cell_size), 0, width - 1).astype(np.int64)
        i = np.clip(np.floor((xy[:, 1] - y_min) / self.cell_size), 0, height - 1).astype(np.int64)
        return i, j

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """bool ``[N]``: points inside the outer bounds."""
        xy = np.asarray(xy)
        x_min, y_min, x_max, y_max = self._bounds
        return (xy[:, 0] >= x_min) & (xy[:, 0] <= x_max) & (xy[:, 1] >= y_min) & (xy[:, 1] <= y_max)

    def __repr__(self) -> str:
        height, width = self.shape
        return (
            f"RadioMap({list(self._features)}, {height}x{width} cells of {self.cell_size:g} m, "
            f"bounds={self._bounds}, coverage={self.coverage_text()})"
        )

    # -- storage ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the map as a Zarr v3 group at ``path``, atomically, with a new lineage id.

        Afterwards this map's :attr:`source` is ``path`` and :attr:`lineage` the saved one.
        Returns the path.
        """
        import zarr

        path = Path(path)
        lineage = Lineage.new(self.digest())
        height, width = self.shape
        chunks = (1, min(_CHUNK, height), min(_CHUNK, width))
        with atomic_path(path) as tmp:
            group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
            group.create_array("values", data=self._values, chunks=chunks)
            group.create_array("valid", data=self._valid, chunks=chunks[1:])
            for name, arr in (("outdoor", self._outdoor), ("ground", self._ground)):
                if arr is not None:
                    group.create_array(name, data=arr, chunks=chunks[1:])
            if self._layers:
                sub = group.create_group("layers")
                for name, layer in self._layers.items():
                    sub.create_array(name, data=layer, chunks=(1,) + chunks[1:])
            group.attrs.update(
                {
                    "format_version": FORMAT_VERSION,
                    "kind": "radio_map",
                    "features": list(self._features),
                    "units": self.units,
                    "bounds": list(self._bounds),
                    "cell_size": self.cell_size,
                    "attrs": self._attrs,
                    "lineage": lineage.to_dict(),
                }
            )
        self._source, self._lineage = path, lineage
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RadioMap:
        """Read and validate a map written by :meth:`save`.

        Raises :class:`~core.errors.StoreError` naming ``path`` and the problem when the
        store is missing, corrupt, of another format version, or inconsistent. A read that
        overlaps a save to the same path is repeated (see :func:`~core.stores.atomic.read_consistently`).
        """
        path = Path(path)
        return read_consistently(path, lambda: cls._read(path), errors=(StoreError,))

    @classmethod
    def _read(cls, path: Path) -> RadioMap:
        group, meta = open_group(
            path, "radio map", "radio_map", FORMAT_VERSION, "generate it with `python -m core generate-maps`",
            regenerate=lambda m: regenerate_command(path, m), oldest_readable=OLDEST_READABLE_VERSION,
        )
        for key in ("features", "bounds"):
            if key not in meta:
                raise StoreError(f"radio map {path}: attrs lack {key!r}")

        def arrays():
            layers = {}
            if "layers" in group:
                for name, arr in group["layers"].arrays():
                    layers[name] = arr[...]
            terrain = {name: group[name][...] for name in ("outdoor", "ground") if name in group}
            return group["values"][...], group["valid"][...], layers, terrain

        values, valid, layers, terrain = read_arrays(path, "radio map", arrays)
        radio_map = cls(
            np.asarray(values),
            meta["features"],
            tuple(meta["bounds"]),
            valid=np.asarray(valid),
            attrs=meta.get("attrs") or {},
            layers=layers,
            source=path,
            lineage=Lineage.from_attrs(meta.get("lineage")),
            outdoor=terrain.get("outdoor"),
            ground=terrain.get("ground"),
        )
        check_digest("radio map", path, radio_map.lineage, radio_map.digest())
        return radio_map
