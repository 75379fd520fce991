"""THE localization result file: one row per (walk, report time), in CSV, Parquet or GeoJSON.

Columns (units: metres in the scene's frame, degrees counter-clockwise from +x)::

    walk_id, time_s            the report the position is for (the file's values)
    method                     network | network + MAP | map matching, exhaustive
    x_m, y_m                   the estimate
    sigma_major_m, sigma_minor_m, sigma_angle_deg   its 1σ ellipse (core.reports.ellipse)
    confidence                 the network's confidence in [0, 1] (empty without a network)
    network_x_m, network_y_m   the network's estimate (the MAP search's prior; empty without a network)
    true_x_m, true_y_m, error_m   only when the reports carry x_m, y_m (empty where a row lacks them)

GeoJSON (``.geojson``): a FeatureCollection of Points, one per row, the other columns as properties. No
shipped scene carries a georeference (its coordinates are local metres), so the points are in scene
metres, not WGS84, and the collection says so in its ``frame`` member (RFC 7946 readers that assume
longitude/latitude will misplace them). All three are written row chunk by row chunk.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa

from core.reports.format import TableWriter

__all__ = ["POSITION_COLUMNS", "TRUTH_COLUMNS", "PositionWriter", "FRAME_NOTE"]

POSITION_COLUMNS: tuple[str, ...] = ("walk_id", "time_s", "method", "x_m", "y_m", "sigma_major_m", "sigma_minor_m",
                                     "sigma_angle_deg", "confidence", "network_x_m", "network_y_m")
TRUTH_COLUMNS: tuple[str, ...] = ("true_x_m", "true_y_m", "error_m")
FRAME_NOTE = "scene metres (x, y); the scene has no georeference, so no WGS84 coordinates"


def _schema(truth: bool) -> pa.Schema:
    names = POSITION_COLUMNS + (TRUTH_COLUMNS if truth else ())
    text = {"walk_id", "method"}
    return pa.schema([(c, pa.string() if c in text else pa.float64()) for c in names])


class PositionWriter:
    """Writes result chunks (dicts of equal-length arrays, keys :data:`POSITION_COLUMNS` and, with ``truth``,
    :data:`TRUTH_COLUMNS`) to ``path`` as ``kind`` (csv | parquet | geojson). ``scene``: named in GeoJSON."""

    def __init__(self, path: str | os.PathLike, kind: str, truth: bool, scene: str | None = None) -> None:
        self.kind, self.schema = kind, _schema(truth)
        self.rows = 0
        if kind == "geojson":
            self._fh = open(path, "w")
            head = {"type": "FeatureCollection", "scene": scene, "frame": FRAME_NOTE}
            self._fh.write(json.dumps(head)[:-1] + ', "features": [\n')
        else:
            self._table = TableWriter(path, kind, self.schema)

    def write(self, columns: dict[str, np.ndarray]) -> None:
        arrays = []
        for f in self.schema:
            v = columns[f.name]
            if f.type == pa.float64():
                v = np.asarray(v, np.float64)
                arrays.append(pa.array(v, pa.float64(), mask=np.isnan(v)))
            else:
                arrays.append(pa.array(np.asarray(v, dtype=object).astype(str), pa.string()))
        table = pa.table(arrays, schema=self.schema)
        if self.kind == "geojson":
            self._write_features(table)
        else:
            self._table.write(table)
        self.rows += table.num_rows

    def _write_features(self, table: pa.Table) -> None:
        cols = table.to_pydict()
        names = [n for n in self.schema.names if n not in ("x_m", "y_m")]
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        lines = []
        for i in range(table.num_rows):
            props = {n: clean(cols[n][i]) for n in names}
            geom = {"type": "Point", "coordinates": [clean(cols["x_m"][i]), clean(cols["y_m"][i])]}
            lines.append(json.dumps({"type": "Feature", "geometry": geom, "properties": props}))
        if lines:
            self._fh.write(("" if self.rows == 0 else ",\n") + ",\n".join(lines))

    def close(self) -> None:
        if self.kind == "geojson":
            self._fh.write("\n]}\n")
            self._fh.close()
        else:
            self._table.close()

    def __enter__(self) -> PositionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
