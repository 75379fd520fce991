"""Calibration: recovers biases and noise scales, robust to NLOS outliers, JSON round trip, criterion."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import CoreError
from core.features import wrap_degrees
from core.physics.calibration import DEFAULT_SCALE, MIN_SCALE, Calibration, calibrate, robust_location_scale
from core.physics.synthetic import analytic_radio_map, synthetic_dataset
from core.stores.radio_map import RadioMap

BOUNDS = (-64.0, -48.0, 64.0, 48.0)


def test_robust_location_scale_linear_and_circular():
    rng = np.random.default_rng(0)
    r = np.concatenate([rng.normal(3.0, 2.0, 5000), rng.uniform(100, 500, 500)])  # 9 % gross outliers
    bias, scale = robust_location_scale(r)
    assert bias == pytest.approx(3.0, abs=0.3) and scale == pytest.approx(2.0, rel=0.15)
    a = wrap_degrees(179.0 + rng.normal(0, 4.0, 4000))  # straddles the seam
    bias, scale = robust_location_scale(a, angular=True)
    assert abs(wrap_degrees(bias - 179.0)) < 0.5 and scale == pytest.approx(4.0, rel=0.1)
    assert np.isnan(robust_location_scale(np.array([]))[0])


def test_recovers_bias_and_noise_and_ignores_nlos():
    world = analytic_radio_map(height=24, width=32, bounds=BOUNDS, excess_ns=[25.0, 0.0, 0.0])  # site 0's clock is late
    data = synthetic_dataset(world, 600, seed=1, nlos_prob=0.15)
    model = analytic_radio_map(height=24, width=32, bounds=BOUNDS)  # the map does not know the late clock
    cal = calibrate(data, model)
    assert cal.bias[0, 1] == pytest.approx(25.0, abs=1.5)  # ToA bias of site 0
    assert np.abs(cal.bias[1:, 1]).max() < 1.5 and np.abs(cal.bias[:, 0]).max() < 0.5
    # the synthetic noise: 2 dB, 3 ns, 5 deg; NLOS excess (15 % of slots) barely moves the robust scale
    np.testing.assert_allclose(cal.scale[:, 0], 2.0, rtol=0.2)
    np.testing.assert_allclose(cal.scale[:, 1], 3.0, rtol=0.3)
    np.testing.assert_allclose(cal.scale[:, 2], 5.0, rtol=0.3)
    assert (cal.count > 30).all() and (cal.miss_rate == 0).all()
    assert cal.meta["split"] == "train" and cal.meta["num_reports"] > 0


def test_cell_criterion_and_json_round_trip(tmp_path):
    rm = analytic_radio_map(height=24, width=32, bounds=BOUNDS)
    cal = calibrate(synthetic_dataset(rm, 300, seed=2), rm)
    # measured SNR noise is 1 dB against a map spread of several dB: informative; a constant map is not
    assert cal.cell["snr"]["informative"] and cal.cell["snr"]["ratio"] < 0.5
    flat = rm.values.copy()
    flat[rm.index("sinr")] = 10.0  # a featureless SINR map: spread 0
    rm_flat = RadioMap(flat, rm.features, rm.bounds, attrs=rm.attrs, layers=rm.layers)
    cal_flat = calibrate(synthetic_dataset(rm, 300, seed=2), rm_flat)
    assert not cal_flat.cell["sinr"]["informative"] and "sinr" not in cal_flat.informative_cell_features
    path = cal.save(tmp_path / "calibration.json")
    back = Calibration.load(path)
    np.testing.assert_array_equal(back.bias, cal.bias)
    np.testing.assert_array_equal(back.scale, cal.scale)
    assert back.cell == cal.cell and back.site_names == cal.site_names and back.meta == cal.meta
    with pytest.raises(CoreError, match="calibration"):
        Calibration.from_json('{"kind": "radio map"}')
    with pytest.raises(CoreError, match="no such"):
        Calibration.load(tmp_path / "missing.json")


def test_fallbacks_with_little_data():
    rm = analytic_radio_map(height=24, width=32, bounds=BOUNDS)
    data = synthetic_dataset(rm, 12, seed=3, reports=2)
    cal = calibrate(data, rm, min_count=10_000)  # too few residuals anywhere: the defaults
    np.testing.assert_array_equal(cal.bias, 0.0)
    np.testing.assert_array_equal(cal.scale, np.tile([DEFAULT_SCALE[f] for f in ("path_gain", "toa", "aoa")], (3, 1)))
    cal = calibrate(synthetic_dataset(rm, 200, seed=3), rm, min_count=1)
    assert (cal.scale >= np.array([MIN_SCALE[f] for f in ("path_gain", "toa", "aoa")])).all()
    with pytest.raises(CoreError, match="reports"):
        calibrate(data, rm, reports="first")


def test_a_serving_feature_that_recounts_the_path_gain_is_not_informative():
    """SNR derived from the measured serving path gain re-counts its noise: off; independent noise: on."""
    rm = analytic_radio_map(height=24, width=32, bounds=BOUNDS)
    data = synthetic_dataset(rm, 300, seed=3)
    cal = calibrate(data, rm)
    assert cal.cell["snr"]["independent"] and abs(cal.cell["snr"]["corr"]) < 0.2
    assert "snr" in cal.informative_cell_features
    pg_noise = data.site_features[..., 0, 0] - data.clean_site_features[..., 0, 0]
    data.cell_features[..., 0] = data.clean_cell_features[..., 0] + pg_noise  # the UE's SNR from its own path gain
    derived = calibrate(data, rm)
    assert derived.cell["snr"]["corr"] > 0.9 and not derived.cell["snr"]["independent"]
    assert "snr" not in derived.informative_cell_features and "sinr" in derived.informative_cell_features
    # a calibration stored before the independence test was recorded has not shown it: no serving feature
    old = derived.to_dict()
    for entry in old["cell"].values():
        entry.pop("independent")
    assert Calibration.from_dict(old).informative_cell_features == ()


def test_rank_correlation_matches_pandas_spearman_with_ties():
    """The numpy Spearman (average ranks for ties) against pandas' reference, and NaN for a constant input."""
    import pandas as pd

    from core.physics.calibration import _rank_correlation

    rng = np.random.default_rng(3)
    for n in (2, 7, 300):
        a = rng.integers(0, 5, n).astype(float)  # many ties
        b = a + rng.normal(0, 2, n)
        b[: n // 3] = 0.0  # a saturated stretch: ties in b as well
        want = pd.Series(a).corr(pd.Series(b), method="spearman")
        got = _rank_correlation(a, b)
        assert (np.isnan(got) and np.isnan(want)) or abs(got - want) < 1e-12, (n, got, want)
    assert np.isnan(_rank_correlation(np.ones(5), np.arange(5.0)))
