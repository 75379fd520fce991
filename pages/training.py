"""Training: launch from presets, follow jobs and live curves, compare runs, ablate."""

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

import app_widgets as wb
from core import REPO_ROOT
from core.errors import CoreError
from core.jobs.manager import ablate_spec, evaluate_spec, train_spec
from core.learning.config import Config, load_config
from core.learning.evaluation import group_table, held_out_summary, method_table
from core.stores.lineage import check_scene_stores
from core.stores.output import check_writable
from core.stores.run import evaluations, is_taken, read_metrics, run_info
from core.stores.workspace import PRESETS, store_status
from core.viz import plots as figures

wb.ensure_frame()
st.title("Training")
ws = wb.workspace()
scene = wb.active_scene()
dataset_path = wb.active_dataset(scene)  # the sidebar's dataset (world)
map_path = ws.map_path(scene)
st.caption(f"Scene **{scene}** · dataset `{ws.rel(dataset_path)}` · runs in `{ws.rel(ws.runs_dir)}/`. "
           "Loss: L_total = L_coarse + λ_fine·L_fine + λ_phys·L_phys; λ_phys is the one switch of the physics "
           "term (0 = off), ramped in after a warm-up, its gradient reaching only the position head.")

ds_status = store_status(dataset_path, "measurement_dataset")
map_status = store_status(map_path, "radio_map")
if not ds_status.ok:
    wb.missing_box("No dataset to train on" if ds_status.state == "missing" else "Dataset broken", ds_status.message,
                   None, "", key="train_make_ds")
    wb.dataset_form(scene, ws.rel(dataset_path), ws.rel(ws.radio_maps_dir), key="train_make_ds",
                    button=f"Make the dataset of {scene}", force=ds_status.state == "corrupt")
else:
    wb.dataset_model_box(dataset_path, table=False)
if not map_status.ok:
    st.warning(f"**Radio map**: {map_status.message}. Training needs it; generate it on the Radio maps page.")
    st.page_link("pages/radio_maps.py", label="Go to Radio maps")
if ds_status.ok and map_status.ok:
    try:
        check_scene_stores(dataset_path, map_path)
    except CoreError as exc:
        st.error(f"Cannot train on scene {scene}: {exc}", icon=":material/link_off:")


def preset_values(preset: str) -> dict:
    """The form's defaults from the preset's validated config."""
    config = Config()
    with wb.guard(f"preset {preset}"):
        config = load_config(ws.preset_path(preset))
    return {"lambda_phys": config.physics_loss.lambda_phys, "label_fraction": config.data.label_fraction,
            "split": config.data.split, "epochs": config.training.epochs, "batch_size": config.training.batch_size,
            "learning_rate": config.training.learning_rate, "model_preset": config.model.preset}


def portable(path) -> str:
    """A path for the run's config: repo-relative in the repository (short commands),
    absolute in another workspace (so the app, running from the repository, finds it too)."""
    return ws.rel(path) if ws.root == REPO_ROOT else str(path)


# -- launch ------------------------------------------------------------------------------
st.subheader("Launch a training run")
preset = st.selectbox("Preset", PRESETS, index=1, key="train_preset",
                      format_func=lambda p: {"baseline": "baseline (λ_phys = 0)", "model": "model (λ_phys = 0.1)",
                                             "strong_physics": "strong physics (λ_phys = 0.5)",
                                             "agnostic": "scene-agnostic model (λ_phys = 0.1)"}[p])
values = preset_values(preset)
if st.session_state.get("_name_preset") != preset:  # a fresh default name per preset, kept while typing
    st.session_state["train_name"] = f"{preset}-{time.strftime('%m%d-%H%M%S')}"
    st.session_state["_name_preset"] = preset
