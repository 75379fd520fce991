"""Every page's logic through Streamlit's AppTest, on a tmp workspace (never the shipped data).

The workspace holds an analytic radio map saved as scene ``etoile``, a synthetic
measurement dataset, a tiny model trained for two epochs, and a cached geometry of a
few box buildings (so no Sionna is needed). Jobs launched here are real processes.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core import REPO_ROOT
from core.jobs.manager import JobManager, train_spec

APP = str(REPO_ROOT / "app.py")
TIMEOUT = 180


def _box(x0, y0, x1, y1, h):
    return {"name": f"b{x0}_{y0}", "footprint": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "height": h, "base": 0.0}


def build_workspace(root: Path) -> Path:
    """Fill ``root`` with an analytic map (scene etoile), a synthetic dataset, a tiny model
    trained for two epochs and cached box geometry for the scenes the tests visit."""
    import torch

    from core.learning.config import load_config
    from core.learning.training import train
    from core.physics.synthetic import analytic_radio_map, synthetic_dataset

    rm = analytic_radio_map(height=32, width=48, bounds=(-96.0, -64.0, 96.0, 64.0))
    rm._attrs["scene"] = "etoile"
    rm._attrs["radio"] = {"tx_power_dbm": 43.0}  # the analytic map's (silence's threshold: sensitivity - this)
    rm.save(root / "radio_maps" / "etoile.zarr")
    ds = synthetic_dataset(rm, 300, reports=6, seed=0)
    ds.attrs["scene"] = "etoile"
    ds.save(root / "datasets" / "etoile")
    threads = torch.get_num_threads()
    config = load_config(REPO_ROOT / "configs" / "model.yaml", [
        f"data.dataset={root / 'datasets' / 'etoile'}", "model.preset=tiny",
        "training.epochs=2", "training.batch_size=64", "training.num_threads=1",
        f"physics_loss.radio_maps_dir={root / 'radio_maps'}"])
    train(config, root / "runs" / "tiny", device="cpu", show_progress=False)
    torch.set_num_threads(threads)
    geometry_dir = root / ".jobs" / "geometry"
    geometry_dir.mkdir(parents=True, exist_ok=True)
    geometry = {"name": "etoile", "bbox": [-96, -64, 0, 96, 64, 30],
                "buildings": [_box(-80, 10, -50, 40, 20.0), _box(20, -50, 40, -30, 12.5)],
                "sites": rm.attrs["sites"]}
    for name in ("etoile", "simple_street_canyon", "munich", "florence"):  # no Sionna needed to draw
        (geometry_dir / f"{name}.json").write_text(json.dumps({**geometry, "name": name}))
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A complete tmp workspace; env vars point the app and the jobs at it."""
    root = build_workspace(tmp_path_factory.mktemp("ws"))
    old = {k: os.environ.get(k) for k in ("CORE_WORKSPACE", "CORE_JOBS_DB")}
    os.environ["CORE_WORKSPACE"] = str(root)
    os.environ["CORE_JOBS_DB"] = str(root / ".jobs" / "jobs.sqlite")
    yield root
    manager = JobManager(root / ".jobs" / "jobs.sqlite", cwd=root)
    for job in manager.active():
        manager.cancel(job.id, grace_s=1.0)
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _app(page: str | None = None, scene: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    if scene:
        at.session_state["active_scene"] = scene
    at.run()
    if page:
        at.switch_page(page).run()
    _no_exception(at)
    return at


def _no_exception(at: AppTest) -> None:
    """No traceback box and no "unexpected error" box (a bug caught by the page guard)."""
    assert not at.exception, [e.value for e in at.exception]
    bugs = [e.value for e in at.error if str(e.value).startswith("Unexpected error")]
    assert not bugs, bugs


def _texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def _plotly(at: AppTest) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def _array(value) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array dict ``{dtype, bdata, shape}``."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape([int(n) for n in str(value["shape"]).split(",")])
        return arr.astype(float)
    return np.array(value, dtype=float)


def _manager(root: Path) -> JobManager:
    return JobManager(root / ".jobs" / "jobs.sqlite", cwd=root)


# -- Scenes -------------------------------------------------------------------------------
def test_scenes_page_shows_what_exists_and_draws_the_deck(workspace):
    at = _app()
    assert at.sidebar.selectbox(key="_scene_picker").value == "etoile"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics == {"Radio map": "ok", "Dataset": "ok", "Trained models": "1"}
    (deck,) = at.get("deck_gl_json_chart")
    spec = json.loads(deck.proto.json)
    layers = {layer["id"]: layer for layer in spec["layers"]}
    assert {"coverage", "buildings", "sites"} <= set(layers)
    assert layers["coverage"]["image"].startswith("data:image/png;base64,")
    assert len(layers["buildings"]["data"]) == 2 and layers["buildings"]["extruded"] is True
    assert "mapStyle" not in spec or spec["mapStyle"] == "__MAP_STYLE__"  # no basemap: offline
    assert not at.warning


def test_switching_scene_reaches_every_page_and_offers_the_missing_maps(workspace):
    at = _app()
    at.sidebar.selectbox(key="_scene_picker").select("simple_street_canyon").run()
    _no_exception(at)
    assert at.session_state["active_scene"] == "simple_street_canyon"
    warnings = _texts(at.warning)
    assert "Radio map" in warnings and "Measurement dataset" in warnings
    labels = [b.label for b in at.button]
    assert "Generate the radio map of simple_street_canyon" in labels
    at.switch_page("pages/radio_maps.py").run()
    _no_exception(at)
    assert "No radio map" in _texts(at.warning)
    assert at.session_state["active_scene"] == "simple_street_canyon"  # the choice follows the user


def test_scenes_page_offers_ray_for_the_missing_jobs(workspace):
    at = _app(scene="simple_street_canyon")
    commands = lambda: [str(c.value) for c in at.caption if "The button runs" in str(c.value)]  # noqa: E731
    assert len(commands()) == 2 and not any("--ray" in c for c in commands())  # default: this machine
    at.radio(key="scene_ray").set_value("local Ray").run()
    _no_exception(at)
    assert all(c.endswith(" --ray`") for c in commands())
    at.radio(key="scene_ray").set_value("Ray cluster").run()
    at.text_input(key="scene_ray_address").input("head:6379").run()
    _no_exception(at)
    assert all(c.endswith(" --ray head:6379`") for c in commands())
    at.text_input(key="scene_ray_address").input("-x").run()
    assert "Ray address '-x'" in _texts(at.error)


def test_missing_map_button_launches_the_generation_job(workspace):
    at = _app("pages/radio_maps.py", scene="munich")
    at.button(key="make_map_rm").click().run()
    _no_exception(at)
    manager = _manager(workspace)
    job = next(j for j in manager.list() if j.kind == "generate-maps" and "munich" in j.args)
    try:
        assert job.command.startswith("python -m core generate-maps --scenes munich --radio-maps radio_maps")
        assert job.output == str(workspace / "radio_maps" / "munich.zarr")
    finally:
        manager.cancel(job.id, grace_s=1.0)
    # while another job writes that store, the button is refused with a clear message
    from core.jobs.manager import selftest_spec

    blocker = manager.submit(selftest_spec(seconds=60, out="radio_maps/munich.zarr"))
    try:
        at.button(key="make_map_rm").click().run()
        _no_exception(at)
        assert f"job #{blocker.id}" in _texts(at.error) and "already writes" in _texts(at.error)
    finally:
        manager.cancel(blocker.id, grace_s=1.0)


def test_dataset_form_builds_the_make_dataset_command(workspace):
    """Every measurement-model knob of the form becomes its make-dataset flag."""
    at = _app(scene="simple_street_canyon")
    assert "Measurement dataset" in _texts(at.warning)
    at.number_input(key="make_dataset_ues").set_value(5)
    at.number_input(key="make_dataset_reports").set_value(3)
    at.number_input(key="make_dataset_k").set_value(2)
    at.number_input(key="make_dataset_toa").set_value(10.0)
    at.number_input(key="make_dataset_clock").set_value(25.0)
    at.number_input(key="make_dataset_missing").set_value(0.4)
    at.number_input(key="make_dataset_sens").set_value(-90.0)
    next(b for b in at.button if b.label == "Make the dataset of simple_street_canyon").click().run()
    _no_exception(at)
    expected = ("python -m core make-dataset --scene simple_street_canyon --num-ues 5 --reports 3 "
                "--out datasets/simple_street_canyon --radio-maps radio_maps --noise-path-gain-db 2 --noise-toa-ns 10 "
                "--noise-aoa-deg 3 --clock-offset-ns 25 --missing-rate 0.4 --sites-per-report 2 --sensitivity-dbm -90")
    manager = _manager(workspace)
    job = next(j for j in manager.list() if j.kind == "make-dataset" and "simple_street_canyon" in j.args)
    try:
        assert job.command == expected
        assert job.output == str(workspace / "datasets" / "simple_street_canyon")
    finally:
        manager.cancel(job.id, grace_s=1.0)
    assert any(expected.removeprefix("python -m core ") in str(c.value) for c in at.caption)


def test_the_datasets_measurement_model_is_shown(workspace):
    """A dataset's recorded knobs on the Scenes page (table) and the Training page (one line)."""
    import shutil

    from core.physics.synthetic import analytic_radio_map, synthetic_dataset
    from core.stores.measurement_model import MeasurementModel

    model = MeasurementModel(toa_ns=0.0, clock_offset_ns=20.0, missing_rate=0.4, sites_per_report=3,
                             sensitivity_dbm=-110.0)
    ds = synthetic_dataset(analytic_radio_map(height=16, width=16, bounds=(0.0, 0.0, 64.0, 64.0)), 20, reports=3, k=3)
    ds.attrs.update(scene="florence", measurement_model=model.to_attrs())
    path = ds.save(workspace / "datasets" / "florence")
    try:
        at = _app(scene="florence")
        (box,) = [e for e in at.expander if e.label.startswith("Measurement model of the dataset")]
        assert model.summary() in box.label and "clock offset σ 20 ns" in box.label
        table = at.dataframe[-1].value
        assert dict(zip(table["flag"], table["value"], strict=True)) == {
            "--noise-path-gain-db": "2 dB", "--noise-toa-ns": "0 ns", "--noise-aoa-deg": "3 deg",
            "--clock-offset-ns": "20 ns", "--missing-rate": "40 %", "--sites-per-report": "3",
            "--sensitivity-dbm": "-110 dBm"}
        # the form that makes it again replaces it (--force)
        assert any("--out datasets/florence" in str(c.value) and str(c.value).endswith("--force`") for c in at.caption)
        at.switch_page("pages/training.py").run()
        _no_exception(at)
        assert f"Measurement model of the dataset: {model.summary()}." in _texts(at.caption)
    finally:
        shutil.rmtree(path)


def test_the_datasets_world_is_shown_and_the_form_picks_one(workspace):
    """A realistic-world dataset says so where it is picked; the form's world select becomes --world."""
    import shutil

    from core.physics.synthetic import analytic_radio_map, synthetic_dataset
    from core.stores.measurement_model import MeasurementModel
    from core.stores.world_model import PRESETS

    model = MeasurementModel(world=PRESETS["realistic"])
    ds = synthetic_dataset(analytic_radio_map(height=16, width=16, bounds=(0.0, 0.0, 64.0, 64.0)), 20, reports=3, k=4)
    ds.attrs.update(scene="florence", measurement_model=model.to_attrs())
    path = ds.save(workspace / "datasets" / "florence")
    try:
        at = _app(scene="florence")
        _no_exception(at)
        assert "Dataset world: realistic (materials ± 30 %" in _texts(at.caption)
        world_rows = [d.value for d in at.dataframe if "perturbation" in d.value.columns]
        assert world_rows and "--world-shadowing-nlos" in list(world_rows[0]["flag"])
        at.selectbox(key="remake_dataset_world").set_value("realistic")
        at.number_input(key="remake_dataset_world_seed").set_value(3)
        at.number_input(key="remake_dataset_motion_step").set_value(0.1)
        at.number_input(key="remake_dataset_motion_heading").set_value(10.0)
        next(b for b in at.button if b.label == "Make the dataset of florence again").click().run()
        _no_exception(at)
        manager = _manager(workspace)
        job = next(j for j in manager.list() if j.kind == "make-dataset" and "florence" in j.args)
        try:
            # another world is its own dataset beside the oracle one: datasets/florence stays as it is
            assert job.command.endswith("--sensitivity-dbm -100 --world realistic --world-seed 3 "
                                        "--motion-step-sigma 0.1 --motion-heading-deg 10")
            assert "--out datasets/florence_realistic" in job.command
        finally:
            manager.cancel(job.id, grace_s=1.0)
    finally:
        shutil.rmtree(path)


def test_datasets_of_one_world_are_merged_from_the_scenes_page(workspace):
    """The dataset form's walk seed gives another dataset of the same world in its own folder; the merge box joins
    datasets of one world with a real merge-datasets job, and refuses to mix worlds before any job."""
    import shutil

    from core.physics.synthetic import analytic_radio_map, synthetic_dataset
    from core.stores.dataset import MeasurementDataset
    from core.stores.measurement_model import MeasurementModel
    from core.stores.world_model import PRESETS

    radio_map = analytic_radio_map(height=16, width=16, bounds=(0.0, 0.0, 64.0, 64.0))
    made = []
    for name, seed, world in (("munich", 0, None), ("munich_seed1", 1, None), ("munich_realistic", 0, "realistic")):
        ds = synthetic_dataset(radio_map, 20 + seed, reports=3, k=2, seed=seed)
        ds.attrs["scene"] = "munich"
        if world:
            ds.attrs["measurement_model"] = MeasurementModel(world=PRESETS[world]).to_attrs()
        made.append(ds.save(workspace / "datasets" / name))
    manager = _manager(workspace)
    try:
        at = _app(scene="munich")
        at.number_input(key="remake_dataset_seed").set_value(2)
        next(b for b in at.button if b.label == "Make the dataset of munich again").click().run()
        _no_exception(at)
        job = next(j for j in manager.list() if j.kind == "make-dataset" and "munich" in j.args)
        manager.cancel(job.id, grace_s=1.0)
        assert "--out datasets/munich_seed2 " in job.command and "--seed 2" in job.command
        assert not job.command.endswith("--force")  # a new folder: datasets/munich stays as it is

        at.multiselect(key="merge_pick").set_value(["datasets/munich", "datasets/munich_realistic"]).run()
        _no_exception(at)
        assert "different worlds (oracle, realistic)" in _texts(at.warning)
        assert not [b for b in at.button if b.key == "merge_go"]
        at.multiselect(key="merge_pick").set_value(["datasets/munich", "datasets/munich_seed1"]).run()
        assert ("merge-datasets --datasets datasets/munich datasets/munich_seed1 --out datasets/munich_merged`"
                in _texts(at.caption))
        at.button(key="merge_go").click().run()
        _no_exception(at)
        job = next(j for j in manager.list() if j.kind == "merge-datasets")
        assert manager.wait(job.id, timeout_s=120).status == "succeeded", manager.log(job.id)
        merged = MeasurementDataset.load(workspace / "datasets" / "munich_merged")
        first = MeasurementDataset.load(made[0])
        assert merged.num_samples == 41
        np.testing.assert_array_equal(merged.indices("test"), first.indices("test"))
        at.run()  # now it exists: replacing it is a choice, off by default
        assert [b for b in at.button if b.key == "merge_go"][0].disabled
        assert any(c.label.startswith("Replace datasets/munich_merged") for c in at.checkbox)
    finally:
        for path in [*made, workspace / "datasets" / "munich_merged"]:
            shutil.rmtree(path, ignore_errors=True)


# -- Radio maps ---------------------------------------------------------------------------
def test_radio_maps_every_feature_with_units_and_comparison(workspace):
    at = _app("pages/radio_maps.py")
    from core.stores.radio_map import RadioMap

    rm = RadioMap.load(workspace / "radio_maps" / "etoile.zarr")
    from core.raytracing.coverage import coverage_figures

    cov = coverage_figures(rm, -100.0)  # reached vs heard at the dataset's sensitivity, computed on load
    shown = {m.label: m.value for m in at.metric}
    assert shown["Heard"] == f"{cov['heard']:.1%}" and shown["Heard threshold"] == f"{cov['threshold_db']:g} dB"
    assert any(k.startswith("Reached") and v == f"{cov['reached']:.1%}" for k, v in shown.items())
    for feature in rm.features:
        at.selectbox(key="rm_feature").select(feature).run()
        _no_exception(at)
        heat, hist = _plotly(at)[:2]
        unit = rm.units[feature]
        assert heat["data"][0]["type"] == "heatmap"
        assert heat["data"][0]["colorbar"]["title"]["text"] == f"{feature} [{unit}]"
        assert heat["layout"]["xaxis"]["title"]["text"] == "x [m]"
        assert unit in heat["data"][0]["hovertemplate"]
        assert any(t.get("name") == "buildings" for t in heat["data"])
        assert hist["layout"]["xaxis"]["title"]["text"] == f"{feature} [{unit}]"
    # a second store on the same grid: side by side and the difference
    shifted = RadioMap(rm.values + np.float32(3.0), rm.features, rm.bounds, rm.valid, rm.attrs)
    shifted.save(workspace / "radio_maps" / "shifted.zarr")
    at = _app("pages/radio_maps.py")
    at.selectbox(key="cmp_store_B").select("radio_maps/shifted.zarr").run()
    at.selectbox(key="cmp_fa").select("path_gain").run()
    at.selectbox(key="cmp_fb").select("path_gain").run()
    _no_exception(at)
    diff = _plotly(at)[-1]
    assert diff["data"][0]["colorbar"]["title"]["text"] == "Δ path_gain [dB]"
    z = _array(diff["data"][0]["z"])
    assert np.allclose(z[np.isfinite(z)], -3.0, atol=1e-4)  # A - B = -3 dB everywhere
    (workspace / "radio_maps" / "shifted.zarr").rename(workspace / "radio_maps" / ".shifted.old")


def test_the_generation_form_carries_coverage_and_node_spacing(workspace):
    """The form's minimum coverage and node spacing become --min-coverage and --toa-decimation."""
    at = _app("pages/radio_maps.py")
    at.text_input(key="gen_scene").set_value("florence")
    at.number_input(key="gen_decimation").set_value(3)
    at.number_input(key="gen_min_coverage").set_value(90)
    next(b for b in at.button if b.label == "Start map generation").click().run()
    _no_exception(at)
    manager = _manager(workspace)
    job = next(j for j in manager.list() if j.kind == "generate-maps" and "florence" in j.args)
    try:
        assert "--toa-decimation 3 --min-coverage 0.9" in job.command
        assert job.output == str(workspace / "radio_maps" / "florence.zarr")
    finally:
        manager.cancel(job.id, grace_s=1.0)
    # a scene without a map: the form starts from the scene's extent (its cached bbox: 192 x 128 m)
    at = _app("pages/radio_maps.py", scene="munich")
    _no_exception(at)
    heights = [n.value for n in at.number_input if n.label == "Map height [cells]"]
    widths = [n.value for n in at.number_input if n.label == "Map width [cells]"]
    assert (heights, widths) == ([128], [192])


def test_corrupt_stores_are_reported_not_raised(workspace):
    bad = workspace / "radio_maps" / "broken.zarr"
    bad.mkdir(parents=True)
    (bad / "zarr.json").write_text("{not json")
    at = _app("pages/radio_maps.py", scene="broken")
    assert "Radio map broken" in _texts(at.warning)
    assert any(b.label.startswith("Generate the radio map of broken") for b in at.button)
    # metadata that claims a radio map, but no arrays: loading fails with a named store error
    bad2 = workspace / "radio_maps" / "hollow.zarr"
    bad2.mkdir()
    (bad2 / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                "attributes": {"kind": "radio_map", "format_version": 1,
                                                               "features": ["path_gain"], "bounds": [0, 0, 1, 1]}}))
    at = _app("pages/radio_maps.py", scene="hollow")
    assert "Radio map unreadable" in _texts(at.warning) and "hollow.zarr" in _texts(at.warning)
    at = _app(scene="hollow")  # the Scenes page too: the store is named, and nothing is drawn from it
    assert "hollow.zarr" in _texts(at.error) + _texts(at.warning)
    assert not at.get("deck_gl_json_chart")  # no geometry for "hollow" and no readable map: no deck
    assert "Nothing to draw yet" in _texts(at.info)


