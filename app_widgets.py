"""Streamlit helpers shared by ``app.py`` and the pages: the active scene, cached
loaders, error boxes and the live job panel.

Everything that is not drawing lives in ``core`` (jobs, workspace, figures, decks);
this module only glues it to Streamlit. It is the one place besides the pages that
imports streamlit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import streamlit as st

from core.errors import CoreError
from core.jobs.manager import JobConflictError, JobManager, JobSpec, make_dataset_spec
from core.stores import run as run_store
from core.stores.measurement_model import MeasurementModel
from core.stores.motion_model import MotionModel
from core.stores.workspace import CORPUS_FOLDER, DEFAULT_SCENE, Workspace, store_status
from core.stores.world_model import PRESET_NAMES as WORLD_PRESETS
from core.stores.world_model import PRESETS as WORLDS

STATUS_ICON = {"queued": ":material/schedule:", "running": ":material/autorenew:", "succeeded": ":material/check_circle:",
               "failed": ":material/error:", "cancelled": ":material/cancel:"}
POLL_S = 2.0


# -- the frame ------------------------------------------------------------------------------
def ensure_frame() -> None:
    """Make sure the page runs inside ``app.py``'s frame (navigation, sidebar, guard).

    With a ``pages/`` folder, Streamlit starts in its old multipage mode, where a first
    visit to a page URL (a bookmark, or a tab reconnecting after a restart) runs the
    page file alone, before ``app.py`` ever called ``st.navigation``. Then switch to
    ``st.navigation`` mode and rerun: the same URL now runs ``app.py`` around this page.
    """
    first_run = not st.session_state.get("_session_started")
    st.session_state["_session_started"] = True
    if not first_run:  # only a session's first run can start in the old mode (no clicks lost)
        return
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a future Streamlit: nothing to do
        return
    if getattr(PagesManager, "uses_pages_directory", None):
        PagesManager.uses_pages_directory = False
        st.rerun()


# -- workspace and the active scene -----------------------------------------------------
def workspace() -> Workspace:
    return Workspace.from_env()


@st.cache_resource(show_spinner=False)
def _job_manager(db: str | None, root: str) -> JobManager:
    return JobManager(db, cwd=root)


def jobs() -> JobManager:
    """The job manager of this workspace (``CORE_JOBS_DB`` or ``<repo>/.jobs``)."""
    ws = workspace()
    return _job_manager(os.environ.get("CORE_JOBS_DB"), str(ws.root))


@st.cache_data(show_spinner=False, ttl=30)
def scene_names(root: str) -> list[str]:
    return Workspace.from_env(root).scene_names()


def active_scene() -> str:
    """The scene every page works on (picked on the Scenes page or in the sidebar)."""
    return st.session_state.get("active_scene") or DEFAULT_SCENE


def _on_scene_change() -> None:
    st.session_state["active_scene"] = st.session_state["_scene_picker"]


def scene_picker(container=None) -> str:
    """A select box for the active scene (kept in ``st.session_state["active_scene"]``)."""
    container = container or st.sidebar
    ws = workspace()
    names = scene_names(str(ws.root))
    current = active_scene()
    if current not in names:
        names = [current] + names
    container.selectbox("Active scene", names, index=names.index(current), key="_scene_picker",
                        on_change=_on_scene_change, help="Every page works on this scene.")
    st.session_state["active_scene"] = current
    return current


@st.cache_data(show_spinner=False, ttl=30)
def _cached_datasets(root: str, scene: str, stamp: float) -> list:
    return Workspace.from_env(root).datasets(scene)


def _datasets(root: str, scene: str) -> list:
    """The scene's datasets (:meth:`Workspace.datasets`), cached until the datasets folder changes."""
    return _cached_datasets(root, scene, mtime(Workspace.from_env(root).datasets_dir))


def active_dataset(scene: str | None = None) -> Path:
    """The dataset every page reads for ``scene`` (default: the active one): the one picked in the sidebar
    (:func:`dataset_picker`), else the scene's oracle dataset ``datasets/<scene>``."""
    ws = workspace()
    scene = scene or active_scene()
    picked = st.session_state.get("active_datasets", {}).get(scene)
    if picked and any(e.path.name == picked for e in _datasets(str(ws.root), scene)):
        return ws.datasets_dir / picked
    return ws.dataset_path(scene)


def _on_dataset_change(scene: str) -> None:
    st.session_state.setdefault("active_datasets", {})[scene] = st.session_state["_dataset_picker"]


