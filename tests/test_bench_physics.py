"""The physics benchmark runs small and reports the per-site likelihood and the MAP search."""

from __future__ import annotations

import json

from core.cli import main


def test_bench_physics_reports_likelihood_and_map(tmp_path, capsys):
    out = tmp_path / "physics.json"
    args = ["bench", "--out", str(out), "physics", "--batches", "16,64", "--size", "16", "--repeats", "1",
            "--map-samples", "40,80", "--walks", "20"]
    assert main(args) == 0
    assert "lik_fwdbwd_vs_site_bare_fwdbwd" in capsys.readouterr().out
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert {"lik_ok", "map_ok", "map_ms_per_sample", "lik_prep_fwdbwd_vs_site_bare_fwdbwd", "map_memory_O(N)_ok",
            "lik_fwdbwd_memory_O(N)_ok"} <= set(summary)
    batch_rows, map_rows = report["rows"], summary["map_search"]
    assert [r["batch"] for r in batch_rows] == [16, 64] and [r["map_samples"] for r in map_rows] == [40, 80]
    assert all(r["lik_fwdbwd_ms"] > 0 and r["site_bare_fwdbwd_ms"] > 0 for r in batch_rows)
    assert summary["walks"] == 20 and summary["walk_ms_per_walk"] > 0 and summary["walk_smoother_ms_per_walk"] > 0  # two timings: no order asserted
    assert summary["walk_basins3_ms_per_walk"] > 0 and isinstance(summary["walk_basins3_ok"], bool)
    assert map_rows[-1]["map_ms_per_sample"] > 0 and map_rows[-1]["median_err_after_m"] >= 0
    # the search with starts from the exact scan, timed in the same run, its ratio and its target
    assert summary["map_scan_ms_per_sample"] > 0 and summary["map_scan_vs_map"] > 0 and "map_scan_ok" in summary
    assert map_rows[-1]["median_err_after_scan_m"] >= 0
