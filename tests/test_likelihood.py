"""Calibrated robust likelihood: numpy reference, masks, coverage penalty, gradients, terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import ConfigError, CoreError
from core.physics.calibration import Calibration, calibrate
from core.physics.likelihood import LikelihoodConfig, RobustLikelihood, penalty
from core.physics.observation import SiteObservation, site_observation
from core.physics.site_lookup import SiteMaps
from core.physics.synthetic import analytic_radio_map, synthetic_dataset

RM = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0), max_range_m=70.0)
DATA = synthetic_dataset(RM, 300, seed=0, nlos_prob=0.2)
CAL = calibrate(DATA, RM)


def reference_nll(maps: SiteMaps, cal: Calibration, xy, ids, site, kind="cauchy", delta=2.0, miss_z=10.0,
                  weights=(1.0, 1.0, 1.0)):
    """Independent numpy NLL (site features only), slot by slot, from the lookup's values."""
    out = maps.lookup(torch.as_tensor(xy), torch.as_tensor(ids))
    vals = out.values.double().numpy()
    cov = out.covered.numpy()
    raw = maps.sample(torch.as_tensor(xy).to(maps.dtype)).double().numpy()  # [C, N]: cos/sin for the chord
    s_n = maps.num_sites
    rho = (lambda z2: np.log1p(z2)) if kind == "cauchy" else (
        lambda z2: np.where(np.sqrt(z2) <= delta, 0.5 * z2, delta * (np.sqrt(z2) - 0.5 * delta)))
    total = np.zeros(len(xy))
    for n in range(len(xy)):
        for k, s in enumerate(ids[n]):
            if s < 0:
                continue
            for f in range(3):
                o = site[n, k, f]
                if not np.isfinite(o) or not weights[f]:
                    continue
                if not cov[n, k]:
                    total[n] += weights[f] * rho(miss_z**2)
                    continue
                if f < 2:
                    z2 = ((o - cal.bias[s, f] - vals[n, k, f]) / cal.scale[s, f]) ** 2
                else:
                    a = np.deg2rad(o - cal.bias[s, 2])
                    c, sn = raw[2 * s_n + s, n], raw[3 * s_n + s, n]
                    z2 = ((np.cos(a) - c) ** 2 + (np.sin(a) - sn) ** 2) / np.deg2rad(cal.scale[s, 2]) ** 2
                total[n] += weights[f] * rho(z2)
    return total


@pytest.mark.parametrize("kind", ["cauchy", "huber"])
def test_matches_numpy_reference(kind):
    weights = {"toa": 0.5} if kind == "huber" else {}
    lik = RobustLikelihood(SiteMaps.from_radio_map(RM, dtype=torch.float64), CAL,
                           LikelihoodConfig(cell_features=(), penalty=kind, weights=weights))
    obs = site_observation(DATA, np.arange(80))
    rng = np.random.default_rng(0)
    xy = DATA.labels[:80] + rng.normal(0, 8, (80, 2))
    got = lik(torch.from_numpy(xy), obs).numpy()
    ref = reference_nll(lik.maps, CAL, xy, obs.site_ids.numpy(), obs.site.double().numpy(), kind=kind,
                        weights=(1.0, 0.5 if weights else 1.0, 1.0))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-8)
    assert (obs.site_ids < 0).any() and not lik.maps.lookup(torch.from_numpy(xy), obs.site_ids).covered.all()


def test_penalty_functions():
    z2 = torch.tensor([0.0, 1.0, 4.0, 100.0], dtype=torch.float64, requires_grad=True)
    np.testing.assert_allclose(penalty(z2).detach(), np.log1p([0, 1, 4, 100]))
    hub = penalty(z2, "huber", 2.0)
    np.testing.assert_allclose(hub.detach(), [0.0, 0.5, 2.0, 2.0 * (10 - 1)])
    (g,) = torch.autograd.grad(hub.sum(), z2)
    assert torch.isfinite(g).all()