with st.form("train_form"):
    cols = st.columns(4)
    lam = cols[0].number_input("λ_phys", min_value=0.0, max_value=10.0, value=values["lambda_phys"], step=0.05,
                               format="%.3f", key=f"lam_{preset}", help="0 = the physics term is off")
    epochs = cols[1].number_input("Epochs", min_value=1, max_value=1000, value=values["epochs"], key=f"ep_{preset}")
    batch = cols[2].number_input("Batch size", min_value=8, max_value=8192, value=values["batch_size"], step=32,
                                 key=f"bs_{preset}")
    lr = cols[3].number_input("Learning rate", min_value=1e-6, max_value=1.0, value=values["learning_rate"],
                              format="%.5f", key=f"lr_{preset}")
    cols = st.columns(3)
    sizes = ["tiny", "small", "base", "large"]
    model_preset = cols[0].selectbox("Model size", sizes, index=sizes.index(values["model_preset"])
                                     if values["model_preset"] in sizes else 1, key=f"mp_{preset}",
                                     help="tiny/small train on a 2-core CPU; base/large are for GPUs")
    max_samples = cols[1].number_input("Use the first N samples (0 = all)", min_value=0, value=0, step=1000)
    name = cols[2].text_input("Run name", key="train_name", help="the run is written to runs/<name>")
    cols = st.columns(3)
    fraction = cols[0].number_input("Labelled train walks (fraction)", min_value=0.001, max_value=1.0,
                                    value=float(values["label_fraction"]), step=0.05, format="%.3f",
                                    key=f"frac_{preset}", help="the other walks train through the physics term only")
    split = cols[1].selectbox("Split", ["random", "spatial"], index=["random", "spatial"].index(values["split"]),
                              key=f"split_{preset}", help="spatial: whole map blocks are held out for val and test")
    with_dataset = ws.scenes_with_dataset()
    corpus = {c: p for c, p in ws.corpus_datasets().items() if c not in with_dataset}  # corpus cities with a dataset
    trainable = with_dataset + list(corpus)
    label = lambda s: f"{s} (corpus)" if s in corpus else s  # noqa: E731
    cols = st.columns(2)
    train_scenes = cols[0].multiselect("Training scenes", trainable, default=[scene] if scene in with_dataset else [],
                                       key="train_scenes", format_func=label,
                                       help="one model on all of them: the scenes that have a dataset and the "
                                            f"cities of the corpus ({ws.rel(ws.corpus_dir)}/datasets)")
    holdout = cols[1].selectbox("Held-out scene", ["(none)"] + trainable, key="train_holdout", format_func=label,
                                help="never trained on; evaluate the run there with python -m core evaluate --scene")
    teachers = st.multiselect("Learn from runs (distillation)", [r.name for r in ws.runs(scene)], key="train_teachers",
                              help="runs trained on the same dataset, split and grid: the new run also learns their "
                                   "pooled predictions (training.distill_from; measured on realistic etoile it did not "
                                   "beat a plain run: docs/model.md)")
    go = st.form_submit_button("Start training", type="primary")
clean = name.strip()
picked = {**corpus, scene: dataset_path}  # the active scene trains on the sidebar's dataset (world), a city its corpus one
try:
    run_dir, name_problem = ws.run_path(clean), ""
except CoreError as exc:
    run_dir, name_problem = None, str(exc)
if go and name_problem:
    wb.refuse(f"{name_problem}. Nothing was started.")
elif go and is_taken(run_dir):
    wb.refuse(f"Run name {clean!r} is taken: {ws.rel(run_dir)} already holds a run. "
              "Pick another name; nothing was started.")
elif go and (problem := wb.scenes_problem(ws, train_scenes, None if holdout == "(none)" else holdout, portable, picked)):
    wb.refuse(f"Not started: {problem}")
elif go:
    with wb.guard("training"):
        overrides = {"physics_loss.lambda_phys": float(lam), "training.epochs": int(epochs),
                     "training.batch_size": int(batch), "training.learning_rate": float(lr),
                     "model.preset": model_preset,
                     **ws.training_overrides(train_scenes, None if holdout == "(none)" else holdout, portable, picked)}
        if fraction < 1.0:
            overrides["data.label_fraction"] = float(fraction)
        if split != "random":
            overrides["data.split"] = split
        if ws.radio_maps_dir != REPO_ROOT / "radio_maps":
            overrides["physics_loss.radio_maps_dir"] = portable(ws.radio_maps_dir)
        if max_samples:
            overrides["data.max_samples"] = int(max_samples)
        if teachers:
            overrides["training.distill_from"] = json.dumps([portable(ws.root / t) for t in teachers])
        job_id = wb.launch(train_spec(ws.rel(ws.preset_path(preset)), ws.rel(run_dir), overrides))
        if job_id is not None:
            st.session_state["curve_run"] = ws.rel(run_dir)
            st.session_state["_name_preset"] = None  # the next run gets a new default name

wb.job_panel(("train", "ablate"), key="train_jobs", limit=4, title="Training and ablation jobs")

# -- live curves ---------------------------------------------------------------------------
st.subheader("Training curves")
runs = ws.runs()
run_names = [r.name for r in runs]
pending = st.session_state.get("curve_run")
if pending and pending not in run_names:
    run_names = [pending] + run_names  # launched, directory not written yet
if not run_names:
    st.info("No runs yet: launch one above.")
