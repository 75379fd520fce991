"""Refinement inspector: why a prediction is wrong, and what MAP refinement does to it."""

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

import app_widgets as wb
from core.learning import candidates as cands
from core.learning.inference import calibrate_run, subpoint_xy
from core.physics.twin_correction import BOUND_CAVEAT, is_corrected
from core.viz import network as netfig
from core.viz import plots as figures

wb.ensure_frame()
st.title("Refinement inspector")
ws = wb.workspace()
scene = wb.active_scene()
dataset = str(wb.active_dataset(scene))  # the sidebar's dataset (world)
st.caption("MAP refinement looks for the most probable position given the measurement reports and the network: "
           "J(p) = NLL(reports | p) + prior(p), the calibrated robust likelihood of every reported site's path gain, "
           "ToA and AoA against the radio map, plus the network's Gaussian (mean, σ) with an outlier floor. "
           "The search starts from a window around the network's estimate, its next most likely coarse cells and "
           "the map's best blocks, then refines by pattern search and a few gradient steps.")

c = st.columns([3, 1, 1])
name = wb.pick_run(ws, scene, c[0], key="ref_run")
split = c[1].selectbox("Split", ["test", "val", "train"], key="ref_split")
limit = c[2].number_input("Samples (max)", min_value=50, max_value=20000, value=2000, step=250, key="ref_limit")

run = None
with wb.guard(f"run {name}"):
    loaded = wb.load_run(ws.root / name, scene, dataset)
    calibrate_run(loaded)  # made and stored with the run on first use, before its stamp is read
    run = loaded
if run is None:
    st.stop()
wb.dataset_note(run)
why_not = run.silence_unavailable()
silence = st.toggle("Silence term", value=bool(run.config.physics_loss.silence) and why_not is None, key="ref_silence",
                    disabled=why_not is not None,
                    help="Also charge the sites a report with a free slot did NOT hear where the map predicts them "
                         "loud (as `evaluate --silence`): the refinement, its likelihood surface (view \"silent "
                         "sites\") and the residuals use that likelihood.")
if why_not:
    st.caption(f"Silence term unavailable: {why_not}")
view = None
with wb.guard("silence term"):
    view = run.with_silence(silence)  # a copy when it differs from the run's config: the cached run is unchanged
if view is None:
    st.stop()
run = view



def report_point(run, point: dict) -> None:
    """One point of a localized report file (set by the Localize page): network + MAP on its window of reports,
    the posterior around it and the residuals per site, as below for a dataset sample."""
    import dataclasses

    from core.learning.inference import predict, refine_prediction, refinement_surface, residual_table
    from core.reports.localize import report_window

    win = report_window(run, point["reports"], point["walk_id"], point["time_s"])
    r = dataclasses.replace(run, dataset=win.dataset)
    pred = predict(r, [0])
    ref = refine_prediction(r, pred)
    truth = pred.true_xy[0] if win.truth[0] else None
    err = f"; error network {ref.error_before_m[0]:.2f} m → MAP {ref.error_after_m[0]:.2f} m" if truth is not None else ""
    st.markdown(f"Walk **{point['walk_id']}** at **{point['time_s']:g} s**: {int(pred.num_reports[0])} reports in its "
                f"window; σ = ({pred.sigma[0, 0]:.1f}, {pred.sigma[0, 1]:.1f}) m{err}.")
    surf = refinement_surface(r, ref, 0)
    names = [str(site.get("name", k)) for k, site in enumerate(run.radio_map.attrs.get("sites") or [])]
    st.plotly_chart(figures.likelihood_surface(
        surf, next(iter(figures.surface_layers(surf, names))), true_xy=truth, network_xy=pred.xy[0], sigma=pred.sigma[0], map_xy=ref.xy[0],
        path=ref.path[:, 0], path_labels=ref.path_labels, starts=ref.starts[0], start_labels=ref.start_labels,
        site_names=names, title=f"Walk {point['walk_id']} at {point['time_s']:g} s: posterior"), key="ref_point_surface")
    st.dataframe(residual_table(r, ref, 0).round(2), hide_index=True, width="stretch", key="ref_point_residuals")


point = st.session_state.get("ref_report_point")
if point and point.get("run") == name:
    with st.expander(f"A point of the report file {Path(point['reports']).name} (from the Localize page)",
                     expanded=True):
        with wb.guard("report point"):
            report_point(run, point)  # run: with the silence term as the toggle says
        if st.button("Close this point", key="ref_point_close"):
            st.session_state.pop("ref_report_point", None)
            st.rerun()

o = st.columns([1, 1, 1, 1])
gate = o[0].checkbox("Refine only unconfident samples", value=False, key="ref_gate",
                     help="By default every sample is refined; tick to refine only those below the threshold.")