def dataset_picker(container=None) -> Path:
    """A select box for the active scene's dataset: its oracle dataset and every other world measured of it
    (e.g. ``datasets/etoile_realistic``), labelled with the world. Every page reads the one picked."""
    container = container or st.sidebar
    ws = workspace()
    scene = active_scene()
    entries = _datasets(str(ws.root), scene)
    current = active_dataset(scene)
    if not entries:
        container.caption(f"No dataset of {scene} yet.")
        return current
    names = [e.path.name for e in entries]
    labels = {e.path.name: e.label for e in entries}
    index = names.index(current.name) if current.name in names else 0
    container.selectbox("Dataset (world)", names, index=index, format_func=labels.get, key="_dataset_picker",
                        on_change=_on_dataset_change, args=(scene,),
                        help="The dataset every page reads: the scene's oracle world (measured in the map itself) or "
                             "another world of it (e.g. realistic: a perturbed twin; docs/world.md).")
    chosen = entries[index]
    if chosen.world != "oracle":
        container.caption(f"World: {chosen.world_summary}")
    return chosen.path


# -- errors ------------------------------------------------------------------------------
@contextlib.contextmanager
def guard(what: str = "") -> Iterator[None]:
    """Show a core error (or any other exception) as an error box, never a traceback."""
    try:
        yield
    except CoreError as exc:
        st.error(f"{what}: {exc}" if what else str(exc), icon=":material/warning:")
    except ImportError as exc:
        st.error(f"{what + ': ' if what else ''}a part of the project is not installed or not built yet ({exc}).",
                 icon=":material/extension:")
    except Exception as exc:  # a bug: one line on the page, the traceback in the server log
        logging.getLogger("workbench").exception("unexpected error in %s", what or "a page")
        st.error(f"Unexpected error{' in ' + what if what else ''}: {type(exc).__name__}: {exc}",
                 icon=":material/bug_report:")


# -- cached loaders (keyed by path and modification time, so new outputs show) -----------
def mtime(path: str | os.PathLike) -> float:
    """Latest modification time of ``path`` (and of its zarr.json for a store)."""
    path = Path(path)
    times = [0.0]
    for p in (path, path / "zarr.json", *(path / name for name in (run_store.BEST, run_store.CONFIG, run_store.LINEAGE))):
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times)


@st.cache_resource(show_spinner="Loading the radio map…", max_entries=8)
def _load_map(path: str, stamp: float):
    from core.stores.radio_map import RadioMap

    return RadioMap.load(path)


def load_map(path: str | os.PathLike):
    return _load_map(str(path), mtime(path))


@st.cache_resource(show_spinner="Loading the dataset…", max_entries=4)
def _load_dataset(path: str, stamp: float):
    from core.stores.dataset import MeasurementDataset

    return MeasurementDataset.load(path)


def load_dataset(path: str | os.PathLike):
    return _load_dataset(str(path), mtime(path))


@st.cache_resource(show_spinner="Reading the scene geometry (the first time takes a while)…", max_entries=32,
                   ttl=300)
def _geometry(scene: str, scenes_dir: str | None, cache_dir: str):
    """``(geometry, None)`` or ``(None, reason)``; failures are cached too (for 5 min),
    so a scene without geometry does not start a subprocess on every rerun."""
    from core.stores.workspace import cached_scene_geometry

    try:
        return cached_scene_geometry(scene, scenes_dir), None
    except ImportError as exc:
        return None, f"core.raytracing.scenes is not available ({exc})"
    except CoreError as exc:
        return None, str(exc)
    except Exception as exc:  # geometry is decoration: never break the page over it
        return None, f"{type(exc).__name__}: {exc}"


def geometry(scene: str):
    """The scene's buildings and sites, or ``None`` (with a note) when unavailable."""
    from core.stores.workspace import geometry_cache_dir

    ws = workspace()
    geo, why = _geometry(scene, str(ws.scenes_dir) if ws.scenes_dir.is_dir() else None, str(geometry_cache_dir()))
    if geo is None:
        st.caption(f"Buildings are not drawn: {why}")
    return geo


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _load_run(path: str, stamp: float, scene: str | None = None, dataset: str | None = None):
    from core.learning.inference import load_run

    return load_run(path, device="cpu", scene=scene, dataset_path=dataset)