else:
    default = run_names.index(pending) if pending in run_names else 0
    picked = st.selectbox("Run", run_names, index=default, key="curve_pick")
    active_outputs = {j.output for j in wb.jobs().active()}
    # live while a job writes it, or while its status says it trains (e.g. started from a terminal)
    live = (str((ws.root / picked).resolve()) in active_outputs
            or ((ws.root / picked).is_dir() and run_info(ws.root / picked).state == "running"))

    @st.fragment(run_every=3.0 if live else None)
    def curves() -> None:
        rows = read_metrics(ws.root / picked)
        st.plotly_chart(figures.loss_curves(rows, title=f"{picked}: loss terms and validation error per epoch"
                                            + (" (live)" if live else "")), key="curves_chart")
        st.plotly_chart(figures.gradient_balance(rows, title=f"{picked}: gradient balance of the loss terms"),
                        key="grad_chart")
        if rows:
            last = rows[-1]
            val = (f"val median {last['val_median_m']:.2f} m, P90 {last.get('val_p90_m') or float('nan'):.2f} m"
                   if last.get("val_median_m") is not None else "no validation (model selection: last)")
            st.caption(f"Epoch {last.get('epoch', len(rows))}: {val}, {last.get('epoch_s', float('nan')):.1f} s/epoch.")

    with wb.guard("curves"):
        curves()

# -- compare -----------------------------------------------------------------------------
st.subheader("Compare runs")
if runs:
    table = pd.DataFrame([{"run": r.name, "scene": r.scene, "scenes": ", ".join(r.scenes),
                           "held out": r.holdout_scene or "", "state": r.state, "why": r.cause,
                           "λ_phys applied": r.lambda_phys,
                           "labels": r.label_fraction, "split": r.split, "epochs": r.epochs_done,
                           "best val median [m]": r.best_val_median_m, "checkpoint": r.has_checkpoint} for r in runs])
    st.dataframe(table, hide_index=True, width="stretch")

shipped = [r for r in runs if r.path.resolve() in {p.resolve() for p in ws.shipped_run_paths()} and r.holdout_scene]
for info in shipped:  # a shipped run on several scenes: what it does on the scene it never trained on
    with wb.guard(info.name):
        held = [row for path in evaluations(info.path)
                if (row := held_out_summary(json.loads(path.read_text()))) is not None]
        kind = {"agnostic": "scene-agnostic", "memorizing": "memorizing"}.get(info.config.model.kind, "") \
            if info.config else ""
        st.markdown(f"**{info.name}** (shipped, read-only): a {kind} model trained on {', '.join(info.scenes)}; "
                    f"**{info.holdout_scene}** held out, never trained on. Its evaluation there:")
        if held:
            st.dataframe(pd.DataFrame(held), hide_index=True, width="stretch", key=f"held_{info.name}")
        else:
            st.caption(f"No evaluation on {info.holdout_scene} yet (Evaluate on a scene, below).")


# -- evaluate on a scene (in-scene or held out) ------------------------------------------
st.subheader("Evaluate on a scene")
st.caption("A run evaluated on one of its training scenes or on a scene it never trained on, with and without "
           "test-time MAP refinement on that scene's map; the result lists every training scene next to it.")
evaluable = [r for r in runs if r.has_checkpoint]
if not evaluable:
    st.info("No run with a checkpoint yet.")
