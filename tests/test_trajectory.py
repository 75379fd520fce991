"""The whole-walk smoother: beats one report on straight walks, recovers the velocity, validates its input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.calibration import calibrate
from core.physics.likelihood import RobustLikelihood
from core.physics.observation import site_observation
from core.physics.refinement import MapRefiner, MapSearchConfig
from core.physics.synthetic import analytic_radio_map, synthetic_dataset
from core.physics.trajectory import WalkConfig, WalkSmoother, scan_starts, walk_observation, whole_walk

RM = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0))
DATA = synthetic_dataset(RM, 240, reports=8, seed=4, report_interval_s=0.5, speed_mps=(0.8, 1.5), missing_prob=0.1)
LIK = RobustLikelihood(RM, calibrate(DATA, RM), device="cpu")
TEST = DATA.indices("test") if len(DATA.indices("test")) >= 20 else np.arange(40)


def _true(indices):
    return DATA.ue_xyz[indices][:, -1, :2].astype(np.float64)


def test_whole_walk_beats_the_latest_report_and_recovers_the_velocity():
    refiner = MapRefiner(LIK, MapSearchConfig(global_top=2))
    idx = np.arange(120)
    walk = whole_walk(DATA, idx, refiner, WalkConfig(), window_s=0.0)
    true = _true(idx)
    e_walk = np.linalg.norm(walk.xy.numpy() - true, axis=1)
    one = refiner(torch.as_tensor(true + 30.0), 1.0e4, site_observation(DATA, idx))  # a far mean, a flat prior
    e_one = np.linalg.norm(one.xy.numpy() - true, axis=1)
    assert np.median(e_walk) < 0.8 * np.median(e_one)
    xyz = DATA.ue_xyz[idx][..., :2].astype(np.float64)
    t = DATA.t[idx].astype(np.float64)
    straight = np.linalg.norm(xyz[:, -1] - xyz[:, 0], axis=1) > 0.95 * np.linalg.norm(np.diff(xyz, axis=1), axis=2).sum(1)
    v_true = (xyz[:, -1] - xyz[:, 0]) / (t[:, -1] - t[:, 0])[:, None]
    v_err = np.linalg.norm(walk.velocity.numpy() - v_true, axis=1)[straight]
    assert straight.sum() > 50 and np.median(v_err) < 0.3
    assert walk.path.shape == (120, 8, 2) and torch.isfinite(walk.cost).all()


def test_the_scan_finds_the_true_basin_and_the_prior_pulls():
    idx = np.arange(60)
    obs = site_observation(DATA, idx)
    starts = scan_starts(LIK, obs, step_m=4.0, top=3)
    d = np.linalg.norm(starts.numpy() - _true(idx)[:, None], axis=2).min(1)
    assert np.median(d) < 4.0 and starts.shape == (60, 3, 2)
    from core.physics.prior import position_prior

    walk_obs, t = walk_observation(DATA, idx)
    smoother = WalkSmoother(LIK)
    start = torch.as_tensor(_true(idx), dtype=torch.float32)
    free = smoother(walk_obs, t, start)
    pulled = smoother(walk_obs, t, start, position_prior(start + 5.0, 0.2, 1.0e4, outlier_prob=0.0, min_sigma=0.1))
    assert ((pulled.xy - (start + 5.0)).norm(dim=1) < (free.xy - (start + 5.0)).norm(dim=1)).float().mean() > 0.9


def test_a_measured_velocity_is_followed():
    """The device's own motion (e.g. dead reckoning) pins the velocity; a confident wrong one moves it there."""
    idx = np.arange(60)
    walk_obs, t = walk_observation(DATA, idx)
    smoother = WalkSmoother(LIK)
    start = torch.as_tensor(_true(idx), dtype=torch.float32)
    xyz = DATA.ue_xyz[idx][..., :2].astype(np.float64)
    v_true = (xyz[:, -1] - xyz[:, 0]) / (t[:, -1] - t[:, 0])[:, None]
    wrong = v_true + np.array([3.0, 0.0])
    free = smoother(walk_obs, t, start)
    told = smoother(walk_obs, t, start, velocity=wrong, velocity_sigma=0.01)
    assert np.abs(told.velocity.numpy() - wrong).max() < 0.1
    assert np.median(np.linalg.norm(free.velocity.numpy() - wrong, axis=1)) > 1.0
    with pytest.raises(CoreError, match="velocity"):
        smoother(walk_obs, t, start, velocity=wrong[:3])


def test_bad_input_is_one_clear_error():
    walk_obs, t = walk_observation(DATA, np.arange(4))
    smoother = WalkSmoother(LIK)
    with pytest.raises(CoreError, match="start must be"):
        smoother(walk_obs, t, torch.zeros(3, 2))
    with pytest.raises(CoreError, match="increase"):
        smoother(walk_obs, t[:, ::-1].copy(), torch.zeros(4, 2))
    with pytest.raises(CoreError, match="process_noise_m"):
        WalkConfig(process_noise_m=0.0)
