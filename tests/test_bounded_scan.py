"""The bounded lattice scan (the whole walk's no-network start): a true lower bound, the full scan's picks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.bounded_scan import BoundedScan, scan_lattice
from core.physics.calibration import calibrate
from core.physics.likelihood import LikelihoodConfig, RobustLikelihood
from core.physics.observation import site_observation
from core.physics.synthetic import analytic_radio_map, synthetic_dataset
from core.physics.trajectory import WalkConfig, scan_starts
from core.stores.radio_map import RadioMap

# 256 m x 192 m at 2 m, 4 sites with excess delays and a limited range (holes in some sites' coverage)
SITES = np.array([[-90.0, -60.0, 25.0], [95.0, -70.0, 25.0], [0.0, 80.0, 25.0], [-100.0, 70.0, 25.0]])
RM = analytic_radio_map(height=96, width=128, bounds=(-128.0, -96.0, 128.0, 96.0), sites=SITES,
                        excess_ns=[0.0, 15.0, 0.0, 5.0], max_range_m=190.0)
DATA = synthetic_dataset(RM, 160, reports=8, k=4, seed=3, nlos_prob=0.15, report_interval_s=0.2, speed_mps=(0.5, 1.5))
CAL = calibrate(DATA, RM, split=None)
LIK = RobustLikelihood(RM, CAL, LikelihoodConfig(cell_features=()), device="cpu")


def test_the_bounded_scan_makes_the_full_scans_picks_in_the_true_basin():
    obs = site_observation(DATA, np.arange(160), window_s=1.0)
    full = scan_starts(LIK, obs, step_m=4.0, top=6, bound_block=0)
    fast = scan_starts(LIK, obs, step_m=4.0, top=6)  # the default: bounded blocks of 4 x 4 points
    assert fast.shape == full.shape == (160, 6, 2)
    assert torch.equal(fast, full)  # every pick, in order, for every walk
    truth = DATA.ue_xyz[:160, -1, :2]
    assert np.median(np.linalg.norm(fast[:, 0].numpy() - truth, axis=1)) < 3.0
    bounded = BoundedScan(LIK, scan_lattice(LIK.maps, 4.0), block=4)
    bounded.top(LIK.prepare(obs), 6, 8.0)
    assert bounded.scored < 0.2 * bounded.offered  # it does prune: most points are never scored


def _k_path(rm: RadioMap) -> RadioMap:
    """``rm`` as a 2-path anchor map: the direct path and a reflection off the wall x = 200 m."""
    from core.stores.path_anchors import ANCHOR_LAYER, encode_anchors

    h, w = rm.shape
    sites = np.array([q["position"] for q in rm.attrs["sites"]])
    l0 = np.asarray(rm.attrs["generator"]["excess_ns"]) * 0.299792458  # the excess delay as a length before
    mirror = sites.copy()
    mirror[:, 0] = 2 * 200.0 - mirror[:, 0]
    a = np.stack([np.concatenate([q, l0[:, None]], 1) for q in (sites, mirror)], 1)[..., None, None] * np.ones((h, w))
    a = np.where(np.isfinite(rm.layers["site_toa"])[:, None, None], a, np.nan)
    layer, meta = encode_anchors(a, (0.0, 0.0))
    return RadioMap(rm.values, rm.features, rm.bounds, valid=rm.valid,
                    attrs={**rm.attrs, "paths_per_site": 2, "path_anchors": meta},
                    layers={**rm.layers, ANCHOR_LAYER: layer})


@pytest.mark.parametrize("rm, config", [
    (RM, LikelihoodConfig(cell_features=("snr", "sinr"))),  # serving features too, Cauchy product
    (RM, LikelihoodConfig(cell_features=(), penalty="huber", weights={"toa": 0.5, "aoa": 2.0})),
    (_k_path(RM), LikelihoodConfig(cell_features=())),  # a mixture over two paths
])
def test_the_block_bound_is_below_the_nll_of_every_point_of_the_block(rm, config):
    lik = RobustLikelihood(rm, calibrate(DATA, rm, split=None), config, device="cpu")
    lattice = scan_lattice(lik.maps, 4.0)
    bounded = BoundedScan(lik, lattice, block=3)
    prep = lik.prepare(site_observation(DATA, np.arange(0, 160, 8), window_s=1.0))
    nll = lik.evaluate_shared(lattice.points, prep)  # [B, P]
    members = bounded.members  # [G, 9]
    ok = members >= 0
    per_block = torch.where(ok, nll[:, members.clamp(min=0)], torch.inf).amin(-1)  # [B, G] each block's best point
    lb = bounded.bound(prep)
    assert bool((lb <= per_block + 1e-4 * (1 + per_block.abs())).all())
    assert float((lb > 0.5 * per_block).float().mean()) > 0.3  # and it is not vacuous
    # the table scored per (sample, point) pair is the shared scan's NLL
    cols = torch.randint(0, lattice.points.shape[0], (prep.site_ids.shape[0], 7), generator=torch.Generator().manual_seed(0))
    flat = cols.reshape(-1)
    sampled = lik.evaluate_sampled(bounded.table[:, flat], bounded.cover[:, flat], prep)  # [B, 7]
    torch.testing.assert_close(sampled, nll.gather(1, cols))


def test_bad_settings_are_one_error():
    obs = site_observation(DATA, np.arange(4))
    with pytest.raises(CoreError, match="bound_block"):
        scan_starts(LIK, obs, bound_block=-1)
    with pytest.raises(CoreError, match="scan_block"):
        WalkConfig(scan_block=-1)
    with pytest.raises(CoreError, match="block"):
        BoundedScan(LIK, scan_lattice(LIK.maps, 4.0), block=0)


def test_more_picks_than_the_map_holds_fall_back_like_the_full_scan():
    """A small lattice with fewer distinct points than picks: the extra picks are the full scan's (point 0)."""
    obs = site_observation(DATA, np.arange(12), window_s=1.0)
    full = scan_starts(LIK, obs, step_m=40.0, top=30, bound_block=0)
    assert torch.equal(scan_starts(LIK, obs, step_m=40.0, top=30, bound_block=2), full)


