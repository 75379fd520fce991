"""``python -m core export-reports --dataset D --split test --out FILE``: a dataset split as a report file.

Every sample of the split becomes one walk (``walk_id`` = its index in the dataset) with one row per
report and site heard (:mod:`core.reports.format`): the slots in the dataset's order (strongest first), the
measured path gain, ToA and AoA, the report's serving cell on each of its rows, the true position and
LOS at the report time, and the scene. A missing report (or one that heard no site) is one row with an
empty ``site``: the time and the truth stay, so the walk's windows are the dataset's. Values are
written as their float32 (the store's precision) shortest decimal, so the file reads back exactly.

CSV or Parquet by ``--out``'s suffix; written chunk by chunk into a temporary beside ``--out``, which
replaces it at the end (:func:`core.stores.atomic.atomic_path`), under the output's lock.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from core import cli_types, resolve_path
from core.errors import CoreError
from core.reports.format import CELL, COLUMNS, MEASUREMENTS, TableWriter, file_kind, site_names

#: the columns an export writes, in order
EXPORT_COLUMNS: tuple[str, ...] = ("walk_id", "time_s", "site", *MEASUREMENTS, *CELL, "x_m", "y_m", "los", "scene")
#: samples per chunk
CHUNK_SAMPLES = 4096


def _f64(a: np.ndarray) -> np.ndarray:
    """float32 values as float64 holding their shortest decimal (0.2f -> 0.2, not 0.2000000029802)."""
    return np.asarray(a, dtype=np.float32).astype(str).astype(np.float64)


def report_rows(dataset, indices: np.ndarray, site_names: list[str]) -> pa.Table:
    """The rows of samples ``indices`` of ``dataset`` (see the module doc) as an arrow table of EXPORT_COLUMNS."""
    idx = np.asarray(indices, dtype=np.int64)
    ids = np.asarray(dataset.site_ids[idx], dtype=np.int64)  # [n, T, K]
    n, t_len, k = ids.shape
    present = np.asarray(dataset.report_mask[idx])[..., None] & (ids >= 0)  # [n, T, K]
    empty = ~present.any(-1)  # [n, T]: one row with no site
    keep = present.copy()
    keep[..., 0] |= empty
    s, t, slot = np.nonzero(keep)  # row order: sample, time, slot (C order)
    heard = present[s, t, slot]
    feats = np.asarray(dataset.site_features[idx], dtype=np.float32)[s, t, slot]  # [R, 3]
    cells = np.asarray(dataset.cell_features[idx], dtype=np.float32)[s, t]  # [R, 4]
    xyz = np.asarray(dataset.ue_xyz[idx], dtype=np.float32)[s, t]
    names = np.asarray(site_names, dtype=object)
    site = np.where(heard, names[np.clip(ids[s, t, slot], 0, len(names) - 1)], None)
    scene = dataset.attrs.get("scene") or ""
    cols = {"walk_id": idx[s].astype(str), "time_s": _f64(np.asarray(dataset.t[idx])[s, t]), "site": site}
    for f, c in enumerate(MEASUREMENTS):
        cols[c] = np.where(heard, _f64(feats[:, f]), np.nan)
    for f, c in enumerate(CELL):
        cols[c] = _f64(cells[:, f])
    cols.update(x_m=_f64(xyz[:, 0]), y_m=_f64(xyz[:, 1]), los=np.asarray(dataset.los[idx])[s, t],
                scene=np.full(len(s), scene, dtype=object))
    arrays = []
    for c in EXPORT_COLUMNS:
        v = cols[c]
        if COLUMNS[c].type == pa.float64():
            arrays.append(pa.array(v, pa.float64(), mask=~np.isfinite(v)))  # missing -> null, never NaN
        else:
            arrays.append(pa.array(v, COLUMNS[c].type))
    return pa.table(arrays, names=list(EXPORT_COLUMNS))


def export_reports(dataset_path, split: str, out, show_progress: bool = True, limit: int | None = None) -> int:
    """Write ``split`` of the dataset at ``dataset_path`` to ``out`` (csv | parquet), only its first ``limit``
    walks when given; returns the rows written."""
    from tqdm import tqdm

    from core import progress
    from core.stores.atomic import atomic_path
    from core.stores.dataset import MeasurementDataset
    from core.stores.lock import output_lock
    from core.stores.output import check_writable

    out = Path(out)
    kind = file_kind(out, "--out")
    dataset = MeasurementDataset.load(resolve_path(dataset_path))
    idx = dataset.indices(split)[:limit]
    if len(idx) == 0:
        raise CoreError(f"--split {split}: no samples in {dataset_path}")
    sites = site_names(dataset)
    if not sites:
        sites = [f"site{i}" for i in range(int(dataset.site_ids.max()) + 1)]
    check_writable(out, "--out")
    schema = pa.schema([(c, COLUMNS[c].type) for c in EXPORT_COLUMNS])
    rows = 0
    with output_lock(out, "--out"), atomic_path(out) as tmp, TableWriter(tmp, kind, schema) as writer:
        bar = tqdm(total=len(idx), desc="export", unit="walk", disable=not show_progress)
        for s in range(0, len(idx), CHUNK_SAMPLES):
            part = idx[s:s + CHUNK_SAMPLES]
            table = report_rows(dataset, part, sites)
            writer.write(table)
            rows += table.num_rows
            bar.update(len(part))
            progress.report((s + len(part)) / len(idx), f"exported {s + len(part)} of {len(idx)} walks")
        bar.close()
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="dataset store (e.g. datasets/etoile)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--out", required=True, help="report file to write: .csv or .parquet")
    parser.add_argument("--limit", type=cli_types.count, default=None, help="only the first LIMIT walks")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    file_kind(args.out, "--out")
    rows = export_reports(args.dataset, args.split, args.out, show_progress=not args.no_progress, limit=args.limit)
    print(f"wrote {rows} report rows to {args.out}")
    return 0