def shown_scene(path: str | os.PathLike, scene: str | None) -> str | None:
    """The scene to show the run at ``path`` on: ``scene`` (the active one) when the run trained on several
    scenes among them ``scene``, or keeps ``scene`` held out; else None (the run's first scene)."""
    from core.stores.run import run_info

    if scene is None:
        return None
    info = run_info(path)
    return scene if (len(info.scenes) > 1 and scene in info.scenes) or info.holdout_scene == scene else None


def dataset_note(run) -> None:
    """Say which dataset (world) a page reads when it is not the one the run trained on."""
    if run.foreign_dataset:
        model = run.dataset.measurement_model
        world = model.world if model is not None else None
        st.info(f"Reading `{workspace().rel(run.dataset.ref.path)}`"
                + (f" ({world.summary()})" if world is not None else "")
                + ": another dataset of the scene this run trained on (picked in the sidebar); its likelihood "
                  "calibration is made on this dataset's train split, in memory.", icon=":material/public:")


def load_run(path: str | os.PathLike, scene: str | None = None, dataset: str | os.PathLike | None = None):
    """The run at ``path`` with the dataset and map of :func:`shown_scene` (reloaded, and so checked again
    against the run's lineage, when the run or a store changes). ``dataset``: the dataset to read (the
    sidebar's :func:`active_dataset`) when it is not the one the run trained on for that scene: another
    world of a training scene, or a held-out scene's."""
    from core import resolve_path
    from core.stores.run import input_stores, run_info

    stores = list(input_stores(path) or ())
    shown = shown_scene(path, scene)
    info = run_info(path)
    config = info.config
    trained = [resolve_path(p) for p in config.data.training_datasets] if config is not None else []
    stores += trained
    other = None
    if dataset is not None and Path(dataset).is_dir() and Path(dataset).resolve() not in [p.resolve() for p in trained]:
        from core.stores.lineage import store_ref

        # another dataset of the scene shown (another world of it): read it instead of the trained one
        target = shown or info.scene
        if store_ref(dataset, "dataset").scene == target:
            other, shown = str(Path(dataset).resolve()), target
            stores.append(Path(other))
    return _load_run(str(path), max([mtime(path), *(mtime(p) for p in stores)]), shown, other)


# -- messages that survive the job panel's automatic rerun --------------------------------
def _say(text: str, icon: str) -> None:
    st.error(text, icon=icon)
    st.session_state.setdefault("_said", []).append((text, icon))


def refuse(text: str) -> None:
    """Say why an action was not taken (an error box that survives the job panel's rerun)."""
    _say(text, ":material/block:")


def show_flash() -> None:
    """Called once per run (by app.py): repeat the messages the previous run lost to a rerun."""
    for text, icon in st.session_state.pop("_flash", []):
        st.error(text, icon=icon)
    st.session_state["_said"] = []


