"""Radio maps: every feature of the active scene, histograms, comparisons, generation."""

import pandas as pd
import streamlit as st

import app_widgets as wb
from core.jobs.manager import correct_map_spec, generate_maps_spec
from core.physics.twin_correction import FEATURES, VIEWS, check_lines, correction_record, record_rows, site_layer
from core.raytracing.coverage import DEFAULT_MIN_COVERAGE, coverage_figures, heard_sensitivity
from core.raytracing.generation import DEFAULT_TOA_DECIMATION, fitted_map_size
from core.raytracing.tracing import MAX_SAMPLES_PER_SRC, PropagationSettings
from core.stores.lineage import corrected_twin_id, map_paths
from core.stores.workspace import store_status
from core.viz import plots as figures

wb.ensure_frame()
st.title("Radio maps")
ws = wb.workspace()
scene = wb.active_scene()
st.caption(f"Scene **{scene}** · maps in `{ws.rel(ws.radio_maps_dir)}/`. Each cell holds the features of its "
           "serving (strongest) site; cells without coverage are blank.")

path = ws.map_path(scene)
status = store_status(path, "radio_map")
radio_map = None
if status.ok:
    try:
        radio_map = wb.load_map(path)
    except Exception as exc:  # a corrupt store: say so and offer to rebuild it
        status_msg = str(exc)
        wb.missing_box("Radio map unreadable", status_msg, generate_maps_spec(scene, ws.rel(ws.radio_maps_dir), force=True),
                       "Regenerate it", key="regen_map")
else:
    wb.missing_box("No radio map" if status.state == "missing" else "Radio map broken", status.message,
                   generate_maps_spec(scene, ws.rel(ws.radio_maps_dir), force=status.state == "corrupt"),
                   f"Generate the radio map of {scene} (default settings)", key="make_map_rm")

if radio_map is not None:
    geometry = wb.geometry(scene)
    gen = radio_map.attrs.get("generator") or {}
    with wb.guard("coverage"):
        sensitivity, source = heard_sensitivity(wb.active_dataset(scene))
        cov = coverage_figures(radio_map, sensitivity)
        cols = st.columns(3)
        cols[0].metric(f"Reached ({cov['of']})", f"{cov['reached']:.1%}",
                       help="some site has a path to the cell, however weak")
        cols[1].metric("Heard", "–" if sensitivity is None else f"{cov['heard']:.1%}",
                       help="the strongest site's path gain is at least the sensitivity minus the transmit power: "
                            "what a UE can actually hear")
        cols[2].metric("Heard threshold", "–" if sensitivity is None else f"{cov['threshold_db']:g} dB",
                       help=f"{sensitivity} dBm sensitivity ({source}) at {cov['tx_power_dbm']:g} dBm transmit power")
    st.caption(f"{radio_map.shape[0]}×{radio_map.shape[1]} cells of {radio_map.cell_size:g} m, coverage "
               f"{radio_map.coverage_text()}, {len(radio_map.attrs.get('sites') or [])} sites."
               + (f" Generator: {', '.join(f'{k}={v}' for k, v in gen.items() if not isinstance(v, (dict, list)))}."
                  if isinstance(gen, dict) and gen else ""))
    tab_map, tab_cmp = st.tabs(["Feature map", "Compare two maps"])
    with tab_map:
        feature = st.selectbox("Feature", list(radio_map.features), key="rm_feature",
                               format_func=lambda f: f"{f} [{radio_map.units[f]}]")
        with wb.guard("feature map"):
            st.plotly_chart(figures.feature_heatmap(radio_map, feature, geometry), key="rm_heatmap")
            st.plotly_chart(figures.feature_histogram(radio_map, feature), key="rm_hist")
    with tab_cmp:
        stores = map_paths(ws.radio_maps_dir)
        labels = [ws.rel(p) for p in stores]
        if not labels:
            st.info("No map stores to compare.")
        else:
            cols = st.columns(2)
            picks = []
            for side, col in zip(("A", "B"), cols):
                with col:
                    default = labels.index(ws.rel(path)) if ws.rel(path) in labels else 0
                    store = st.selectbox(f"Map {side}", labels, index=default, key=f"cmp_store_{side}")
                    picks.append(store)
            with wb.guard("comparison"):
                rm_a = wb.load_map(ws.root / picks[0])
                rm_b = wb.load_map(ws.root / picks[1])
                fa = cols[0].selectbox("Feature A", list(rm_a.features), key="cmp_fa")
                fb = cols[1].selectbox("Feature B", list(rm_b.features),
                                       index=list(rm_b.features).index(fa) if fa in rm_b.features else 0, key="cmp_fb")
                cols[0].plotly_chart(figures.feature_heatmap(rm_a, fa, geometry if picks[0] == ws.rel(path) else None,
                                                             height=460, max_cells=160,
                                                             title=f"A: {fa} [{rm_a.units[fa]}] — {picks[0]}"), key="cmp_a")
                cols[1].plotly_chart(figures.feature_heatmap(rm_b, fb, geometry if picks[1] == ws.rel(path) else None,
                                                             height=460, max_cells=160,
                                                             title=f"B: {fb} [{rm_b.units[fb]}] — {picks[1]}"), key="cmp_b")
                if fa != fb:
                    st.info("Pick the same feature on both sides to see their difference.")
                elif picks[0] == picks[1]:
                    st.info("Pick two different stores (for example two generator settings) to see their difference.")
                else:
                    st.plotly_chart(figures.difference_heatmap(rm_a, rm_b, fa, picks[0], picks[1], geometry),
                                    key="cmp_diff")