# -- the twin corrected (correct-map) ----------------------------------------------------------
@pytest.fixture
def corrected_map(workspace):
    """``(twin, corrected map)``: the workspace's etoile map corrected by its dataset's train walks, read in a
    world 5 dB louder than the twin at site 1 (fit_corrections + correct_map, no job), at the workspace's
    corrected-map path; removed afterwards."""
    import shutil

    from core.physics.twin_correction import correct_map, fit_corrections
    from core.stores.dataset import MeasurementDataset
    from core.stores.radio_map import RadioMap
    from core.stores.workspace import Workspace

    path = Workspace.from_env().corrected_map_path("etoile")
    twin = RadioMap.load(workspace / "radio_maps" / "etoile.zarr")
    ds = MeasurementDataset.load(workspace / "datasets" / "etoile")
    for arr in (ds.site_features, ds.clean_site_features):  # in memory only: the stored dataset is the twin's
        arr[..., 0][ds.site_ids == 1] += 5.0
    fit = fit_corrections(ds, twin)
    assert fit.choices["path_gain"].bandwidth_m is not None  # path gain corrected: the views differ
    correct_map(twin, fit, fit.record(ds.ref.to_dict(), twin.ref.to_dict())).save(path)
    yield twin, RadioMap.load(path)
    shutil.rmtree(path.parent)