def _fragment_only_run() -> bool:
    """True when only a fragment reruns (a poll), not the whole page."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return bool(ctx is not None and ctx.fragment_ids_this_run)


def _rerun() -> None:
    st.session_state["_flash"] = st.session_state.get("_said", [])
    st.rerun()


# -- jobs --------------------------------------------------------------------------------
def launch(spec: JobSpec) -> int | None:
    """Start ``spec`` as a background job; shows the outcome. Returns the job id."""
    try:
        job = jobs().submit(spec)
    except JobConflictError as exc:
        _say(f"Not started: {exc}", ":material/block:")
        return None
    except CoreError as exc:
        _say(f"Could not start the job: {exc}", ":material/warning:")
        return None
    st.session_state.setdefault("launched", []).append(job.id)
    st.toast(f"Job #{job.id} started: {job.command}")
    return job.id


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _job_row(job, key: str, show_log: bool) -> None:
    manager = jobs()
    with st.container(border=True):
        top = st.columns([5, 1])
        top[0].markdown(f"**#{job.id} {job.kind}** {STATUS_ICON.get(job.status, '')} `{job.status}` · "
                        f"{_fmt_duration(job.duration_s)}")
        if job.active and top[1].button("Cancel", key=f"{key}-cancel-{job.id}", help="End the job's process group"):
            with guard(f"cancel job #{job.id}"):
                manager.cancel(job.id)
                st.rerun()
        st.code(job.command, language="bash")
        if job.active:
            st.progress(min(max(job.fraction, 0.0), 1.0), text=f"{job.fraction:.0%} {job.message}".strip())
        elif job.status == "failed":
            st.error(f"Failed: {job.error or 'no reason recorded'}", icon=":material/error:")
        elif job.status == "succeeded" and job.output:
            st.caption(f"Output: {job.output}")
        if show_log or job.status == "failed":
            log = manager.log(job.id, 25)
            with st.expander("Log (last lines)", expanded=job.status == "failed" or (show_log and job.active)):
                st.code(log or "(empty)", language="text")


def job_panel(kinds: Sequence[str] | None = None, key: str = "jobs", limit: int = 6, title: str = "Jobs") -> None:
    """The jobs of ``kinds``, newest first, polling every 2 s while any is active.

    When a job this session watched finishes, the whole page reruns so its output
    (a new map, a new run) appears.
    """
    def draw() -> None:
        try:
            listed = jobs().list(limit=200)
        except CoreError as exc:
            st.error(str(exc))
            return
        shown = [j for j in listed if kinds is None or j.kind in kinds][:limit]
        watched = st.session_state.setdefault(f"_active_{key}", set())
        now_active = {j.id for j in shown if j.active}
        finished = watched - now_active
        st.session_state[f"_active_{key}"] = now_active
        st.markdown(f"#### {title}")
        if not shown:
            st.caption("No jobs yet.")
        for i, job in enumerate(shown):
            _job_row(job, key, show_log=i == 0)
        if finished and _fragment_only_run():
            _rerun()  # a job ended during a poll: redraw the whole page with its output

    active = False
    with contextlib.suppress(CoreError):
        active = any(kinds is None or j.kind in kinds for j in jobs().active())
    st.fragment(draw, run_every=POLL_S if active or st.session_state.get("launched") else None)()


def missing_box(what: str, message: str, spec: JobSpec | None, button: str, key: str) -> None:
    """A warning that ``what`` is missing or broken, with the button that makes it."""
    st.warning(f"**{what}**: {message}", icon=":material/search:")
    if spec is not None:
        st.caption("The button runs: `python -m core " + " ".join(spec.args) + "`")
        if st.button(button, key=key, type="primary") and launch(spec) is not None:
            st.rerun()  # show the new job (on failure, launch's message stays on screen)


def dataset_form(scene: str, out: str, radio_maps: str, key: str, button: str, force: bool = False,
                 ray: str | None = None) -> None:
    """The make-dataset form: size and every knob of the measurement model
    (:class:`~core.stores.measurement_model.MeasurementModel`); submitting launches
    ``python -m core make-dataset ...`` with the same flags a user would type (``ray``: where it runs,
    :func:`ray_choice`)."""
    d = MeasurementModel()
    with st.form(key):
        cols = st.columns(4)
        num_ues = cols[0].number_input("UE walks", min_value=1, max_value=10_000_000, value=20_000, step=1000,
                                       key=f"{key}_ues")
        reports = cols[1].number_input("Reports per walk", min_value=1, max_value=1000, value=8, key=f"{key}_reports")
        k = cols[2].number_input("Sites per report K", min_value=1, max_value=64, value=d.sites_per_report,
                                 key=f"{key}_k", help="the K strongest received sites of each report")
        walk_seed = cols[3].number_input("Walk seed", min_value=0, max_value=2**31 - 1, value=0, step=1,
                                         key=f"{key}_seed",
                                         help="seed of the walks, noise and split; another seed is another dataset of "
                                              "the same world, in its own folder (<name>_seed<N>), to merge below")
        cols = st.columns(4)
        pg = cols[0].number_input("Path-gain noise σ [dB]", min_value=0.0, max_value=100.0, value=d.path_gain_db,
                                  step=0.5, key=f"{key}_pg")
        toa = cols[1].number_input("ToA noise σ [ns]", min_value=0.0, max_value=10_000.0, value=d.toa_ns, step=1.0,
                                   key=f"{key}_toa")
        aoa = cols[2].number_input("AoA noise σ [deg]", min_value=0.0, max_value=360.0, value=d.aoa_deg, step=1.0,
                                   key=f"{key}_aoa")
        clock = cols[3].number_input("Clock offset σ per walk [ns]", min_value=0.0, max_value=10_000.0,
                                     value=d.clock_offset_ns, step=5.0, key=f"{key}_clock",
                                     help="one offset per UE walk, added to all its ToAs; 0 = off")
        cols = st.columns(3)
        missing = cols[0].number_input("Missing-report rate", min_value=0.0, max_value=0.99, value=d.missing_rate,
                                       step=0.05, format="%.2f", key=f"{key}_missing")
        sensitivity = cols[1].number_input("Sensitivity [dBm]", min_value=-250.0, max_value=100.0,
                                           value=float(d.sensitivity_dbm or -100.0), step=5.0, key=f"{key}_sens",
                                           help="a site is reported only when P_tx + G_s is at or above this")
        no_threshold = cols[2].checkbox("No sensitivity threshold", value=False, key=f"{key}_nosens",
                                        help="report every site PathSolver finds a path to")
        cols = st.columns([1, 1, 2])
        world_name = cols[0].selectbox(
            "World", WORLD_PRESETS, index=0, key=f"{key}_world",
            help="oracle: the UEs measure in the map itself. realistic: in a perturbed copy of the scene "
                 f"(the map stays as it is): {WORLDS['realistic'].summary()}. Sources: docs/world.md")
        world_seed = cols[1].number_input("World seed", min_value=0, max_value=2**31 - 1, value=0, step=1,
                                          key=f"{key}_world_seed", help="seed of the world's perturbations")
        inner = cols[2].columns(2)
        step_sigma = inner[0].number_input("Device motion: step σ", min_value=0.0, max_value=0.99, value=0.0,
                                           step=0.05, format="%.2f", key=f"{key}_motion_step",
                                           help="relative step-length error of the phone's dead reckoning; 0 and "
                                                "heading 0 = no motion channel (core/stores/motion_model.py)")
        heading = inner[1].number_input("heading σ [deg]", min_value=0.0, max_value=180.0, value=0.0, step=1.0,
                                        key=f"{key}_motion_heading", help="heading error of the dead reckoning")
        go = st.form_submit_button(button, type="primary")
    with guard("dataset settings"):
        world = replace(WORLDS[world_name], seed=int(world_seed)) if world_name != "oracle" else WORLDS["oracle"]
        model = MeasurementModel(float(pg), float(toa), float(aoa), float(clock), float(missing), int(k),
                                 None if no_threshold else float(sensitivity), world=world,
                                 motion=MotionModel(float(step_sigma), float(heading)))
        if not world.is_oracle or walk_seed:  # another world or seed: its own folder beside the oracle dataset
            ws = workspace()
            target = ws.dataset_path(scene, world.name, f"seed{int(walk_seed)}" if walk_seed else None)
            out, force = ws.rel(target), store_status(target, "measurement_dataset").state != "missing"
        spec = make_dataset_spec(scene, out, int(num_ues), int(reports), radio_maps=radio_maps, model=model,
                                 force=force, ray=ray, seed=int(walk_seed))
        st.caption("The button runs: `python -m core " + " ".join(spec.args) + "`")
        if go and launch(spec) is not None:
            st.rerun()


def merge_box(ws: Workspace, scene: str, key: str = "merge") -> None:
    """Datasets of one world of ``scene`` (walks traced with other seeds) merged into one, ``<dataset>_merged``:
    ``python -m core merge-datasets`` (:mod:`core.stores.dataset_merge`); the first keeps its val and test walks
    and every walk of the others goes to train, so runs and maps fitted on the merge are scored on the same UEs."""
    from core.jobs.manager import merge_datasets_spec

    entries = {ws.rel(e.path): e for e in ws.datasets(scene) if e.status.ok}
    if len(entries) < 2:
        st.caption(f"Merging needs two datasets of one world of {scene}: make another with another walk seed above.")
        return
    picked = st.multiselect("Datasets to merge (the first keeps its val and test walks)", list(entries),
                            key=f"{key}_pick")
    if len(picked) < 2:
        st.caption("Pick two or more datasets of the same world.")
        return
    worlds = sorted({entries[p].world for p in picked})
    if len(worlds) > 1:
        st.warning(f"These datasets are of different worlds ({', '.join(worlds)}): only walks of one world merge.",
                   icon=":material/block:")
        return
    target = ws.dataset_path(scene, worlds[0], "merged")
    exists = store_status(target, "measurement_dataset").state != "missing"
    force = exists and st.checkbox(f"Replace {ws.rel(target)}", value=False, key=f"{key}_force",
                                   help="--force: replaces a dataset store only, never anything else")
    with guard("merge settings"):
        spec = merge_datasets_spec(picked, ws.rel(target), force=force)
        st.caption("The button runs: `python -m core " + " ".join(spec.args) + "` (it checks that the datasets are "
                   "walks of one world before it writes)")
        if st.button(f"Merge into {ws.rel(target)}", key=f"{key}_go", disabled=exists and not force) \
                and launch(spec) is not None:
            st.rerun()


def dataset_model_box(path: str | os.PathLike, table: bool = True) -> None:
    """How the dataset at ``path`` was measured: its measurement model in one line and, with
    ``table``, per knob with its flag (in an expander)."""
    from core.stores.dataset import recorded_measurement_model

    with guard("dataset"):
        model = recorded_measurement_model(path)
        world = model.world.summary() if model else "oracle (no record)"
        if not table:
            st.caption(f"Measurement model of the dataset: {model.summary() if model else 'not recorded'}.")
            return
        st.caption(f"Dataset world: {world}")
        with st.expander("Measurement model of the dataset" + (f": {model.summary()}" if model else "")):
            if model is None:
                st.caption("This dataset records no measurement model (an analytic test dataset).")
            else:
                st.dataframe(model.describe(), hide_index=True, width="stretch")
                if not model.world.is_oracle:
                    st.dataframe(model.world.describe(), hide_index=True, width="stretch")
                st.caption("Formulas: `core/raytracing/measurements.py` and `core/raytracing/world.py`; the flags "
                           "are those of `python -m core make-dataset`.")


RAY_CHOICES = ("this machine", "local Ray", "Ray cluster")


def ray_choice(key: str) -> str | None:
    """Where a map or dataset job runs: None (this machine, no Ray), ``"local"`` (``--ray``: a local Ray)
    or a Ray cluster's address (``--ray ADDRESS``; blank = ``auto``, a cluster started on this machine)."""
    choice = st.radio("Run the job on", RAY_CHOICES, horizontal=True, key=key,
                      help="Ray runs one task per scene (a GPU each where the cluster has GPUs); "
                           "a cluster's nodes need this checkout and the workspace's file system.")
    if choice == RAY_CHOICES[1]:
        return "local"
    if choice == RAY_CHOICES[2]:
        return st.text_input("Ray address", placeholder="HOST:6379 (blank: auto)", key=f"{key}_address").strip() or "auto"
    return None


