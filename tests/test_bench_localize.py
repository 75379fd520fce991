"""``python -m core bench localize``: report files of the asked sizes, localized by a child process, measured."""

import json

import pytest

from core.benchmarks.localize import make_report_file
from core.cli import main


def test_report_files_hold_whole_walks_of_about_the_asked_size(tmp_path):
    import pyarrow.parquet as pq

    rows, walks = make_report_file("datasets/etoile", "test", 2_500, tmp_path / "r.parquet")
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == rows and 2_500 <= rows < 2_600  # whole walks: at most one walk past the size
    ids = table.column("walk_id").to_pylist()
    assert len(set(ids)) == walks and all(i.startswith("r0-") for i in ids)  # one pass of the split, renamed


def test_bench_localize_reports_time_and_peak_memory_per_size(tmp_path, capsys):
    out = tmp_path / "localize.json"
    assert main(["bench", "--out", str(out), "localize", "--rows", "1500,3000", "--method", "network"]) == 0
    report = json.loads(out.read_text())
    small, large = report["rows"]
    assert small["rows"] >= 1500 and large["rows"] >= 3000 and large["walks"] > small["walks"]
    assert all(r["positions"] > 0 and r["wall_s"] > 0 and r["peak_rss_mb"] > 100 for r in report["rows"])
    assert report["summary"]["million_rows_s_estimate"] == pytest.approx(large["wall_s"] * 1e6 / large["rows"])
    assert "peak_rss_mb" in capsys.readouterr().out
