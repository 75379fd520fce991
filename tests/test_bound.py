"""The Cramér–Rao bound: the closed form of line-of-sight ToA, and how the walk's bounds order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.bound import (
    NoiseModel,
    fisher_information,
    noise_model,
    position_bound,
    position_bounds,
    slot_gradients,
)
from core.physics.calibration import calibrate
from core.physics.site_lookup import SiteMaps
from core.physics.synthetic import SPEED_OF_LIGHT, analytic_radio_map, synthetic_dataset

C_M_PER_NS = SPEED_OF_LIGHT * 1e-9
#: three sites at the receiver's height (1.5 m): the 3-D distance is the horizontal one
SITES = np.array([[-50.0, -40.0, 1.5], [50.0, -30.0, 1.5], [5.0, 45.0, 1.5]])


def los_maps() -> SiteMaps:
    rm = analytic_radio_map(height=192, width=256, bounds=(-64.0, -48.0, 64.0, 48.0), sites=SITES)
    return SiteMaps.from_radio_map(rm, dtype=torch.float64)


def test_toa_fisher_information_matches_the_closed_form():
    """Line-of-sight ToA to known sites: FIM = sum_s u_s u_s^T / (c sigma)^2 with u_s the unit vector to s."""
    maps = los_maps()
    sigma_ns = 3.0
    pts = np.array([[3.3, 2.7], [-20.1, 10.4], [30.2, -15.6]])
    ids = torch.tensor([[0, 1, 2]] * len(pts))
    g, covered = slot_gradients(maps, torch.as_tensor(pts), ids)
    assert bool(covered.all())
    weight = torch.zeros(len(pts), 1, 3, 3, dtype=torch.float64)
    weight[..., 1] = 1.0 / sigma_ns**2  # ToA only
    fim = fisher_information(g.unsqueeze(1), weight)
    for n, p in enumerate(pts):
        u = p[None] - SITES[:, :2]
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        expected = (u[:, :, None] * u[:, None, :]).sum(0) / (C_M_PER_NS * sigma_ns) ** 2
        np.testing.assert_allclose(fim[n].numpy(), expected, rtol=0.02, atol=0.02 * np.abs(expected).max())
    bound = position_bound(fim)
    cov = np.linalg.inv(fim.numpy())
    np.testing.assert_allclose(bound.cov.numpy(), cov, rtol=1e-9)
    np.testing.assert_allclose(bound.rms.numpy(), np.sqrt(np.trace(cov, axis1=1, axis2=2)), rtol=1e-9)
    # with two sites on one line through the UE the position across it is unobservable: inf, not a number
    line = position_bound(fisher_information(g[:1, None, :1], weight[:1, :, :1]))
    assert np.isinf(line.rms.numpy()).all()


def test_bounds_of_a_walk_order_as_information_grows():
    rm = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0))
    data = synthetic_dataset(rm, 60, reports=6, seed=1, report_interval_s=0.2)
    maps = SiteMaps.from_radio_map(rm, dtype=torch.float64)
    noise = NoiseModel((2.0, 3.0, 3.0), 0.0, "given")
    idx = np.arange(data.num_samples)
    b = {k: v.rms.numpy() for k, v in position_bounds(maps, data, idx, noise, window_s=0.5).items()}
    ok = np.isfinite(b["latest"])
    assert ok.mean() > 0.9
    tol = 1 + 1e-9
    assert (b["window"][ok] <= b["latest"][ok] * tol).all()
    assert (b["walk"][ok] <= b["window"][ok] * tol).all()
    assert (b["walk"][ok] <= b["walk_velocity"][ok] * tol).all()  # an unknown velocity costs information
    assert np.median(b["walk_velocity"][ok]) < np.median(b["latest"][ok])  # still more than one report alone
    # a zero window is the latest report alone; a clock offset only adds a nuisance
    zero = position_bounds(maps, data, idx, noise, window_s=0.0)
    np.testing.assert_allclose(zero["window"].rms.numpy()[ok], b["latest"][ok], rtol=1e-9)
    clock = position_bounds(maps, data, idx, NoiseModel((2.0, 3.0, 3.0), 20.0, "given"), window_s=0.5)
    assert (clock["walk"].rms.numpy()[ok] >= b["walk"][ok] / tol).all()
    # halving every sigma halves the bound
    half = position_bounds(maps, data, idx, NoiseModel((1.0, 1.5, 1.5), 0.0, "given"), window_s=0.5)
    np.testing.assert_allclose(half["walk"].rms.numpy()[ok], 0.5 * b["walk"][ok], rtol=1e-6)


def test_noise_model_comes_from_the_dataset_or_the_calibration():
    rm = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0))
    data = synthetic_dataset(rm, 40, seed=2)
    with pytest.raises(CoreError, match="no measurement model"):
        noise_model(data)
    cal = calibrate(data, rm)
    nm = noise_model(data, cal)
    assert nm.source == "calibration" and nm.sigma[0] == pytest.approx(float(np.median(cal.scale[:, 0])))
    data.attrs["measurement_model"] = {"version": 1, "path_gain_db": 1.0, "toa_ns": 5.0, "aoa_deg": 2.0,
                                       "clock_offset_ns": 7.0, "missing_rate": 0.1, "sites_per_report": 3,
                                       "sensitivity_dbm": None}
    assert noise_model(data) == NoiseModel((1.0, 5.0, 2.0), 7.0, "measurement model")
    with pytest.raises(CoreError, match="unknown feature"):
        position_bounds(SiteMaps.from_radio_map(rm), data, [0], noise_model(data), 1.0, features=("snr",))