def elapsed(start: float) -> str:
    return f"{time.time() - start:.1f} s"


def pick_run(ws: Workspace, scene: str, container, key: str) -> str:
    """A run picker over the trained runs, preselecting a finished run of ``scene``.

    Stops the page with a pointer to the Training page when there is no trained run.
    """
    runs = [r for r in ws.runs() if r.has_checkpoint]
    if not runs:
        st.warning("No trained model yet. Train one on the Training page (the shipped model lives in "
                   f"`{ws.rel(ws.default_run_path())}`).")
        st.page_link("pages/training.py", label="Go to Training")
        st.stop()
    # a run still training is listed, not preselected
    ours = [i for i, r in enumerate(runs) if r.scene == scene or scene in r.scenes or r.holdout_scene == scene]
    preferred = [i for i in ours if runs[i].state == "done"] or ours
    return container.selectbox("Run", [r.name for r in runs], index=preferred[0] if preferred else 0, key=key)


def scenes_problem(ws, scenes: list[str], holdout: str | None, portable, picked: dict | None = None) -> str:
    """Why training on ``scenes`` with ``holdout`` kept out cannot start ("" when it can): no scene, a
    held-out scene also trained on, or a scene whose map is not the one its dataset was made with."""
    from core.stores.lineage import check_scene_stores

    try:
        ws.training_overrides(scenes, holdout, portable, picked)
        for name in scenes:
            dataset = (picked or {}).get(name) or ws.dataset_path(name)
            check_scene_stores(dataset, ws.scene_map_path(name, dataset))
    except CoreError as exc:
        return str(exc)
    return ""


