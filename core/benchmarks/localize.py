"""``python -m core bench localize``: time and peak memory of ``localize`` against the file size.

For each size in ``--rows`` a Parquet report file of about that many rows is made from a dataset split
(the split's export, :func:`core.reports.export.report_rows`, repeated with new walk ids until the size
is reached, whole walks only), then ``python -m core localize`` runs on it in a child process, as a user
would. Reported per size: rows, walks, positions (walk × report time), wall time [s], ms per position
and the child's peak resident memory [MB] (sampled every 50 ms with psutil). Memory flat in the file
size means the peak does not grow with ``rows``; the summary states the largest size's time against the
10-minute target for a million rows.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from core import REPO_ROOT, cli_types


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="assets/default_run", help="the run that localizes (default: %(default)s)")
    parser.add_argument("--dataset", default="datasets/etoile", help="whose split is repeated (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--rows", type=cli_types.counts, default=[100_000, 1_000_000],
                        help="report-file sizes in rows, comma-separated (default: 100000,1000000)")
    parser.add_argument("--method", default="map", choices=("network", "map", "exhaustive"))
    parser.add_argument("--chunk-rows", type=cli_types.count, default=None, help="localize's --chunk-rows")


def make_report_file(dataset_path, split: str, rows: int, out: Path) -> tuple[int, int]:
    """Write about ``rows`` report rows (whole walks; the split's export repeated with new walk ids) to
    ``out`` (Parquet); returns ``(rows written, walks)``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from core import resolve_path
    from core.reports.export import EXPORT_COLUMNS, report_rows
    from core.reports.format import COLUMNS, TableWriter, site_names
    from core.stores.dataset import MeasurementDataset

    dataset = MeasurementDataset.load(resolve_path(dataset_path))
    idx = dataset.indices(split)
    base = report_rows(dataset, idx, site_names(dataset))
    walk = base.column("walk_id")
    starts = np.flatnonzero(np.r_[True, pc.not_equal(walk.slice(1), walk.slice(0, len(walk) - 1)).to_numpy(False)])
    per_walk = np.diff(np.r_[starts, base.num_rows])
    schema = pa.schema([(c, COLUMNS[c].type) for c in EXPORT_COLUMNS])
    written = walks = copy = 0
    with TableWriter(out, "parquet", schema) as writer:
        while written < rows:
            take = int(np.searchsorted(np.cumsum(per_walk), rows - written, side="left")) + 1  # whole walks
            part = base.slice(0, int(per_walk[:take].sum()))
            ids = pc.binary_join_element_wise(pa.scalar(f"r{copy}-"), part.column("walk_id"), "")
            writer.write(part.set_column(part.schema.get_field_index("walk_id"), "walk_id", ids))
            written, walks, copy = written + part.num_rows, walks + min(take, len(per_walk)), copy + 1
    return written, walks


def _peak_rss_mb(proc: subprocess.Popen) -> float:
    """The child's peak resident memory [MB], sampled every 50 ms until it exits."""
    import psutil

    peak = 0
    child = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, child.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.05)
    return peak / 2**20


def run(args: argparse.Namespace) -> int:
    import json

    from core.benchmarks.report import write_report

    sizes = args.rows
    rows_out = []
    with tempfile.TemporaryDirectory(prefix="bench-localize-") as tmp:
        for n in sizes:
            reports, out = Path(tmp) / f"reports_{n}.parquet", Path(tmp) / f"positions_{n}.parquet"
            written, walks = make_report_file(args.dataset, args.split, n, reports)
            cmd = [sys.executable, "-m", "core", "localize", "--run", args.run, "--reports", str(reports),
                   "--method", args.method, "--out", str(out), "--no-progress", "--json"]
            if args.chunk_rows:
                cmd += ["--chunk-rows", str(args.chunk_rows)]
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "CORE_WORKSPACE": tmp})
            holder: dict[str, float] = {}
            sampler = threading.Thread(target=lambda: holder.update(peak=_peak_rss_mb(proc)))
            sampler.start()
            stdout, stderr = proc.communicate()
            sampler.join()
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(stderr, file=sys.stderr)
                return proc.returncode
            positions = json.loads(stdout)["positions"]
            rows_out.append({"rows": written, "walks": walks, "positions": positions, "wall_s": wall,
                             "ms_per_position": 1000.0 * wall / max(positions, 1), "peak_rss_mb": holder["peak"]})
    largest = rows_out[-1]
    summary = {"method": args.method, "run": args.run,
               "peak_rss_growth_mb": largest["peak_rss_mb"] - rows_out[0]["peak_rss_mb"],
               "million_rows_s_estimate": largest["wall_s"] * 1_000_000 / largest["rows"],
               "million_rows_ok_10min": largest["wall_s"] * 1_000_000 / largest["rows"] <= 600.0}
    write_report("localize", rows_out, args.out, summary)
    return 0