threshold = o[1].number_input("Confidence below", min_value=0.0, max_value=1.01, key="ref_thr", disabled=not gate,
                              value=float(run.config.physics_loss.refinement.min_confidence_threshold))
top_k = o[2].number_input("Coarse cells searched", min_value=0, max_value=8, value=3, key="ref_topk",
                          help="The network's next most likely coarse cells, each searched as an extra start.")
window_s = o[3].number_input("Pool reports over [s]", min_value=0.0, max_value=5.0, value=float(run.config.physics_loss.report_window_s),
                             step=0.2, key="ref_window", help="Reports within this time of the latest one are averaged per site "
                                                    "(0: the latest report only).")
o2 = st.columns([1, 1, 2])
scan_starts = o2[0].number_input("Scan starts", min_value=0, max_value=16, key="ref_scan",
                                 value=int(run.config.physics_loss.refinement.scan_starts),
                                 help="The best points of the exact scan of the likelihood alone (as exhaustive map "
                                      "matching ranks them), each searched as an extra start (`evaluate --scan-starts`).")
sigma_scale = o2[1].number_input("Prior σ × the network's", min_value=0.01, max_value=100.0, key="ref_sigma_scale",
                                 value=float(run.config.physics_loss.refinement.prior_sigma_scale), format="%.4g",
                                 help="The prior's σ over the network's own (`evaluate --prior-sigma-scale`; "
                                      "auto there chooses it on the val split).")
min_sigma = o2[2].number_input("Prior σ floor [m]", min_value=0.01, max_value=1000.0, key="ref_min_sigma",
                               value=float(run.config.physics_loss.refinement.prior_min_sigma_m), format="%.4g",
                               help="The prior's σ is never below this (`physics_loss.refinement.prior_min_sigma_m`; "
                                    "`evaluate --prior-sigma-scale auto` chooses it on the val split after the scale).")
options = (float(threshold) if gate else None, int(top_k), float(window_s), int(scan_starts), float(sigma_scale),
           float(min_sigma))


@st.cache_data(show_spinner="Predicting and refining…", max_entries=8)
def analysis(path: str, stamp: float, split: str, limit: int, options: tuple, silence: bool, scene: str | None,
             ds: str | None):
    from dataclasses import replace

    from core.learning.inference import map_search_config, predict, refine_prediction

    r = wb.load_run(path, scene, ds).with_silence(silence)
    pred = predict(r, r.dataset.indices(split)[:limit])
    threshold, top_k, window_s, scan_starts, sigma_scale, min_sigma = options
    return pred, refine_prediction(r, pred, threshold=threshold, top_k=top_k, window_s=window_s,
                                   search=replace(map_search_config(r.config), scan_top=scan_starts,
                                                  min_sigma_m=min_sigma),
                                   sigma_scale=sigma_scale)


@st.cache_data(show_spinner="Computing the Cramér–Rao bound…", max_entries=8)
def bound(path: str, stamp: float, split: str, limit: int, window_s: float, scene: str | None, ds: str | None):
    from core.learning.inference import bounds

    r = wb.load_run(path, scene, ds)
    out = bounds(r, r.dataset.indices(split)[:limit], window_s)
    return None if out is None else out[0]["window"]


@st.cache_data(show_spinner="Evaluating the likelihood surface…", max_entries=64)
def surface(path: str, stamp: float, split: str, limit: int, options: tuple, silence: bool, scene: str | None,
            ds: str | None, row: int, half_m: float, centre: tuple):
    from core.learning.inference import refinement_surface

    _, ref = analysis(path, stamp, split, limit, options, silence, scene, ds)
    return refinement_surface(wb.load_run(path, scene, ds).with_silence(silence), ref, row, half_m=half_m, centre=centre)


@st.cache_data(show_spinner="The network's distribution…", max_entries=64)
def distribution(path: str, stamp: float, scene: str | None, ds: str | None, sample: int):
    from core.learning.inference import predict

    return predict(wb.load_run(path, scene, ds), [sample], return_attention=True, return_distribution=True)


path, stamp = str(ws.root / name), wb.mtime(ws.root / name)
result = None
with wb.guard("refinement"):
    result = analysis(path, stamp, split, int(limit), options, silence, scene, dataset)
if result is None:
    st.stop()
pred, ref = result
if len(pred.indices) == 0:
    st.warning(f"No samples in the {split} split.")
    st.stop()
table = pd.DataFrame({"sample": pred.indices, "error_m": pred.error_m, "map_error_m": ref.error_after_m,
                      "confidence": pred.confidence, "los": np.where(pred.los, "LOS", "NLOS"),
                      "reports": pred.num_reports, "sigma_x_m": pred.sigma[:, 0], "sigma_y_m": pred.sigma[:, 1],
                      "row": np.arange(len(pred.indices))})

