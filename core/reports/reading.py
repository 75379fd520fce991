"""Reading a report file (:mod:`core.reports.format`) in chunks, and checking all of it before any work.

:func:`record_batches` streams a CSV or Parquet file as pyarrow record batches of about ``chunk_rows``
rows (memory flat in the file size). :func:`validate` reads the whole file once and refuses, with one
:class:`ReportError` line, the first of (in this order): an unreadable file, a missing required column or
a misspelled one (named, with the suggestion), no measurement column, an empty file, a file of another
scene, NaN or inf, values out of physical range (which rows), unknown site names (listed), a walk whose
time goes back or whose rows are not contiguous, positions outside the scene. Row numbers count data rows
from 1 (a CSV's header is not a row). :func:`walk_chunks` then yields pandas frames of WHOLE walks,
each of at least ``chunk_rows`` rows (but the last), in file order.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.errors import CoreError
from core.reports.format import COLUMNS, MEASUREMENTS, REQUIRED, file_kind

__all__ = ["ReportError", "ReportSummary", "record_batches", "check_columns", "validate", "walk_chunks"]

#: rows per chunk read and localized (peak RSS about 0.9 GB with the shipped run: docs/reports.md)
CHUNK_ROWS = 50_000
#: rows named in a message at most
_SHOWN = 5


class ReportError(CoreError):
    """A report file that cannot be localized as it is: one line naming the file, column and rows."""


@dataclass
class ReportSummary:
    """What :func:`validate` found: ``rows``, ``walks``, ``reports`` (distinct (walk, time)),
    ``columns`` present (format columns only), ``has_truth`` (x_m and y_m), ``sites`` used."""

    rows: int = 0
    walks: int = 0
    reports: int = 0
    columns: tuple[str, ...] = ()
    has_truth: bool = False
    sites: set[str] = field(default_factory=set)


def _open(path: Path, kind: str, chunk_rows: int):
    if kind == "parquet":
        import pyarrow.parquet as pq

        f = pq.ParquetFile(str(path))
        return f.schema_arrow.names, (lambda cols: f.iter_batches(batch_size=chunk_rows, columns=cols))
    import csv

    import pyarrow.csv as pacsv

    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:  # a BOM is not a name
        first = next(csv.reader(fh), [])
    names = [n.strip() for n in first]

    def batches(cols):
        types = {c: COLUMNS[c].type for c in cols}
        reader = pacsv.open_csv(str(path), read_options=pacsv.ReadOptions(block_size=max(1 << 20, chunk_rows * 64)),
                                convert_options=pacsv.ConvertOptions(column_types=types, include_columns=cols,
                                                                     strings_can_be_null=True, null_values=[""],
                                                                     true_values=["true", "True", "1"],
                                                                     false_values=["false", "False", "0"]))
        yield from reader

    return names, batches


def check_columns(names: list[str], where: str) -> tuple[str, ...]:
    """The format columns of a file with header ``names``; refuses a missing required column, a misspelled
    one (a name close to a format column: the suggestion) and a file without a measurement column."""
    known = list(COLUMNS)
    for name in names:
        if name not in COLUMNS:
            close = difflib.get_close_matches(name.lower(), [k for k in known if k not in names], n=1, cutoff=0.75)
            if close:
                raise ReportError(f"{where}: unknown column {name!r}: did you mean {close[0]!r}?")
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ReportError(f"{where}: missing column(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    if not any(c in names for c in MEASUREMENTS):
        raise ReportError(f"{where}: no measurement column (at least one of {', '.join(MEASUREMENTS)})")
    return tuple(c for c in known if c in names)


def record_batches(path: str | os.PathLike, chunk_rows: int = CHUNK_ROWS,
                   where: str = "--reports") -> tuple[tuple[str, ...], Iterator[pa.RecordBatch]]:
    """``(format columns, batches)`` of the file at ``path`` (a missing or unreadable file, a bad header: one line)."""
    path = Path(path)
    label = f"{where} {path}"
    kind = file_kind(path, where)
    if not path.is_file():
        raise ReportError(f"{label}: no such file")
    try:
        names, batches = _open(path, kind, chunk_rows)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ReportError(f"{label}: not a readable {kind} file ({str(exc).splitlines()[0]})") from None
    if not names:
        raise ReportError(f"{label}: empty file (no header, no rows)")
    cols = check_columns(names, label)

    schema = pa.schema([(c, COLUMNS[c].type) for c in cols])

    def guarded():
        try:
            for b in batches(list(cols)):
                yield pa.record_batch([pc.cast(b.column(c), schema.field(c).type) for c in cols], schema=schema)
        except pa.ArrowInvalid as exc:
            raise ReportError(f"{label}: {_conversion_message(str(exc), path, names)}") from None

    return cols, guarded()


def _conversion_message(msg: str, path: Path, names: list[str]) -> str:
    """pyarrow's CSV conversion error as one line naming the column, the value and its row."""
    import re

    m = re.search(r"column #(\d+): CSV conversion error to (\w+): invalid value '(.*)'", msg)
    if not m or int(m.group(1)) >= len(names):
        return msg.splitlines()[0]
    col, value = names[int(m.group(1))], m.group(3)
    what = "not a number" if m.group(2) == "double" else f"not a {m.group(2)}"
    return f"column {col}: {what} ({value!r}) in row {_row_of(path, col, value)}"