def test_with_the_silence_term_the_bounded_scan_still_makes_the_full_scans_picks():
    """The silence term (>= 0) is outside the block bound, inside every scored point: the picks stay the full scan's."""
    from core.physics.silence import Silence

    pg = LIK.maps.site_part(LIK.maps.sample(torch.zeros(1, 2, dtype=LIK.maps.dtype)))[0]
    lik = RobustLikelihood(LIK.maps, CAL, LikelihoodConfig(cell_features=(), silence=True),
                           silence=Silence(float(pg.median()), 0.05))
    obs = site_observation(DATA, np.arange(80), window_s=1.0)
    ids = obs.site_ids.clone()
    ids[:, 1:] = -1  # one site heard: the others silent
    obs = obs._replace(site_ids=ids, room=torch.ones(80, dtype=torch.bool))
    assert not torch.equal(scan_starts(lik, obs, step_m=4.0, top=6, bound_block=0),
                           scan_starts(LIK, obs, step_m=4.0, top=6, bound_block=0))  # silence moves picks
    torch.testing.assert_close(scan_starts(lik, obs, step_m=4.0, top=6),
                               scan_starts(lik, obs, step_m=4.0, top=6, bound_block=0), rtol=0, atol=0)


def test_first_in_order_matches_a_full_stable_sort():
    """The NMS's first L points per sample (value, then index), with ties, infinities and short rows, against
    sorting every row whole."""
    from core.physics.bounded_scan import _first_in_order

    rng = np.random.default_rng(0)
    val = torch.from_numpy(rng.integers(0, 6, (7, 40)).astype(np.float32))  # many ties
    val[1, 5:] = torch.inf  # a row with 5 finite entries
    val[2] = torch.inf  # none
    idx = torch.from_numpy(np.stack([rng.permutation(100)[:40] for _ in range(7)]))
    for width in (1, 8, 40):
        got_val, got_idx = _first_in_order(val, idx, width, fill=100)
        for r in range(7):
            ref = sorted((float(v), int(i)) for v, i in zip(val[r], idx[r]) if np.isfinite(float(v)))[:width]
            ref += [(float("inf"), 100)] * (width - len(ref))
            assert [(float(v), int(i)) for v, i in zip(got_val[r], got_idx[r])] == ref