def test_correct_map_spec_is_the_command_a_user_types(workspace):
    from core.errors import CoreError
    from core.jobs.manager import correct_map_spec, evaluate_spec
    from core.stores.workspace import Workspace

    spec = correct_map_spec("datasets/etoile_realistic", "etoile")
    assert spec.kind == "correct-map" and spec.output == "radio_maps/corrected/etoile.zarr"
    assert spec.args == ("correct-map", "--dataset", "datasets/etoile_realistic", "--radio-maps", "radio_maps")
    again = correct_map_spec("d", "etoile", "maps", split="test", force=True)
    assert again.args[-4:] == ("maps", "--split", "test", "--force") and again.output == "maps/corrected/etoile.zarr"
    ws = Workspace.from_env()
    assert ws.corrected_map_path("etoile") == workspace / "radio_maps" / "corrected" / "etoile.zarr"
    with pytest.raises(CoreError, match="train or test"):
        correct_map_spec("d", "etoile", split="val")
    ev = evaluate_spec("runs/tiny", None, "test", True, radio_map="radio_maps/corrected/etoile.zarr")
    assert ev.args[-2:] == ("--radio-map", "radio_maps/corrected/etoile.zarr") and "--scene" not in ev.args
    assert Path(ev.output).name == "eval_test_map-corrected_refine.json"  # the name evaluate gives it
    with pytest.raises(CoreError, match="no scene"):
        evaluate_spec("runs/tiny", "etoile", radio_map="radio_maps/corrected/etoile.zarr")
    auto = evaluate_spec("runs/tiny", None, "test", True, prior_sigma_scale="auto")
    assert auto.args[-2:] == ("--prior-sigma-scale", "auto")
    assert Path(auto.output).name == "eval_test_refine_prior-auto.json"
    assert evaluate_spec("runs/tiny", None, "test", True, prior_sigma_scale=0.125).args[-1] == "0.125"
    searched = evaluate_spec("runs/tiny", None, "test", True, True, scan_starts=6, walk_basins=3)
    assert searched.args[-4:] == ("--scan-starts", "6", "--walk-basins", "3")
    assert Path(searched.output).name == "eval_test_refine_scan-6_basins-3.json"
    for bad, words in ((dict(refine=False, prior_sigma_scale=0.5), "with refinement"),
                       (dict(split="val", prior_sigma_scale="auto"), "score another split"),
                       (dict(refine=False, scan_starts=2), "with refinement"),
                       (dict(refine=False, walk_basins=2), "refinement or baselines")):
        with pytest.raises(CoreError, match=words):
            evaluate_spec("runs/tiny", **bad)
    # the page: no corrected map yet, and the command of the sidebar's dataset
    at = _app("pages/radio_maps.py")
    assert "No corrected map of etoile yet" in _texts(at.caption)
    assert ("The button runs: `python -m core correct-map --dataset datasets/etoile --radio-maps radio_maps`"
            in _texts(at.caption))
    assert not at.get("radio") or all(r.key != "corr_view" for r in at.radio)
    at.button(key="corr_go").click().run()  # the button launches that command as a job
    _no_exception(at)
    manager = _manager(workspace)
    job = next(j for j in manager.list() if j.kind == "correct-map")
    try:
        assert job.command == "python -m core correct-map --dataset datasets/etoile --radio-maps radio_maps"
        assert job.output == str(ws.corrected_map_path("etoile"))
    finally:
        manager.cancel(job.id, grace_s=1.0)
        import shutil

        shutil.rmtree(ws.corrected_map_path("etoile").parent, ignore_errors=True)  # had it finished already


def test_the_corrected_map_views_and_its_record(workspace, corrected_map):
    twin, fixed = corrected_map
    at = _app("pages/radio_maps.py")
    assert "correct-map --dataset datasets/etoile --radio-maps radio_maps --force`" in _texts(at.caption)
    assert at.radio(key="corr_view").value == "twin"
    record = next(d.value for d in at.dataframe if "h m" in d.value.columns)
    assert list(record["feature"]) == ["path_gain [dB]", "toa [ns]", "aoa [deg]"]
    chosen = fixed.attrs["twin_correction"]["features"]
    kept = lambda v: None if v is None or v != v else float(v)  # noqa: E731 (None or NaN: the twin kept)
    assert [kept(v) for v in record["h m"]] == [chosen[f]["bandwidth_m"] for f in ("path_gain", "toa", "aoa")]

    def shown() -> np.ndarray:
        fig = next(f for f in _plotly(at) if " of site " in f["layout"]["title"]["text"])
        return _array(fig["data"][0]["z"])

    site = 1
    at.selectbox(key="corr_site").select(site).run()
    _no_exception(at)
    want = np.where(twin.valid, twin.layers["site_path_gain"][site], np.nan)
    np.testing.assert_allclose(shown(), want, equal_nan=True)
    at.radio(key="corr_view").set_value("corrected").run()
    np.testing.assert_allclose(shown(), np.where(twin.valid, fixed.layers["site_path_gain"][site], np.nan),
                               rtol=1e-6, equal_nan=True)
    at.radio(key="corr_view").set_value("correction").run()
    diff = fixed.layers["site_path_gain"][site].astype(np.float64) - twin.layers["site_path_gain"][site]
    np.testing.assert_allclose(shown(), np.where(twin.valid, diff, np.nan), atol=1e-4, equal_nan=True)
    assert 3.0 < np.nanmedian(shown()) < 6.0  # the world's +5 dB at site 1, where the walks went
    at.selectbox(key="corr_feature").select("aoa").run()
    _no_exception(at)
    z = shown()
    assert np.nanmax(np.abs(z)) <= 180.0 and "wrapped" in _plotly(at)[-1]["layout"]["title"]["text"]
    assert not at.error
    # the evaluate form: the dataset's map by default, the corrected one adds --radio-map
    at.switch_page("pages/training.py").run()
    _no_exception(at)
    assert at.radio(key="eval_map").options == ["the dataset's map",
                                                "the corrected map (radio_maps/corrected/etoile.zarr)"]
    command = lambda: next(str(c.value) for c in at.caption if "python -m core evaluate" in str(c.value))  # noqa: E731
    assert "--radio-map" not in command() and "--scene etoile" in command()
    at.radio(key="eval_map").set_value("corrected").run()
    _no_exception(at)
    assert command().endswith("--refine --radio-map radio_maps/corrected/etoile.zarr`")
    assert "--scene" not in command()
    at.radio(key="eval_prior").set_value("auto").run()  # the prior's sigma scale chosen on val
    _no_exception(at)
    assert command().endswith("--radio-map radio_maps/corrected/etoile.zarr --prior-sigma-scale auto`")


def test_foreign_corrected_stores_are_one_line(workspace, corrected_map):
    """A corrected-map path that holds no radio map, or a radio map without the correction record: one
    line each, never a traceback."""
    from core.stores.radio_map import RadioMap

    path = workspace / "radio_maps" / "corrected" / "etoile.zarr"
    twin, _ = corrected_map
    plain = RadioMap(twin.values, twin.features, twin.bounds, valid=twin.valid, attrs=twin.attrs, layers=twin.layers)
    plain.save(path)  # the twin's copy: a radio map of etoile, but no correction record
    at = _app("pages/radio_maps.py")
    assert "corrected map: " in _texts(at.error) and "not a corrected map" in _texts(at.error)
    assert len([e for e in at.error if "corrected" in str(e.value)]) == 1
    assert all(r.key != "corr_view" for r in at.radio)
    import shutil

    shutil.rmtree(path)
    path.mkdir()
    (path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                "attributes": {"kind": "measurement_dataset"}}))
    at = _app("pages/radio_maps.py")
    assert [str(e.value) for e in at.error if "orrected" in str(e.value)] == [
        f"Corrected map: {path}: not a radio map store (kind='measurement_dataset')"]
    at.switch_page("pages/training.py").run()
    _no_exception(at)
    assert at.radio(key="eval_map").options == ["the dataset's map"]  # a broken store is never offered