# -- procedural cities (issue 18) ---------------------------------------------------------
CORPUS_DIR = CORPUS_FOLDER  # the corpus folder of the workspace (`make corpus`)


def city_form(ws: Workspace, key: str = "make_city") -> None:
    """Make a procedural city (seed and the main generator parameters) into the workspace's scenes
    folder: launches ``python -m core make-city ...``; the city is then a scene like any other."""
    from core.jobs.manager import make_city_spec

    with st.form(key):
        cols = st.columns(4)
        seed = cols[0].number_input("Seed", min_value=0, max_value=2**32 - 1, value=0, step=1, key=f"{key}_seed")
        layout = cols[1].selectbox("Streets", ["perturbed", "grid", "irregular"], key=f"{key}_layout")
        size = cols[2].number_input("Size [m]", min_value=64, max_value=512, value=256, step=64, key=f"{key}_size")
        vehicles = cols[3].number_input("Vehicles", min_value=0, max_value=500, value=0, key=f"{key}_vehicles")
        cols = st.columns(4)
        street = cols[0].number_input("Street width [m]", min_value=2.0, max_value=60.0, value=16.0, key=f"{key}_street")
        density = cols[1].number_input("Density (lots built)", min_value=0.0, max_value=1.0, value=0.85, step=0.05,
                                       key=f"{key}_density")
        height = cols[2].number_input("Height mean [m]", min_value=3.0, max_value=100.0, value=15.0, key=f"{key}_height")
        terrain = cols[3].number_input("Hills ± [m]", min_value=0.0, max_value=50.0, value=0.0, key=f"{key}_terrain")
        go = st.form_submit_button("Make the city", type="primary")
    with guard("city settings"):
        params = {"layout": layout, "size_m": float(size), "street_width_m": float(street), "density": float(density),
                  "height_mean_m": float(height), "vehicles": int(vehicles), "terrain_m": float(terrain)}
        spec = make_city_spec(int(seed), ws.rel(ws.scenes_dir), params)
        st.caption("Making the city runs `python -m core " + " ".join(spec.args) + "`; then pick "
                   f"`city_{int(seed)}` as the active scene and generate its map.")
        if go and launch(spec) is not None:
            scene_names.clear()
            st.rerun()


