"""Refinement inspector: why a prediction is wrong, and what refinement does to it."""

import numpy as np
import pandas as pd
import streamlit as st

import app_widgets as wb
from core.viz import plots as figures

wb.ensure_frame()
st.title("Refinement inspector")
ws = wb.workspace()
scene = wb.active_scene()
st.caption("Test-time refinement moves a prediction downhill on the physics loss: the mismatch between the "
           "measured features and the radio map at the predicted position (plus a prior that keeps it near the "
           "network's estimate, scaled by its σ).")

c = st.columns([3, 1, 1])
name = wb.pick_run(ws, scene, c[0], key="ref_run")
split = c[1].selectbox("Split", ["test", "val", "train"], key="ref_split")
limit = c[2].number_input("Samples (max)", min_value=50, max_value=20000, value=2000, step=250, key="ref_limit")

run = None
with wb.guard(f"run {name}"):
    run = wb.load_run(ws.root / name)
if run is None:
    st.stop()


@st.cache_data(show_spinner="Predicting…", max_entries=16)
def predictions(path: str, stamp: float, split: str, limit: int) -> pd.DataFrame:
    from core.learning.inference import predict

    r = wb.load_run(path)
    idx = r.dataset.indices(split)[:limit]
    p = predict(r, idx)
    return pd.DataFrame({"sample": p.indices, "error_m": p.error_m, "confidence": p.confidence,
                         "los": np.where(p.los, "LOS", "NLOS"), "reports": p.num_reports,
                         "x_m": p.xy[:, 0], "y_m": p.xy[:, 1], "true_x_m": p.true_xy[:, 0], "true_y_m": p.true_xy[:, 1],
                         "sigma_x_m": p.sigma[:, 0], "sigma_y_m": p.sigma[:, 1]})


@st.cache_data(show_spinner="Refining…", max_entries=64)
def refined(path: str, stamp: float, indices: tuple[int, ...], steps: int, lr: float, threshold: float):
    from core.learning.inference import predict, refine_prediction

    r = wb.load_run(path)
    p = predict(r, np.array(indices))
    return p, refine_prediction(r, p, steps=steps, lr=lr, threshold=threshold)


path, stamp = str(ws.root / name), wb.mtime(ws.root / name)
table = None
with wb.guard("predictions"):
    table = predictions(path, stamp, split, int(limit))
if table is None or table.empty:
    st.warning(f"No samples in the {split} split.")
    st.stop()

# -- filters -----------------------------------------------------------------------------
st.subheader("Samples")
f = st.columns(4)
emax = float(np.ceil(table.error_m.max())) if len(table) else 1.0
err_rng = f[0].slider("Error [m]", 0.0, max(emax, 1.0), (0.0, max(emax, 1.0)), key="ref_err")
conf_rng = f[1].slider("Confidence", 0.0, 1.0, (0.0, 1.0), key="ref_conf")
los = f[2].selectbox("Line of sight", ["all", "LOS", "NLOS"], key="ref_los")
rmin, rmax = int(table.reports.min()), int(table.reports.max())
rep_rng = f[3].slider("Valid reports", rmin, max(rmax, rmin + 1), (rmin, max(rmax, rmin + 1)), key="ref_rep")
shown = table[table.error_m.between(*err_rng) & table.confidence.between(*conf_rng) & table.reports.between(*rep_rng)]
if los != "all":
    shown = shown[shown.los == los]
shown = shown.sort_values("error_m", ascending=False)
st.caption(f"{len(shown)} of {len(table)} samples match; median error {shown.error_m.median():.2f} m "
           "(sorted worst first)." if len(shown) else "No sample matches the filters.")
st.dataframe(shown[["sample", "error_m", "confidence", "los", "reports", "sigma_x_m", "sigma_y_m"]].round(3),
             hide_index=True, width="stretch", height=240)
if shown.empty:
    st.stop()

# -- one sample ----------------------------------------------------------------------------
st.subheader("One sample")
cfg = run.config.physics_loss.refinement
s = st.columns(5)
sample = s[0].selectbox("Sample", shown["sample"].tolist(), key="ref_sample")
feature = s[1].selectbox("Map feature", list(run.radio_map.features), key="ref_feature")
steps = s[2].number_input("Steps", min_value=1, max_value=200, value=int(cfg.num_steps), key="ref_steps")
lr = s[3].number_input("Step size", min_value=1e-4, max_value=100.0, value=float(cfg.learning_rate), format="%.4f",
                       key="ref_lr")
threshold = s[4].number_input("Refine if confidence <", min_value=0.0, max_value=1.01,
                              value=float(cfg.min_confidence_threshold), key="ref_thr",
                              help="Only samples whose confidence is below this threshold are refined.")

with wb.guard("refinement"):
    pred, res = refined(path, stamp, (int(sample),), int(steps), float(lr), float(threshold))
    step = st.slider("Refinement step", 0, int(res.steps), int(res.steps), key=f"ref_step_{sample}_{steps}")
    if not res.refined[0]:
        st.info(f"This sample's confidence {pred.confidence[0]:.2f} is not below the threshold "
                f"{threshold:.2f}, so refinement leaves it where it is.")
    geometry = wb.geometry(run.scene or scene)
    err_step = float(np.hypot(*(res.path[step, 0] - pred.true_xy[0])))
    st.markdown(f"Error: network **{res.error_before_m[0]:.2f} m** → step {step}: **{err_step:.2f} m** "
                f"(final {res.error_after_m[0]:.2f} m). σ = ({pred.sigma[0, 0]:.1f}, {pred.sigma[0, 1]:.1f}) m, "
                f"confidence {pred.confidence[0]:.2f}.")
    st.plotly_chart(figures.sample_map(run.radio_map, feature, pred.true_xy[0], pred.xy[0], pred.sigma[0],
                                       res.path[:, 0], step, geometry,
                                       title=f"Sample {sample} on the {feature} map: truth, prediction (1σ, 2σ), "
                                             f"refinement path to step {step}"), key="ref_map")
    cols = st.columns(2)
    cols[0].plotly_chart(figures.residual_bars(res.features, res.residual_before[0], res.residual_after[0],
                                               title="Per-feature residuals (measured − map), before and after"),
                         key="ref_resid")
    cols[1].plotly_chart(figures.loss_per_step(res.loss[:, 0], title="Refinement objective per step"),
                         key="ref_loss")

# -- batch ---------------------------------------------------------------------------------
st.subheader("Batch summary")
top = int(min(len(shown), 2000))
n_batch = (st.slider("Samples refined (the filtered ones, worst first)", 1, top, min(top, 500), key="ref_batch")
           if top > 1 else top)
with wb.guard("batch refinement"):
    batch = tuple(int(i) for i in shown["sample"].tolist()[:n_batch])
    bpred, bres = refined(path, stamp, batch, int(steps), float(lr), float(threshold))
    moved = bres.refined
    m = st.columns(4)
    m[0].metric("Median error before", f"{np.median(bres.error_before_m):.2f} m")
    m[1].metric("Median error after", f"{np.median(bres.error_after_m):.2f} m",
                delta=f"{np.median(bres.error_after_m) - np.median(bres.error_before_m):+.2f} m", delta_color="inverse")
    m[2].metric("Samples refined", f"{int(moved.sum())} / {len(batch)}")
    if moved.any():
        m[3].metric("Median of refined ones", f"{np.median(bres.error_before_m[moved]):.2f} → "
                                                f"{np.median(bres.error_after_m[moved]):.2f} m")
    st.plotly_chart(figures.refinement_summary(bres.error_before_m, bres.error_after_m, moved), key="ref_summary")
