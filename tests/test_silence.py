"""The silence term: the sites a report with a free slot did not hear (core.physics.silence)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.calibration import calibrate
from core.physics.likelihood import LikelihoodConfig, RobustLikelihood
from core.physics.map_scan import GlobalScan
from core.physics.observation import SiteObservation, site_observation
from core.physics.silence import Silence, outlier_share, silence_cost, unheard_sites
from core.physics.site_lookup import SiteMaps
from core.physics.synthetic import analytic_radio_map, synthetic_dataset

RM = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0), max_range_m=70.0)
DATA = synthetic_dataset(RM, 200, seed=0, nlos_prob=0.2)
CAL = calibrate(DATA, RM)
MAPS = SiteMaps.from_radio_map(RM, dtype=torch.float64)


def _threshold() -> float:
    """A threshold inside the map's path-gain range, so that silence is informative somewhere."""
    pg = MAPS.site_part(MAPS.sample(torch.zeros(1, 2, dtype=torch.float64)))[0]
    return float(pg.median())


def test_cost_is_the_formula_and_bounded():
    s = Silence(-100.0, 0.02)
    gain = torch.tensor([[-160.0, -100.0, -97.0, -40.0]], dtype=torch.float64)
    bias, scale = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    got = silence_cost(gain, bias, scale, s)[0].numpy()
    phi = [0.5 * (1 + math.erf((-100.0 + 3.0 - g) / 2.0 / math.sqrt(2))) for g in gain[0].tolist()]
    want = [-math.log(0.02 + 0.98 * p) for p in phi]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] < 1e-9 and abs(got[3] + math.log(0.02)) < 1e-9  # far below: free; far above: capped at -log eps
    assert abs(got[2] - math.log(2 / 1.02)) < 1e-12  # at the threshold (bias included): Phi = 1/2
    with pytest.raises(CoreError, match="outlier"):
        Silence(-100.0, 0.0)
    with pytest.raises(CoreError, match="threshold"):
        Silence(float("nan"))


def test_unheard_sites():
    ids = torch.tensor([[0, -1, -1], [2, 1, -1], [0, 1, 2]])
    got = unheard_sites(ids, torch.tensor([True, True, False]), 4)
    want = torch.tensor([[False, True, True, True], [True, False, False, True],
                         [False, False, False, False]]).t()
    assert torch.equal(got, want)


def test_outlier_share_is_the_maximum_likelihood():
    rng = np.random.default_rng(0)
    phi = np.concatenate([rng.uniform(0.9, 1.0, 800), rng.uniform(0.0, 0.05, 60)])
    heard = 1500
    eps = outlier_share(phi, heard)
    grid = np.linspace(1e-4, 0.1, 5001)
    loglik = np.log(grid[:, None] + (1 - grid[:, None]) * phi[None]).sum(1) + heard * np.log(1 - grid)
    assert abs(eps - grid[np.argmax(loglik)]) < 2e-4
    assert 0.02 < eps < 0.03  # about the 60 loud-but-silent pairs among all 2,360


def test_likelihood_adds_exactly_the_silence_term_with_its_gradient():
    thr = _threshold()
    sil = Silence(thr, 0.05)
    off = RobustLikelihood(MAPS, CAL, LikelihoodConfig(cell_features=()))
    on = RobustLikelihood(MAPS, CAL, LikelihoodConfig(cell_features=(), silence=True), silence=sil)
    obs = site_observation(DATA, np.arange(40))
    assert obs.room is not None and obs.room.dtype == torch.bool
    ids = obs.site_ids.clone()
    ids[:, 1:] = -1  # one site heard per report: the others are silent
    site = obs.site.clone()
    site[:, 1:] = float("nan")
    obs = obs._replace(site_ids=ids, site=site, room=torch.ones(40, dtype=torch.bool))
    rng = np.random.default_rng(3)
    xy = torch.from_numpy(DATA.labels[:40] + rng.normal(0, 10, (40, 2)))
    gain = MAPS.site_part(MAPS.sample(xy))[0]
    cover = MAPS.coverage(xy)[:-1]
    unheard = unheard_sites(obs.site_ids, obs.room, MAPS.num_sites).double()
    want = (silence_cost(gain, torch.as_tensor(CAL.bias[:, 0]), torch.as_tensor(CAL.scale[:, 0]), sil)
            * cover * unheard).sum(0)
    diff = on(xy, obs) - off(xy, obs)
    torch.testing.assert_close(diff, want)
    assert (diff > 0.5).any()  # the test is not vacuous
    terms = on.terms(xy, obs)
    torch.testing.assert_close(terms.silence, want)
    torch.testing.assert_close(terms.total, on(xy, obs))
    # shared candidate points (the exhaustive scans) give the same as per-sample points
    pts = xy[:7]
    prep = on.prepare(obs)
    torch.testing.assert_close(on.evaluate_shared(pts, prep), on.evaluate(pts.unsqueeze(0).expand(40, -1, -1), prep))
    # the gradient through the path-gain lookup
    p = xy[:12].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: on(q, obs.take(slice(0, 12))), (p,), atol=1e-5)
    # no room (or an observation that does not say): no silence
    torch.testing.assert_close(on(xy, obs._replace(room=None)), off(xy, obs))
    torch.testing.assert_close(on(xy, obs._replace(room=torch.zeros(40, dtype=torch.bool))), off(xy, obs))
    # the global scan's block cost carries it too
    scan_on, scan_off = GlobalScan(on), GlobalScan(off)
    extra = scan_on.nll(prep) - scan_off.nll(off.prepare(obs))
    assert (extra >= -1e-9).all() and (extra > 0.5).any()


def test_silence_needs_its_constants_and_room_follows_the_slots():
    with pytest.raises(CoreError, match="no Silence"):
        RobustLikelihood(MAPS, CAL, LikelihoodConfig(cell_features=(), silence=True))
    obs = site_observation(DATA, np.arange(60))
    t = DATA.report_mask[:60].shape[1] - 1 - np.argmax(DATA.report_mask[:60][:, ::-1], axis=1)
    slots = (DATA.site_ids[np.arange(60), t] >= 0).sum(1)
    assert torch.equal(obs.room, torch.from_numpy(slots < DATA.site_ids.shape[2]))
    pooled = site_observation(DATA, np.arange(60), window_s=1.0)
    assert torch.equal(pooled.room, obs.room)
    one = SiteObservation(torch.tensor([[0, -1]]), torch.full((1, 2, 3), -80.0), None, None, torch.tensor([True]))
    assert one.take(slice(0, 1)).room.tolist() == [True]
