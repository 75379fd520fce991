"""THE measurement-report file format: one row per (walk, report time, site heard).

A file is CSV (``.csv``) or Parquet (``.parquet``, ``.pq``), read and written with pyarrow. Columns
(docs/reports.md has the same table and an example file)::

    column            unit     required   meaning
    walk_id           text     yes        one UE's walk; its rows are contiguous, time non-decreasing
    time_s            s        yes        report time (any origin; only differences within a walk matter)
    site              text     yes        a site name of the scene's radio map; empty: this report heard no site
    path_gain_db      dB       one of     path gain of the strongest path from the site, [-300, 0]
    toa_ns            ns       the three  its time of arrival, [0, 100000]
    aoa_deg           deg      (or more)  its azimuth of arrival at the UE, [-180, 180]
    snr_db, sinr_db   dB       no         the report's serving cell (read from the report's FIRST row), [-100, 100]
    throughput_mbps   Mbit/s   no         ... link-abstraction throughput, [0, 100000]
    bler              1        no         ... block error rate, [0, 1]
    x_m, y_m          m        no         ground truth at the report time, scene frame (for scoring only)
    los               bool     no         ground truth: the serving site in line of sight (for the LOS groups)
    scene             text     no         the scene the reports were made in (refused when not the run's)

Frames: positions in the scene's metres (the radio map's ``bounds``, x east, y north as the scene
file has them). AoA ``aoa_deg`` is the azimuth, in the horizontal plane, of the direction the strongest
path ARRIVES FROM at the UE, measured counter-clockwise from +x, wrapped to (-180, 180]
(:func:`core.features.wrap_degrees`): a UE due east of a line-of-sight site measures about 180 deg.
Rows of one report list its sites strongest first (the first row is the serving site); only the first
``K`` (the run's site slots per report) are used.

Missing values: an empty CSV cell or a Parquet null. ``NaN`` and ``inf`` written as numbers are refused
(a missing value must be said as missing, not as a number). Columns not in the table are ignored unless
their name is close to one of it (a misspelling, refused with the suggestion).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from core.errors import CoreError

__all__ = ["Column", "COLUMNS", "REQUIRED", "MEASUREMENTS", "CELL", "TRUTH", "file_kind", "TableWriter"]


@dataclass(frozen=True)
class Column:
    """One column: name, unit, arrow type, physical range (None: any finite value) and meaning."""

    name: str
    unit: str
    type: pa.DataType
    range: tuple[float, float] | None
    meaning: str


COLUMNS: dict[str, Column] = {c.name: c for c in (
    Column("walk_id", "text", pa.string(), None, "one UE's walk"),
    Column("time_s", "s", pa.float64(), (0.0, float("inf")), "report time"),
    Column("site", "text", pa.string(), None, "site name of the scene's map (empty: no site heard)"),
    Column("path_gain_db", "dB", pa.float64(), (-300.0, 0.0), "path gain of the strongest path"),
    Column("toa_ns", "ns", pa.float64(), (0.0, 1.0e5), "time of arrival of the strongest path"),
    Column("aoa_deg", "deg", pa.float64(), (-180.0, 180.0), "azimuth of arrival, ccw from +x"),
    Column("snr_db", "dB", pa.float64(), (-100.0, 100.0), "serving-cell SNR"),
    Column("sinr_db", "dB", pa.float64(), (-100.0, 100.0), "serving-cell SINR"),
    Column("throughput_mbps", "Mbit/s", pa.float64(), (0.0, 1.0e5), "serving-cell throughput"),
    Column("bler", "1", pa.float64(), (0.0, 1.0), "serving-cell block error rate"),
    Column("x_m", "m", pa.float64(), None, "true x at the report time (scene frame)"),
    Column("y_m", "m", pa.float64(), None, "true y at the report time (scene frame)"),
    Column("los", "bool", pa.bool_(), None, "true: serving site in line of sight"),
    Column("scene", "text", pa.string(), None, "the scene of the reports"),
)}
#: columns every file has
REQUIRED: tuple[str, ...] = ("walk_id", "time_s", "site")
#: per-site measurements (at least one column of them), in the order of core.stores.dataset.SITE_FEATURES
MEASUREMENTS: tuple[str, ...] = ("path_gain_db", "toa_ns", "aoa_deg")
#: the serving cell, in the order of core.stores.dataset.CELL_FEATURES
CELL: tuple[str, ...] = ("snr_db", "sinr_db", "throughput_mbps", "bler")
#: ground truth (optional; scores the result)
TRUTH: tuple[str, ...] = ("x_m", "y_m", "los")

def site_names(dataset) -> list[str]:
    """The names a report's ``site`` column uses: the dataset's ``attrs["sites"]`` names in site-id order
    (``site<i>`` where a site has none); empty when the dataset records no sites."""
    return [str(s.get("name", f"site{i}")) for i, s in enumerate(dataset.attrs.get("sites") or [])]


_KINDS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".geojson": "geojson"}


def file_kind(path: str | os.PathLike, flag: str, allowed: tuple[str, ...] = ("csv", "parquet")) -> str:
    """``"csv" | "parquet" | "geojson"`` from ``path``'s suffix; another suffix is a one-line CoreError naming ``flag``."""
    kind = _KINDS.get(Path(path).suffix.lower())
    if kind not in allowed:
        names = ", ".join(s for s, k in _KINDS.items() if k in allowed)
        raise CoreError(f"{flag} {path}: unknown file type {Path(path).suffix or '(no suffix)'!r} (use {names})")
    return kind


class TableWriter:
    """Writes record batches of one schema to a CSV or Parquet file, batch by batch (memory flat in the file).

    ``path``: where (usually a temporary of :func:`core.stores.atomic.atomic_path`); ``kind``: csv | parquet.
    """

    def __init__(self, path: str | os.PathLike, kind: str, schema: pa.Schema) -> None:
        self.schema = schema
        if kind == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(str(path), schema, compression="zstd")
        else:
            import pyarrow.csv as pacsv

            self._writer = pacsv.CSVWriter(str(path), schema, write_options=pacsv.WriteOptions(quoting_header="none"))

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