# -- filters -----------------------------------------------------------------------------
st.subheader("Samples")
f = st.columns(4)
emax = float(np.ceil(table.error_m.max())) if len(table) else 1.0
err_rng = f[0].slider("Network error [m]", 0.0, max(emax, 1.0), (0.0, max(emax, 1.0)), key="ref_err")
conf_rng = f[1].slider("Confidence", 0.0, 1.0, (0.0, 1.0), key="ref_conf")
los = f[2].selectbox("Line of sight", ["all", "LOS", "NLOS"], key="ref_los")
rmin, rmax = int(table.reports.min()), int(table.reports.max())
rep_rng = f[3].slider("Valid reports", rmin, max(rmax, rmin + 1), (rmin, max(rmax, rmin + 1)), key="ref_rep")
shown = table[table.error_m.between(*err_rng) & table.confidence.between(*conf_rng) & table.reports.between(*rep_rng)]
if los != "all":
    shown = shown[shown.los == los]
shown = shown.sort_values("error_m", ascending=False)
st.caption(f"{len(shown)} of {len(table)} samples match; median error: network {shown.error_m.median():.2f} m, "
           f"network + MAP {shown.map_error_m.median():.2f} m (sorted worst network error first)."
           if len(shown) else "No sample matches the filters.")
st.dataframe(shown[["sample", "error_m", "map_error_m", "confidence", "los", "reports", "sigma_x_m", "sigma_y_m"]]
             .round(3), hide_index=True, width="stretch", height=240)
if shown.empty:
    st.stop()

# -- one sample ----------------------------------------------------------------------------
st.subheader("One sample")
sample = st.selectbox("Sample", shown["sample"].tolist(), key="ref_sample")
i = int(table.loc[table["sample"] == sample, "row"].iloc[0])
site_names = [str(site.get("name", k)) for k, site in enumerate(run.radio_map.attrs.get("sites") or [])]
s = st.columns(3)
centre_on = s[0].selectbox("Centre the view on", ["network estimate", "MAP estimate", "ground truth"], key="ref_centre")
centre = {"network estimate": pred.xy[i], "MAP estimate": ref.xy[i], "ground truth": pred.true_xy[i]}[centre_on]
reach = max(float(np.abs(p - centre).max()) for p in (pred.xy[i], ref.xy[i], pred.true_xy[i]))
half = s[1].number_input("Half-width [m]", min_value=2.0, max_value=300.0, key=f"ref_half_{sample}_{centre_on}",
                         value=float(min(max(ref.search.window_m, 1.1 * reach + 2.0), 300.0)),
                         help="Default: the search window, widened to show the truth and both estimates.")
st.markdown(f"Error: network **{ref.error_before_m[i]:.2f} m** → MAP **{ref.error_after_m[i]:.2f} m** "
            f"(won by the start **{ref.source_name(i)}**; posterior {ref.posterior_before[i]:.2f} → "
            f"{ref.posterior_after[i]:.2f} nats). σ = ({pred.sigma[i, 0]:.1f}, {pred.sigma[i, 1]:.1f}) m, "
            f"confidence {pred.confidence[i]:.2f}, {int(pred.num_reports[i])} reports.")
if silence:
    st.caption(f"Silence term: the sites this sample's reports did not hear add {ref.silence_before[i]:.2f} nats "
               f"at the network's estimate and {ref.silence_after[i]:.2f} at the MAP estimate (in the NLL and the "
               "posterior above; 0 when its latest report had no free slot).")
bound_cov = None
with wb.guard("Cramér–Rao bound"):
    covs = bound(path, stamp, split, int(limit), float(window_s), scene, dataset)
    bound_cov = None if covs is None else covs[i]
if bound_cov is not None:
    rms = float(np.sqrt(np.trace(bound_cov)))
    st.caption(f"Cramér–Rao bound of the reports pooled over {window_s:g} s (at their true positions, the "
               f"dataset's noise): RMS {rms:.2f} m — the green ellipses around the truth; an efficient estimator's "
               f"errors would lie there. The error of network + MAP is {ref.error_after_m[i] / rms:.1f}× it."
               if np.isfinite(rms) else "Cramér–Rao bound: the pooled reports do not determine the position.")
    if is_corrected(run.radio_map):
        st.caption(BOUND_CAVEAT[0].upper() + BOUND_CAVEAT[1:] + ".")
