"""The measurement-dataset contract: UE walks with temporal measurement reports.

One sample is one UE walking for ``T`` reports; the label is its position at the last
report. Each report holds, for the ``K`` strongest sites, the path gain, time of
arrival and azimuth of arrival of the strongest path, plus serving-cell SNR, SINR,
throughput and BLER.

Storage: a Zarr v3 group (``MeasurementDataset.save`` / ``.load``)::

    ue_xyz          float32 [N, T, 3]     UE position at each report [m, scene frame]
    t               float32 [N, T]        report time [s], 0 at the first report
    report_mask     bool    [N, T]        True where the report exists (>= 1 per sample)
    site_ids        int16   [N, T, K]     index into attrs["sites"], strongest first; -1 = none
    site_features   float32 [N, T, K, 3]  (path_gain [dB], toa [ns], aoa [deg]) per site; NaN = none
    cell_features   float32 [N, T, 4]     serving (snr [dB], sinr [dB], throughput [Mbit/s], bler [1])
    los             bool    [N, T]        serving site in line of sight
    split           int8    [N]           0 train, 1 val, 2 test
    clean/site_features, clean/cell_features   the same before measurement noise
    motion          float32 [N, T, 2]     optional: the device's measured displacement since its previous report
                                          [m] (row 0 NaN; :mod:`core.stores.motion_model`), when the
                                          measurement model records a motion channel
    attrs: format_version, kind, attrs (scene, sites, measurement_model, seed, generator settings...),
           lineage {id, digest, radio_map: {path, scene, id, digest} | null}

``attrs["measurement_model"]`` records every knob of the measurement model (noise sigmas,
clock offset, missing-report rate, site slots, sensitivity threshold;
:mod:`core.stores.measurement_model`), read back as :attr:`MeasurementDataset.measurement_model`;
a store written before that record reads as the defaults it was made with.

Saving is atomic, stamps a new lineage id and the content digest (every array, attrs and
the radio-map ref) and records the radio map the dataset was made with
(:mod:`core.stores.lineage`); loading checks the digest.

Where a report is missing (``report_mask`` false) its features are NaN. Site slot 0 is
the serving (strongest) site, which is what the radio map's ``values`` describe; slot
``k`` of site ``s = site_ids[n, t, k]`` compares with the map's per-site layers
``site_path_gain / site_toa / site_aoa [s]`` (:mod:`core.stores.radio_map`).
``attrs["propagation"]`` holds the ray-tracing settings, the same as the map's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CoreError, StoreError
from core.stores.atomic import atomic_path, read_consistently
from core.stores.lineage import Lineage, StoreRef, check_digest, content_digest
from core.stores.measurement_model import MeasurementModel
from core.stores.zarr_group import open_group, read_arrays, read_attrs

FORMAT_VERSION = 1
SITE_FEATURES: tuple[str, ...] = ("path_gain", "toa", "aoa")
CELL_FEATURES: tuple[str, ...] = ("snr", "sinr", "throughput", "bler")
SPLITS = {"train": 0, "val": 1, "test": 2}

_ARRAYS: dict[str, tuple[str, int]] = {  # name -> (dtype, ndim)
    "ue_xyz": ("float32", 3),
    "t": ("float32", 2),
    "report_mask": ("bool", 2),
    "site_ids": ("int16", 3),
    "site_features": ("float32", 4),
    "cell_features": ("float32", 3),
    "los": ("bool", 2),
    "split": ("int8", 1),
}


@dataclass
class MeasurementDataset:
    """In-memory measurement dataset; see the module docstring for shapes and units.

    ``lineage`` is the id and digest of the store it was loaded from (or last saved to);
    ``radio_map_ref`` the radio map it was made with (None when unknown).
    """

    ue_xyz: np.ndarray
    t: np.ndarray
    report_mask: np.ndarray
    site_ids: np.ndarray
    site_features: np.ndarray
    cell_features: np.ndarray
    los: np.ndarray
    split: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    clean_site_features: np.ndarray | None = None
    clean_cell_features: np.ndarray | None = None
    source: str | None = None
    lineage: Lineage | None = None
    radio_map_ref: StoreRef | None = None
    motion: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- shape facts ------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.ue_xyz.shape[0]

    @property
    def num_reports(self) -> int:
        return self.ue_xyz.shape[1]

    @property
    def num_sites_per_report(self) -> int:
        return self.site_ids.shape[2]

    @property
    def labels(self) -> np.ndarray:
        """float32 ``[N, 2]``: UE (x, y) at the last report [m]."""
        return self.ue_xyz[:, -1, :2]

    @property
    def measurement_model(self) -> MeasurementModel | None:
        """How the reports were made (noise, clock offset, missing rate, slots, sensitivity);
        ``None`` when the attrs record none (e.g. an analytic dataset)."""
        return MeasurementModel.from_attrs(self.attrs)

    def indices(self, split: str) -> np.ndarray:
        """Sample indices of ``split`` (train, val or test)."""
        if split not in SPLITS:
            raise StoreError(f"unknown split {split!r} (use {', '.join(SPLITS)})")
        return np.flatnonzero(self.split == SPLITS[split])

    def map_features(self, names: tuple[str, ...] | list[str]) -> np.ndarray:
        """float32 ``[N, T, F]``: the serving-site observation of each map feature.

        Channel ``f`` is feature ``names[f]`` in its map unit, so the result can be
        compared with a radio map read at the UE position. NaN where missing.
        """
        out = np.full(self.cell_features.shape[:2] + (len(names),), np.nan, dtype=np.float32)
        for f, name in enumerate(names):
            if name in SITE_FEATURES:
                out[..., f] = self.site_features[:, :, 0, SITE_FEATURES.index(name)]
            elif name in CELL_FEATURES:
                out[..., f] = self.cell_features[..., CELL_FEATURES.index(name)]
            else:
                raise StoreError(f"dataset {self.source or ''}: no measurement for map feature {name!r}")
        return out

    def subset(self, idx: np.ndarray) -> MeasurementDataset:
        """A new dataset holding samples ``idx`` only."""
        take = lambda a: None if a is None else a[idx]  # noqa: E731
        return MeasurementDataset(
            self.ue_xyz[idx], self.t[idx], self.report_mask[idx], self.site_ids[idx], self.site_features[idx],
            self.cell_features[idx], self.los[idx], self.split[idx], dict(self.attrs),
            take(self.clean_site_features), take(self.clean_cell_features), self.source, self.lineage,
            self.radio_map_ref, take(self.motion),
        )

    # -- lineage ----------------------------------------------------------------------
    @property
    def ref(self) -> StoreRef:
        """This dataset as a :class:`~core.stores.lineage.StoreRef` (path, scene, id, digest)."""
        lineage, scene = self.lineage, self.attrs.get("scene")
        return StoreRef(self.source or "(dataset in memory)", scene if isinstance(scene, str) else None,
                        lineage.id if lineage else None, lineage.digest if lineage else None)

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        if self.clean_site_features is not None and self.clean_cell_features is not None:
            arrays.update({"clean/site_features": self.clean_site_features,
                           "clean/cell_features": self.clean_cell_features})
        if self.motion is not None:
            arrays["motion"] = self.motion
        return arrays

    def digest(self) -> str:
        """The content digest: every array, the attrs and the radio-map ref."""
        ref = self.radio_map_ref.to_dict() if self.radio_map_ref else None
        return content_digest(self._arrays(), {"attrs": self.attrs, "radio_map": ref})

    # -- validation -------------------------------------------------------------------
    def validate(self) -> None:
        where = f"dataset {self.source}" if self.source else "dataset"
        for name, (dtype, ndim) in _ARRAYS.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype) or arr.ndim != ndim:
                got = f"{arr.dtype} with {arr.ndim} dims" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise StoreError(f"{where}: array {name!r} must be {dtype} with {ndim} dims, got {got}")
        n, t = self.ue_xyz.shape[:2]
        k = self.site_ids.shape[2] if self.site_ids.ndim == 3 else 0
        expected = {
            "ue_xyz": (n, t, 3), "t": (n, t), "report_mask": (n, t), "site_ids": (n, t, k),
            "site_features": (n, t, k, len(SITE_FEATURES)), "cell_features": (n, t, len(CELL_FEATURES)),
            "los": (n, t), "split": (n,),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise StoreError(f"{where}: array {name!r} has shape {getattr(self, name).shape}, expected {shape}")
        if n and not self.report_mask.any(axis=1).all():
            raise StoreError(f"{where}: some samples have no valid report (report_mask all false)")
        if not np.isfinite(self.ue_xyz).all():
            raise StoreError(f"{where}: NaN or inf in 'ue_xyz'")
        present = self.report_mask
        serving = self.site_features[:, :, 0, :][present]
        if serving.size and not np.isfinite(serving).all():
            raise StoreError(f"{where}: NaN or inf in the serving-site features of a present report")
        cells = self.cell_features[present]
        if cells.size and not np.isfinite(cells).all():
            raise StoreError(f"{where}: NaN or inf in 'cell_features' of a present report")
        if not np.isin(self.split, list(SPLITS.values())).all():
            raise StoreError(f"{where}: 'split' holds values other than 0, 1, 2")
        self._validate_measurement_model(where, k)

    def _validate_measurement_model(self, where: str, k: int) -> None:
        try:
            model = self.measurement_model
        except CoreError as exc:
            raise StoreError(f"{where}: {exc}") from None
        if model is not None and model.sites_per_report != k:
            raise StoreError(f"{where}: attrs measurement_model has sites_per_report {model.sites_per_report}, "
                             f"but the arrays hold {k} site slots")
        recorded = model is not None and model.motion.enabled
        if recorded != (self.motion is not None):
            raise StoreError(f"{where}: the measurement model {'records' if recorded else 'records no'} device motion "
                             f"but the store {'has no' if recorded else 'has a'} 'motion' array")
        if self.motion is not None:
            n, t = self.ue_xyz.shape[:2]
            if not isinstance(self.motion, np.ndarray) or self.motion.dtype != np.float32 or self.motion.shape != (n, t, 2):
                raise StoreError(f"{where}: array 'motion' must be float32 with shape {(n, t, 2)}")
            if t > 1 and not np.isfinite(self.motion[:, 1:]).all():
                raise StoreError(f"{where}: NaN or inf in 'motion' after the first report")

    # -- storage ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, radio_map: StoreRef | None = None) -> Path:
        """Write the dataset as a Zarr v3 group at ``path``, atomically, with a new lineage id.

        ``radio_map``: the map it was made with (default: :attr:`radio_map_ref`, kept from
        the store it was loaded from). Afterwards :attr:`source`, :attr:`lineage` and
        :attr:`radio_map_ref` describe the saved store. Returns the path.
        """
        import zarr

        path = Path(path)
        if radio_map is not None:
            self.radio_map_ref = radio_map
        lineage = Lineage.new(self.digest())
        map_ref = self.radio_map_ref.to_dict() if self.radio_map_ref else None
        with atomic_path(path) as tmp:
            group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
            for name, arr in self._arrays().items():
                group.create_array(name, data=arr, chunks=(min(4096, max(len(arr), 1)),) + arr.shape[1:])
            group.attrs.update(
                {
                    "format_version": FORMAT_VERSION,
                    "kind": "measurement_dataset",
                    "site_features": list(SITE_FEATURES),
                    "cell_features": list(CELL_FEATURES),
                    "attrs": self.attrs,
                    "lineage": {**lineage.to_dict(), "radio_map": map_ref},
                }
            )
        self.source, self.lineage = str(path), lineage
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> MeasurementDataset:
        """Read and validate a dataset; errors name ``path`` and the problem. A read that
        overlaps a save to the same path is repeated (see :func:`~core.stores.atomic.read_consistently`)."""
        path = Path(path)
        return read_consistently(path, lambda: cls._read(path), errors=(StoreError,))

    @classmethod
    def _read(cls, path: Path) -> MeasurementDataset:
        group, meta = open_group(
            path, "dataset", "measurement_dataset", FORMAT_VERSION, "make it with `python -m core make-dataset`"
        )

        def arrays():
            found = {name: np.asarray(group[name][...]) for name in _ARRAYS}
            clean_site = clean_cell = None
            if "clean" in group:
                clean_site = np.asarray(group["clean/site_features"][...])
                clean_cell = np.asarray(group["clean/cell_features"][...])
            motion = np.asarray(group["motion"][...]) if "motion" in group else None
            return found, clean_site, clean_cell, motion

        found, clean_site, clean_cell, motion = read_arrays(path, "dataset", arrays)
        raw = meta.get("lineage") if isinstance(meta.get("lineage"), dict) else {}
        dataset = cls(**found, attrs=meta.get("attrs") or {}, clean_site_features=clean_site,
                      clean_cell_features=clean_cell, source=str(path), lineage=Lineage.from_attrs(raw),
                      radio_map_ref=StoreRef.from_dict(raw.get("radio_map")), motion=motion)
        check_digest("dataset", path, dataset.lineage, dataset.digest())
        if dataset.num_samples == 0:  # nothing to train, evaluate or compare: refused here, once, for every reader
            raise StoreError(f"dataset {path}: holds no samples (0 UE walks); make it again with "
                             "`python -m core make-dataset --num-ues N`")
        return dataset


def recorded_measurement_model(path: str | os.PathLike) -> MeasurementModel | None:
    """The measurement model recorded in the dataset store at ``path``, read from its metadata
    only (cheap: no array is opened); ``None`` when it records none. Errors name the store."""
    try:
        meta = read_attrs(path)
    except (OSError, ValueError) as exc:
        raise StoreError(f"dataset {path}: unreadable store metadata ({type(exc).__name__})") from None
    attrs = meta.get("attrs")
    try:
        return MeasurementModel.from_attrs(attrs if isinstance(attrs, dict) else {})
    except CoreError as exc:
        raise StoreError(f"dataset {path}: {exc}") from None
