"""A run's stored likelihood calibration: read it, and make and store it when it is missing or stale.

The files are the run directory's (:mod:`core.stores.run`): ``calibration.json`` for the first
training scene, ``calibration_<scene>.json`` for each other one (:func:`core.stores.run.calibration_path`).
A calibration is derived data: :func:`ensure_calibration` reads the stored one when it was made from
the very stores given (:func:`made_from`), and otherwise calibrates on the train split at the true
positions (:func:`core.physics.calibration.calibrate`) and stores the result atomically, so an older
run gains it at its first evaluation. Inference reaches it through one explicit call,
:func:`core.learning.inference.calibrate_run`; nothing here runs behind a property.
"""

from __future__ import annotations

import contextlib
import os

from core.errors import CoreError, StoreError
from core.physics.calibration import Calibration, calibrate
from core.stores import run as run_store
from core.stores.lineage import StoreRef
from core.stores.output import is_shipped


def read_calibration(run_dir: str | os.PathLike, scene: str | None = None):
    """The run's :class:`~core.physics.calibration.Calibration`, or None when it has none.

    A file that is not a calibration raises a :class:`StoreError` naming it.
    """
    path = run_store.calibration_path(run_dir, scene)
    if not path.exists():
        return None
    try:
        return Calibration.from_json(path.read_text())
    except (OSError, CoreError) as exc:
        raise StoreError(f"{path}: unreadable calibration ({exc})") from None


def stored_calibrations(run_dir: str | os.PathLike, scenes) -> list:
    """The calibrations ``run_dir`` stored for its training ``scenes`` (in scene-index order; the first scene's is
    ``calibration.json``), skipping the missing and unreadable ones."""
    out = []
    for m, name in enumerate(scenes):
        with contextlib.suppress(StoreError):
            cal = read_calibration(run_dir, None if m == 0 else name)
            if cal is not None:
                out.append(cal)
    return out


def made_from(calibration, dataset: StoreRef, radio_map: StoreRef) -> bool:
    """Whether ``calibration`` records these stores (the same saves: equal lineage ids, or
    equal digests when ids are absent)."""
    meta = calibration.meta or {}
    for key, ref in (("dataset", dataset), ("radio_map", radio_map)):
        was = StoreRef.from_dict(meta.get(key))
        if was is None or not (was.id or was.digest):
            return False
        if (was.id or None) != (ref.id or None) or (was.digest or None) != (ref.digest or None):
            return False
    return True


def ensure_calibration(run_dir: str | os.PathLike, dataset, radio_map, scene: str | None = None, store: bool = True):
    """The run's calibration for ``dataset`` and ``radio_map``: the stored one when it was
    made from these very stores, else calibrated now and stored.

    Calibration: :func:`~core.physics.calibration.calibrate` on the train split, every
    present report at its true position; ``meta["dataset"]`` / ``meta["radio_map"]`` record
    the stores' refs. A stored file that is unreadable or made from other stores is
    replaced. A shipped or read-only run directory gets none written (the calibration is returned),
    nor does ``store=False`` (a dataset the run was not trained on: the stored file stays the run's).
    """
    refs = (dataset.ref, radio_map.ref)
    try:
        stored = read_calibration(run_dir, scene)
    except StoreError:
        stored = None
    if stored is not None and made_from(stored, *refs):
        return stored
    cal = calibrate(dataset, radio_map, split="train")
    cal.meta.update({"dataset": refs[0].to_dict(), "radio_map": refs[1].to_dict()})
    if store and not is_shipped(run_dir):
        with contextlib.suppress(OSError):
            run_store.write_calibration(run_dir, cal, scene)
    return cal