# -- Training -----------------------------------------------------------------------------
def test_training_launches_a_tiny_job_and_shows_its_curves(workspace):
    at = _app("pages/training.py")
    at.selectbox(key="train_preset").select("baseline").run()
    form = {n.label: n for n in at.number_input}
    assert form["λ_phys"].value == 0.0
    form["Epochs"].set_value(1)
    form["Use the first N samples (0 = all)"].set_value(200)
    form["Batch size"].set_value(64)
    at.selectbox(key="mp_baseline").select("tiny")
    at.text_input[0].set_value("apptest")
    at.button[0].click().run()  # the form's submit button
    _no_exception(at)
    manager = _manager(workspace)
    job = next(j for j in manager.list() if j.kind == "train")
    assert "--out runs/apptest" in job.command and "--set training.epochs=1" in job.command
    assert "--set model.preset=tiny" in job.command and "--set data.max_samples=200" in job.command
    done = manager.wait(job.id, timeout_s=240)
    assert done.status == "succeeded", manager.log(job.id)
    at = _app("pages/training.py")
    at.selectbox(key="curve_pick").select("runs/apptest").run()
    _no_exception(at)
    curves = next(f for f in _plotly(at) if "loss terms" in f["layout"]["title"]["text"])
    names = {t["name"] for t in curves["data"]}
    assert {"train_total", "train_coarse", "train_fine", "val_total"} <= names
    assert curves["layout"]["yaxis2"]["title"]["text"] == "localization error [m]"
    grads = next(f for f in _plotly(at) if "gradient balance" in f["layout"]["title"]["text"])
    assert {"coarse", "λ_fine·fine", "supervised (sum)", "λ_phys applied"} <= {t["name"] for t in grads["data"]}
    runs = at.dataframe[0].value
    assert (runs.set_index("run").loc["runs/apptest", "λ_phys applied"] == 0.0)
    assert {"runs/tiny", "runs/apptest"} <= set(runs["run"])
    at.multiselect(key="cdf_runs").set_value(["runs/tiny", "runs/apptest"]).run()
    _no_exception(at)
    cdf = next(f for f in _plotly(at) if "CDF" in f["layout"]["title"]["text"])
    assert len(cdf["data"]) == 2, _texts(at.error)
    assert cdf["layout"]["xaxis"]["title"]["text"] == "localization error [m]"


def test_training_learns_from_picked_runs(workspace):
    """The form's teachers become ``training.distill_from``; the job trains with their targets."""
    at = _app("pages/training.py")
    at.selectbox(key="train_preset").select("baseline").run()
    {n.label: n for n in at.number_input}["Epochs"].set_value(1)
    at.selectbox(key="mp_baseline").select("tiny")
    at.multiselect(key="train_teachers").set_value(["runs/tiny"])
    at = _start_training(at, "student")
    manager = _manager(workspace)
    job = next(j for j in manager.list() if j.kind == "train" and "runs/student" in j.command)
    teacher = workspace / "runs" / "tiny"  # absolute: the workspace is not the repository
    assert f'training.distill_from=["{teacher}"]' in job.args
    done = manager.wait(job.id, timeout_s=240)
    assert done.status == "succeeded", manager.log(job.id)
    assert f"distilled from {teacher}" in (workspace / "runs" / "student" / "log.txt").read_text()


def _start_training(at: AppTest, name: str) -> AppTest:
    at.text_input(key="train_name").set_value(name)
    next(b for b in at.button if b.label == "Start training").click().run()
    _no_exception(at)
    return at


def test_training_refuses_a_taken_run_name(workspace):
    manager = _manager(workspace)
    jobs_before = [j.id for j in manager.list()]
    tiny = workspace / "runs" / "tiny"
    files_before = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}
    at = _start_training(_app("pages/training.py"), "tiny")
    assert ("Run name 'tiny' is taken: runs/tiny already holds a run. Pick another name; nothing was started."
            in [e.value for e in at.error])
    assert [j.id for j in manager.list()] == jobs_before
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == files_before


@pytest.mark.parametrize("name", [".", "..", "a/b", ".hidden", "two words"])
def test_training_refuses_a_run_name_that_is_not_a_plain_folder_name(workspace, name):
    """The issue: "." and ".." started `train --out runs` and `train --out .` (the repository root)."""
    manager = _manager(workspace)
    jobs_before = [j.id for j in manager.list()]
    runs_before = sorted(p.name for p in (workspace / "runs").iterdir())
    at = _start_training(_app("pages/training.py"), name)
    assert (f"Run name {name!r} is not a plain folder name: use letters, digits, '-', '_' and '.', starting with a "
            "letter or digit (the run is written to runs/<name>). Nothing was started." in [e.value for e in at.error])
    assert [j.id for j in manager.list()] == jobs_before
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == runs_before


def test_pages_refuse_a_map_that_is_not_the_datasets(tmp_path, monkeypatch):
    """Another save of the scene's map (e.g. regenerated) after the dataset and the run were made."""
    from core.stores.lineage import store_ref
    from core.stores.radio_map import RadioMap

    root = build_workspace(tmp_path)
    map_path, ds_path = root / "radio_maps" / "etoile.zarr", root / "datasets" / "etoile"
    made_with = store_ref(map_path)
    RadioMap.load(map_path).save(map_path)
    now, dataset = store_ref(map_path), store_ref(ds_path)
    monkeypatch.setenv("CORE_WORKSPACE", str(root))
    monkeypatch.setenv("CORE_JOBS_DB", str(root / ".jobs" / "jobs.sqlite"))
    mismatch = (f"radio map {map_path} (scene etoile, id {now.id[:8]}) is not the map dataset {ds_path} "
                f"(scene etoile, id {dataset.id[:8]}) was made with ({map_path} (scene etoile, id "
                f"{made_with.id[:8]})): make the dataset again, or restore that map")
    at = _app("pages/training.py")  # the launch form and the test-error CDF of the run
    assert [e.value for e in at.error] == [f"Cannot train on scene etoile: {mismatch}", f"run runs/tiny: {mismatch}"]
    _start_training(at, "fresh")
    assert f"Not started: {mismatch}" in [e.value for e in at.error]
    assert _manager(root).list() == [] and not (root / "runs" / "fresh").exists()
    for page in ("pages/attention.py", "pages/refinement.py"):
        at = _app(page)
        assert [e.value for e in at.error] == [f"run runs/tiny: {mismatch}"], page


def test_failed_job_is_shown_with_its_log_tail(workspace):
    manager = _manager(workspace)
    job = manager.submit(train_spec("configs/model.yaml", "runs/bad", {"physics_loss.lambda_phys": -1.0}))
    assert manager.wait(job.id, timeout_s=120).status == "failed"
    at = _app("pages/training.py")
    errors = _texts(at.error)
    assert "exit status 2" in errors and "lambda_phys" in errors
    logs = [c.value for c in at.code]
    assert any("lambda_phys" in text and "$ python -m core train" in text for text in logs)


# -- Attention ----------------------------------------------------------------------------
def test_attention_page(workspace):
    at = _app("pages/attention.py")
    figs = _plotly(at)
    assert len(figs) == 3
    temporal, cross, average = figs
    heads = sum(1 for t in temporal["data"] if t["type"] == "heatmap")
    assert heads >= 1 and temporal["layout"]["coloraxis"]["colorbar"]["title"]["text"] == "weight"
    assert cross["data"][0]["type"] == "heatmap" and any(t.get("name") == "ground truth" for t in cross["data"])
    w = _array(average["data"][0]["z"])
    assert np.isclose(w.sum(), 1.0, atol=1e-3)  # mean of distributions over patches
    at.selectbox(key="att_head").select_index(1).run()
    at.selectbox(key="att_report").select_index(1).run()
    at.number_input(key="att_sample").set_value(3).run()
    _no_exception(at)
    assert "head 1" in _plotly(at)[1]["layout"]["title"]["text"]


