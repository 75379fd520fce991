"""Localize: bring your own measurement reports, see the tracks over the scene, download the positions."""

import os
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

import app_widgets as wb
from core import REPO_ROOT
from core.jobs.manager import localize_spec
from core.viz import plots as figures

wb.ensure_frame()
st.title("Localize")
ws = wb.workspace()
scene = wb.active_scene()
st.caption("A measurement-report file (CSV or Parquet, one row per walk, report time and site heard: "
           "docs/reports.md) is localized by a trained run: a position per walk and report time with its 1σ "
           "ellipse. With ground truth columns (x_m, y_m) the positions are coloured by their error. The same as "
           "`python -m core localize`.")
REPORTS = ws.root / "reports"
#: files up to this size [bytes] are localized on the page; larger ones run as a background job
PAGE_LIMIT_BYTES = int(os.environ.get("CORE_LOCALIZE_PAGE_BYTES", 3_000_000))
METHODS = {"network + MAP": "map", "network": "network", "map matching, exhaustive (no network)": "exhaustive"}
SCALES = {"the run's": None, "auto (chosen on val)": "auto", "a number": None}


def workspace_files() -> list[Path]:
    found = [p for d in (REPORTS, REPO_ROOT / "docs" / "examples") if d.is_dir() for p in sorted(d.iterdir())
             if p.suffix.lower() in (".csv", ".parquet", ".pq") and p.is_file()]
    return found


# -- the file -----------------------------------------------------------------------------
c = st.columns([2, 3])
source = c[0].radio("Report file", ["From the workspace", "Upload"], key="loc_source", horizontal=True)
reports: Path | None = None
if source == "Upload":
    up = c[1].file_uploader("CSV or Parquet report file", type=["csv", "parquet", "pq"], key="loc_upload")
    if up is not None:
        from core.stores.atomic import atomic_path

        reports = REPORTS / Path(up.name).name
        with wb.guard(f"saving {up.name}"):
            if not reports.exists() or reports.stat().st_size != up.size:
                with atomic_path(reports) as tmp:
                    tmp.write_bytes(up.getvalue())
else:
    files = workspace_files()
    if not files:
        c[1].info("No report file in the workspace yet: upload one, or write one with "
                  "`python -m core export-reports --dataset datasets/etoile --out reports/test.csv`.")
    else:
        pick = c[1].selectbox("File", [ws.rel(p) for p in files], key="loc_file")
        reports = ws.root / pick if not Path(pick).is_absolute() else Path(pick)
if reports is None:
    st.stop()

o = st.columns([3, 2, 1])
name = wb.pick_run(ws, scene, o[0], key="loc_run")
method_label = o[1].selectbox("Method", list(METHODS), key="loc_method",
                              help="network + MAP: the network, then MAP refinement on the map (the most accurate); "
                                   "exhaustive: the calibrated likelihood searched over the whole map, no network.")
fmt = o[2].selectbox("Output", ["csv", "parquet", "geojson"], key="loc_fmt")
method = METHODS[method_label]
runs = ws.runs()  # read once: each entry reads its run directory
chosen = next((r for r in runs if r.name == name), None)
peers = [r.name for r in runs if r.has_checkpoint and r.name != name and chosen is not None
         and (r.dataset, r.scene, r.split) == (chosen.dataset, chosen.scene, chosen.split)]
members = st.multiselect("Ensemble with (other runs of this dataset)", peers, key="loc_ensemble",
                         disabled=method == "exhaustive",
                         help="their networks are pooled with this run's (mean and mixture σ) as the network and "
                              "MAP's prior (localize --ensemble)") if peers else []
members = members if method != "exhaustive" else []
scale, starts = None, None
if method == "map":
    sc = st.columns([2, 1, 1])
    pick = sc[0].selectbox("Prior σ scale", list(SCALES), key="loc_scale",
                          help="the prior's σ over the network's in MAP: the run's setting, chosen on the run's val "
                               "split (auto, with the σ floor; seconds to minutes), or a number "
                               "(localize --prior-sigma-scale)")
    scale = SCALES[pick] if pick != "a number" else sc[1].number_input("Scale", 0.05, 100.0, 1.0, 0.25, key="loc_scale_value")
    starts = sc[2].number_input("Scan starts", 0, 64, value=None, step=1, key="loc_scan", placeholder="the run's",
                               help="MAP also starts from the N best points of the exact scan of the likelihood "
                                    "(localize --scan-starts); empty: the run's setting")
tag = f".ens{len(members) + 1}-" + "-".join(Path(m).name for m in members) if members else ""
tag += (f".s{scale if scale == 'auto' else f'{scale:g}'}" if scale is not None else "") + \
    (f".scan{int(starts)}" if starts is not None else "")