def corpus_box(ws: Workspace, ray: str | None, key: str = "corpus") -> None:
    """The corpus of the workspace (``corpus/manifest.json``; without one, the shipped manifest of the default
    corpus, ``assets/corpus/manifest.json``) as a table, and the job that builds or resumes it."""
    import json

    import pandas as pd

    from core.jobs.manager import make_corpus_spec

    manifest_path = ws.root / CORPUS_DIR / "manifest.json"
    shipped = not manifest_path.is_file()
    if shipped:
        manifest_path = ws.assets_dir / "corpus" / "manifest.json"
    if manifest_path.is_file():
        with guard("corpus manifest"):
            manifest = json.loads(manifest_path.read_text())
            rows = [{"city": c["name"], "seed": c["seed"], "streets": c["params"]["layout"], "buildings": c["buildings"],
                     "footprint share": c["footprint_share"], "height mean m": c["height_m"]["mean"],
                     "outdoor coverage": c.get("outdoor_coverage"),
                     **{f"{stage} s": (c.get("seconds") or {}).get(f"{stage}_s") for stage in ("city", "map", "dataset")},
                     "peak RSS MB": c.get("peak_rss_mb")} for c in manifest.get("cities", [])]
            where = (f"the shipped manifest of the default corpus ({ws.rel(manifest_path)}); the corpus itself is "
                     f"built into {CORPUS_DIR}/ below" if shipped else ws.rel(manifest_path))
            st.caption(f"{manifest.get('complete', 0)} of {manifest.get('count', 0)} cities complete, "
                       f"{len(manifest.get('failed', []))} failed ({where})")
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
            for failure in manifest.get("failed", []):
                st.error(f"{failure['name']}: {failure['cause']}")
    else:
        st.caption(f"No corpus yet in {ws.rel(ws.root / CORPUS_DIR)}.")
    with st.form(key):
        cols = st.columns(2)
        count = cols[0].number_input("Cities", min_value=1, max_value=10_000, value=102, step=10, key=f"{key}_count",
                                     help="seeds 0 .. N-1; with the default parameters seeds 21 and 37 fail the coverage "
                                          "check, so 102 seeds give 100 complete cities")
        cpus = cols[1].number_input("CPUs of the local Ray (0: every core)", min_value=0, max_value=256, value=0,
                                    key=f"{key}_cpus", disabled=ray != "local")
        go = st.form_submit_button("Build or resume the corpus")
    with guard("corpus settings"):
        extra = ("--num-cpus", str(int(cpus))) if ray == "local" and cpus else ()
        spec = make_corpus_spec(int(count), CORPUS_DIR, ray=ray, extra=extra)
        st.caption("Building the corpus runs `python -m core " + " ".join(spec.args) + "` (finished cities are "
                   "skipped; progress and cancel in the job list below)")
        if go and launch(spec) is not None:
            st.rerun()
