"""The ray-traced measurement dataset, with real Sionna RT on a tiny scene."""

from __future__ import annotations

import numpy as np
import pytest

from core.features import wrap_degrees
from core.stores.dataset import MeasurementDataset
from core.stores.measurement_model import MeasurementModel

pytestmark = pytest.mark.sionna


@pytest.fixture(scope="module")
def tiny_dataset(maps_dir, tmp_path_factory):
    from core.raytracing.measurements import make_dataset

    maps = maps_dir
    ds = make_dataset("simple_street_canyon", num_ues=40, reports=4, radio_maps=str(maps), seed=3)
    path = tmp_path_factory.mktemp("ds") / "tiny"
    ds.save(path)
    return MeasurementDataset.load(path)


def test_schema_and_walks(tiny_dataset, tiny_map, tiny_scene):
    from core.raytracing.tracing import indoor_mask

    ds = tiny_dataset
    assert (ds.num_samples, ds.num_reports, ds.num_sites_per_report) == (40, 4, 4)
    assert ds.report_mask.any(axis=1).all()
    np.testing.assert_allclose(ds.t[0], [0.0, 0.2, 0.4, 0.6], atol=1e-6)
    speed = np.linalg.norm(ds.ue_xyz[:, -1, :2] - ds.ue_xyz[:, 0, :2], axis=1) / ds.t[:, -1]
    assert (speed >= 0.5 - 1e-3).all() and (speed <= 1.5 + 1e-3).all()
    assert not indoor_mask(tiny_scene, ds.ue_xyz.reshape(-1, 3)).any()
    assert tiny_map.contains(ds.ue_xyz.reshape(-1, 3)[:, :2]).all()
    assert ds.measurement_model == MeasurementModel()  # the defaults, recorded
    assert ds.attrs["measurement_model"] == {"version": 1, "path_gain_db": 2.0, "toa_ns": 3.0, "aoa_deg": 3.0,
                                             "clock_offset_ns": 0.0, "missing_rate": 0.2, "sites_per_report": 4,
                                             "sensitivity_dbm": -100.0}
    assert ds.attrs["sites"] == tiny_map.attrs["sites"]
    assert set(np.unique(ds.split)) <= {0, 1, 2}
    # missing reports carry no features
    gone = ~ds.report_mask
    assert np.isnan(ds.site_features[gone]).all() and (ds.site_ids[gone] == -1).all()
    # strongest first, serving slot 0
    pg = ds.clean_site_features[..., 0]
    assert (np.nan_to_num(pg[..., :-1], nan=-np.inf) >= np.nan_to_num(pg[..., 1:], nan=-np.inf)).all()


def test_the_dataset_records_the_map_it_was_made_with(tiny_dataset, tiny_map):
    from core.stores.lineage import recorded_map, store_ref

    made_with = tiny_dataset.radio_map_ref
    assert made_with.id == tiny_map.lineage.id and made_with.digest == tiny_map.digest()
    assert made_with.scene == "simple_street_canyon" and made_with.path.endswith("simple_street_canyon.zarr")
    assert recorded_map(tiny_dataset.source) == made_with
    assert store_ref(made_with.path).id == made_with.id


def test_clean_features_equal_pathsolver_at_the_points(tiny_dataset, tiny_scene):
    from core.raytracing.tracing import PropagationSettings, trace_points

    ds = tiny_dataset
    settings = PropagationSettings.from_dict(ds.attrs["propagation"])
    traced = trace_points(tiny_scene, ds.ue_xyz.reshape(-1, 3), settings)
    clean = ds.clean_site_features.reshape(-1, ds.num_sites_per_report, 3)
    ids = ds.site_ids.reshape(-1, ds.num_sites_per_report)
    present = ds.report_mask.reshape(-1)
    rows = np.flatnonzero(present)
    for r in rows:
        for k in range(ds.num_sites_per_report):
            s = ids[r, k]
            if s < 0:
                continue
            assert clean[r, k, 0] == pytest.approx(traced["path_gain"][r, s], abs=0.05)
            assert clean[r, k, 1] == pytest.approx(traced["toa"][r, s], abs=0.05)
            assert abs(wrap_degrees(clean[r, k, 2] - traced["aoa"][r, s])) < 0.05
    serving_pg = ds.clean_site_features[..., 0, 0].reshape(-1)
    np.testing.assert_allclose(serving_pg, traced["path_gain"].max(axis=1), atol=0.05)


