"""The ray-traced measurement dataset, with real Sionna RT on a tiny scene."""

from __future__ import annotations

import numpy as np
import pytest

from core.features import wrap_degrees
from core.stores.dataset import MeasurementDataset

pytestmark = pytest.mark.sionna


@pytest.fixture(scope="module")
def tiny_dataset(tiny_map, tmp_path_factory):
    from core.raytracing.measurements import make_dataset

    maps = tmp_path_factory.mktemp("maps")
    tiny_map.save(maps / "simple_street_canyon.zarr")
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
    assert ds.attrs["noise"] == {"path_gain_db": 2.0, "toa_ns": 3.0, "aoa_deg": 3.0, "p_missing": 0.2}
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
