"""Analytic per-site layers and datasets: the slots read the same model as the map."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import CoreError
from core.physics.synthetic import analytic_radio_map, site_layers_at, synthetic_dataset


def test_per_site_layers_and_slots_agree():
    rm = analytic_radio_map(height=16, width=24, bounds=(-48.0, -32.0, 48.0, 32.0), excess_ns=[0.0, 12.0, 0.0],
                            max_range_m=60.0)
    assert {"site_path_gain", "site_toa", "site_aoa"} <= set(rm.layers) and rm.layers["site_toa"].shape == (3, 16, 24)
    assert np.isnan(rm.layers["site_toa"]).any()  # beyond 60 m a site has no path
    xs, ys = rm.cell_centers()
    sites = np.array([s["position"] for s in rm.attrs["sites"]])
    at = site_layers_at(np.array([[xs[3], ys[5]]]), sites, excess_ns=[0.0, 12.0, 0.0], max_range_m=60.0)
    for name in ("path_gain", "toa", "aoa"):
        np.testing.assert_allclose(rm.layers[f"site_{name}"][:, 5, 3], at[name][0], rtol=1e-6)
    data = synthetic_dataset(rm, 50, seed=0, noise=False)
    xy = data.ue_xyz[..., :2].reshape(-1, 2)
    ids = data.site_ids.reshape(len(xy), -1)
    feats = data.site_features.reshape(len(xy), -1, 3)
    ref = site_layers_at(xy, sites, excess_ns=[0.0, 12.0, 0.0], max_range_m=60.0)
    for k in range(ids.shape[1]):
        ok = ids[:, k] >= 0
        np.testing.assert_allclose(feats[ok, k, 1], ref["toa"][ok, ids[ok, k]], rtol=1e-5)  # slots read the model
        assert np.isfinite(feats[ok, k]).all() and np.isnan(feats[~ok, k]).all()
    gain = np.take_along_axis(np.nan_to_num(ref["path_gain"], nan=-1e9), np.maximum(ids, 0), 1)
    both = (ids[:, 1:] >= 0) & (ids[:, :-1] >= 0)
    assert (np.diff(gain, axis=1)[both] <= 1e-9).all()  # strongest first


def test_nlos_slots_and_unreachable_walks():
    rm = analytic_radio_map(height=16, width=16, bounds=(-64.0, -64.0, 64.0, 64.0))
    clean = synthetic_dataset(rm, 100, seed=1, noise=False)
    nlos = synthetic_dataset(rm, 100, seed=1, noise=False, nlos_prob=0.5)
    late = nlos.site_features[..., 1] - clean.site_features[..., 1]
    assert np.nanmin(late) >= 0 and np.nanmean(late > 1) > 0.3 and not nlos.los.all() and clean.los[clean.report_mask].all()
    tiny = analytic_radio_map(height=16, width=16, bounds=(-64.0, -64.0, 64.0, 64.0), max_range_m=1.0)
    with pytest.raises(CoreError, match="max_range_m"):
        synthetic_dataset(tiny, 20, seed=0)