def test_noise_and_link_consistency(tiny_dataset):
    ds = tiny_dataset
    p = ds.report_mask
    snr, sinr, thr, bler = (ds.cell_features[..., f][p] for f in range(4))
    assert (sinr <= snr + 1e-4).all()
    assert ((bler >= 0) & (bler <= 1)).all() and (thr >= 0).all()
    # noisy SNR follows the noisy serving gain exactly: SNR - path gain is a constant
    diff = snr - ds.site_features[..., 0, 0][p]
    np.testing.assert_allclose(diff, diff[0], atol=1e-3)
    # the noise is there and of the documented size (loose: few samples)
    d_pg = (ds.site_features[..., 0, 0] - ds.clean_site_features[..., 0, 0])[p]
    assert 1.0 < d_pg.std() < 3.5
    d_aoa = wrap_degrees(ds.site_features[..., 0, 2] - ds.clean_site_features[..., 0, 2])[p]
    assert 1.5 < d_aoa.std() < 5.0 and (np.abs(d_aoa) <= 180).all()
    assert 0.05 < 1 - p.mean() < 0.4


def test_bad_dataset_input_is_refused(tmp_path):
    from core.errors import CoreError
    from core.raytracing.measurements import make_dataset

    with pytest.raises(CoreError, match="unknown scene"):
        make_dataset("no_such_scene", 2, 2, radio_maps=None)
    with pytest.raises(CoreError, match="--num-ues"):
        make_dataset("simple_street_canyon", 0, 2, radio_maps=None)


def test_consistency_at_the_truth(tiny_dataset, tmp_path, capsys):
    """The dataset and its map describe the same physics: residuals at the true positions are small."""
    import json
    from pathlib import Path

    from core.cli import main

    maps = Path(tiny_dataset.attrs["radio_map"]).parent
    out, md = tmp_path / "c.json", tmp_path / "c.md"
    argv = ["consistency", "--dataset", tiny_dataset.source, "--radio-maps", str(maps), "--split", "all",
            "--json", str(out), "--markdown", str(md)]
    assert main(argv) == 0
    assert "| clean | toa [ns] | site layer, all slots |" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert md.read_text().startswith("| variant | feature | group |")
    rows = {(r["variant"], r["feature"], r["group"]): r for r in result["rows"]}
    assert result["summary"]["reports"] == int(tiny_dataset.report_mask[:, -1].sum())
    assert result["summary"]["serving_agreement"] > 0.8
    for feature, tol in (("path_gain", 1.0), ("toa", 0.5), ("aoa", 0.5)):
        clean = rows[("clean", feature, "site layer, all slots")]
        assert clean["n"] >= tiny_dataset.report_mask[:, -1].sum() and clean["map_nan"] <= 0.05 * clean["n"]
        assert abs(clean["median"]) < tol and clean["robust_std"] < tol, (feature, clean)
    # the noisy residuals are the measurement noise: 3 ns ToA, 3 deg AoA, 2 dB path gain
    assert 1.5 < rows[("noisy", "toa", "site layer, all slots")]["robust_std"] < 5.0
    assert 1.5 < rows[("noisy", "aoa", "site layer, all slots")]["robust_std"] < 5.0
    assert rows[("clean", "toa", "site layer, all slots")]["gross"] < 0.1
    assert ("clean", "sinr", "serving map") in rows and ("noisy", "bler", "serving map") in rows


# -- the measurement model's knobs, from the command line to the data ----------------------
KNOBS = {"--noise-toa-ns": "0", "--clock-offset-ns": "20", "--missing-rate": "0.4", "--sensitivity-dbm": "-45",
         "--sites-per-report": "3", "--noise-path-gain-db": "1.5", "--noise-aoa-deg": "2"}


def make_with_flags(maps_dir, out, flags: dict[str, str], num_ues: int, reports: int, seed: int) -> MeasurementDataset:
    """``python -m core make-dataset`` (in-process) on the tiny scene; the saved store, loaded."""
    from core.cli import main

    argv = ["make-dataset", "--scene", "simple_street_canyon", "--num-ues", str(num_ues), "--reports", str(reports),
            "--radio-maps", str(maps_dir), "--seed", str(seed), "--out", str(out), "--no-progress"]
    assert main(argv + [a for flag, value in flags.items() for a in (flag, value)]) == 0
    return MeasurementDataset.load(out)


@pytest.fixture(scope="module")
def knob_dataset(maps_dir, tmp_path_factory):
    return make_with_flags(maps_dir, tmp_path_factory.mktemp("knobs") / "ds", KNOBS, num_ues=60, reports=5, seed=5)


def test_the_flags_are_recorded_and_survive_load(knob_dataset):
    expected = MeasurementModel(path_gain_db=1.5, toa_ns=0.0, aoa_deg=2.0, clock_offset_ns=20.0, missing_rate=0.4,
                                sites_per_report=3, sensitivity_dbm=-45.0)
    assert knob_dataset.measurement_model == expected
    assert knob_dataset.attrs["measurement_model"] == {"version": 1, **expected.knobs()}  # oracle: no world key
    assert knob_dataset.num_sites_per_report == 3