def test_attention_and_refinement_without_models(tmp_path, monkeypatch):
    """An empty workspace: each page says exactly what is missing (not just any warning)."""
    monkeypatch.setenv("CORE_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("CORE_JOBS_DB", str(tmp_path / ".jobs" / "jobs.sqlite"))
    no_model = "No trained model yet. Train one on the Training page"
    radio_map, dataset = tmp_path / "radio_maps" / "etoile.zarr", tmp_path / "datasets" / "etoile"
    expected = {
        "pages/attention.py": [no_model],
        "pages/refinement.py": [no_model],
        "pages/training.py": [f"**No dataset to train on**: {dataset} does not exist",
                              f"**Radio map**: {radio_map} does not exist. Training needs it"],
        "pages/radio_maps.py": [f"**No radio map**: {radio_map} does not exist"],
    }
    for page, messages in expected.items():
        at = _app(page)
        warnings = [str(w.value) for w in at.warning]
        assert len(warnings) == len(messages), (page, warnings)
        for message, warning in zip(messages, warnings):
            assert warning.startswith(message), (page, warning)


# -- Refinement ---------------------------------------------------------------------------
def test_refinement_inspector(workspace):
    from core.learning.inference import RESIDUAL_COLUMNS

    at = _app("pages/refinement.py")
    table = at.dataframe[0].value
    assert len(table) > 0 and (np.diff(table["error_m"].to_numpy()) <= 1e-9).all()  # worst first
    assert {"error_m", "map_error_m"} <= set(table.columns)
    figs = _plotly(at)
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert any("Batch summary" in t for t in titles) and any("MAP path" in t for t in titles)
    _check_network_heatmap(at, agnostic=False)
    surface = next(f for f in figs if f["layout"]["title"]["text"].startswith("Sample "))
    heat = surface["data"][0]
    assert heat["type"] == "heatmap" and heat["name"] == "posterior (likelihood + prior)"
    assert np.nanmin(_array(heat["z"])) == 0.0  # drawn as the difference from the best point in view
    names = [t.get("name") for t in surface["data"]]
    assert {"ground truth", "network estimate", "1σ network", "2σ network", "MAP estimate", "MAP path",
            "search starts", "1σ Cramér–Rao bound", "2σ Cramér–Rao bound"} <= set(names)
    assert "Cramér–Rao bound of the reports pooled" in _texts(at.caption)
    path = next(t for t in surface["data"] if t.get("name") == "MAP path")
    assert list(path["text"][:3]) == ["network", "best start", "pattern search"]
    assert len(_array(path["x"])) == len(path["text"])
    starts = next(t for t in surface["data"] if t.get("name") == "search starts")
    assert list(starts["text"][:2]) == ["window", "centre 1"]
    # the residual table: one row per reported site, residuals in sigma units before and after
    residuals = at.dataframe[1].value
    assert list(residuals.columns) == list(RESIDUAL_COLUMNS) and len(residuals) >= 1
    assert {"path_gain σ network", "toa σ MAP", "aoa σ MAP"} <= set(residuals.columns)
    metrics = {m.label: m.value for m in at.metric}
    done, total = metrics["Samples refined"].split(" / ")
    assert done == total  # every sample by default
    # the synthetic dataset records no sensitivity: the silence term is off and says why, in one line
    toggle = at.toggle(key="ref_silence")
    assert toggle.disabled and toggle.value is False
    assert "Silence term unavailable: silence: " in _texts(at.caption) and "records no sensitivity" in _texts(at.caption)
    assert "silent sites" not in at.selectbox(key="ref_layer").options
    # one site's term of the likelihood
    layers = at.selectbox(key="ref_layer").options
    site_layer = next(x for x in layers if x.startswith("site "))
    at.selectbox(key="ref_layer").select(site_layer).run()
    _no_exception(at)
    surface = next(f for f in _plotly(at) if f["layout"]["title"]["text"].startswith("Sample "))
    assert surface["data"][0]["name"] == site_layer and site_layer in surface["layout"]["title"]["text"]
    at.selectbox(key="ref_centre").select("ground truth").run()
    _no_exception(at)
    # starts from the exact scan: drawn and labelled among the search starts
    at.number_input(key="ref_scan").set_value(2).run()
    _no_exception(at)
    surface = next(f for f in _plotly(at) if f["layout"]["title"]["text"].startswith("Sample "))
    starts = next(t for t in surface["data"] if t.get("name") == "search starts")
    assert list(starts["text"][-2:]) == ["scan 1", "scan 2"]
    width = lambda: np.ptp(_array(next(t for t in next(  # noqa: E731
        f for f in _plotly(at) if f["layout"]["title"]["text"].startswith("Sample "))["data"]
        if t.get("name") == "1σ network")["x"]))
    before = width()
    at.number_input(key="ref_sigma_scale").set_value(0.25).run()  # a narrower prior: the ellipse drawn shrinks
    _no_exception(at)
    assert width() == pytest.approx(0.25 * before, rel=1e-3)
    at.number_input(key="ref_min_sigma").set_value(0.25).run()  # the prior's floor, as `auto` may choose it
    _no_exception(at)
    # the confidence gate is an option: below 0, nothing is refined
    at.checkbox(key="ref_gate").check().run()
    at.number_input(key="ref_thr").set_value(0.0).run()
    _no_exception(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Samples refined"].startswith("0 / ")
    # filters: every listed sample passes them, and an impossible filter empties the list
    at.selectbox(key="ref_los").select("LOS").run()
    _no_exception(at)
    los_only = at.dataframe[0].value
    n_los = int((table["los"] == "LOS").sum())
    assert len(los_only) == n_los and (los_only["los"] == "LOS").all()
    at.slider(key="ref_conf").set_value((0.999, 1.0)).run()
    _no_exception(at)
    n_confident = int(((table["los"] == "LOS") & table["confidence"].between(0.999, 1.0)).sum())
    if n_confident:  # both outcomes are checked: the matching rows, or the note that there are none
        assert len(at.dataframe[0].value) == n_confident
    else:
        assert "No sample matches the filters." in _texts(at.caption)
    at.slider(key="ref_err").set_value((0.0, 0.0)).run()  # no network error is exactly 0 m
    _no_exception(at)
    assert "No sample matches the filters." in _texts(at.caption)


def test_refinement_inspector_shows_errors_not_tracebacks(workspace, monkeypatch):
    import core.learning.inference as inference
    from core.errors import CoreError

    def broken_surface(*args, **kwargs):
        raise CoreError("likelihood surface: the map has no per-site layers")

    monkeypatch.setattr(inference, "refinement_surface", broken_surface)
    at = _app("pages/refinement.py")
    at.number_input(key="ref_limit").set_value(60).run()  # new cache keys
    _no_exception(at)
    assert "likelihood surface: likelihood surface: the map has no per-site layers" in _texts(at.error)
    assert len(at.dataframe) >= 2 and any("Batch summary" in f["layout"]["title"]["text"] for f in _plotly(at))

    def broken_refine(*args, **kwargs):
        raise CoreError("likelihood: the calibration has 3 sites, the map 5")

    monkeypatch.setattr(inference, "refine_prediction", broken_refine)
    at.number_input(key="ref_limit").set_value(70).run()
    _no_exception(at)
    assert [e.value for e in at.error] == ["refinement: likelihood: the calibration has 3 sites, the map 5"]
    assert not _plotly(at)


def _silent_dataset(workspace: Path) -> Path:
    """A dataset of etoile that records a sensitivity (so the silence term applies): the slots after the first
    whose measured path gain is below the median second slot's are dropped, so most reports have a free slot."""
    from core.physics.synthetic import synthetic_dataset
    from core.stores.measurement_model import MeasurementModel
    from core.stores.radio_map import RadioMap

    rm = RadioMap.load(workspace / "radio_maps" / "etoile.zarr")
    ds = synthetic_dataset(rm, 300, reports=6, seed=2)
    pg, ids = ds.site_features[..., 0], ds.site_ids
    threshold = float(np.nanmedian(pg[..., 1]))  # [dB]
    heard = np.isfinite(pg) & (pg >= threshold)
    heard[..., 0] = ids[..., 0] >= 0
    drop = ~np.cumprod(heard, axis=-1).astype(bool)
    ids[drop] = -1
    ds.site_features[drop] = np.nan
    ds.clean_site_features[drop] = np.nan
    tx = rm.attrs["radio"]["tx_power_dbm"]
    ds.attrs.update(scene="etoile", measurement_model=MeasurementModel(sensitivity_dbm=threshold + tx).to_attrs())
    return ds.save(workspace / "datasets" / "etoile_silent")


def test_the_silence_term_on_the_refinement_inspector(workspace):
    """On a dataset that records a sensitivity, the "Silence term" toggle refines with the likelihood that also
    charges the unheard sites: off, the estimates are the plain likelihood's; on, the silence term's (its nats
    shown, its own surface view), and the cached run is never changed."""
    import shutil

    from core.learning.inference import calibrate_run, load_run, predict, refine_prediction, refinement_surface

    path = _silent_dataset(workspace)
    try:
        run = load_run(workspace / "runs" / "tiny", scene="etoile", dataset_path=path)
        calibrate_run(run)
        pred = predict(run, run.dataset.indices("test"))
        window_s = run.config.physics_loss.report_window_s
        off = refine_prediction(run, pred, top_k=3, window_s=window_s)
        silent = run.with_silence(True)
        on = refine_prediction(silent, pred, top_k=3, window_s=window_s)
        assert run.config.physics_loss.silence is False and run.likelihood.silence is None  # the run is unchanged
        assert silent.with_silence(False).likelihood.silence is None and run.with_silence(True) is silent
        row = int(np.argmax(on.silence_before))  # the sample whose unheard sites cost most at the network's mean
        assert on.silence_before[row] > 0.5 and off.silence_before[row] == 0.0
        surf = refinement_surface(silent, on, row, half_m=4.0, centre=on.xy[row], step_m=1.0)  # its own layer
        assert np.allclose(surf.nll, surf.site.sum(0) + surf.cell + surf.silence, atol=1e-3)
        assert np.isclose(surf.silence[4, 4], on.silence_after[row], atol=1e-3)
        assert np.isclose(surf.posterior[4, 4], on.posterior_after[row], atol=1e-3)

        at = _app()
        at.selectbox(key="_dataset_picker").select("etoile_silent").run()
        at.session_state["ref_run"] = "runs/tiny"  # (other tests of the module train more runs)
        at.switch_page("pages/refinement.py").run()
        _no_exception(at)
        assert at.selectbox(key="ref_run").value == "runs/tiny"
        toggle = at.toggle(key="ref_silence")
        assert not toggle.disabled and toggle.value is False and "Silence term unavailable" not in _texts(at.caption)

        def estimates(at: AppTest) -> np.ndarray:
            return at.dataframe[0].value.sort_values("sample")["map_error_m"].to_numpy()

        np.testing.assert_allclose(estimates(at), np.round(off.error_after_m, 3), atol=2e-3)  # off: as before
        at.selectbox(key="ref_sample").select(int(pred.indices[row])).run()
        before = _texts(at.markdown)
        at.toggle(key="ref_silence").set_value(True).run()
        _no_exception(at)
        np.testing.assert_allclose(estimates(at), np.round(on.error_after_m, 3), atol=2e-3)
        assert not np.allclose(on.error_after_m, off.error_after_m)  # the term moves some estimates
        assert f"add {on.silence_before[row]:.2f} nats at the network's estimate" in _texts(at.caption)
        assert f"posterior {on.posterior_before[row]:.2f}" in _texts(at.markdown) and _texts(at.markdown) != before
        assert on.posterior_before[row] > off.posterior_before[row] + 0.5
        assert "silent sites" in at.selectbox(key="ref_layer").options
        at.selectbox(key="ref_layer").select("silent sites").run()
        _no_exception(at)
        surface = next(f for f in _plotly(at) if f["layout"]["title"]["text"].startswith("Sample "))
        assert surface["data"][0]["name"] == "silent sites" and np.nanmax(_array(surface["data"][0]["customdata"])) > 0
        at.toggle(key="ref_silence").set_value(False).run()  # back: the plain likelihood's estimates again
        _no_exception(at)
        np.testing.assert_allclose(estimates(at), np.round(off.error_after_m, 3), atol=2e-3)
        assert "silent sites" not in at.selectbox(key="ref_layer").options
    finally:
        shutil.rmtree(path)


def test_job_survives_an_app_restart(workspace):
    """The job list is read from the database: a new session (an app restart) still sees it."""
    manager = _manager(workspace)
    from core.jobs.manager import generate_maps_spec

    job = manager.submit(generate_maps_spec("florence", "radio_maps", samples_per_tx=1000))
    try:
        at = _app()
        codes = [c.value for c in at.code]
        assert any(job.command in text for text in codes)
        cancel = next(b for b in at.button if b.key == f"scene_jobs-cancel-{job.id}")
        cancel.click().run()
        _no_exception(at)
        assert manager.wait(job.id, timeout_s=20).status == "cancelled"
    finally:
        manager.cancel(job.id, grace_s=1.0)


def test_ablation_results_are_tabled_and_plotted(workspace):
    """An ablation folder (table.csv, curve.csv, cdf.json, summary.json as `python -m core ablate` writes
    them) is shown: header, table per group, median vs label fraction with CI bands, CDFs per block."""
    import pandas as pd

    from core.learning.inference import load_run, predict
    from core.learning.metrics import error_cdf, error_metrics

    run = load_run(workspace / "runs" / "tiny")
    errors = predict(run, run.dataset.indices("test")).error_m
    out = workspace / "runs" / "ablation"
    out.mkdir()
    arms = (("transformer λ=0", 0.0, errors), ("transformer λ=0.1", 0.1, errors * 0.9))
    rows = [{"split": "random", "label_fraction": 1.0, "refinement": "off", "group": g, "arm": name, "lambda_phys": lam,
             "seeds": 3, **error_metrics(e)} for g in ("all", "nlos") for name, lam, e in arms]
    pd.DataFrame(rows).to_csv(out / "table.csv", index=False)
    curve = [{"split": "random", "refinement": "off", "arm": name, "lambda_phys": lam, "label_fraction": f,
              "seeds": 3, "median_m": float(np.median(e)) / f, "median_m_lo": 0.9 * float(np.median(e)) / f,
              "median_m_hi": 1.1 * float(np.median(e)) / f} for name, lam, e in arms for f in (0.05, 0.2, 1.0)]
    pd.DataFrame(curve).to_csv(out / "curve.csv", index=False)
    (out / "cdf.json").write_text(json.dumps({"random split, 100 % labels": {n: error_cdf(e) for n, _, e in arms}}))
    (out / "summary.json").write_text(json.dumps({"header": "# Ablation of the physics term — test header"}))
    try:
        at = _app("pages/training.py")
        _no_exception(at)
        assert any("Ablation of the physics term — test header" in m.value for m in at.markdown)
        tables = [d.value for d in at.dataframe]
        shown = next(t for t in tables if "arm" in t)
        assert list(shown["arm"]) == ["transformer λ=0", "transformer λ=0.1"] and set(shown["group"]) == {"all"}
        figs = _plotly(at)
        frac = next(f for f in figs if "test median vs label fraction" in f["layout"]["title"]["text"])
        lines = [t for t in frac["data"] if t.get("mode") == "lines+markers"]
        assert [t["name"] for t in lines] == ["transformer λ=0", "transformer λ=0.1"]
        assert len(frac["data"]) == 4  # a CI band per line
        cdf = next(f for f in figs if f["layout"]["title"]["text"].startswith("Test-split error CDF"))
        assert [t["name"].split(" (")[0] for t in cdf["data"]] == ["transformer λ=0", "transformer λ=0.1"]
        med = float(cdf["data"][0]["name"].split("median ")[1].split(" m")[0])
        assert abs(med - np.median(errors)) < 0.05 * np.percentile(errors, 99) + 0.01  # on the 200-point grid
    finally:
        import shutil

        shutil.rmtree(out)


def test_corrupt_dataset_is_reported_on_training(workspace):
    bad = workspace / "datasets" / "broken"
    bad.mkdir(parents=True)
    (bad / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"kind": "x"}}))
    at = _app("pages/training.py", scene="broken")
    assert "Dataset broken" in _texts(at.warning) and "not a measurement dataset store" in _texts(at.warning)
    assert any(b.label == "Make the dataset of broken" for b in at.button)


