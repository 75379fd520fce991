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
from core.physics.trajectory import (
    WalkConfig,
    WalkSmoother,
    runner_up_basins,
    scan_starts,
    walk_observation,
    whole_walk,
)

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
    with pytest.raises(CoreError, match="alternatives must be"):
        smoother(walk_obs, t, torch.zeros(4, 2), alternatives=(torch.zeros(4, 2), torch.ones(4, dtype=torch.bool)))
    with pytest.raises(CoreError, match="basins"):
        WalkConfig(basins=-1)


def test_runner_up_basins_keep_close_rivals_far_apart_best_first():
    """Against a hand-made search: margin, separation from the winner and from each other, NaN = not searched."""
    xy = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    post = torch.tensor([10.0, 10.0])
    starts = torch.tensor([[[0.0, 0.0], [50.0, 0.0], [55.0, 0.0], [0.0, 40.0], [5.0, 0.0], [0.0, -90.0]],
                           [[0.0, 0.0], [30.0, 0.0], [0.0, 30.0], [-30.0, 0.0], [0.0, -30.0], [6.0, 6.0]]])
    sp = torch.tensor([[10.0, 14.0, 12.0, 19.0, 10.5, 25.0],      # 55 m (12) wins over 50 m (14, within 10 m of it)
                       [10.0, float("nan"), 13.0, 19.9, 20.0, 11.0]])  # NaN, a rival at the margin, one too close
    points, valid = runner_up_basins(xy, post, starts, sp, count=3, margin_nats=10.0, separation_m=10.0)
    assert valid.tolist() == [[True, True, False], [True, True, False]]
    assert points[0, :2].tolist() == [[55.0, 0.0], [0.0, 40.0]] and points[0, 2].tolist() == [0.0, 0.0]
    assert points[1, :2].tolist() == [[0.0, 30.0], [-30.0, 0.0]]
    none, ok = runner_up_basins(xy, post, starts, sp, count=2, margin_nats=1.0)
    assert not ok.any() and (none == 0).all()
    with pytest.raises(CoreError, match="basins"):
        runner_up_basins(xy, post, starts[:, :3], sp, count=1)


def test_other_starts_only_lower_the_walk_posterior_and_find_the_true_basin():
    """A walk started 40 m off with the true position as an alternative ends near the truth; invalid alternatives
    change nothing; a walk keeps whichever start ends lowest."""
    idx = np.arange(60)
    walk_obs, t = walk_observation(DATA, idx)
    smoother = WalkSmoother(LIK)
    true = torch.as_tensor(_true(idx), dtype=torch.float32)
    off = true + torch.tensor([40.0, 0.0])
    alone = smoother(walk_obs, t, off)
    other = (torch.stack([true, off + 3.0], 1), torch.tensor([[True, False]] * 60))
    both = smoother(walk_obs, t, off, alternatives=other)
    assert (both.cost <= alone.cost).all() and (both.cost < alone.cost).float().mean() > 0.8
    assert np.median((both.xy - true).norm(dim=1).numpy()) < 2.0 < np.median((alone.xy - true).norm(dim=1).numpy())
    unused = smoother(walk_obs, t, off, alternatives=(other[0], torch.zeros(60, 2, dtype=torch.bool)))
    assert torch.equal(unused.xy, alone.xy) and torch.equal(unused.cost, alone.cost)


def test_whole_walk_with_basins_never_ends_above_its_one_start():
    """Without a network: the snapshot search's runner-up basins as more starts (WalkConfig.basins)."""
    refiner = MapRefiner(LIK, MapSearchConfig(global_top=2))
    idx = np.arange(80)
    one = whole_walk(DATA, idx, refiner, WalkConfig(), window_s=0.0)
    more = whole_walk(DATA, idx, refiner, WalkConfig(basins=2, basin_margin_nats=50.0), window_s=0.0)
    assert (more.cost <= one.cost + 1e-4).all()