def _row_of(path: Path, col: str, value: str) -> int:
    """The first data row (from 1) whose ``col`` is ``value``, reading that column alone, as text, in chunks."""
    import pyarrow.csv as pacsv

    reader = pacsv.open_csv(str(path), convert_options=pacsv.ConvertOptions(column_types={col: pa.string()},
                                                                          include_columns=[col]))
    seen = 0
    for batch in reader:
        hit = np.flatnonzero(np.asarray(batch.column(0).to_pylist(), dtype=object) == value)
        if hit.size:
            return seen + int(hit[0]) + 1
        seen += batch.num_rows
    return seen


def _rows(mask: np.ndarray, offset: int) -> list[int]:
    return (np.flatnonzero(mask)[:_SHOWN] + offset + 1).tolist()


def _fmt_rows(rows: list[int], total: int) -> str:
    more = f" and {total - len(rows)} more" if total > len(rows) else ""
    return f"row{'s' if total > 1 else ''} {', '.join(map(str, rows))}{more}"


@dataclass
class _Problems:
    """The first rows of each problem, over the whole file (bounded memory)."""

    empty: dict[str, tuple[list[int], int]] = field(default_factory=dict)
    nonfinite: dict[str, tuple[list[int], int]] = field(default_factory=dict)
    out_of_range: dict[str, tuple[list[int], int]] = field(default_factory=dict)
    unknown_sites: dict[str, int] = field(default_factory=dict)
    time_back: tuple[str, int] | None = None
    split_walk: tuple[str, int] | None = None
    outside: tuple[list[int], int] | None = None
    scenes: set[str] = field(default_factory=set)

    def add(self, store: dict, col: str, mask: np.ndarray, offset: int) -> None:
        n = int(mask.sum())
        if not n:
            return
        rows, total = store.get(col, ([], 0))
        store[col] = ((rows + _rows(mask, offset))[:_SHOWN], total + n)


def validate(path: str | os.PathLike, sites: list[str], scene: str | None, bounds=None,
             chunk_rows: int = CHUNK_ROWS, where: str = "--reports", show_progress: bool = False) -> ReportSummary:
    """Check the whole file at ``path`` (see the module doc) against the scene's ``sites`` (names in site-id
    order), its name ``scene`` and ``bounds`` (x_min, y_min, x_max, y_max) [m] of the truth positions.
    Returns a :class:`ReportSummary`; raises :class:`ReportError` (one line) at the first problem.
    ``show_progress``: a tqdm bar of the rows checked."""
    from tqdm import tqdm

    label = f"{where} {path}"
    cols, batches = record_batches(path, chunk_rows, where)
    bar = tqdm(desc="check", unit="row", disable=not show_progress)
    known = set(sites)
    summary = ReportSummary(columns=cols, has_truth="x_m" in cols and "y_m" in cols)
    p = _Problems()
    done: set[str] = set()
    last_walk, last_time = None, -np.inf
    for batch in batches:
        off, n = summary.rows, batch.num_rows
        summary.rows += n
        bar.update(n)
        if "scene" in cols:
            p.scenes.update(s for s in pc.unique(batch.column("scene")).to_pylist() if s is not None)
        for c in cols:
            if COLUMNS[c].type != pa.float64():
                continue
            v = batch.column(c).to_numpy(zero_copy_only=False)  # nulls -> NaN
            valid = ~np.asarray(batch.column(c).is_null().to_numpy(zero_copy_only=False))
            p.add(p.nonfinite, c, valid & ~np.isfinite(v), off)
            lo_hi = COLUMNS[c].range
            if lo_hi is not None:
                with np.errstate(invalid="ignore"):
                    p.add(p.out_of_range, c, valid & np.isfinite(v) & ((v < lo_hi[0]) | (v > lo_hi[1])), off)
        for c in ("walk_id", "time_s"):  # required values: never empty
            p.add(p.empty, c, np.asarray(batch.column(c).is_null().to_numpy(zero_copy_only=False)), off)
        site = batch.column("site")
        for name, count in zip(*_value_counts(site)):
            if name is not None and name not in known:
                p.unknown_sites[name] = p.unknown_sites.get(name, 0) + count
            elif name is not None:
                summary.sites.add(name)
        walks = batch.column("walk_id").to_numpy(zero_copy_only=False)
        times = batch.column("time_s").to_numpy(zero_copy_only=False)
        last_walk, last_time = _check_order(walks, times, off, last_walk, last_time, done, p, summary)
        if summary.has_truth and bounds is not None:
            x = batch.column("x_m").to_numpy(zero_copy_only=False)
            y = batch.column("y_m").to_numpy(zero_copy_only=False)
            x0, y0, x1, y1 = bounds
            with np.errstate(invalid="ignore"):
                bad = (x < x0) | (x > x1) | (y < y0) | (y > y1)
            if bad.any():
                rows, total = p.outside or ([], 0)
                p.outside = ((rows + _rows(bad, off))[:_SHOWN], total + int(bad.sum()))
    bar.close()
    summary.walks = len(done) + (last_walk is not None)
    _raise_first(p, summary, label, scene, bounds, known)
    return summary