def test_map_difference_wraps_angles_and_refuses_other_grids():
    from core.stores.radio_map import RadioMap
    from core.viz.plots import difference, ellipse_points

    a = RadioMap(np.full((1, 2, 3), 179.0, np.float32), ["aoa"], (0, 0, 3, 2))
    b = RadioMap(np.full((1, 2, 3), -179.0, np.float32), ["aoa"], (0, 0, 3, 2))
    assert np.allclose(difference(a, b, "aoa"), -2.0)  # 179 - (-179) = 358 -> -2 deg, not 358
    other = RadioMap(np.zeros((1, 2, 2), np.float32), ["aoa"], (0, 0, 2, 2))
    with pytest.raises(Exception, match="different grids"):
        difference(a, other, "aoa")
    pts = ellipse_points((10.0, -5.0), (3.0, 1.0), n_sigma=2.0)
    assert np.allclose(pts.max(axis=0), [16.0, -3.0], atol=1e-2) and np.allclose(pts.min(axis=0), [4.0, -7.0], atol=1e-2)


def test_every_page_on_the_shipped_default_scene(tmp_path, monkeypatch):
    """A clean clone opens on etoile with its shipped map, dataset and model, and every page
    draws without a warning. Reads the shipped data only; jobs and caches go to tmp."""
    monkeypatch.delenv("CORE_WORKSPACE", raising=False)
    monkeypatch.setenv("CORE_JOBS_DB", str(tmp_path / "jobs.sqlite"))
    monkeypatch.setenv("CORE_RUNS_DIR", str(tmp_path / "runs"))  # the shipped model, not a checkout's own runs
    at = _app()
    assert at.sidebar.selectbox(key="_scene_picker").value == "etoile"
    assert {m.label: m.value for m in at.metric}["Radio map"] == "ok"
    assert {m.label: m.value for m in at.metric}["Dataset"] == "ok"
    assert int({m.label: m.value for m in at.metric}["Trained models"]) >= 1
    # the shipped dataset predates the measurement-model record: it reads as what made it
    assert any("K = 4, sites ≥ -100 dBm; world: oracle" in e.label for e in at.expander)
    assert at.get("deck_gl_json_chart") and not at.warning
    expected = {"pages/radio_maps.py": 2, "pages/training.py": 2, "pages/attention.py": 3, "pages/refinement.py": 4}
    for page, charts in expected.items():
        at.switch_page(page).run()
        _no_exception(at)
        assert not at.warning and not at.error, (page, _texts(at.warning), _texts(at.error))
        assert len(at.get("plotly_chart")) >= charts, page


def test_the_shipped_many_city_run_on_munich(tmp_path, monkeypatch):
    """The shipped scene-agnostic run (assets/agnostic_many: trained on etoile, florence and both street canyons,
    munich held out) on the shipped data: the Training page lists it with its held-out scene and its shipped
    evaluation on munich; the Attention and Refinement pages draw it on munich. Reads the shipped data only."""
    monkeypatch.delenv("CORE_WORKSPACE", raising=False)
    monkeypatch.setenv("CORE_JOBS_DB", str(tmp_path / "jobs.sqlite"))
    monkeypatch.setenv("CORE_RUNS_DIR", str(tmp_path / "runs"))  # the shipped runs, not a checkout's own
    shipped = json.loads((REPO_ROOT / "assets" / "agnostic_many" / "eval_test_munich_refine.json").read_text())
    assert shipped["held_out"] and shipped["scene"] == "munich" and shipped["count"] == 300
    at = _app("pages/training.py", scene="munich")
    assert not at.error, _texts(at.error)
    runs = at.dataframe[0].value.set_index("run")
    row = runs.loc["assets/agnostic_many"]
    assert row["held out"] == "munich" and row["scenes"] == ("etoile, florence, simple_street_canyon, "
                                                             "simple_street_canyon_with_cars")
    held = next(d.value for d in at.dataframe if "network + MAP median [m]" in d.value.columns)
    assert list(held["scene"]) == ["munich"] and list(held["UEs"]) == [300]
    assert held["network median [m]"].iloc[0] == pytest.approx(shipped["median_m"])
    assert held["network + MAP median [m]"].iloc[0] == pytest.approx(shipped["refinement"]["after"]["median_m"])
    assert held["network median [m]"].iloc[0] < 3.0 and held["network + MAP median [m]"].iloc[0] < 1.5
    assert "**munich** held out" in _texts(at.markdown)
    at.switch_page("pages/attention.py").run()
    _no_exception(at)
    assert at.selectbox(key="att_run").value == "assets/agnostic_many"  # preselected: munich is its held-out scene
    assert not at.error and not at.warning, (_texts(at.error), _texts(at.warning))
    assert "Scene 'munich' is held out" in _texts(at.info)
    _check_agnostic_attention(at, site_names={f"site{k}" for k in range(5)})
    at.switch_page("pages/refinement.py").run()
    _no_exception(at)
    assert at.selectbox(key="ref_run").value == "assets/agnostic_many"
    assert not at.error and not at.warning, (_texts(at.error), _texts(at.warning))
    _check_network_heatmap(at, agnostic=True)
    summary = {m.label: m.value for m in at.metric}
    assert summary["Samples refined"] == "300 / 300"


