"""Multilateration: exact geometry, NLOS robustness, single-site fixes, bounds, datasets."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import CoreError
from core.physics.multilateration import (
    SPEED_OF_LIGHT,
    MultilaterationConfig,
    multilaterate,
    multilaterate_dataset,
)
from core.physics.synthetic import analytic_radio_map, synthetic_dataset

SITES = np.array([[-100.0, -80.0, 25.0], [110.0, -60.0, 30.0], [0.0, 100.0, 20.0], [-110.0, 90.0, 25.0]])


def measure(xy: np.ndarray, ids: np.ndarray, h: float = 1.5) -> np.ndarray:
    """Line-of-sight (path gain, ToA [ns], AoA [deg]) of sites ``ids [B, K]`` at ``xy [B, 2]``."""
    q = SITES[np.clip(ids, 0, None)]
    d3 = np.sqrt(((q[..., :2] - xy[:, None]) ** 2).sum(-1) + (q[..., 2] - h) ** 2)
    aoa = np.degrees(np.arctan2(q[..., 1] - xy[:, None, 1], q[..., 0] - xy[:, None, 0]))
    out = np.stack([np.full(d3.shape, -80.0), d3 / SPEED_OF_LIGHT * 1e9, aoa], -1)
    out[ids < 0] = np.nan
    return out


def test_exact_measurements_give_the_exact_position():
    rng = np.random.default_rng(0)
    xy = rng.uniform(-90, 90, (200, 2))
    ids = np.tile([0, 1, 2, 3], (200, 1))
    for k in (4, 2, 1):  # every site, two, one (a single ToA + AoA already pins the point)
        res = multilaterate(SITES, ids[:, :k], measure(xy, ids[:, :k]))
        np.testing.assert_allclose(res.xy.numpy(), xy, atol=1e-3)
        assert (res.slots == k).all() and (res.cost < 1e-4).all()
    # ToA alone from three sites, AoA alone from two: still exact
    for cfg, k in ((MultilaterationConfig(use_aoa=False), 3), (MultilaterationConfig(use_toa=False), 2)):
        res = multilaterate(SITES, ids[:, :k], measure(xy, ids[:, :k]), cfg)
        assert np.median(np.linalg.norm(res.xy.numpy() - xy, axis=1)) < 1e-2


def test_robust_to_nlos_and_noise():
    rng = np.random.default_rng(1)
    xy = rng.uniform(-90, 90, (300, 2))
    ids = np.tile([0, 1, 2, 3], (300, 1))
    meas = measure(xy, ids)
    meas[..., 1] += rng.normal(0, 3.0, meas[..., 1].shape)
    meas[..., 2] += rng.normal(0, 2.0, meas[..., 2].shape)
    bad = rng.integers(0, 4, 300)  # one NLOS slot per sample: 300 ns late and 40 deg off
    meas[np.arange(300), bad, 1] += 300.0
    meas[np.arange(300), bad, 2] += 40.0
    err = np.linalg.norm(multilaterate(SITES, ids, meas).xy.numpy() - xy, axis=1)
    assert np.median(err) < 2.0 and np.percentile(err, 90) < 5.0


def test_missing_slots_bounds_and_errors():
    xy = np.array([[10.0, 20.0], [-30.0, 5.0]])
    ids = np.array([[2, -1], [-1, -1]])
    meas = measure(xy, np.maximum(ids, 0))
    meas[ids < 0] = np.nan
    res = multilaterate(SITES, ids, meas, bounds=(-50.0, -50.0, 50.0, 50.0))
    np.testing.assert_allclose(res.xy[0].numpy(), xy[0], atol=1e-3)
    assert np.isnan(res.cost[1].item()) and res.slots[1] == 0
    np.testing.assert_allclose(res.xy[1].numpy(), np.clip(SITES[:, :2].mean(0), -50, 50))
    far = measure(np.array([[300.0, 0.0]]), np.array([[1]]))
    clamped = multilaterate(SITES, np.array([[1]]), far, bounds=(-50.0, -50.0, 50.0, 50.0)).xy.numpy()
    assert (np.abs(clamped) <= 50.0 + 1e-9).all()
    with pytest.raises(CoreError, match="site id"):
        multilaterate(SITES, np.array([[7]]), far)
    with pytest.raises(CoreError):
        MultilaterationConfig(use_toa=False, use_aoa=False)


def test_on_an_analytic_dataset_with_report_pooling():
    rm = analytic_radio_map(height=32, width=32, bounds=(-128.0, -128.0, 128.0, 128.0), sites=SITES)
    data = synthetic_dataset(rm, 200, seed=2, report_interval_s=0.2, speed_mps=(0.5, 1.0), nlos_prob=0.1)
    one = multilaterate_dataset(data, config=MultilaterationConfig(window_s=0.0))
    pooled = multilaterate_dataset(data, config=MultilaterationConfig(window_s=0.5), bounds=rm.bounds)
    e1 = np.linalg.norm(one - data.labels, axis=1)
    e3 = np.linalg.norm(pooled - data.labels, axis=1)
    assert np.median(e1) < 2.5 and np.median(e3) < np.median(e1)
    idx = np.array([5, 1, 9])
    np.testing.assert_allclose(multilaterate_dataset(data, idx), multilaterate_dataset(data)[idx])


def test_multi_start_recovers_what_single_site_fixes_miss():
    """ToA from two sites, no AoA: a slot without a bearing has no single-site fix (its start is the site
    itself) and IRLS from the sites stops far off; the range circles' crossings (pairwise starts) hold the
    true position (or its mirror across the line through the sites: the two crossings fit equally)."""
    rng = np.random.default_rng(3)
    n = 200
    xy = rng.uniform(-80, 80, (n, 2))
    ids = np.tile([0, 1], (n, 1))
    meas = measure(xy, ids)
    meas[..., 2] = np.nan  # no AoA
    bounds = (-128.0, -128.0, 128.0, 128.0)
    fixes = multilaterate(SITES, ids, meas, MultilaterationConfig(pair_starts=False, grid_top=0), bounds)
    multi = multilaterate(SITES, ids, meas, MultilaterationConfig(pair_starts=True, grid_top=4), bounds)
    e_fix = np.linalg.norm(fixes.xy.numpy() - xy, axis=1)
    e_multi = np.linalg.norm(multi.xy.numpy() - xy, axis=1)
    assert np.median(e_fix) > 10.0 and np.mean(e_fix < 1.0) < 0.2  # the single-site starts miss
    assert np.mean(e_multi < 1.0) > 0.8  # the multi-start finds the truth ...
    assert (multi.cost.numpy() < 1e-6).all()  # ... or the mirror crossing, which fits as well
    assert (multi.cost <= fixes.cost + 1e-9).all()  # never a worse optimum: the fixes are among its starts
    assert multi.starts > fixes.starts and multi.iterations <= MultilaterationConfig().iterations