def _value_counts(arr) -> tuple[list, list]:
    vc = pc.value_counts(arr)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()


def _check_order(walks, times, off, last_walk, last_time, done, p: _Problems, summary: ReportSummary):
    """Walks contiguous, time non-decreasing within one; counts walks and reports. Returns the running state."""
    n = len(walks)
    if not n:
        return last_walk, last_time
    prev_w = np.concatenate([[last_walk], walks[:-1]])
    prev_t = np.concatenate([[last_time], times[:-1]])
    new_walk = walks != prev_w
    with np.errstate(invalid="ignore"):
        back = ~new_walk & (times < prev_t)
    if back.any() and p.time_back is None:
        i = int(np.flatnonzero(back)[0])
        p.time_back = (str(walks[i]), off + i + 1)
    starts = np.flatnonzero(new_walk)
    summary.reports += int((new_walk | (times != prev_t)).sum())
    for i in starts:
        if prev_w[i] is not None:
            done.add(prev_w[i])
        if walks[i] in done and p.split_walk is None:
            p.split_walk = (str(walks[i]), off + int(i) + 1)
    return walks[-1], times[-1]


def _raise_first(p: _Problems, summary: ReportSummary, label: str, scene: str | None, bounds, known: set[str]) -> None:
    if summary.rows == 0:
        raise ReportError(f"{label}: empty file (a header but no rows)")
    others = sorted(s for s in p.scenes if s != scene)
    if scene is not None and others:
        raise ReportError(f"{label}: reports of scene {others[0]!r}, but the run localizes in scene {scene!r}")
    for col, (rows, total) in p.empty.items():
        raise ReportError(f"{label}: column {col}: empty in {_fmt_rows(rows, total)} (a required value)")
    for col, (rows, total) in p.nonfinite.items():
        raise ReportError(f"{label}: column {col}: NaN or inf in {_fmt_rows(rows, total)} "
                          "(leave a missing value empty)")
    for col, (rows, total) in p.out_of_range.items():
        lo, hi = COLUMNS[col].range
        unit = COLUMNS[col].unit
        raise ReportError(f"{label}: column {col}: out of the physical range [{lo:g}, {hi:g}] {unit} in "
                          f"{_fmt_rows(rows, total)}")
    if p.unknown_sites:
        names = sorted(p.unknown_sites)
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ReportError(f"{label}: unknown site(s) {shown} (the scene's sites: {', '.join(sorted(known))})")
    if p.time_back is not None:
        w, row = p.time_back
        raise ReportError(f"{label}: time goes back within walk {w!r} at row {row} (time_s must not decrease in a walk)")
    if p.split_walk is not None:
        w, row = p.split_walk
        raise ReportError(f"{label}: walk {w!r} starts again at row {row} (a walk's rows must be contiguous)")
    if p.outside is not None:
        rows, total = p.outside
        x0, y0, x1, y1 = bounds
        raise ReportError(f"{label}: x_m, y_m outside the scene ({x0:g}..{x1:g}, {y0:g}..{y1:g} m) in "
                          f"{_fmt_rows(rows, total)} (a file of another scene, or another frame?)")


def walk_chunks(path: str | os.PathLike, chunk_rows: int = CHUNK_ROWS, where: str = "--reports") -> Iterator[pd.DataFrame]:
    """pandas frames of whole walks, in file order, each of at most ``chunk_rows`` rows (cut at the last walk
    that starts within them; a single longer walk is one frame of its own): memory set by ``chunk_rows``.
    The file must have passed :func:`validate`. Columns: the file's format columns."""
    _, batches = record_batches(path, chunk_rows, where)
    carry: pd.DataFrame | None = None
    for batch in batches:
        df = batch.to_pandas()
        if carry is not None and len(carry):
            df = pd.concat([carry, df], ignore_index=True)
        while len(df) > chunk_rows:
            walks = df["walk_id"].to_numpy()
            starts = np.flatnonzero(walks[1:chunk_rows + 1] != walks[:chunk_rows]) + 1  # walks starting by chunk_rows
            if starts.size:
                cut = int(starts[-1])
            else:  # one walk longer than a chunk: all of it
                after = np.flatnonzero(walks[chunk_rows:] != walks[0])
                if not after.size:
                    break  # it may go on in the next batch
                cut = chunk_rows + int(after[0])
            yield df.iloc[:cut].reset_index(drop=True)
            df = df.iloc[cut:].reset_index(drop=True)
        carry = df
    if carry is not None and len(carry):
        yield carry