out = REPORTS / "localized" / f"{reports.stem}.{Path(name).name}{tag}.{method}.{fmt}"
big = reports.stat().st_size > PAGE_LIMIT_BYTES
st.caption(f"Writes `{ws.rel(out)}`. " + ("This file is large: it runs as a background job (progress and cancel "
                                          "below)." if big else "Small enough to run here."))
if st.button("Localize", type="primary", key="loc_go"):
    if big:
        with wb.guard("localize"):
            wb.launch(localize_spec(name, str(reports), str(out), method, members, scale, starts))
    else:
        from core.learning.ensemble import load_members
        from core.reports.localize import format_result, localize_reports

        with wb.guard("localize"), st.spinner("Localizing…"):
            run = wb.load_run(ws.root / name)
            others = load_members(run, [str(ws.root / m) for m in members])
            info = localize_reports(run, reports, out, method, show_progress=False, members=tuple(others),
                                    sigma_scale=scale, scan_starts=starts)
            st.session_state["loc_info"] = {"out": str(out), "text": format_result(info["result"])
                                            if info["result"] else "", "summary":
                                            f"{info['positions']} positions of {info['walks']} walks "
                                            f"({info['rows']} rows) in {info['seconds']:.1f} s"}
wb.job_panel(["localize"], key="loc_jobs", limit=3, title="Localize jobs")


# -- the result ---------------------------------------------------------------------------
@st.cache_data(show_spinner="Reading the positions…", max_entries=4)
def read_positions(path: str, stamp: float) -> pd.DataFrame:
    p = Path(path)
    if p.suffix == ".geojson":
        import json

        feats = json.loads(p.read_text())["features"]
        return pd.DataFrame([{**f["properties"], "x_m": f["geometry"]["coordinates"][0],
                              "y_m": f["geometry"]["coordinates"][1]} for f in feats])
    return pd.read_parquet(p) if p.suffix in (".parquet", ".pq") else pd.read_csv(p, dtype={"walk_id": str})


if not out.is_file():
    st.info("No positions for this file, run and method yet: press Localize.")
    st.stop()
pos = read_positions(str(out), wb.mtime(out))
pos["walk_id"] = pos["walk_id"].astype(str)
info = st.session_state.get("loc_info")
st.subheader("Tracks")
if info and info["out"] == str(out):
    st.caption(info["summary"])
walks = pos["walk_id"].drop_duplicates().tolist()
w = st.columns([2, 2, 1])
walk = w[0].selectbox("Walk (ellipses, truth)", walks[:2000], key="loc_walk")
ends = pos.groupby("walk_id", sort=False).tail(1)
if "error_m" in pos and pos["error_m"].notna().any():
    e = ends["error_m"].dropna()
    w[2].metric("Median error (walk ends)", f"{e.median():.2f} m", help=f"P90 {e.quantile(0.9):.2f} m over "
                f"{len(e)} walks; every report time: median {pos['error_m'].median():.2f} m")
loaded = None
with wb.guard(f"run {name}"):
    loaded = wb.load_run(ws.root / name)
if loaded is not None:
    fig = figures.report_tracks(loaded.radio_map, pos, wb.geometry(loaded.scene or scene), highlight=walk,
                                title=f"{len(pos)} positions of {len(walks)} walks ({pos['method'].iloc[0]})")
    st.plotly_chart(fig, key="loc_tracks")
if info and info["out"] == str(out) and info["text"]:
    with st.expander("Error table (as `evaluate` prints it)"):
        st.code(info["text"], language="text")
st.download_button("Download the positions", data=out.read_bytes(), file_name=out.name, key="loc_download",
                   mime="text/csv" if fmt == "csv" else "application/octet-stream")

points = pos[pos["walk_id"] == walk]
t = w[1].selectbox("Report time [s]", points["time_s"].tolist(), index=len(points) - 1, key="loc_time")
show = ["time_s", "x_m", "y_m", "sigma_major_m", "sigma_minor_m", "sigma_angle_deg"] + \
    [c for c in ("confidence", "error_m") if c in points]
st.dataframe(points[show].round(3), hide_index=True, height=200, key="loc_points")
if st.button("Open this point in the Refinement inspector", key="loc_inspect"):
    st.session_state["ref_report_point"] = {"run": name, "reports": str(reports), "walk_id": walk,
                                            "time_s": float(t)}
    st.session_state["ref_run"] = name
    st.switch_page("pages/refinement.py")
if np.isfinite(points["x_m"]).all():
    st.caption("Ellipses: 1σ of the estimate (network: its σ; MAP and map matching: the Laplace approximation of "
               "the posterior at the estimate, core/reports/ellipse.py).")
