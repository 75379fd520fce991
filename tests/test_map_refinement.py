"""MAP refinement on analytic maps: finds the truth, recovers gross misses, gate, chunking, records, prior."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.calibration import calibrate
from core.physics.exhaustive import ExhaustiveMatcher
from core.physics.likelihood import LikelihoodConfig, RobustLikelihood
from core.physics.map_scan import GlobalScan
from core.physics.observation import site_observation
from core.physics.prior import position_prior
from core.physics.refinement import (
    SOURCE_CENTRE,
    SOURCE_GLOBAL,
    SOURCE_SCAN,
    SOURCE_WINDOW,
    MapRefiner,
    MapSearchConfig,
)
from core.physics.synthetic import analytic_radio_map, synthetic_dataset

SITES = np.array([[-100.0, -80.0, 25.0], [110.0, -60.0, 25.0], [0.0, 100.0, 25.0], [-110.0, 90.0, 25.0]])
RM = analytic_radio_map(height=64, width=64, bounds=(-128.0, -128.0, 128.0, 128.0), sites=SITES, excess_ns=[0, 8, 0, 0])
DATA = synthetic_dataset(RM, 400, seed=0, nlos_prob=0.1)
LIK = RobustLikelihood(RM, calibrate(DATA, RM), LikelihoodConfig(cell_features=()))
REFINER = MapRefiner(LIK)
IDX = DATA.indices("train")[:120]
OBS = site_observation(DATA, IDX)
TRUTH = torch.from_numpy(DATA.labels[IDX]).float()


def start(offset=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(len(TRUTH), generator=g) * 2 * math.pi
    return TRUTH + offset * torch.stack([angle.cos(), angle.sin()], 1)


def test_finds_the_truth_from_a_nearby_estimate():
    mu = start(6.0)
    res = REFINER(mu, 5.0, OBS)
    before = (mu - TRUTH).norm(dim=1)
    after = (res.xy - TRUTH).norm(dim=1)
    assert after.median() < 2.0 and before.median() > 5.9
    assert (res.posterior <= res.posterior_start + 1e-4).all()  # never worse than the start
    assert res.refined.all() and (res.source == SOURCE_WINDOW).float().mean() > 0.9
    # the recorded numbers are what they say
    torch.testing.assert_close(res.nll, LIK(res.xy, OBS), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res.terms_after.total, res.nll, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(res.terms_before.total, res.nll_start, rtol=1e-5, atol=1e-4)
    n, steps = len(mu), REFINER.config.polish_steps
    assert res.path.shape == (steps + 1, n, 2) and res.path_posterior.shape == (steps + 1, n)
    assert res.starts.shape == (n, 1 + REFINER.config.global_top, 2)
    torch.testing.assert_close(res.path[0], res.pattern_xy)
    assert (res.path_posterior.min(0).values >= res.posterior - 1e-4).all()


def test_recovers_a_gross_miss_through_the_global_scan():
    mu = start(6.0)
    far = torch.arange(0, len(mu), 6)
    direction = torch.nn.functional.normalize(-TRUTH[far] + 1e-3, dim=1)  # towards the other side of the map
    mu[far] = torch.clamp(TRUTH[far] + 120.0 * direction, -127, 127)
    res = REFINER(mu, 5.0, OBS)
    err = (res.xy - TRUTH).norm(dim=1)
    assert (err[far] < 5.0).float().mean() > 0.7
    assert (res.source[far] == SOURCE_GLOBAL).float().mean() > 0.7
    # without the global scan (or with a pure Gaussian prior) the miss stays a miss
    local = MapRefiner(LIK, MapSearchConfig(global_top=0))(mu, 5.0, OBS)
    assert ((local.xy[far] - TRUTH[far]).norm(dim=1) > 20).float().mean() > 0.9
    gauss = MapRefiner(LIK, MapSearchConfig(outlier_prob=0.0))(mu, 5.0, OBS)
    assert ((gauss.xy[far] - TRUTH[far]).norm(dim=1) > 20).float().mean() > 0.9


def test_scan_starts_hold_exhaustive_searchs_basins():
    """``scan_top``: the exact lattice scan's best points are starts, so a gross miss whose block the block
    statistics would not rank is recovered, and with a flat prior MAP lands where exhaustive search does."""
    mu = start(6.0)
    far = torch.arange(0, len(mu), 4)
    direction = torch.nn.functional.normalize(-TRUTH[far] + 1e-3, dim=1)
    mu[far] = torch.clamp(TRUTH[far] + 120.0 * direction, -127, 127)
    scan = MapRefiner(LIK, MapSearchConfig(global_top=0, scan_top=4))
    res = scan(mu, 5.0, OBS)
    assert res.starts.shape == (len(mu), 1 + 4, 2)
    assert ((res.xy[far] - TRUTH[far]).norm(dim=1) < 5.0).float().mean() > 0.8
    assert (res.source[far] == SOURCE_SCAN).float().mean() > 0.8 and int(res.source_rank.max()) <= 3
    flat = scan(mu, 1.0e4, OBS)  # no prior: the basin exhaustive map matching finds
    ex = ExhaustiveMatcher(LIK)(OBS)
    assert ((flat.xy - ex.xy).norm(dim=1) < 2.0).float().mean() > 0.95
    with pytest.raises(CoreError, match="scan_top"):
        MapSearchConfig(scan_top=-1)


def test_extra_centres_are_searched():
    mu = start(6.0)
    far = torch.arange(0, len(mu), 5)
    mu[far] = torch.clamp(-TRUTH[far], -127, 127)
    centres = torch.stack([mu + 60.0, TRUTH + torch.tensor([3.0, -2.0])], 1)  # a useless one and a good one
    res = MapRefiner(LIK, MapSearchConfig(global_top=0))(mu, 5.0, OBS, centres=centres)
    assert ((res.xy[far] - TRUTH[far]).norm(dim=1) < 5).float().mean() > 0.8
    assert (res.source[far] == SOURCE_CENTRE).float().mean() > 0.8 and (res.source_rank[far] == 1).float().mean() > 0.8


def test_confidence_gate_and_chunking():
    mu = start(6.0)
    conf = torch.linspace(0, 1, len(mu))
    res = REFINER(mu, torch.full((len(mu), 2), 5.0), OBS, confidence=conf, threshold=0.5)
    keep = conf >= 0.5
    assert torch.equal(res.refined, ~keep)
    assert torch.equal(res.xy[keep], mu[keep]) and torch.equal(res.path[:, keep], mu[keep].expand(res.path.shape[0], -1, -1))
    torch.testing.assert_close(res.terms_after.total[keep], res.terms_before.total[keep])
    assert ((res.xy[~keep] - TRUTH[~keep]).norm(dim=1).median() < 2.0)
    # chunk size changes nothing but memory
    small = MapRefiner(LIK, MapSearchConfig(chunk_size=7))(mu, 5.0, OBS)
    big = MapRefiner(LIK, MapSearchConfig(chunk_size=500))(mu, 5.0, OBS)
    torch.testing.assert_close(small.xy, big.xy, rtol=0, atol=1e-4)
    torch.testing.assert_close(small.posterior, big.posterior, rtol=1e-5, atol=1e-4)


def test_global_scan_ranks_the_true_block_first():
    scan = GlobalScan(LIK, block=8)  # 8 x 8 blocks of 16 m... of 4 m cells: 32 m
    prep = LIK.prepare(OBS)
    top = scan.top(prep, 2)
    d = (top[:, 0] - TRUTH).abs().amax(1)
    assert (d <= 0.5 * scan.block_m + 4.0).float().mean() > 0.8
    assert ((top[:, 0] - top[:, 1]).norm(dim=1) > 1.5 * scan.block_m - 1e-3).all()  # suppressed neighbours
    avoided = scan.top(prep, 1, avoid=TRUTH, avoid_radius=20.0)
    assert ((avoided[:, 0] - TRUTH).abs().amax(1) > 20.0).all()


def test_prior_mixture():
    mu = torch.zeros(2, 2)
    pri = position_prior(mu, torch.tensor([2.0, 4.0]), area_m2=1e4, outlier_prob=0.1, min_sigma=1.0)
    x = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [300.0, 0.0]]]).expand(2, 3, 2)
    got = pri.nll(x)
    for b, s in enumerate((2.0, 4.0)):
        for j in range(3):
            d2 = float(x[b, j].square().sum())
            dens = 0.9 / (2 * math.pi * s * s) * math.exp(-0.5 * d2 / s**2) + 0.1 / 1e4
            assert got[b, j].item() == pytest.approx(-math.log(dens), rel=1e-5)
    assert got[0, 2].item() == pytest.approx(math.log(1e4 / 0.1), rel=1e-4)  # far away: the floor
    with pytest.raises(CoreError, match="sigma"):
        position_prior(mu, torch.tensor([1.0, -1.0]), 1e4)
    with pytest.raises(CoreError, match="outlier_prob"):
        position_prior(mu, 1.0, 1e4, outlier_prob=1.0)


def test_input_errors():
    with pytest.raises(CoreError, match="mu"):
        REFINER(torch.zeros(3, 2), 1.0, OBS)
    with pytest.raises(CoreError, match="centres"):
        REFINER(TRUTH, 1.0, OBS, centres=torch.zeros(len(TRUTH), 2))
    with pytest.raises(CoreError, match="window_m"):
        MapSearchConfig(window_m=0)