def test_clock_offset_is_one_per_walk(knob_dataset):
    """ToA sigma 0 and a clock offset: every ToA residual of a walk is that walk's one offset."""
    ds = knob_dataset
    residual = (ds.site_features[..., 1] - ds.clean_site_features[..., 1]).astype(np.float64)  # [N, T, K]
    received = (ds.site_ids >= 0) & ds.report_mask[..., None]
    offsets = []
    for n in range(ds.num_samples):
        r = residual[n][received[n]]
        assert r.size and np.isfinite(r).all()
        np.testing.assert_allclose(r, r[0], atol=2e-3)  # float32 ToAs of a few hundred ns
        offsets.append(r[0])
    assert 10.0 < np.std(offsets) < 35.0  # sigma 20 ns over 60 walks
    assert len(np.unique(np.round(offsets, 3))) == ds.num_samples


def test_missing_rate_is_the_requested_one(knob_dataset):
    missing = 1.0 - knob_dataset.report_mask.mean()  # 300 reports, p = 0.4: sd 0.028
    assert abs(missing - 0.4) < 0.1
    gone = ~knob_dataset.report_mask
    assert np.isnan(knob_dataset.site_features[gone]).all() and (knob_dataset.site_ids[gone] == -1).all()


def test_the_sensitivity_drops_exactly_the_sites_below_it(knob_dataset):
    ds = knob_dataset
    p_tx = ds.attrs["radio"]["tx_power_dbm"]
    received_power = p_tx + ds.clean_site_features[..., 0]  # [N, T, K] dBm, NaN = no path
    present = ds.report_mask[..., None] & np.ones(ds.site_ids.shape, bool)
    with np.errstate(invalid="ignore"):
        audible = np.isfinite(received_power) & (received_power >= -45.0)
    reported = ds.site_ids >= 0
    np.testing.assert_array_equal(reported[present], audible[present])
    dropped = present & np.isfinite(received_power) & ~audible
    assert dropped.sum() > 5  # the threshold did drop sites here
    assert np.isnan(ds.site_features[dropped]).all()
    # the serving site is always received: walks out of coverage were redrawn
    assert (received_power[..., 0] >= -45.0).all()
    assert np.isfinite(ds.cell_features[ds.report_mask]).all()
    # received sites stay a prefix of the slots (strongest first)
    assert (reported[..., :-1] | ~reported[..., 1:]).all()


def test_a_noisy_sparse_dataset_trains_and_evaluates(maps_dir, tmp_path, capsys):
    """ToA sigma 10 ns and 40 % missing reports: the tiny model trains and evaluates, metrics finite."""
    import json

    from core.cli import main

    ds = make_with_flags(maps_dir, tmp_path / "ds", {"--noise-toa-ns": "10", "--missing-rate": "0.4"},
                         num_ues=80, reports=4, seed=11)
    assert ds.measurement_model == MeasurementModel(toa_ns=10.0, missing_rate=0.4)
    sets = [f"data.dataset={ds.source}", f"physics_loss.radio_maps_dir={maps_dir}", "model.preset=tiny",
            "training.epochs=2", "training.batch_size=32", "training.num_threads=1"]
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/model.yaml", *[a for s in sets for a in ("--set", s)],
                 "--out", str(run), "--no-progress"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2  # two epochs
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--refine", "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["count"] == len(ds.indices("test")) > 0
    for key in ("median_m", "rmse_m", "p90_m"):
        assert np.isfinite(result[key]), key
        assert np.isfinite(result["refinement"]["after"][key]), key



def test_a_dataset_without_a_map_says_so_and_refuses_another_traces_map(tiny_map, maps_dir, tmp_path):
    """``--no-map`` (radio_maps None): the dataset records that it has no map; a map traced with other
    settings is refused for it, naming both stores."""
    from dataclasses import replace

    from core.errors import StoreError
    from core.raytracing.measurements import make_dataset
    from core.raytracing.tracing import PropagationSettings
    from core.stores.lineage import WITHOUT_MAP, check_scene_stores, recorded_map

    other = replace(PropagationSettings.from_dict(tiny_map.attrs["propagation"]), seed=8)  # not the map's
    ds = make_dataset("simple_street_canyon", num_ues=4, reports=2, radio_maps=None, seed=1, propagation=other)
    ds.save(tmp_path / "ds")
    assert ds.attrs[WITHOUT_MAP] is True and ds.attrs["radio_map"] is None and recorded_map(tmp_path / "ds") is None
    with pytest.raises(StoreError, match=r"was made without a radio map \(make-dataset --no-map\), and radio map "
                                         r".*simple_street_canyon\.zarr \(scene simple_street_canyon, id .*\) has other"):
        check_scene_stores(tmp_path / "ds", maps_dir / "simple_street_canyon.zarr")