def test_training_on_many_scenes_and_a_held_out_one(tmp_path, monkeypatch):
    """The launch form picks the training scenes and the held-out scene; the run table shows them."""
    from core.learning.config import load_config
    from core.learning.training import train
    from core.physics.synthetic import synthetic_scene

    root = build_workspace(tmp_path)
    synthetic_scene(root, num_ues=120, height=20, width=28, cell=4.0, reports=6, k=4, seed=1, scene="munich")
    synthetic_scene(root, num_ues=120, height=20, width=20, cell=4.0, reports=6, k=4, seed=2, scene="florence")
    config = load_config(REPO_ROOT / "configs" / "model.yaml", [
        f"data.datasets=[{root / 'datasets' / 'etoile'}, {root / 'datasets' / 'munich'}]", "model.preset=tiny",
        "training.epochs=1", "training.num_threads=1", "data.holdout_scene=florence",
        f"physics_loss.radio_maps_dir={root / 'radio_maps'}"])
    train(config, root / "runs" / "two", device="cpu", show_progress=False)
    monkeypatch.setenv("CORE_WORKSPACE", str(root))
    monkeypatch.setenv("CORE_JOBS_DB", str(root / ".jobs" / "jobs.sqlite"))
    synthetic_scene(root / "corpus", num_ues=120, height=20, width=20, cell=4.0, reports=6, k=4, seed=3,
                    scene="city_7")  # a corpus city: corpus/datasets/city_7 with its map in corpus/radio_maps
    at = _app("pages/training.py")
    runs = at.dataframe[0].value.set_index("run")
    assert runs.loc["runs/two", "scenes"] == "etoile, munich" and runs.loc["runs/two", "held out"] == "florence"
    assert runs.loc["runs/tiny", "scenes"] == "etoile"
    assert set(at.multiselect(key="train_scenes").options) >= {"etoile", "munich", "florence", "city_7 (corpus)"}
    at.multiselect(key="train_scenes").set_value(["etoile", "munich"])  # the same page as a fresh one: only read
    at.selectbox(key="train_holdout").select("munich")
    _start_training(at, "refused")
    assert any("held-out scene 'munich' is also a training scene" in e.value for e in at.error)
    assert _manager(root).list() == []
    at.selectbox(key="train_holdout").select("florence")
    at.selectbox(key="mp_model").select("tiny")
    _start_training(at, "multi")
    manager = _manager(root)
    job = next(j for j in manager.list() if j.kind == "train")
    assert '--set data.datasets=["datasets/etoile", "datasets/munich"]' in job.command or \
        "data.datasets=" in job.command and "munich" in job.command
    assert "--set data.holdout_scene=florence" in job.command
    manager.cancel(job.id, grace_s=1.0)
    # evaluate the run on its held-out scene, with MAP on that scene's map: a real job, then its table
    at.selectbox(key="eval_run").select("runs/two").run()
    assert at.selectbox(key="eval_scene").options[0] == "florence (held out)"
    at.selectbox(key="eval_scene").select("florence").run()
    at.button(key="eval_go").click().run()
    _no_exception(at)
    job = next(j for j in manager.list() if j.kind == "evaluate")
    assert job.command.endswith("evaluate --run runs/two --split test --scene florence --refine")
    assert manager.wait(job.id, timeout_s=240).status == "succeeded", manager.log(job.id)
    at = _app("pages/training.py")
    table = next(d.value for d in at.dataframe if "role" in d.value.columns)
    assert list(zip(table["scene"], table["role"])) == [("etoile", "trained"), ("munich", "trained"),
                                                        ("florence", "held-out")]
    assert np.isfinite(table["refined_median_m"]).all()
    methods = next(d.value for d in at.dataframe if "worst 2 % share of e²" in d.value.columns)
    assert {"network", "network + MAP"} <= set(methods.index)  # every method the eval JSON holds
    for page in ("pages/attention.py", "pages/refinement.py"):  # the run on its held-out scene's data and map
        at = _app(page, scene="florence")
        at.selectbox(key="att_run" if "attention" in page else "ref_run").select("runs/two").run()
        _no_exception(at)
        assert not at.error, _texts(at.error)
        if "attention" in page:
            assert "Scene 'florence' is held out" in _texts(at.info)
    # corpus cities train beside the real scenes (and can be held out): their corpus datasets, their corpus maps
    at.switch_page("pages/training.py").run()
    at.multiselect(key="train_scenes").set_value(["etoile", "city_7"])
    at.selectbox(key="train_holdout").select("munich")
    _start_training(at, "with_corpus")
    job = next(j for j in _manager(root).list() if j.kind == "train" and "with_corpus" in j.command)
    assert "corpus/datasets/city_7" in job.command and "--set data.holdout_scene=munich" in job.command
    _manager(root).cancel(job.id, grace_s=1.0)
    from core.learning.scene_data import load_scenes

    scenes = load_scenes(load_config(REPO_ROOT / "configs" / "model.yaml", [
        f"data.datasets=[{root / 'datasets' / 'etoile'}, {root / 'corpus' / 'datasets' / 'city_7'}]",
        f"physics_loss.radio_maps_dir={root / 'radio_maps'}"]))
    assert [m.ref.scene for _, m in scenes] == ["etoile", "city_7"]
    assert scenes[1][1].source is not None and "corpus" in str(scenes[1][1].source)


def _evaluate_from_the_page(root: Path, run: str, ensemble: list[str] | None = None):
    """The Training page's Evaluate click for ``run`` on etoile (with ``ensemble`` picked, when given):
    ``(the job manager, the evaluate job it started)``."""
    at = _app("pages/training.py")
    at.selectbox(key="eval_run").select(run).run()
    if ensemble:
        assert set(ensemble) <= set(at.multiselect(key="eval_ensemble").options)
        at.multiselect(key="eval_ensemble").set_value(ensemble).run()
    at.selectbox(key="eval_scene").select("etoile").run()
    at.button(key="eval_go").click().run()
    _no_exception(at)
    manager = _manager(root)
    return manager, next(j for j in manager.list() if j.kind == "evaluate")


def test_evaluating_the_shipped_run_in_the_app_leaves_it_untouched(tmp_path, monkeypatch):
    """An Evaluate click on the shipped run (assets/default_run) writes to runs/evaluations/, which the page
    reads back; nothing under assets/ changes (here the workspace's, and the repository's tracked files)."""
    import hashlib
    import shutil
    import subprocess

    def digest(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}

    root = build_workspace(tmp_path)
    shutil.copytree(root / "runs" / "tiny", root / "assets" / "default_run")
    before = digest(root / "assets")
    monkeypatch.setenv("CORE_WORKSPACE", str(root))
    monkeypatch.setenv("CORE_JOBS_DB", str(root / ".jobs" / "jobs.sqlite"))
    manager, job = _evaluate_from_the_page(root, "assets/default_run")
    assert job.command.endswith("evaluate --run assets/default_run --split test --scene etoile --refine")
    result = root / "runs" / "evaluations" / "default_run" / "eval_test_etoile_refine.json"
    assert job.output == str(result)
    assert manager.wait(job.id, timeout_s=240).status == "succeeded", manager.log(job.id)
    assert digest(root / "assets") == before and result.exists()
    at = _app("pages/training.py")
    at.selectbox(key="eval_run").select("assets/default_run").run()
    assert f"**{ws_rel(root, result)}** — test errors [m] per scene" in _texts(at.markdown)
    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "assets", "radio_maps",
                              "datasets"], capture_output=True, text=True, check=True).stdout
    assert tracked == ""


def test_an_ensemble_is_evaluated_from_the_training_page(tmp_path, monkeypatch):
    """Two runs of one dataset picked as an ensemble: the job is ``evaluate --ensemble``, its result file the
    ensemble's; with another scene the job is refused before it starts."""
    import shutil

    root = build_workspace(tmp_path)
    shutil.copytree(root / "runs" / "tiny", root / "runs" / "tiny_b")
    monkeypatch.setenv("CORE_WORKSPACE", str(root))
    monkeypatch.setenv("CORE_JOBS_DB", str(root / ".jobs" / "jobs.sqlite"))
    manager, job = _evaluate_from_the_page(root, "runs/tiny", ensemble=["runs/tiny_b"])
    assert job.command.endswith("evaluate --run runs/tiny --split test --ensemble runs/tiny_b --refine")
    assert Path(job.output).name.startswith("eval_test_refine_ens-2-")
    assert manager.wait(job.id, timeout_s=240).status == "succeeded", manager.log(job.id)
    assert json.loads(Path(job.output).read_text())["ensemble"] == ["runs/tiny", "runs/tiny_b"]
    from core.errors import CoreError
    from core.jobs.manager import evaluate_spec

    with pytest.raises(CoreError, match="an ensemble is evaluated on its first run's own scene"):
        evaluate_spec("runs/tiny", "munich", ensemble=["runs/tiny_b"])


def ws_rel(root: Path, path: Path) -> str:
    return str(path.resolve().relative_to(root.resolve()))


# -- Localize -----------------------------------------------------------------------------
def test_localize_page_pools_an_ensemble(tmp_path, monkeypatch):
    """Another run of the dataset picked as an ensemble: the positions file is the ensemble's (its own name), its
    network columns the members' mean (here two copies of one run: that run's own)."""
    import shutil

    import pandas as pd

    from core.reports.export import export_reports

    root = build_workspace(tmp_path)
    shutil.copytree(root / "runs" / "tiny", root / "runs" / "tiny_b")
    monkeypatch.setenv("CORE_WORKSPACE", str(root))
    monkeypatch.setenv("CORE_JOBS_DB", str(root / ".jobs" / "jobs.sqlite"))
    export_reports(root / "datasets" / "etoile", "test", root / "reports" / "test.csv", show_progress=False, limit=6)
    at = _app("pages/localize.py")
    at.selectbox(key="loc_run").select("runs/tiny").run()
    at.selectbox(key="loc_file").select("reports/test.csv").run()
    at.selectbox(key="loc_method").select("network").run()
    at.button(key="loc_go").click().run()  # the run alone
    at.multiselect(key="loc_ensemble").set_value(["runs/tiny_b"]).run()
    at.button(key="loc_go").click().run()
    _no_exception(at)
    alone = pd.read_csv(root / "reports" / "localized" / "test.tiny.network.csv")
    pooled = pd.read_csv(root / "reports" / "localized" / "test.tiny.ens2-tiny_b.network.csv")
    assert np.allclose(pooled["network_x_m"], alone["network_x_m"], atol=1e-4) and len(pooled) == len(alone)
    # network + MAP with the search's own settings: a positions file of its own, the run's settings untouched
    at.selectbox(key="loc_method").select("network + MAP").run()
    at.selectbox(key="loc_scale").select("a number").run()
    at.number_input(key="loc_scale_value").set_value(0.5).run()
    at.number_input(key="loc_scan").set_value(2).run()
    at.button(key="loc_go").click().run()
    _no_exception(at)
    searched = pd.read_csv(root / "reports" / "localized" / "test.tiny.ens2-tiny_b.s0.5.scan2.map.csv")
    assert len(searched) == len(alone) and np.isfinite(searched["x_m"]).all()
    assert "Writes `reports/localized/test.tiny.ens2-tiny_b.s0.5.scan2.map.csv`" in " ".join(c.value for c in at.caption)


