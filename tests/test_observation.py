"""Observations: one report, the latest present one, and reports pooled per site with their weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.calibration import calibrate
from core.physics.likelihood import LikelihoodConfig, RobustLikelihood
from core.physics.observation import site_observation
from core.physics.synthetic import analytic_radio_map, synthetic_dataset

RM = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0), max_range_m=70.0)
DATA = synthetic_dataset(RM, 120, reports=6, seed=3)


def _manual_pool(ds, n: int, window_s: float):
    """{site: (mean pg, mean toa, circular mean aoa, counts)} over the pooled reports of sample n."""
    present = ds.report_mask[n]
    latest = int(np.nonzero(present)[0][-1])
    t0 = ds.t[n, latest]
    acc: dict[int, list] = {}
    for t in range(ds.num_reports):
        if not present[t] or not (t0 - window_s - 1e-9 <= ds.t[n, t] <= t0 + 1e-9):
            continue
        for k, s in enumerate(ds.site_ids[n, t]):
            if s >= 0:
                acc.setdefault(int(s), []).append(ds.site_features[n, t, k].astype(np.float64))
    out = {}
    for s, rows in acc.items():
        v = np.array(rows)
        ok = np.isfinite(v)
        ang = np.deg2rad(v[ok[:, 2], 2])
        out[s] = (v[ok[:, 0], 0].mean() if ok[:, 0].any() else np.nan, v[ok[:, 1], 1].mean() if ok[:, 1].any() else np.nan,
                  np.rad2deg(np.arctan2(np.sin(ang).mean(), np.cos(ang).mean())) if ang.size else np.nan, ok.sum(0))
    return out


def test_latest_is_one_report_and_pooling_averages_per_site():
    idx = np.arange(40)
    one = site_observation(DATA, idx)
    assert one.weight is None and one.site_ids.shape == (40, DATA.site_ids.shape[2])
    pooled = site_observation(DATA, idx, window_s=0.45)
    s_n = len(DATA.attrs["sites"])
    assert pooled.site_ids.shape == (40, s_n) and pooled.site.shape == pooled.weight.shape == (40, s_n, 3)
    assert torch.allclose(pooled.cell, one.cell, equal_nan=True)
    for n in idx:
        ref = _manual_pool(DATA, n, 0.45)
        ids = pooled.site_ids[n].numpy()
        assert sorted(ref) == sorted(int(s) for s in ids if s >= 0)
        for s, (pg, toa, aoa, counts) in ref.items():
            got = pooled.site[n, s].double().numpy()
            np.testing.assert_allclose(got[:2], [pg, toa], rtol=1e-5, atol=1e-4)
            if np.isfinite(aoa):
                assert abs((got[2] - aoa + 180) % 360 - 180) < 1e-3
            np.testing.assert_array_equal(pooled.weight[n, s].numpy(), counts)


def test_pooling_takes_the_circular_mean_across_the_seam():
    ds = DATA
    feats = ds.site_features.copy()
    n = 0
    present = np.nonzero(ds.report_mask[n])[0]
    s0 = ds.site_ids[n, present[-1], 0]
    signs = set()
    for t in present:
        k = list(ds.site_ids[n, t]).index(s0) if s0 in ds.site_ids[n, t] else None
        if k is not None:
            feats[n, t, k, 2] = 179.0 if t % 2 else -179.0
            signs.add(t % 2)
    assert signs == {0, 1}  # the site is heard on both sides of the seam: an arithmetic mean would give ~0
    saved = ds.site_features
    try:
        ds.site_features = feats
        obs = site_observation(ds, [n], window_s=10.0)
    finally:
        ds.site_features = saved
    assert abs(abs(float(obs.site[0, s0, 2])) - 180.0) < 1.0 + 1e-3  # never ~0


def test_window_zero_is_one_report_and_bad_arguments_are_refused():
    a, b = site_observation(DATA, np.arange(10)), site_observation(DATA, np.arange(10), window_s=0.0)
    assert torch.equal(a.site_ids, b.site_ids) and b.weight is None
    with pytest.raises(CoreError, match="window_s"):
        site_observation(DATA, [0], window_s=-1.0)
    with pytest.raises(CoreError, match="latest"):
        site_observation(DATA, [0], report="last", window_s=0.5)


def test_weight_n_is_the_likelihood_of_a_scale_over_sqrt_n():
    cal = calibrate(DATA, RM)
    lik = RobustLikelihood(RM, cal, LikelihoodConfig(cell_features=()))
    tight = dataclasses.replace(cal, scale=cal.scale / 2.0)  # n = 4: sigma / sqrt(4)
    lik4 = RobustLikelihood(RM, tight, LikelihoodConfig(cell_features=()))
    obs = site_observation(DATA, np.arange(30))
    xy = torch.as_tensor(DATA.labels[:30] + 3.0, dtype=torch.float32)
    weighted = obs._replace(weight=torch.full(obs.site.shape, 4.0))
    torch.testing.assert_close(lik(xy, weighted), lik4(xy, obs), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lik(xy, obs._replace(weight=torch.ones(obs.site.shape))), lik(xy, obs))
    # weight 0 makes a value absent; the terms see the weight too
    zero = obs._replace(weight=torch.zeros(obs.site.shape))
    none = obs._replace(site_ids=torch.full_like(obs.site_ids, -1))
    torch.testing.assert_close(lik(xy, zero), lik(xy, none))
    t4, t1 = lik.terms(xy, weighted), lik4.terms(xy, obs)
    torch.testing.assert_close(t4.z, t1.z, rtol=1e-4, atol=1e-4)
    with pytest.raises(CoreError, match="weight"):
        lik(xy, obs._replace(weight=torch.ones(30, 1, 3)))
