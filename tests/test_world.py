"""A world that differs from the map (core/raytracing/world.py, core/stores/world_model.py), on the tiny
real Sionna scene: each perturbation has a test that fails if its option is ignored."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import CoreError
from core.stores.measurement_model import MeasurementModel
from core.stores.world_model import ORACLE, PRESETS, WorldModel

pytestmark = pytest.mark.sionna


@pytest.fixture(scope="module")
def setting(tiny_map):
    """``(scene info, map sites, propagation, bounds)`` of the tiny map."""
    from core.raytracing.scenes import resolve_scene
    from core.raytracing.tracing import PropagationSettings

    return (resolve_scene("simple_street_canyon"), tiny_map.attrs["sites"],
            PropagationSettings.from_dict(tiny_map.attrs["propagation"]), tiny_map.bounds)


@pytest.fixture(scope="module")
def street_points(tiny_scene, tiny_map):
    """Outdoor points 1.5 m above the street, every 6 m."""
    from core.raytracing.tracing import indoor_mask

    x0, y0, x1, y1 = tiny_map.bounds
    xx, yy = np.meshgrid(np.arange(x0 + 2, x1, 6.0), np.arange(y0 + 2, y1, 6.0))
    pts = np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, 1.5)], 1)
    return pts[~indoor_mask(tiny_scene, pts)]


def _world(setting, world):
    from core.raytracing.world import world_scene

    info, sites, prop, bounds = setting
    return world_scene(info, sites, prop.radio, world, bounds)


def test_a_removed_building_opens_line_of_sight_in_the_world_only(setting, tiny_scene, street_points):
    from core.raytracing.tracing import line_of_sight, trace_points

    scene, realisation = _world(setting, WorldModel(remove_fraction=0.5, seed=1))
    assert realisation["removed_buildings"] and not any(b in scene.objects for b in realisation["removed_buildings"])
    opened = []
    for s, site in enumerate(setting[1]):
        in_map = line_of_sight(tiny_scene, street_points, np.asarray(site["position"]))
        in_world = line_of_sight(scene, street_points, np.asarray(site["position"]))
        assert not (in_map & ~in_world).any()  # removing never blocks
        opened += [(s, i) for i in np.flatnonzero(in_world & ~in_map)]
    assert opened
    s, i = opened[0]
    prop = setting[2]
    world_los = trace_points(scene, street_points[i:i + 1], prop)["los"][0, s]
    map_los = trace_points(tiny_scene, street_points[i:i + 1], prop)["los"][0, s]
    assert world_los and not map_los


def test_building_heights_change_by_their_draws_and_site_buildings_stay(setting, tiny_scene):
    from core.raytracing.scenes import buildings_of

    scene, realisation = _world(setting, WorldModel(height_sigma_m=3.0, seed=2))
    before = {b.name: b.height for b in buildings_of(tiny_scene)}
    after = {b.name: b.height for b in buildings_of(scene)}
    changed = realisation["height_change_m"]
    assert changed
    for name, dh in changed.items():
        assert after[name] == pytest.approx(before[name] + dh, abs=0.05)
    assert any(abs(dh) > 0.5 for dh in changed.values())


def test_scaled_materials_change_the_reflected_power_not_the_geometry(setting, tiny_scene, street_points):
    from core.raytracing.tracing import trace_points

    scene, realisation = _world(setting, WorldModel(material_spread=0.3, seed=3))
    for name, (eps, sigma) in realisation["materials"].items():
        mat = scene.radio_materials[name]
        assert float(mat.relative_permittivity[0]) == pytest.approx(eps, rel=1e-5)
        ref = tiny_scene.radio_materials[name]
        assert 0.7 - 1e-6 <= sigma / float(ref.conductivity[0]) <= 1.3 + 1e-6
    assert any(abs(eps / float(tiny_scene.radio_materials[n].relative_permittivity[0]) - 1) > 0.02
               for n, (eps, _) in realisation["materials"].items())
    pts = street_points[:64]
    prop = setting[2]
    a, b = trace_points(tiny_scene, pts, prop), trace_points(scene, pts, prop)
    both = np.isfinite(a["path_gain"]) & np.isfinite(b["path_gain"])
    nlos = both & ~a["los"]
    with np.errstate(invalid="ignore"):
        assert np.abs(b["path_gain"] - a["path_gain"])[nlos].max() > 0.3  # reflections and diffractions: Fresnel
    np.testing.assert_array_equal(a["los"], b["los"])  # materials move no wall


def test_a_downtilt_error_changes_off_boresight_gain_as_the_pattern_says(setting, tiny_scene, street_points):
    from dataclasses import replace

    from core.raytracing.tracing import _omni_tr38901_gain_db, trace_points

    delta = 8.0
    scene, realisation = _world(setting, WorldModel(downtilt_error_deg=delta))
    assert realisation["downtilt_deg"] == pytest.approx(6.0 + delta)
    los_only = replace(setting[2], max_depth=0, specular_reflection=False, diffraction=False, edge_diffraction=False,
                       retry_samples_per_src=0)
    pts = street_points[:64]
    a, b = trace_points(tiny_scene, pts, los_only), trace_points(scene, pts, los_only)
    ok = a["los"] & np.isfinite(a["path_gain"]) & np.isfinite(b["path_gain"])
    assert ok.sum() > 20

    def pattern(theta, tilt_deg):
        t = np.radians(tilt_deg)
        return -np.minimum(12 * ((theta - np.pi / 2 - t) / np.radians(65.0)) ** 2, 30) + _omni_tr38901_gain_db(t)

    site = np.array([s["position"] for s in setting[1]])
    d = site[None] - pts[:, None]  # from the point to the site: the departure's zenith angle theta at the site
    theta = np.arccos(np.clip(-d[..., 2] / np.linalg.norm(d, axis=-1), -1, 1))
    expected = pattern(theta, 6.0 + delta) - pattern(theta, 6.0)
    with np.errstate(invalid="ignore"):
        got = b["path_gain"] - a["path_gain"]
    np.testing.assert_allclose(got[ok], expected[ok], atol=0.05)
    assert np.abs(expected[ok]).max() > 1.0


def test_site_position_and_orientation_errors_move_the_worlds_sites(setting):
    scene, realisation = _world(setting, WorldModel(site_position_sigma_m=2.0, site_orientation_sigma_deg=3.0, seed=4))
    for site, off in zip(setting[1], realisation["site_offsets_m"], strict=True):
        tx = scene.transmitters[site["name"]]
        pos = np.asarray(tx.position).ravel()
        np.testing.assert_allclose(pos[:2], np.asarray(site["position"][:2]) + off, atol=1e-3)
        assert pos[2] == pytest.approx(site["position"][2], abs=1e-3)
    offsets = np.asarray(realisation["site_offsets_m"])
    assert np.abs(offsets).max() > 0.5
    tilts = np.asarray(realisation["site_orientation_deg"])
    assert np.abs(tilts[:, :2]).max() > 0.5
    np.testing.assert_allclose(np.degrees(np.asarray(scene.transmitters[setting[1][0]["name"]].orientation).ravel()),
                               tilts[0], atol=1e-3)


def test_vehicles_stand_on_outdoor_ground(setting, tiny_scene):
    from core.raytracing.tracing import indoor_mask

    scene, realisation = _world(setting, WorldModel(vehicle_density_per_km2=400.0, seed=5))
    assert realisation["vehicles"] == round(400.0 * np.prod(np.subtract(setting[3][2:], setting[3][:2])) / 1e6) > 0
    cars = [o for n, o in scene.objects.items() if n.startswith("world-vehicle-")]
    assert len(cars) == realisation["vehicles"]
    centre = np.array([np.asarray(c.position).ravel() for c in cars])
    assert (centre[:, 2] < 2.0).all()
    assert not indoor_mask(tiny_scene, centre).any()  # not inside a map building
    assert indoor_mask(scene, centre - [0, 0, 0.5]).all()  # under the car's own roof in the world


def test_diffuse_scattering_changes_the_power(setting, tiny_scene, street_points):
    from core.raytracing.tracing import trace_points
    from core.raytracing.world import world_propagation

    world = WorldModel(scattering_coefficient=0.5)
    scene, _ = _world(setting, world)
    prop = world_propagation(setting[2], world)
    assert prop.diffuse_reflection and not setting[2].diffuse_reflection
    assert all(float(m.scattering_coefficient[0]) == 0.5 for m in scene.radio_materials.values())
    pts = street_points[:64]
    a, b = trace_points(tiny_scene, pts, setting[2]), trace_points(scene, pts, prop)
    both = np.isfinite(a["path_gain"]) & np.isfinite(b["path_gain"])
    with np.errstate(invalid="ignore"):
        assert np.abs(b["path_gain"] - a["path_gain"])[both].max() > 1.0


def test_shadowing_has_its_sigma_and_exponential_correlation():
    from core.raytracing.world import ShadowField

    world = WorldModel(shadowing_los_db=4.0, shadowing_nlos_db=7.82, shadowing_decorrelation_m=10.0, seed=6)
    field = ShadowField(world, num_sites=2)
    rng = np.random.default_rng(0)
    xy = rng.uniform(-1500, 1500, (12_000, 2))
    x = field.unit(xy)  # [M, 2]
    assert x.std(0) == pytest.approx([1.0, 1.0], abs=0.08)
    assert abs(np.corrcoef(x[:, 0], x[:, 1])[0, 1]) < 0.05  # one field per site
    for lag, tol in ((5.0, 0.06), (10.0, 0.06), (30.0, 0.05)):
        angle = rng.uniform(0, 2 * np.pi, len(xy))
        y = field.unit(xy + lag * np.stack([np.cos(angle), np.sin(angle)], 1))
        rho = np.mean([np.corrcoef(x[:, s], y[:, s])[0, 1] for s in range(2)])
        assert rho == pytest.approx(np.exp(-lag / 10.0), abs=tol)
    los = np.zeros((len(xy), 2), bool)
    los[::2] = True
    db = field.db(xy, los)
    assert db[los].std() == pytest.approx(4.0, rel=0.1) and db[~los].std() == pytest.approx(7.82, rel=0.1)


def _dataset(maps_dir, world, **model):
    from core.raytracing.measurements import make_dataset

    return make_dataset("simple_street_canyon", num_ues=24, reports=3, radio_maps=str(maps_dir), seed=5,
                        model=MeasurementModel(world=world, **model))


@pytest.fixture(scope="module")
def oracle_dataset(maps_dir):
    return _dataset(maps_dir, ORACLE, path_gain_db=6.0, sensitivity_dbm=None, sites_per_report=5, missing_rate=0.0)


def test_the_oracle_world_is_bit_identical_whatever_its_seed(maps_dir, oracle_dataset):
    other = _dataset(maps_dir, WorldModel(seed=99), path_gain_db=6.0, sensitivity_dbm=None, sites_per_report=5,
                     missing_rate=0.0)
    assert other.measurement_model.world.is_oracle and "world_realisation" not in other.attrs
    for name in ("ue_xyz", "site_ids", "report_mask", "los", "split"):  # every draw of --seed: exactly
        np.testing.assert_array_equal(getattr(other, name), getattr(oracle_dataset, name), err_msg=name)
    # traced values: PathSolver's own run-to-run jitter (~3e-5, also before worlds existed) and not a draw more
    for name in ("site_features", "cell_features", "clean_site_features"):
        np.testing.assert_allclose(getattr(other, name), getattr(oracle_dataset, name), atol=1e-3, err_msg=name)


def test_shadowing_is_added_to_every_sites_gain_in_the_dataset(maps_dir, oracle_dataset):
    from core.raytracing.world import ShadowField

    world = WorldModel(shadowing_los_db=4.0, shadowing_nlos_db=8.0, seed=3)
    ds = _dataset(maps_dir, world, path_gain_db=6.0, sensitivity_dbm=None, sites_per_report=5, missing_rate=0.0)
    np.testing.assert_array_equal(ds.ue_xyz, oracle_dataset.ue_xyz)  # no sensitivity: the same walks
    field = ShadowField(world, 5)
    unit = field.unit(ds.ue_xyz[..., :2].reshape(-1, 2)).reshape(24, 3, 5)
    ids_w, ids_o = ds.site_ids, oracle_dataset.site_ids  # every site with a path, strongest first
    clean_w, clean_o = ds.clean_site_features[..., 0], oracle_dataset.clean_site_features[..., 0]
    diffs, sigmas = [], []
    for n, t in np.ndindex(24, 3):
        gw = {int(s): g for s, g in zip(ids_w[n, t], clean_w[n, t], strict=True) if s >= 0}
        go = {int(s): g for s, g in zip(ids_o[n, t], clean_o[n, t], strict=True) if s >= 0}
        for s in gw.keys() & go.keys():
            diffs.append(gw[s] - go[s])
            sigmas.append(unit[n, t, s])
    diffs, unit_vals = np.asarray(diffs), np.asarray(sigmas)
    assert len(diffs) > 100
    ratio = diffs / unit_vals  # sigma_LOS or sigma_NLOS of the link, exactly
    near = np.abs(unit_vals) > 0.1
    assert np.all(np.isclose(ratio[near], 4.0, atol=0.02) | np.isclose(ratio[near], 8.0, atol=0.02))


def test_detection_and_slots_follow_the_noisy_power(maps_dir, oracle_dataset):
    world = WorldModel(detect_on_noisy=True)
    sens = -75.0
    kw = {"path_gain_db": 6.0, "sensitivity_dbm": sens, "sites_per_report": 5, "missing_rate": 0.0}
    ds = _dataset(maps_dir, world, **kw)
    old = _dataset(maps_dir, ORACLE, **kw)
    p_tx = ds.attrs["radio"]["tx_power_dbm"]

    def slots(d):
        pg = d.site_features[..., 0]
        return pg[d.report_mask], d.site_ids[d.report_mask]

    pg, ids = slots(ds)
    heard = ids >= 0
    assert heard[:, 0].all()
    assert (p_tx + pg[heard] >= sens).all()  # heard: the noisy power is above the sensitivity
    filled = np.where(heard, pg, -1e9)
    assert (np.diff(filled, axis=1) <= 0).all()  # slots by decreasing noisy power
    # clean/* stays aligned with the slots: each heard slot's clean ToA is its noisy ToA minus the 3 ns noise
    toa, clean_toa = ds.site_features[..., 1][ds.report_mask], ds.clean_site_features[..., 1][ds.report_mask]
    assert np.abs(toa - clean_toa)[heard].max() < 6 * 3.0
    pg_old, ids_old = slots(old)
    heard_old = ids_old >= 0
    below = heard_old & (p_tx + np.nan_to_num(pg_old, nan=np.inf) < sens)
    unsorted = (np.diff(np.where(heard_old, pg_old, -1e9), axis=1) > 0).any()
    assert below.any() or unsorted  # the clean detection shows what the noisy one does not


def test_the_world_record_round_trips(tmp_path):
    from core.physics.synthetic import analytic_radio_map, synthetic_dataset
    from core.stores.dataset import MeasurementDataset, recorded_measurement_model

    realistic = PRESETS["realistic"]
    assert realistic.name == "realistic" and ORACLE.name == "oracle"
    assert WorldModel(seed=3, height_sigma_m=1.0).name == "custom"
    model = MeasurementModel(toa_ns=5.0, world=WorldModel(**{**realistic.__dict__, "seed": 7}))
    assert MeasurementModel.from_attrs({"measurement_model": json.loads(json.dumps(model.to_attrs()))}) == model
    old = {k: v for k, v in model.to_attrs().items() if k != "world"}  # a record from before worlds
    assert MeasurementModel.from_attrs({"measurement_model": old}).world == ORACLE
    ds = synthetic_dataset(analytic_radio_map(height=16, width=16, bounds=(0.0, 0.0, 64.0, 64.0)), 20, reports=3,
                           k=4, seed=0)
    ds.attrs["measurement_model"] = model.to_attrs()
    ds.save(tmp_path / "ds")
    assert MeasurementDataset.load(tmp_path / "ds").measurement_model == model
    assert recorded_measurement_model(tmp_path / "ds") == model
    assert "realistic" in model.summary() and "shadowing σ NLOS 7.82 dB" in model.summary()
    # the flags a job passes make the same world
    from core.cli_types import Parser
    from core.raytracing.measurements import add_arguments
    from core.stores.world_model import WORLD_KNOBS

    parser = Parser()
    add_arguments(parser)
    for world in (ORACLE, realistic, WorldModel(seed=2, downtilt_error_deg=-3.0, detect_on_noisy=True),
                  WorldModel(**{**realistic.__dict__, "vehicle_density_per_km2": 0.0, "seed": 4})):
        args = parser.parse_args(["--scene", "x", "--out", "y", *MeasurementModel(world=world).cli_args()])
        back = WorldModel.from_flags(args.world, args.world_seed, {n: getattr(args, f"world_{n}") for n in WORLD_KNOBS})
        assert back == world


@pytest.mark.parametrize("flags,needle", [
    (["--world", "perfect"], "--world must be one of oracle, realistic"),
    (["--world-materials", "2"], "--world-materials must be a finite number in [0, 0.9]"),
    (["--world", "realistic", "--world-shadowing-distance", "0"], "--world-shadowing-distance"),
    (["--world-remove-buildings", "nan"], "--world-remove-buildings"),
    (["--world-detect-on-noisy", "maybe"], "--world-detect-on-noisy must be true or false"),
])
def test_a_bad_world_option_is_one_line_exit_2_and_nothing_written(flags, needle, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "ds"
    code = main(["make-dataset", "--scene", "simple_street_canyon", "--num-ues", "4", "--reports", "2",
                 "--out", str(out), "--radio-maps", str(tmp_path), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_consistency_beside_shows_both_worlds(maps_dir, oracle_dataset, tmp_path, capsys):
    from core.cli import main

    world = WorldModel(material_spread=0.3, shadowing_los_db=4.0, shadowing_nlos_db=8.0, seed=1)
    ds = _dataset(maps_dir, world, path_gain_db=6.0, sensitivity_dbm=None, sites_per_report=5, missing_rate=0.0)
    ds.save(tmp_path / "real")
    oracle_dataset.save(tmp_path / "oracle")
    code = main(["consistency", "--dataset", str(tmp_path / "real"), "--beside", str(tmp_path / "oracle"),
                 "--radio-maps", str(maps_dir), "--split", "all", "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert code == 0 and "world: custom (materials ± 30 %" in out and "world: oracle" in out
    result = json.loads((tmp_path / "c.json").read_text())

    def clean_pg(rows):
        return next(r for r in rows if (r["variant"], r["feature"], r["group"]) == ("clean", "path_gain",
                                                                                    "site layer, all slots"))
    real, oracle = clean_pg(result["rows"]), clean_pg(result["beside"]["rows"])
    assert real["robust_std"] > 2 * oracle["robust_std"] and real["robust_std"] > 2.0
    assert "| A median | A robust_std | A gross | B median |" in out.replace("variant | feature | group ", "")


def test_calibration_on_fewer_walks(maps_dir, oracle_dataset, tiny_map):
    from core.physics.calibration import calibrate

    full = calibrate(oracle_dataset, tiny_map, split=None)
    few = calibrate(oracle_dataset, tiny_map, split=None, walks=5)
    assert few.meta["walks"] == 5 and "walks" not in full.meta
    assert few.meta["num_reports"] == 5 * 3 < full.meta["num_reports"]
    with pytest.raises(CoreError, match="walks must be an integer >= 1"):
        calibrate(oracle_dataset, tiny_map, split=None, walks=0)


def test_noisy_detection_keeps_every_walk_hearing_something():
    """Pure numpy: a walk whose every report the noise pushes below the sensitivity still hears its
    strongest noisy site once; every other heard slot is at or above the sensitivity, strongest first."""
    from core.raytracing.link_abstraction import link_abstraction
    from core.raytracing.measurements import _drop_reports, _noisy_detection
    from core.raytracing.tracing import RadioConfig

    radio = RadioConfig()
    n, t, s = 200, 4, 5
    rng = np.random.default_rng(0)
    pg = rng.uniform(-150, -125, (n, t, s))  # received power around the -100 dBm sensitivity (P = 43 dBm)
    pg[0] = -150.0  # walk 0: far below at every report
    c = {"pg_all": pg, "toa_all": rng.uniform(100, 900, (n, t, s)), "aoa_all": rng.uniform(-180, 180, (n, t, s)),
         "los_all": rng.random((n, t, s)) < 0.5}
    model = MeasurementModel(path_gain_db=3.0, missing_rate=0.5)
    detected, noisy, los = _noisy_detection(np.random.default_rng(1), c, model, radio, link_abstraction())
    present, ids, _ = _drop_reports(np.random.default_rng(2), noisy, {"los": los}, detected, 0.5,
                                    heard=detected[..., 0] >= 0)
    assert present.any(1).all() and (ids[present][:, 0] >= 0).all()
    assert np.isfinite(noisy["site_features"][present][:, 0]).all() and np.isfinite(noisy["cell_features"][present]).all()
    assert (detected[0] >= 0).sum() == 1  # the deaf walk: one forced site
    heard = ids >= 0  # in the reports sent
    g = np.where(heard, noisy["site_features"][..., 0], -1e9)
    assert (np.diff(g, axis=-1) <= 0).all()
    forced = np.zeros_like(heard)
    forced[0] = heard[0]
    assert (43.0 + noisy["site_features"][..., 0][heard & ~forced] >= -100.0).all()


def test_bench_world_times_both_worlds_on_the_same_walks(maps_dir, tmp_path, capsys):
    """``bench world``: one run times make-dataset in the oracle and the realistic world (same walks, warm-up
    first, order oracle, realistic, realistic, oracle) and reports the ratio; the table and the JSON agree."""
    from core.cli import main

    out = tmp_path / "world.json"
    assert main(["bench", "--out", str(out), "--no-progress", "world", "--scene", "simple_street_canyon",
                 "--radio-maps", str(maps_dir), "--ues", "3", "--reports", "2"]) == 0
    result = json.loads(out.read_text())
    rows = {r["world"]: r for r in result["rows"]}
    assert set(rows) == {"oracle", "realistic"} and all(r["runs"] == 2 and r["wall_s"] > 0 for r in rows.values())
    assert result["summary"]["realistic_over_oracle"] == pytest.approx(rows["realistic"]["wall_s"] / rows["oracle"]["wall_s"])
    assert result["summary"]["realistic_over_oracle_cpu"] > 0 and "realistic_over_oracle" in capsys.readouterr().out


def test_the_device_motion_channel_leaves_the_radio_measurements_bit_identical(maps_dir, oracle_dataset):
    """--motion-step-sigma / --motion-heading-deg draw from their own stream: the same --seed gives the same
    walks, detections and noise draws, plus a 'motion' array; the whole-walk estimator reads it."""
    from core.stores.motion_model import MotionModel

    other = _dataset(maps_dir, ORACLE, path_gain_db=6.0, sensitivity_dbm=None, sites_per_report=5, missing_rate=0.0,
                     motion=MotionModel(0.1, 10.0))
    assert oracle_dataset.motion is None and other.motion.shape == other.ue_xyz.shape[:2] + (2,)
    for name in ("ue_xyz", "site_ids", "report_mask", "los", "split"):
        np.testing.assert_array_equal(getattr(other, name), getattr(oracle_dataset, name), err_msg=name)
    np.testing.assert_allclose(other.site_features, oracle_dataset.site_features, atol=1e-3)
    steps = np.linalg.norm(other.motion[:, 1:], axis=-1) / np.linalg.norm(np.diff(other.ue_xyz[..., :2], axis=1), axis=-1)
    assert 0.5 < steps.mean() < 1.5