def test_localize_page_tracks_download_and_inspector(workspace):
    """A report file of the workspace localized on the page: tracks coloured by error, the error table, the
    download, and one point opened in the Refinement inspector."""
    from core.reports.export import export_reports

    export_reports(workspace / "datasets" / "etoile", "test", workspace / "reports" / "test.csv",
                   show_progress=False, limit=12)
    at = _app("pages/localize.py")
    at.selectbox(key="loc_run").select("runs/tiny").run()  # other tests of this module add runs
    at.selectbox(key="loc_file").select("reports/test.csv").run()
    at.button(key="loc_go").click().run()
    _no_exception(at)
    out = workspace / "reports" / "localized" / "test.tiny.map.csv"
    assert out.is_file()
    (fig,) = [f for f in _plotly(at) if "positions of 12 walks" in f["layout"]["title"]["text"]]
    names = [t.get("name") for t in fig["data"]]
    assert {"tracks", "positions"} <= set(names) and any(str(n).startswith("1σ ellipses") for n in names)
    positions = next(t for t in fig["data"] if t.get("name") == "positions")
    assert positions["marker"]["colorbar"]["title"]["text"] == "error m"  # coloured by error: truth given
    assert "Median error (walk ends)" in {m.label for m in at.metric}
    assert "network + MAP" in _texts(at.code)  # the error table, as evaluate prints it
    assert at.get("download_button")
    at.button(key="loc_inspect").click().run()
    _no_exception(at)
    assert at.session_state["ref_report_point"]["reports"].endswith("test.csv")
    assert any("posterior" in f["layout"]["title"]["text"] and "Walk" in f["layout"]["title"]["text"]
               for f in _plotly(at))


def test_localize_page_runs_a_large_file_as_a_job(workspace, monkeypatch):
    """Above the page's size limit the file is localized by a `python -m core localize` job (progress, cancel)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from waiting import wait_for

    from core.reports.export import export_reports

    export_reports(workspace / "datasets" / "etoile", "test", workspace / "reports" / "big.parquet",
                   show_progress=False)
    monkeypatch.setenv("CORE_LOCALIZE_PAGE_BYTES", "0")
    at = _app("pages/localize.py")
    at.selectbox(key="loc_run").select("runs/tiny").run()
    at.selectbox(key="loc_file").select("reports/big.parquet").run()
    at.selectbox(key="loc_method").select("network").run()
    assert "runs as a background job" in _texts(at.caption)
    at.button(key="loc_go").click().run()
    _no_exception(at)
    manager = _manager(workspace)
    job = next(j for j in manager.list() if j.kind == "localize")
    out = workspace / "reports" / "localized" / "big.tiny.network.csv"
    assert job.command == (f"python -m core localize --run runs/tiny --reports {workspace / 'reports' / 'big.parquet'} "
                           f"--method network --out {out}")
    job = wait_for(lambda: (j := manager.get(job.id)).status in ("succeeded", "failed", "cancelled") and j,
                   timeout=120, what="the localize job")
    assert job.status == "succeeded", manager.log(job.id)
    at.run()
    _no_exception(at)
    assert out.is_file() and any("positions of" in f["layout"]["title"]["text"] for f in _plotly(at))


def test_another_world_of_the_scene_is_picked_in_the_sidebar_and_read_by_every_page(workspace):
    """A second dataset of etoile (a realistic world) is one more choice of the sidebar's dataset picker,
    never a scene of its own; the Refinement and Attention pages then read it, and the Training page's
    evaluation command names it."""
    import shutil

    from core.physics.synthetic import synthetic_dataset
    from core.stores.measurement_model import MeasurementModel
    from core.stores.radio_map import RadioMap
    from core.stores.world_model import PRESETS

    rm = RadioMap.load(workspace / "radio_maps" / "etoile.zarr")
    ds = synthetic_dataset(rm, 300, reports=6, seed=1)
    ds.attrs.update(scene="etoile", measurement_model=MeasurementModel(world=PRESETS["realistic"]).to_attrs())
    path = ds.save(workspace / "datasets" / "etoile_realistic")
    try:
        wb_scenes = _app()
        assert "etoile_realistic" not in wb_scenes.selectbox(key="_scene_picker").options
        picker = wb_scenes.selectbox(key="_dataset_picker")
        assert list(picker.options) == ["etoile — oracle", "etoile_realistic — realistic"]
        picker.select("etoile_realistic").run()
        _no_exception(wb_scenes)
        assert "Other datasets of etoile" in _texts(wb_scenes.caption)
        assert at_state(wb_scenes)["etoile"] == "etoile_realistic"  # (AppTest drops the sidebar after a rerun)
        for page in ("pages/refinement.py", "pages/attention.py"):
            wb_scenes.switch_page(page).run()
            _no_exception(wb_scenes)
            assert any("Reading `datasets/etoile_realistic`" in str(i.value) for i in wb_scenes.info), page
        wb_scenes.switch_page("pages/training.py").run()
        _no_exception(wb_scenes)
        assert "--dataset datasets/etoile_realistic" in _texts(wb_scenes.caption)
        assert "dataset `datasets/etoile_realistic`" in _texts(wb_scenes.caption)
    finally:
        shutil.rmtree(path)


def at_state(at: AppTest) -> dict:
    return at.session_state["active_datasets"]


def test_an_agnostic_run_on_the_attention_and_refinement_pages(workspace):
    """A scene-agnostic run (no map patches) draws its temporal attention, says in one line why there is no
    cross-attention, and goes through the Refinement inspector like any run."""
    import torch

    from core.learning.config import load_config
    from core.learning.training import train

    threads = torch.get_num_threads()
    config = load_config(REPO_ROOT / "configs" / "agnostic.yaml", [
        f"data.dataset={workspace / 'datasets' / 'etoile'}", "model.preset=tiny", "training.epochs=1",
        "training.batch_size=64", "training.num_threads=1", f"physics_loss.radio_maps_dir={workspace / 'radio_maps'}"])
    train(config, workspace / "runs" / "tiny_agnostic", device="cpu", show_progress=False)
    torch.set_num_threads(threads)
    at = _app("pages/attention.py")
    at.selectbox(key="att_run").select("runs/tiny_agnostic").run()
    _no_exception(at)
    assert not at.error and not at.warning
    assert "no map patches" in _texts(at.caption)
    _check_agnostic_attention(at, site_names={"site0", "site1", "site2"})
    at.selectbox(key="att_cand_query").select_index(1).run()  # the first candidate's attention as lines
    at.selectbox(key="att_cand_pick").select_index(2).run()
    _no_exception(at)
    data = _plotly(at)[0]["data"]
    lines = [t for t in data if str(t.get("name", "")).startswith("attention of c1")]  # c1 to every candidate
    n_cand = len(next(t for t in data if t.get("name") == "candidate cells")["text"])
    assert len(lines) == n_cand and all(t["hovertemplate"].startswith("c1") for t in lines)
    assert "c3" in _plotly(at)[2]["layout"]["title"]["text"]
    at.switch_page("pages/refinement.py").run()
    at.selectbox(key="ref_run").select("runs/tiny_agnostic").run()
    _no_exception(at)
    assert not at.error and any(f["layout"]["title"]["text"].startswith("Sample ") for f in _plotly(at))
    _check_network_heatmap(at, agnostic=True)


def _check_agnostic_attention(at: AppTest, site_names: set[str]) -> None:
    """The Attention page of an agnostic run: candidates on the map with their probabilities, the attention
    between them (rows sum to 1), a candidate's temporal attention over report tokens labelled by time and
    site, the attention per site, and the scene averages."""
    titles = {"Candidates": "Candidates of", "Attention": "Attention between", "Temporal": "Temporal self-attention",
              "Mean": "Mean attention between", "Where": "Where the network"}
    figs = {k: next((f for f in _plotly(at) if f["layout"]["title"]["text"].startswith(t)), None)
            for k, t in titles.items()}
    assert all(f is not None for f in figs.values()), [f["layout"]["title"]["text"] for f in _plotly(at)]
    cmap = figs["Candidates"]
    names = {t.get("name") for t in cmap["data"]}
    assert {"network", "candidate cells", "ground truth", "network estimate"} <= names
    cand = next(t for t in cmap["data"] if t.get("name") == "candidate cells")
    prob = _array(cand["customdata"])
    assert len(prob) >= 2 and (prob >= 0).all() and prob.sum() <= 1 + 1e-6
    assert cand["text"][0].startswith("c1") and sum("*" in x for x in cand["text"]) <= 1
    heat = next(t for t in cmap["data"] if t.get("name") == "network")
    assert np.isclose(_array(heat["customdata"]).sum(), 1.0, atol=1e-3)  # the distribution over every cell
    matrix = _array(figs["Attention"]["data"][0]["z"])
    assert matrix.shape == (len(prob), len(prob)) and np.allclose(matrix.sum(1), 1.0, atol=1e-4)
    temporal = figs["Temporal"]
    labels = list(temporal["data"][0]["x"])
    present = [x for x in labels if "missing" not in x]
    assert present and all(" s: " in x for x in present) and present[-1].split()[1] == "+0.0"
    heard = {site.strip() for x in present for site in x.split(" s: ")[1].split(",")}
    assert heard <= site_names, heard
    shares = next(f for f in _plotly(at) if f["layout"]["title"]["text"].startswith("Attention received per site"))
    assert set(shares["data"][0]["x"]) <= site_names and np.isclose(_array(shares["data"][0]["y"]).sum(), 1.0)
    rank = _array(figs["Mean"]["data"][0]["z"])
    assert rank.shape == matrix.shape and np.allclose(rank.sum(1), 1.0, atol=1e-4)
    assert np.isclose(_array(figs["Where"]["data"][0]["customdata"]).sum(), 1.0, atol=1e-3)


def _check_network_heatmap(at: AppTest, agnostic: bool) -> None:
    """The Refinement inspector draws the network's distribution beside the likelihood surface: coarse cells
    (a distribution), the agnostic model's candidates and sub-point weights (sum to 1), truth, network, MAP."""
    figs = [f for f in _plotly(at) if f["layout"]["title"]["text"].startswith("The network's distribution")]
    assert len(figs) == 2, [f["layout"]["title"]["text"] for f in _plotly(at)]
    view = figs[0]
    names = {t.get("name") for t in view["data"]}
    assert {"coarse cells", "ground truth", "network estimate", "MAP estimate", "1σ network"} <= names
    coarse = next(t for t in view["data"] if t.get("name") == "coarse cells")
    assert np.isclose(_array(coarse["customdata"]).sum(), 1.0, atol=1e-3)
    assert ({"candidate cells", "fine sub-points"} <= names) == agnostic
    if agnostic:
        sub = next(t for t in view["data"] if t.get("name") == "fine sub-points")
        assert np.isclose(_array(sub["z"]).sum(), 1.0, atol=1e-4)