else:
    cols = st.columns([2, 2, 1, 1, 1])
    eval_run = cols[0].selectbox("Run", [r.name for r in evaluable], key="eval_run")
    info = next(r for r in evaluable if r.name == eval_run)
    trained = list(info.scenes or [info.scene])
    choices = list(dict.fromkeys(([info.holdout_scene] if info.holdout_scene else []) + trained
                                 + ws.scenes_with_dataset()))
    eval_scene = cols[1].selectbox("Scene", choices, key="eval_scene",
                                   format_func=lambda s: f"{s} (held out)" if s == info.holdout_scene else
                                   (f"{s} (trained on)" if s in trained else s))
    eval_refine = cols[2].checkbox("MAP refinement", value=True, key="eval_refine")
    eval_baselines = cols[3].checkbox("Baselines", value=False, key="eval_baselines",
                                      help="kNN, ML map matching, multilateration and exhaustive map matching "
                                           "(the calibrated likelihood over the whole map, no network)")
    eval_go = cols[4].button("Evaluate", key="eval_go")
    other = dataset_path if eval_scene == scene and dataset_path != ws.dataset_path(scene) else None
    if other is None and not ws.dataset_path(eval_scene).exists():  # a corpus city: its dataset in the corpus
        other = ws.corpus_datasets().get(eval_scene)
    # the scene's corrected map (correct-map, Radio maps page) in place of the dataset's: the run's own scene only
    corrected = ws.corrected_map_path(eval_scene)
    map_choices = ["dataset"] + (["corrected"] if eval_scene == info.scene
                                 and store_status(corrected, "radio_map").ok else [])
    eval_map = st.radio("Radio map", map_choices, horizontal=True, key="eval_map",
                        format_func={"dataset": "the dataset's map",
                                     "corrected": f"the corrected map ({ws.rel(corrected)})"}.get,
                        help="the corrected map (python -m core correct-map) is read in place of the twin the "
                             "dataset records (--radio-map); it reads the run's own dataset of its first scene")
    eval_prior = st.radio("Network prior's σ in MAP", ["run", "auto"], horizontal=True, key="eval_prior",
                          disabled=not eval_refine,
                          format_func={"run": "the run's (physics_loss.refinement.prior_sigma_scale × the network's)",
                                       "auto": "scale and floor chosen on the val split"}.get,
                          help="the prior's σ = max(s × the network's, floor); auto tries s = 2 … 1/16 on the val "
                               "split, keeps the smallest network + MAP median, then the floor 1, ½ or ¼ m at that s "
                               "(--prior-sigma-scale auto, both recorded in the result)")
    prior_scale = "auto" if eval_refine and eval_prior == "auto" else None
    o = st.columns(2)
    eval_scan = o[0].number_input("Scan starts (0: the run's)", min_value=0, max_value=64, value=0, key="eval_scan",
                                  disabled=not eval_refine,
                                  help="the MAP search also starts from the N best points of the exact scan of the "
                                       "likelihood alone (--scan-starts N)")
    eval_basins = o[1].number_input("Whole-walk basins (0: the run's)", min_value=0, max_value=16, value=0,
                                    key="eval_basins", disabled=not (eval_refine or eval_baselines),
                                    help="every whole walk also starts from up to N runner-up basins of its snapshot "
                                         "search and keeps the one whose walk posterior ends lowest (--walk-basins N)")
    search = dict(prior_sigma_scale=prior_scale, scan_starts=int(eval_scan) if eval_refine and eval_scan else None,
                  walk_basins=int(eval_basins) if (eval_refine or eval_baselines) and eval_basins else None)
    peers = [r.name for r in evaluable if r.name != eval_run and (r.dataset, r.scene, r.split) == (info.dataset, info.scene, info.split)]
    eval_members = st.multiselect("Ensemble with (other runs of this dataset)", peers, key="eval_ensemble",
                                  help="their networks are pooled with this run's (mean and mixture σ) as the "
                                       "network and MAP's prior (--ensemble); on the run's own scene, dataset and map")
    spec = None
    with wb.guard("evaluation"):
        if eval_members:
            if eval_scene != info.scene or other is not None or eval_map != "dataset":
                raise CoreError("an ensemble is evaluated on the run's own scene and dataset with the dataset's map: "
                                f"pick scene {info.scene} and its dataset")
            spec = evaluate_spec(ws.rel(ws.root / eval_run), None, "test", eval_refine, eval_baselines,
                                 ensemble=[ws.rel(ws.root / m) for m in eval_members], **search)
        elif eval_map == "corrected":
            spec = evaluate_spec(ws.rel(ws.root / eval_run), None, "test", eval_refine, eval_baselines,
                                 radio_map=ws.rel(corrected), **search)
            if other is not None and info.dataset and Path(info.dataset).name != Path(other).name:
                st.caption(f"With --radio-map the run's own dataset (`{info.dataset}`) is evaluated, not "
                           f"`{ws.rel(other)}`.")
        else:
            spec = evaluate_spec(ws.rel(ws.root / eval_run), eval_scene, "test", eval_refine, eval_baselines,
                                 dataset=ws.rel(other) if other is not None else None, **search)
        st.caption(f"`python -m core {' '.join(spec.args)}`")
    if eval_go and spec is not None:
        with wb.guard("evaluation"):
            wb.launch(spec)
    wb.job_panel(("evaluate",), key="eval_jobs", limit=3, title="Evaluation jobs")
    for path in evaluations(ws.root / eval_run):  # a shipped run's new results live in runs/evaluations/
        with wb.guard(path.name):
            result = json.loads(path.read_text())
            if "groups" in result:
                st.markdown(f"**{ws.rel(path)}** — {result.get('split', '')} split, {result.get('count', '?')} UEs: "
                            "every method in the file (errors in m, shares as fractions, cost per sample)")
                st.dataframe(method_table(result), width="stretch")
                metric = st.radio("Per UE group", ["median_m", "p90_m", "beyond_20m"], horizontal=True,
                                  key=f"eval_group_metric_{path.name}")
                st.dataframe(group_table(result, metric), width="stretch")
            rows = result.get("scenes")
            if rows:
                st.markdown(f"**{ws.rel(path)}** — test errors [m] per scene")
                st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def show_ablation(folder) -> None:
    """An ablation folder: its header, tables, median vs label fraction with CI bands, error CDFs."""
    summary = folder / "summary.json"
    if summary.exists():
        with wb.guard("summary.json"):
            st.markdown(json.loads(summary.read_text()).get("header", ""))
    if (folder / "table.csv").exists():
        with wb.guard("table.csv"):
            table = pd.read_csv(folder / "table.csv")
            st.caption("Test metrics per split, label fraction, refinement, group and arm: mean ± sd over seeds "
                       "and Δ against λ = 0 with its 95 % CI (errors in m) — `table.csv`, readable in `table.md`")
            groups = list(table["group"].unique()) if "group" in table else []
            group = st.radio("Group", groups, horizontal=True, key=f"abl_group_{folder.name}") if groups else None
            st.dataframe(table[table["group"] == group] if group else table, hide_index=True, width="stretch")
    if (folder / "curve.csv").exists():
        with wb.guard("curve.csv"):
            curve = pd.read_csv(folder / "curve.csv")
            for split in curve["split"].unique():
                rows = curve[curve["split"] == split].to_dict("records")
                st.plotly_chart(figures.fraction_curves(rows, title=f"{split} split: test median vs label fraction "
                                                        "(95 % CI bands)"), key=f"abl_curve_{folder.name}_{split}")
    if (folder / "cdf.json").exists():
        with wb.guard("cdf.json"):
            blocks = json.loads((folder / "cdf.json").read_text())
            if blocks and all("error_m" in v for v in blocks.values()):
                blocks = {"all": blocks}  # an older ablation: one block of curves
            block = st.selectbox("CDF of", list(blocks), key=f"abl_cdf_pick_{folder.name}")
            st.plotly_chart(figures.cdf_curves(blocks[block], title=f"Test-split error CDF per method — "
                                                                    f"{ws.rel(folder)} ({block})"),
                            key=f"abl_cdf_{folder.name}")