views = st.columns(2)
with wb.guard("likelihood surface"):
    surf = surface(path, stamp, split, int(limit), options, silence, scene, dataset, i, float(half),
                   (float(centre[0]), float(centre[1])))
    layers = list(figures.surface_layers(surf, site_names))
    layer = s[2].selectbox("Surface", layers, key="ref_layer",
                           help="The posterior, the likelihood of all sites, the prior, one reported site's term, "
                                "or (silence term on) what the sites it did not hear add.")
    views[0].plotly_chart(figures.likelihood_surface(
        surf, layer, true_xy=pred.true_xy[i], network_xy=pred.xy[i], sigma=pred.sigma[i] * sigma_scale, map_xy=ref.xy[i],
        path=ref.path[:, i], path_labels=ref.path_labels, starts=ref.starts[i], start_labels=ref.start_labels,
        site_names=site_names, title=f"Sample {sample}: {layer} around the {centre_on} (Δ from the best in view)",
        bound_cov=bound_cov),
        key="ref_surface")
with wb.guard("network distribution"):
    net = distribution(path, stamp, scene, dataset, int(sample))
    agnostic = cands.is_agnostic(net)
    cand_xy = cands.candidate_view(net, 0).xy if agnostic else None
    sub = (subpoint_xy(net, 0, run.model.spec.grid_size), net.subpoint_prob[0]) if net.subpoint_prob is not None else (None, None)
    sites = run.radio_map.attrs.get("sites")
    kw = dict(true_xy=pred.true_xy[i], network_xy=pred.xy[i], map_xy=ref.xy[i], sigma=pred.sigma[i], cand_xy=cand_xy,
              sub_xy=sub[0], sub_prob=sub[1], sites=sites)
    views[1].plotly_chart(netfig.network_heatmap(
        net.cell_prob[0], net.cell_bounds, window=(float(centre[0]), float(centre[1]), float(half)),
        title=f"The network's distribution for sample {sample}: coarse cells"
              + (" and the fine head's sub-points" if agnostic else "") + " (same view)", **kw), key="ref_network")
    with st.expander("The network's distribution over the whole scene"):
        st.plotly_chart(netfig.network_heatmap(
            net.cell_prob[0], net.cell_bounds, geometry=wb.geometry(run.scene or scene),
            title=f"The network's distribution for sample {sample} over the scene: log10 P of every coarse cell" + (" and the candidate cells" if agnostic else ""),
            **kw), key="ref_network_scene")
    st.caption("Right: the network's own belief, coarse to fine — log10 P of each coarse cell (softmax of its "
               "coarse logits)" + ("; the scene-agnostic model's candidate cells (cyan squares) and its fine head's "
                                   "weights over the sub-points of the chosen cell (green)" if agnostic else "")
               + "; its Gaussian (σ ellipses) is the MAP search's prior. Left: what the map says.")
with wb.guard("residuals"):
    from core.learning.inference import residual_table, serving_table

    st.markdown("**Residuals per reported site** in σ units: (measured − calibrated bias − map) / (calibrated "
                "scale / √reports), at the network's estimate and at the MAP estimate; NLL in nats.")
    st.dataframe(residual_table(run, ref, i).round(2), hide_index=True, width="stretch", key="ref_residuals")
    serving = serving_table(ref, i)
    if len(serving):
        st.dataframe(serving.round(2), hide_index=True, key="ref_serving")
    cols = st.columns(2)
    cols[0].plotly_chart(figures.posterior_along_path(ref.path_posterior[:, i], ref.path_labels), key="ref_path")
    feature = cols[1].selectbox("Map feature under the path", list(run.radio_map.features), key="ref_feature")
    best = 2 + int(np.argmin(ref.path_posterior[2:, i]))  # the MAP estimate: the best point of the polish
    cols[1].plotly_chart(figures.sample_map(run.radio_map, feature, pred.true_xy[i], pred.xy[i], pred.sigma[i],
                                            ref.path[: best + 1, i], None, wb.geometry(run.scene or scene),
                                            title=f"The MAP path on the {feature} map", end_name="MAP estimate"),
                         key="ref_map")

# -- batch ---------------------------------------------------------------------------------
st.subheader("Batch summary")
rows = shown["row"].to_numpy()
before, after, moved = ref.error_before_m[rows], ref.error_after_m[rows], ref.refined[rows]
m = st.columns(4)
m[0].metric("Median error, network", f"{np.median(before):.2f} m")
m[1].metric("Median error, network + MAP", f"{np.median(after):.2f} m",
            delta=f"{np.median(after) - np.median(before):+.2f} m", delta_color="inverse")
m[2].metric("Samples refined", f"{int(moved.sum())} / {len(rows)}")
m[3].metric("P90 network → MAP", f"{np.percentile(before, 90):.2f} → {np.percentile(after, 90):.2f} m")
st.plotly_chart(figures.refinement_summary(before, after, moved), key="ref_summary")