def test_missing_contributes_nothing_and_holes_never_a_perfect_match():
    lik = RobustLikelihood(RM, CAL, LikelihoodConfig(cell_features=()))
    xy = torch.tensor([[-40.0, -20.0], [40.0, 30.0]])
    site = torch.tensor([[[-80.0, 200.0, 10.0], [-90.0, 300.0, 100.0]]]).repeat(2, 1, 1)
    full = lik(xy, SiteObservation(torch.tensor([[0, 1], [0, 1]]), site))
    # an empty slot (-1) or a NaN feature contributes exactly nothing
    empty = lik(xy, SiteObservation(torch.tensor([[0, -1], [0, -1]]), site))
    nan = site.clone()
    nan[:, 1] = float("nan")
    assert torch.equal(lik(xy, SiteObservation(torch.tensor([[0, 1], [0, 1]]), nan)), empty)
    none = lik(xy, SiteObservation(torch.full((2, 2), -1), site))
    assert torch.equal(none, torch.zeros(2)) and (full > empty).all()
    # a site with no path at the point costs rho(z_miss) per feature: more than a 5-sigma outlier
    far = torch.tensor([[60.0, 46.0]])  # beyond site 0's 70 m range
    ids = torch.tensor([[0]])
    assert not lik.maps.lookup(far, ids).covered.any()
    perfect = lik.maps.lookup(far, ids).values + torch.from_numpy(CAL.bias[:1]).float()  # "measured" = the filler
    hole = lik(far, SiteObservation(ids, perfect))
    assert hole.item() == pytest.approx(3 * np.log1p(100.0), rel=1e-5)
    z5 = 3 * np.log1p(25.0)
    assert hole.item() > z5


def test_gradients_candidates_and_terms():
    lik = RobustLikelihood(SiteMaps.from_radio_map(RM, cell_features=CAL.informative_cell_features, dtype=torch.float64),
                           CAL)
    assert lik.cell_features == ("snr", "sinr", "throughput", "bler")
    obs = site_observation(DATA, np.arange(30))
    rng = np.random.default_rng(1)
    xy = torch.from_numpy(DATA.labels[:30] + rng.normal(0, 6, (30, 2))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: lik(p, obs), (xy,), atol=1e-5)
    cand = xy.detach().unsqueeze(1) + torch.from_numpy(rng.normal(0, 3, (30, 5, 2)))
    many = lik(cand, obs)
    for p in range(5):
        torch.testing.assert_close(many[:, p], lik(cand[:, p], obs))
    terms = lik.terms(xy.detach(), obs)
    torch.testing.assert_close(terms.total, lik(xy.detach(), obs))
    torch.testing.assert_close(terms.site.sum((1, 2)) + terms.cell.sum(1), terms.total)
    assert terms.site.shape == (30, 4, 3) and terms.cell.shape == (30, 4) and terms.z.shape == (30, 4, 3)
    assert (terms.site[~terms.present] == 0).all() and (terms.residual[~terms.present] == 0).all()
    # prepared observations are reusable and sliceable
    prep = lik.prepare(obs)
    torch.testing.assert_close(lik(xy.detach()[3:9], prep.take(slice(3, 9))), lik(xy.detach(), obs)[3:9])


def test_truth_is_better_than_elsewhere_and_no_nan_in_holes():
    lik = RobustLikelihood(RM, CAL)
    obs = site_observation(DATA)
    truth = torch.from_numpy(DATA.labels).float()
    at_truth = lik(truth, obs)
    off = lik(truth + torch.tensor([12.0, -9.0]), obs)
    assert (at_truth < off).float().mean() > 0.9
    grid = torch.stack(torch.meshgrid(torch.linspace(-70, 70, 40), torch.linspace(-55, 55, 30), indexing="xy"), -1)
    pts = grid.reshape(-1, 2)[:300].clone().requires_grad_(True)
    nll = lik(pts, obs.take(slice(0, 300)))
    (g,) = torch.autograd.grad(nll.sum(), pts)
    assert torch.isfinite(nll).all() and torch.isfinite(g).all()


def test_config_and_input_errors():
    with pytest.raises(ConfigError, match="penalty"):
        LikelihoodConfig(penalty="l1")
    with pytest.raises(ConfigError, match="weights"):
        LikelihoodConfig(weights={"rsrp": 1.0})
    with pytest.raises(ConfigError, match="site_features"):
        LikelihoodConfig(site_features=("snr",))
    lik = RobustLikelihood(RM, CAL, LikelihoodConfig(cell_features=()))
    with pytest.raises(CoreError, match="twice"):
        lik(torch.zeros(1, 2), SiteObservation(torch.tensor([[1, 1]]), torch.zeros(1, 2, 3)))
    with pytest.raises(CoreError, match="cell features"):
        RobustLikelihood(SiteMaps.from_radio_map(RM), CAL, LikelihoodConfig(cell_features=("snr",)))