for ablation in ws.ablations():
    with st.expander(f"Ablation: {ws.rel(ablation)}", expanded=True):
        show_ablation(ablation)


@st.cache_data(show_spinner="Predicting the test split…", max_entries=16)
def test_errors(path: str, stamp: float, limit: int = 2000) -> np.ndarray:
    from core.learning.inference import predict

    run = wb.load_run(path)
    idx = run.dataset.indices("test")[:limit]
    return predict(run, idx).error_m


with_ckpt = [r for r in runs if r.has_checkpoint]
if with_ckpt:
    ours = [r.name for r in with_ckpt if scene == r.scene or scene in r.scenes]  # trained on the active scene
    chosen = st.multiselect("Error CDF of runs (test split, up to 2,000 samples)", [r.name for r in with_ckpt],
                            default=ours[:2], key="cdf_runs",
                            help="each run on its (first) training scene; by default two runs trained on the "
                                 "active scene")
    if chosen:
        errors = {}
        for name in chosen:
            with wb.guard(f"run {name}"):
                errors[name] = test_errors(str(ws.root / name), wb.mtime(ws.root / name))
        if errors:
            st.plotly_chart(figures.error_cdf(errors, title="Localization error CDF on the test split"), key="cdf")

# -- ablation ----------------------------------------------------------------------------
st.subheader("Ablation")
st.caption("λ_phys ∈ {0, λ* tuned on val} × refinement off/on × label fractions 5/20/100 % × random and spatial "
           "split × 3 paired seeds, next to kNN, ML map matching, multilateration and exhaustive map matching; "
           "per UE group (LOS / NLOS at the latest present report, last report missing, sites heard); mean ± sd over seeds and "
           "bootstrap 95 % CIs of the change against λ = 0. Finished runs are cached; a killed ablation resumes. "
           "The full plan takes up to ~90 min on a 2-core CPU, the quick one a few minutes.")
with st.form("ablate_form"):
    out = st.text_input("Output folder", value=ws.rel(ws.runs_dir / "ablation"))
    quick = st.checkbox("Quick (tiny model, 2 epochs, first 2,000 samples)", value=False)
    start = st.form_submit_button("Start the ablation")
if start:
    with wb.guard("ablation"):
        check_writable(ws.root / out.strip(), "Output folder")  # the shipped ablation is read-only
        wb.launch(ablate_spec(scene, out.strip(), ["--quick"] if quick else []))