# -- the twin corrected by a world's labelled walks (correct-map) ------------------------
VIEW_LABELS = {"twin": "twin", "corrected": "corrected", "correction": "correction (corrected − twin; AoA wrapped)"}


def correction_launcher(corrected_status) -> None:
    """The expander that launches ``correct-map`` with the sidebar's dataset (the command shown)."""
    dataset = wb.active_dataset(scene)
    with st.expander("Correct the twin with the labelled walks of the dataset (correct-map)",
                     expanded=not corrected_status.ok):
        st.caption(f"Fits the twin's error per site and feature to the labelled walks of `{ws.rel(dataset)}` (the "
                   "sidebar's dataset; a world's, e.g. `datasets/<scene>_realistic`) and writes a corrected copy of "
                   f"the map to `{ws.rel(corrected_status.path)}`; the twin keeps its place. docs/world.md")
        split = st.radio("Walks fitted", ["train", "test"], horizontal=True, key="corr_split",
                         help="the kernel and its shrinkage are chosen on the val split")
        dataset_status = store_status(dataset, "measurement_dataset")
        if not dataset_status.ok:
            st.caption(f"No labelled walks to fit: {dataset_status.message}.")
        with wb.guard("correct-map"):
            spec = correct_map_spec(ws.rel(dataset), scene, ws.rel(ws.radio_maps_dir), split,
                                    force=corrected_status.state != "missing")
            st.caption("The button runs: `python -m core " + " ".join(spec.args) + "`")
            if st.button("Correct the twin", key="corr_go", disabled=not dataset_status.ok) \
                    and wb.launch(spec) is not None:
                st.rerun()
    wb.job_panel(("correct-map",), key="corr_jobs", limit=2, title="Twin-correction jobs")


def correction_view(twin_map, corrected_path) -> None:
    """One site's layer of a feature: twin, corrected or the correction; and the record of the choices."""
    corrected = wb.load_map(corrected_path)
    record = correction_record(corrected)
    sites = twin_map.attrs.get("sites") or []
    cols = st.columns([2, 1, 1])
    view = cols[0].radio("View", VIEWS, horizontal=True, key="corr_view", format_func=VIEW_LABELS.get)
    site = int(cols[1].selectbox("Site", list(range(len(sites))), key="corr_site",
                                 format_func=lambda i: str(sites[i].get("name", i))) or 0)
    feature = cols[2].selectbox("Feature", FEATURES, key="corr_feature")
    values = site_layer(twin_map, corrected, feature, site, view)
    st.plotly_chart(figures.site_layer_heatmap(twin_map, values, feature, site, view, geometry), key="corr_heatmap")
    twin = record.get("twin") or {}
    st.caption(f"`{ws.rel(corrected_path)}`: fitted on {record.get('fit_reports', '?')} labelled reports of "
               f"`{(record.get('dataset') or {}).get('path', '?')}` ({record.get('fit_split', '?')}), kernels "
               f"chosen on {record.get('val_reports', '?')} val reports; h and λ empty = the twin kept for that "
               "feature.")
    if twin_map.ref.id and corrected_twin_id(corrected.ref) != twin_map.ref.id:  # the stand-in rule of lineage
        st.warning(f"The corrected map was fitted to another save of the twin ({twin.get('path')}); correct "
                   "this one again.", icon=":material/link_off:")
    st.dataframe(pd.DataFrame(record_rows(record)), hide_index=True, width="stretch")
    for line in check_lines(record):
        if line.startswith("warning:"):
            st.warning(line.removeprefix("warning: ").capitalize(), icon=":material/warning:")
        else:
            st.caption(line[0].upper() + line[1:] + ".")


