"""Scenes (home): each scene in 3D, what exists for it, and the active scene."""

import pandas as pd
import streamlit as st

import app_widgets as wb
from core.jobs.manager import generate_maps_spec

wb.ensure_frame()
st.title("Scenes")
st.caption("Pick the active scene in the sidebar; every page then works on it. "
           "Below: the scene in 3D and what exists for it.")

ws = wb.workspace()
scene = wb.active_scene()

# -- what exists, for every scene -----------------------------------------------------
with wb.guard("scene table"):
    names = wb.scene_names(str(ws.root))
    rows = []
    for name in names:
        status = ws.scene_status(name)
        rows.append({
            "scene": name,
            "active": "●" if name == scene else "",
            "radio map": status.radio_map.state,
            "dataset": status.dataset.state,
            "worlds": ", ".join(e.world for e in ws.datasets(name) if e.status.ok),
            "models": len([r for r in status.runs if r.has_checkpoint]),
        })
    with st.expander(f"All {len(rows)} scenes and what exists for them", expanded=False):
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")

st.subheader(f"Active scene: {scene}")
status = ws.scene_status(scene)
cols = st.columns(3)
cols[0].metric("Radio map", status.radio_map.state, help=str(status.radio_map.path))
cols[1].metric("Dataset", status.dataset.state, help=str(status.dataset.path))
cols[2].metric("Trained models", len([r for r in status.runs if r.has_checkpoint]))
if status.dataset.ok:
    wb.dataset_model_box(status.dataset.path)
others = [e for e in ws.datasets(scene) if e.path != status.dataset.path]
if others:
    st.caption(f"Other datasets of {scene} (pick one in the sidebar; every page then reads it):")
    st.dataframe(pd.DataFrame([{"dataset": ws.rel(e.path), "state": e.status.state, "world": e.world_summary}
                               for e in others]), hide_index=True, width="stretch")

# -- the 3D view ---------------------------------------------------------------------
radio_map = None
if status.radio_map.ok:
    with wb.guard("radio map"):
        radio_map = wb.load_map(status.radio_map.path)
geometry = wb.geometry(scene)

view_cols = st.columns([2, 2, 3])
view = view_cols[0].radio("View", ["3D", "Top"], horizontal=True, key="scene_view")
feature = None
if radio_map is not None:
    feature = view_cols[1].selectbox("Coverage layer", list(radio_map.features), key="scene_feature")

if geometry is None and radio_map is None:
    st.info("Nothing to draw yet for this scene: no geometry and no radio map.")
else:
    with wb.guard("3D view"):
        from core.viz.scene_deck import coverage_caption, scene_deck

        deck = scene_deck(geometry, radio_map, feature or "path_gain", pitch=50.0 if view == "3D" else 0.0,
                          bearing=-20.0 if view == "3D" else 0.0)
        st.pydeck_chart(deck, height=560)
        notes = []
        if radio_map is not None:
            notes.append(f"Map coverage: {radio_map.coverage_text()}.")
            notes.append(coverage_caption(radio_map, feature))
        if geometry is not None:
            notes.append(f"{len(geometry.buildings)} buildings, {len(geometry.sites)} sites.")
        st.caption(" ".join(notes) + " Drag to pan, right-drag to rotate, scroll to zoom.")

# -- what is missing, with the button that makes it ----------------------------------
ray = None
with wb.guard("map and dataset jobs"):
    ray = wb.ray_choice(key="scene_ray")
if not status.radio_map.ok:
    with wb.guard("map job"):
        wb.missing_box("Radio map", status.radio_map.message,
                       generate_maps_spec(scene, ws.rel(ws.radio_maps_dir), force=status.radio_map.state == "corrupt",
                                          ray=ray),
                       f"Generate the radio map of {scene}", key="make_map")
if not status.dataset.ok:
    wb.missing_box("Measurement dataset", status.dataset.message, None, "", key="make_dataset")
    wb.dataset_form(scene, ws.rel(ws.dataset_path(scene)), ws.rel(ws.radio_maps_dir), key="make_dataset",
                    button=f"Make the dataset of {scene}", force=status.dataset.state == "corrupt", ray=ray)
else:
    with st.expander("Make the dataset again with other measurement settings"):
        st.caption(f"Replaces {ws.rel(ws.dataset_path(scene))}; runs trained on the current dataset are then "
                   "refused (their lineage names it).")
        wb.dataset_form(scene, ws.rel(ws.dataset_path(scene)), ws.rel(ws.radio_maps_dir), key="remake_dataset",
                        button=f"Make the dataset of {scene} again", force=True, ray=ray)
with st.expander("Merge datasets of one world (more labelled walks, the same val and test UEs)"):
    wb.merge_box(ws, scene)
if not any(r.has_checkpoint for r in status.runs):
    st.info(f"No trained model for {scene} yet: train one on the Training page.", icon=":material/monitoring:")
    st.page_link("pages/training.py", label="Go to Training", icon=":material/monitoring:")
else:
    with st.expander("Models of this scene"):
        st.dataframe(pd.DataFrame([{"run": r.name, "state": r.state, "why": r.cause, "epochs": r.epochs_done,
                                    "λ_phys": r.lambda_phys, "best val median [m]": r.best_val_median_m}
                                   for r in status.runs]), hide_index=True, width="stretch")

with st.expander("Make a procedural city (docs/cities.md)"):
    wb.city_form(ws)
with st.expander("The city corpus: many cities with their maps and datasets"):
    wb.corpus_box(ws, ray)

wb.job_panel(("generate-maps", "make-dataset", "merge-datasets", "make-city", "make-corpus"), key="scene_jobs", limit=3,
             title="Map, dataset and city jobs")
