"""Bring your own measurements: the report format (export-reports), its checks and `python -m core localize`."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from core.cli import main
from core.learning.config import load_config
from core.learning.evaluation import evaluate_run
from core.learning.inference import calibrate_run, load_run
from core.learning.training import train
from core.physics.synthetic import synthetic_scene
from core.reports.localize import localize_reports

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    overrides = synthetic_scene(root / "scene", num_ues=150, height=24, width=24, cell=4.0, reports=6, k=3, seed=3)
    sets = [f"{k}={v}" for k, v in overrides.items()] + [
        "model.preset=tiny", "training.epochs=1", "training.batch_size=32"]
    train(load_config(ROOT / "configs" / "model.yaml", sets), root / "runs" / "tiny", show_progress=False)
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The run's test split as a Parquet report file (export-reports)."""
    run = load_run(run_dir)
    out = tmp_path_factory.mktemp("export") / "test.parquet"
    assert main(["export-reports", "--dataset", str(run.config.data.dataset), "--split", "test", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def test_round_trip_equals_evaluate(run_dir, exported, tmp_path):
    """export-reports of the test split, then localize with truth: evaluate's medians, network and network + MAP."""
    run = load_run(run_dir)
    table = pq.read_table(exported).to_pandas()
    assert table["walk_id"].nunique() == len(run.dataset.indices("test"))
    assert set(table["site"].dropna()) <= {s["name"] for s in run.dataset.attrs["sites"]}
    info = localize_reports(run, exported, tmp_path / "pos.csv", "map", show_progress=False)
    ev_run = load_run(run_dir)
    calibrate_run(ev_run)
    ev = evaluate_run(run_dir, "test", refine=True, write=False, run=ev_run)
    res = info["result"]
    assert res["count"] == ev["count"]
    assert res["median_m"] == pytest.approx(ev["median_m"], abs=1e-9)
    assert res["refinement"]["after"]["median_m"] == pytest.approx(ev["refinement"]["after"]["median_m"], abs=1e-9)
    assert res["refinement"]["after"]["p90_m"] == pytest.approx(ev["refinement"]["after"]["p90_m"], abs=1e-9)
    assert res["groups"]["los"]["count"] == ev["groups"]["los"]["count"]
    pos = pd.read_csv(tmp_path / "pos.csv")
    assert len(pos) == info["positions"] and set(pos["method"]) == {"network + MAP"}
    assert (pos["sigma_major_m"] >= pos["sigma_minor_m"]).all() and (pos["sigma_minor_m"] > 0).all()
    assert np.allclose(pos["error_m"], np.hypot(pos["x_m"] - pos["true_x_m"], pos["y_m"] - pos["true_y_m"]))


def test_methods_outputs_and_streaming(run_dir, exported, tmp_path, capsys):
    """network -> GeoJSON, exhaustive -> Parquet; small chunks give the same positions as one chunk."""
    csv = tmp_path / "r.csv"
    pq.read_table(exported).to_pandas().to_csv(csv, index=False)
    assert main(["localize", "--run", str(run_dir), "--reports", str(csv), "--method", "network",
                 "--out", str(tmp_path / "p.geojson"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "median_m" in out and "every report time" in out and "network + MAP" not in out
    gj = json.loads((tmp_path / "p.geojson").read_text())
    assert gj["type"] == "FeatureCollection" and "no georeference" in gj["frame"]
    f = gj["features"][0]
    assert f["geometry"]["type"] == "Point" and f["properties"]["method"] == "network"
    run = load_run(run_dir)
    one = localize_reports(run, csv, tmp_path / "one.parquet", "exhaustive", show_progress=False)
    many = localize_reports(run, csv, tmp_path / "many.parquet", "exhaustive", chunk_rows=300, show_progress=False)
    a, b = pq.read_table(tmp_path / "one.parquet").to_pandas(), pq.read_table(tmp_path / "many.parquet").to_pandas()
    assert one["positions"] == many["positions"] == len(a) == len(gj["features"])
    assert np.allclose(a[["x_m", "y_m"]], b[["x_m", "y_m"]]) and (a["walk_id"] == b["walk_id"]).all()
    assert a["confidence"].isna().all() and "baselines" in one["result"]


GOOD = "walk_id,time_s,site,path_gain_db,toa_ns,aoa_deg,x_m,y_m\n"


def _row(walk="a", t=0.0, site="site0", pg=-80.0, toa=100.0, aoa=10.0, x=0.0, y=0.0):
    return f"{walk},{t},{site},{pg},{toa},{aoa},{x},{y}\n"


BAD = {  # name: (file text, the message after "error: --reports FILE: ")
    "unknown site": (GOOD + _row() + _row(site="tower9") + _row(site="mast2"),
                     "unknown site(s) mast2, tower9 (the scene's sites: site0, site1, site2)"),
    "missing column": ("walk_id,site,path_gain_db\na,site0,-80\n", "missing column(s) time_s (required: walk_id, "
                       "time_s, site)"),
    "misspelled column": ("walk_id,time_s,site,pathgain_db\na,0,site0,-80\n",
                          "unknown column 'pathgain_db': did you mean 'path_gain_db'?"),
    "no measurement": ("walk_id,time_s,site\na,0,site0\n",
                       "no measurement column (at least one of path_gain_db, toa_ns, aoa_deg)"),
    "out of range": (GOOD + _row() + _row(t=1, pg=20.0) + _row(t=2, aoa=400.0),
                     "column path_gain_db: out of the physical range [-300, 0] dB in row 2"),
    "time back": (GOOD + _row(t=1.0) + _row(t=0.5), "time goes back within walk 'a' at row 2 (time_s must not "
                  "decrease in a walk)"),
    "walk split": (GOOD + _row() + _row(walk="b") + _row(walk="a", t=1), "walk 'a' starts again at row 3 (a walk's "
                   "rows must be contiguous)"),
    "nan": (GOOD + _row() + _row(t=1, toa="nan"), "column toa_ns: NaN or inf in row 2 (leave a missing value empty)"),
    "inf": (GOOD + _row(pg="-inf"), "column path_gain_db: NaN or inf in row 1 (leave a missing value empty)"),
    "not a number": (GOOD + _row(pg="loud"), "column path_gain_db: not a number ('loud') in row 1"),
    "empty": (GOOD, "empty file (a header but no rows)"),
    "no bytes": ("", "empty file (no header, no rows)"),
    "other scene": ("walk_id,time_s,site,path_gain_db,scene\na,0,site0,-80,munich\n",
                    "reports of scene 'munich', but the run localizes in scene 'analytic'"),
    "outside": (GOOD + _row(x=5000.0), "x_m, y_m outside the scene (-48..48, -48..48 m) in row 1 (a file of "
                "another scene, or another frame?)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_reports_are_refused_before_any_work(name, run_dir, tmp_path, capsys):
    text, message = BAD[name]
    reports, out = tmp_path / "r.csv", tmp_path / "out" / "pos.csv"
    reports.write_text(text)
    assert main(["localize", "--run", str(run_dir), "--reports", str(reports), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --reports {reports}: {message}\n"
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written, no temporary


def test_bad_outputs_are_refused(run_dir, exported, tmp_path, capsys):
    shipped = ROOT / "assets" / "pos.csv"
    assert main(["localize", "--run", str(run_dir), "--reports", str(exported), "--out", str(shipped)]) == 2
    assert "shipped with the project and read-only" in capsys.readouterr().err and not shipped.exists()
    assert main(["localize", "--run", str(run_dir), "--reports", str(exported), "--out", str(tmp_path / "p.txt")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'p.txt'}: unknown file type '.txt' (use .csv, " \
                                      ".parquet, .pq, .geojson)\n"
    assert main(["export-reports", "--dataset", "datasets/etoile", "--out", str(tmp_path / "x.json")]) == 2


def test_the_page_launches_the_same_command():
    from core.cli import build_parser
    from core.errors import CoreError
    from core.jobs.manager import KINDS, localize_spec

    spec = localize_spec("assets/default_run", "reports/big.parquet", "reports/localized/big.csv", "exhaustive")
    assert spec.kind == "localize" in KINDS and spec.output == "reports/localized/big.csv"
    args = build_parser("localize").parse_args(list(spec.args))
    assert (args.run, args.reports, args.method, args.out) == ("assets/default_run", "reports/big.parquet",
                                                               "exhaustive", "reports/localized/big.csv")
    spec = localize_spec("assets/default_run", "r.csv", "o.csv", "map", sigma_scale=0.5, scan_starts=6)
    args = build_parser("localize").parse_args(list(spec.args))
    assert (args.prior_sigma_scale, args.scan_starts) == (0.5, 6)
    assert build_parser("localize").parse_args(list(localize_spec("a", "r.csv", "o.csv", "map", sigma_scale="auto")
                                                    .args)).prior_sigma_scale == "auto"
    with pytest.raises(CoreError, match="MAP's"):
        localize_spec("a", "r.csv", "o.csv", "network", scan_starts=2)


def test_windows_are_dataset_samples():
    """One sample per walk and report time: the walk's reports up to it (at most T), slots in row order (at most
    K), the serving cell and truth from the report's first row, an empty site a missing report."""
    from core.reports.windows import report_windows

    df = pd.DataFrame({
        "walk_id": ["a"] * 6 + ["b"],
        "time_s": [100.0, 100.5, 100.5, 100.5, 101.0, 101.5, 7.0],
        "site": [None, "s1", "s0", "s2", "s0", "s1", "s2"],
        "path_gain_db": [np.nan, -80, -90, -95, -85, np.nan, -70],
        "toa_ns": [np.nan, 300, 400, 500, 410, 320, 100],
        "snr_db": [np.nan, 20, 99, 99, 18, 17, 30],
        "x_m": [1.0, 2, 2, 2, 3, 4, 5], "y_m": [0.0, 0, 0, 0, 0, 0, np.nan]})
    w = report_windows(df, {"s0": 0, "s1": 1, "s2": 2}, num_reports=3, num_slots=2, attrs={"sites": []})
    ds = w.dataset
    # walk a's first report heard nothing: no sample there; then 100.5, 101, 101.5; walk b: 7
    assert list(w.walk_id) == ["a", "a", "a", "b"] and list(w.time_s) == [100.5, 101.0, 101.5, 7.0]
    assert list(w.walk_end) == [False, False, True, True] and list(w.truth) == [True, True, True, False]
    assert ds.report_mask.tolist() == [[False, False, True], [False, True, True], [True, True, True],
                                       [False, False, True]]
    assert np.allclose(ds.t[2], [0.0, 0.5, 1.0]) and np.allclose(ds.t[1, 1:], [0.5, 1.0])  # from the walk's start
    assert ds.site_ids[2].tolist() == [[1, 0], [0, -1], [1, -1]]  # the third site of 100.5 is past K = 2
    assert ds.site_features[2, 0, 0, 0] == -80 and np.isnan(ds.site_features[2, 0, 0, 2])  # no aoa column
    assert np.isnan(ds.site_features[2, 2, 0, 0]) and ds.site_features[2, 2, 0, 1] == 320  # a missing value
    assert ds.cell_features[2, 0, 0] == 20 and ds.cell_features[2, 1, 0] == 18  # the report's first row
    assert np.allclose(ds.labels[:3], [[2, 0], [3, 0], [4, 0]])


def test_ellipse_axes_and_the_drawn_covariance_agree():
    from core.reports.ellipse import diagonal_covariance, ellipse_axes
    from core.viz.plots import ellipse_covariance

    cov = np.stack([ellipse_covariance(3.0, 1.0, 30.0), ellipse_covariance(2.0, 2.0, 0.0),
                    ellipse_covariance(5.0, 0.5, -60.0)])
    major, minor, angle = ellipse_axes(cov)
    assert np.allclose(major, [3, 2, 5]) and np.allclose(minor, [1, 2, 0.5]) and np.allclose(angle[[0, 2]], [30, -60])
    major, minor, angle = ellipse_axes(diagonal_covariance(np.array([[1.0, 4.0]])))
    assert (major[0], minor[0], angle[0]) == (4.0, 1.0, 90.0)
    assert np.isinf(ellipse_axes(np.full((1, 2, 2), np.inf))[0]).all()