if radio_map is not None:  # the twin is there to correct
    st.divider()
    st.subheader("What the twin gets wrong")
    corrected_status = store_status(ws.corrected_map_path(scene), "radio_map")
    correction_launcher(corrected_status)
    if corrected_status.state == "missing":
        st.caption(f"No corrected map of {scene} yet (`{ws.rel(corrected_status.path)}`).")
    elif not corrected_status.ok:
        st.error(f"Corrected map: {corrected_status.message}", icon=":material/warning:")
    else:
        with wb.guard("corrected map"):
            correction_view(radio_map, corrected_status.path)

# -- generation form ---------------------------------------------------------------------
st.divider()
st.subheader("Generate radio maps")
# defaults: the settings of the current map when there is one
gen = (radio_map.attrs.get("generator") if radio_map is not None else None) or {}
gen = gen if isinstance(gen, dict) else {}
if radio_map is not None:
    shape = radio_map.shape
else:  # no map yet: the command's default, the scene's extent at 1 m (at most 512 x 512 cells)
    scene_geometry = wb.geometry(scene)
    shape = fitted_map_size(scene_geometry.bbox, 1.0) if scene_geometry is not None else (512, 512)


PROPAGATION = PropagationSettings()


def _default(key, fallback, cast):
    try:
        return cast(gen.get(key, fallback))
    except (TypeError, ValueError):
        return fallback


st.caption("The defaults are the settings of the current map." if gen else
           "Defaults: the scene's extent in cells of 1 m (at most 512 × 512) around its centre.")
with st.form("generate_maps"):
    cols = st.columns(5)
    resolution = cols[0].number_input("Cell size [m]", min_value=0.1, max_value=50.0,
                                      value=min(max(_default("resolution", 1.0, float), 0.1), 50.0), step=0.5)
    height = cols[1].number_input("Map height [cells]", min_value=8, max_value=4096, value=int(shape[0]), step=64)
    width = cols[2].number_input("Map width [cells]", min_value=8, max_value=4096, value=int(shape[1]), step=64)
    samples = cols[3].number_input("Rays per site", min_value=100, max_value=MAX_SAMPLES_PER_SRC,
                                   value=min(max(_default("samples_per_tx", PROPAGATION.samples_per_src, int), 100),
                                             MAX_SAMPLES_PER_SRC),
                                   step=1000, help="PathSolver rays per transmitter; time grows with it.")
    depth = cols[4].number_input("Max depth", min_value=0, max_value=10,
                                 value=min(max(_default("max_depth", PROPAGATION.max_depth, int), 0), 10),
                                 help="Maximum number of reflections per path.")
    cols = st.columns([2, 1, 1, 1])
    gen_scene = cols[0].text_input("Scene", value=scene, key="gen_scene")
    decimation = cols[1].number_input("Node spacing [cells]", min_value=1, max_value=16,
                                      value=min(max(_default("toa_decimation", DEFAULT_TOA_DECIMATION, int), 1), 16),
                                      key="gen_decimation",
                                      help="PathSolver traces every n-th row and column; the cells between "
                                           "are interpolated (--toa-decimation). 1 traces every cell.")
    min_cov = cols[2].number_input("Min. outdoor coverage [%]", min_value=0, max_value=100,
                                   value=int(round(100 * min(max(_default("min_coverage", DEFAULT_MIN_COVERAGE, float),
                                                                 0.0), 1.0))), key="gen_min_coverage",
                                   help="A map covering fewer outdoor cells is refused and not written "
                                        "(--min-coverage); the job's log names the likely cause.")
    force = cols[3].checkbox("Overwrite (--force)", value=False)
    submitted = st.form_submit_button("Start map generation", type="primary")
if submitted:
    with wb.guard("map generation"):
        spec = generate_maps_spec(gen_scene.strip(), ws.rel(ws.radio_maps_dir), float(resolution),
                                  (int(height), int(width)), int(samples), int(depth), force,
                                  min_coverage=int(min_cov) / 100, toa_decimation=int(decimation))
        wb.launch(spec)

wb.job_panel(("generate-maps",), key="map_jobs", limit=4, title="Map-generation jobs")
