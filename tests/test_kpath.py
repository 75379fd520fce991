"""k-path maps: the mixture likelihood over a site's paths, the store contract, the path lookup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import StoreError
from core.features import wrap_degrees
from core.physics.calibration import calibrate
from core.physics.likelihood import LikelihoodConfig, RobustLikelihood
from core.physics.observation import SiteObservation, site_observation
from core.physics.site_lookup import SiteMaps
from core.physics.synthetic import analytic_radio_map, synthetic_dataset
from core.stores.radio_map import RadioMap

RM = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0), max_range_m=70.0)
DATA = synthetic_dataset(RM, 300, seed=0, nlos_prob=0.2)
CAL = calibrate(DATA, RM)
SHIFT_NS, SHIFT_DEG = 120.0, 40.0  # path 1 of every site: 120 ns later, 40 deg to the left of path 0


def with_paths(rm: RadioMap, alt_toa, alt_aoa, alt_power) -> RadioMap:
    """``rm`` with k-path layers ``[S (k-1), H, W]``."""
    s = rm.layers["site_toa"].shape[0]
    k = 1 + alt_toa.shape[0] // s
    return RadioMap(rm.values, rm.features, rm.bounds, valid=rm.valid, attrs={**rm.attrs, "paths_per_site": k},
                    layers={**rm.layers, "site_alt_toa": alt_toa.astype(np.float32),
                            "site_alt_aoa": alt_aoa.astype(np.float32), "site_alt_power": alt_power.astype(np.float32)})


def shifted(rm: RadioMap) -> RadioMap:
    toa, aoa = rm.layers["site_toa"], rm.layers["site_aoa"]
    return with_paths(rm, toa + SHIFT_NS, wrap_degrees(aoa + SHIFT_DEG), np.where(np.isfinite(toa), -3.0, np.nan))


def test_kpath_layers_are_checked_and_read():
    k2 = shifted(RM)
    assert k2.paths_per_site == 2 and RM.paths_per_site == 1
    maps = SiteMaps.from_radio_map(k2, dtype=torch.float64)
    assert maps.paths == 2 and SiteMaps.from_radio_map(k2, paths=False).paths == 1
    ids = torch.as_tensor(DATA.site_ids[:20, -1])
    i, j = RM.cell_of(DATA.labels[:20])  # at cell centres the lookup is the cell's value
    xs, ys = RM.cell_centers()
    xy = torch.as_tensor(np.stack([xs[j], ys[i]], -1))
    got = maps.path_lookup(xy, ids)  # [B, K, 2, 2]
    out = maps.lookup(xy, ids)
    base, cov = out.values, out.covered
    np.testing.assert_allclose(got[..., 0, 0], base[..., 1], atol=1e-9)
    np.testing.assert_allclose(got[..., 1, 0][cov], (base[..., 1] + SHIFT_NS)[cov], atol=1e-6)
    np.testing.assert_allclose(wrap_degrees((got[..., 1, 1] - base[..., 2]).numpy())[cov.numpy()], SHIFT_DEG, atol=1e-4)
    bad = {**k2.layers, "site_alt_aoa": k2.layers["site_alt_aoa"][:1]}
    with pytest.raises(StoreError, match="k-path layers"):
        RadioMap(RM.values, RM.features, RM.bounds, valid=RM.valid, attrs=k2.attrs, layers=bad)


def _centres(idx) -> torch.Tensor:
    """The centres of the cells of ``DATA[idx]``'s labels ``[B, 2]`` (where the lookup is the cell's value)."""
    i, j = RM.cell_of(DATA.labels[idx])
    xs, ys = RM.cell_centers()
    return torch.as_tensor(np.stack([xs[j], ys[i]], -1))


def _obs_at_path(maps: SiteMaps, idx, path: int) -> SiteObservation:
    """Reports of ``DATA[idx]`` whose ToA and AoA are the map's path ``path`` at :func:`_centres` (+ the bias)."""
    obs = site_observation(DATA, idx)
    ids = torch.as_tensor(obs.site_ids)
    paths = maps.path_lookup(_centres(idx), ids).double()
    site = torch.as_tensor(obs.site).double().clone()
    bias = torch.as_tensor(CAL.bias)[ids.clamp(min=0)]  # [B, K, 3]
    site[..., 1] = paths[..., path, 0] + bias[..., 1]
    site[..., 2] = torch.as_tensor(wrap_degrees((paths[..., path, 1] + bias[..., 2]).numpy()))
    site = torch.where((ids >= 0)[..., None], site, torch.nan)
    return SiteObservation(ids, site, obs.cell)


def _covered_samples(maps: SiteMaps, n: int) -> np.ndarray:
    """The first ``n`` samples whose latest report's sites all cover the truth (no miss cost)."""
    obs = site_observation(DATA, np.arange(DATA.num_samples))
    ids = torch.as_tensor(obs.site_ids)
    cov = maps.lookup(_centres(np.arange(DATA.num_samples)), ids).covered
    ok = ((cov | (ids < 0)).all(1) & (ids >= 0).any(1)).numpy()
    return np.flatnonzero(ok)[:n]


def test_mixture_equals_single_path_when_k_is_one():
    idx = np.arange(60)
    obs = site_observation(DATA, idx)
    xy = torch.as_tensor(DATA.labels[idx] + np.random.default_rng(1).normal(0, 6, (60, 2)))
    single = RobustLikelihood(SiteMaps.from_radio_map(RM, dtype=torch.float64), CAL, LikelihoodConfig(cell_features=()))
    assert single.paths == 1
    off = RobustLikelihood(SiteMaps.from_radio_map(shifted(RM), dtype=torch.float64, paths=False), CAL,
                           LikelihoodConfig(cell_features=(), path_mixture="off"))
    torch.testing.assert_close(off(xy, obs), single(xy, obs), rtol=0, atol=0)
    # a k-path map whose next paths are all absent: the mixture renormalises onto path 0
    nan = np.full((RM.layers["site_toa"].shape[0],) + RM.shape, np.nan)
    empty = RobustLikelihood(SiteMaps.from_radio_map(with_paths(RM, nan, nan, nan), dtype=torch.float64), CAL,
                             LikelihoodConfig(cell_features=()))
    assert empty.paths == 2
    torch.testing.assert_close(empty(xy, obs), single(xy, obs), rtol=1e-9, atol=1e-9)


def test_a_report_on_the_second_path_is_no_outlier_with_two_paths():
    k2 = shifted(RM)
    maps = SiteMaps.from_radio_map(k2, dtype=torch.float64)
    idx = _covered_samples(maps, 80)
    truth = _centres(idx)
    on0, on1 = _obs_at_path(maps, idx, 0), _obs_at_path(maps, idx, 1)
    cfg = LikelihoodConfig(cell_features=(), site_features=("toa", "aoa"))
    mix = RobustLikelihood(maps, CAL, cfg)
    single = RobustLikelihood(SiteMaps.from_radio_map(k2, dtype=torch.float64, paths=False), CAL,
                              LikelihoodConfig(cell_features=(), site_features=("toa", "aoa"), path_mixture="off"))
    pi = mix.log_pi.exp()
    slots = (torch.as_tensor(on0.site_ids) >= 0).sum(1).double()
    # single path: path 0 costs ~0, path 1 is a gross outlier in every slot (ToA 40 sigma, AoA 40 deg)
    assert float(single(truth, on0).max()) < 1e-6
    assert float((single(truth, on1) / slots).min()) > 8.0
    # mixture: either path costs only its weight, -log pi_j per slot (the other component adds ~nothing)
    torch.testing.assert_close(mix(truth, on0), -torch.log(pi[0]) * slots, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(mix(truth, on1), -torch.log(pi[1]) * slots, rtol=1e-3, atol=1e-3)
    terms = mix.terms(truth, on1)  # the breakdown: the responsible path's residual, the same total
    torch.testing.assert_close(terms.total, mix(truth, on1), rtol=1e-6, atol=1e-6)
    assert float(terms.residual[..., 1].abs().max()) < 1e-6


@pytest.mark.parametrize("config", [{}, {"penalty": "huber"}, {"weights": {"toa": 0.5}}])
def test_the_mixture_gradient_is_the_finite_difference(config):
    maps = SiteMaps.from_radio_map(shifted(RM), dtype=torch.float64)
    idx = np.arange(40)
    obs = _obs_at_path(maps, idx, 1)
    lik = RobustLikelihood(maps, CAL, LikelihoodConfig(cell_features=(), **config))
    xy = torch.as_tensor(DATA.labels[idx] + np.random.default_rng(2).normal(0, 1.5, (40, 2))).requires_grad_(True)
    lik(xy, obs).sum().backward()
    assert torch.isfinite(xy.grad).all() and float(xy.grad.abs().sum()) > 0
    h = 1e-5
    for d in range(2):
        e = torch.zeros_like(xy)
        e[:, d] = h
        with torch.no_grad():
            fd = (lik(xy + e, obs) - lik(xy - e, obs)) / (2 * h)
        torch.testing.assert_close(xy.grad[:, d], fd, rtol=1e-4, atol=1e-4)


def test_calibration_fits_the_path_weights_by_em():
    from core.physics.calibration import Calibration, path_weights

    maps = SiteMaps.from_radio_map(shifted(RM), dtype=torch.float64)
    idx = _covered_samples(maps, 200)
    xy = _centres(idx).numpy()
    on0, on1 = _obs_at_path(maps, idx, 0), _obs_at_path(maps, idx, 1)
    second = np.random.default_rng(3).random(len(idx)) < 0.3  # 30 % of the reports carry path 1
    site = np.where(second[:, None, None], on1.site.numpy(), on0.site.numpy())
    pi = path_weights(maps, xy, np.asarray(on0.site_ids), site, CAL.bias, CAL.scale)
    assert abs(pi[1] - second.mean()) < 0.02 and abs(sum(pi) - 1) < 1e-9
    cal = calibrate(DATA, shifted(RM))  # the synthetic reports are path 0's: nearly all weight on it
    assert cal.path_weights is not None and cal.path_weights[0] > 0.95
    back = Calibration.from_json(cal.to_json())
    assert back.path_weights == pytest.approx(cal.path_weights)
    assert Calibration.from_json(CAL.to_json()).path_weights is None


def test_the_bound_takes_the_gradient_of_the_path_nearest_the_report():
    from core.physics.bound import slot_gradients

    toa, aoa = RM.layers["site_toa"], RM.layers["site_aoa"]
    k2 = with_paths(RM, 2.0 * toa, aoa, np.where(np.isfinite(toa), -3.0, np.nan))  # path 1: twice the delay
    maps = SiteMaps.from_radio_map(k2, dtype=torch.float64)
    idx = _covered_samples(maps, 30)
    xy = _centres(idx) + 0.3  # off the centre: inside one cell, where the bilinear gradient is defined
    ids = torch.as_tensor(site_observation(DATA, idx).site_ids)
    on = lambda path: _obs_at_path(maps, idx, path).site - torch.as_tensor(CAL.bias)[ids.clamp(min=0)]  # noqa: E731
    g0, cov = slot_gradients(maps, xy, ids)
    g_on0, _ = slot_gradients(maps, xy, ids, on(0), (2.0, 3.0, 3.0))
    g_on1, _ = slot_gradients(maps, xy, ids, on(1), (2.0, 3.0, 3.0))
    torch.testing.assert_close(g_on0, g0)
    # slots whose four surrounding cells the site covers (at an edge the hole-filled path 1 is path 0's)
    i, j = RM.cell_of(DATA.labels[idx])
    h, w = RM.shape
    inner = np.ones(ids.shape, bool)
    for di in (0, 1):
        for dj in (0, 1):
            ii, jj = np.minimum(i + di, h - 1), np.minimum(j + dj, w - 1)
            inner &= np.isfinite(toa[ids.clamp(min=0).numpy(), ii[:, None], jj[:, None]]) & RM.valid[ii, jj][:, None]
    sel = torch.as_tensor(inner) & cov
    assert int(sel.sum()) > 20
    torch.testing.assert_close(g_on1[..., 1, :][sel], 2.0 * g0[..., 1, :][sel])  # ToA: path 1's gradient
    torch.testing.assert_close(g_on1[..., [0, 2], :], g0[..., [0, 2], :])  # path gain, AoA (the same here)
    assert float(g0[..., 1, :][sel].abs().sum()) > 0


def test_another_map_of_the_same_physics_is_accepted_explicitly_and_recorded(tmp_path, capsys):
    import json

    from core.cli import main
    from core.physics.synthetic import synthetic_scene
    from core.stores.dataset import MeasurementDataset
    from core.stores.lineage import check_map_override

    synthetic_scene(tmp_path, num_ues=120)
    rm = RadioMap.load(tmp_path / "radio_maps" / "analytic.zarr")
    kmap = shifted(rm)
    kmap.save(tmp_path / "kpath" / "analytic.zarr")
    ds = MeasurementDataset.load(tmp_path / "datasets" / "analytic")
    check_map_override(ds.ref, kmap.ref)  # same scene, sites, propagation
    moved = [{**q, "position": [q["position"][0] + 5.0, *q["position"][1:]]} for q in rm.attrs["sites"]]
    other = RadioMap(rm.values, rm.features, rm.bounds, valid=rm.valid, attrs={**rm.attrs, "sites": moved},
                     layers=rm.layers)
    other.save(tmp_path / "moved" / "analytic.zarr")
    with pytest.raises(StoreError, match="other sites"):
        check_map_override(ds.ref, other.ref)
    out = tmp_path / "c.json"
    assert main(["consistency", "--dataset", str(tmp_path / "datasets" / "analytic"), "--split", "all",
                 "--radio-map", str(tmp_path / "kpath" / "analytic.zarr"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["paths_per_site"] == 2
    assert result["summary"]["radio_map_override"]["used"]["id"] == kmap.lineage.id
    groups = {(r["variant"], r["feature"], r["group"]) for r in result["rows"]}
    assert ("noisy", "toa", "site layer, nearest of 2 paths") in groups
    capsys.readouterr()  # without --radio-map the recorded map is required, as before
    assert main(["consistency", "--dataset", str(tmp_path / "datasets" / "analytic"),
                 "--radio-maps", str(tmp_path / "kpath")]) == 2
    assert "is not the map dataset" in capsys.readouterr().err


def test_the_cauchy_product_form_is_the_log_sum_exp():
    """Cauchy with 0/1 weights takes one log of sum_j pi_j / prod(1 + z^2); any other weight the log-sum-exp."""
    maps = SiteMaps.from_radio_map(shifted(RM), dtype=torch.float64)
    idx = np.arange(60)
    obs = _obs_at_path(maps, idx, 1)
    xy = torch.as_tensor(DATA.labels[idx] + np.random.default_rng(4).normal(0, 3, (60, 2)))
    fast = RobustLikelihood(maps, CAL, LikelihoodConfig(cell_features=()))
    slow = RobustLikelihood(maps, CAL, LikelihoodConfig(cell_features=(), weights={"toa": 1.0 + 1e-12}))
    assert fast._product_mixture and not slow._product_mixture
    torch.testing.assert_close(fast(xy, obs), slow(xy, obs), rtol=1e-9, atol=1e-9)


def test_evaluate_radio_map_flag_is_checked_before_any_work(tmp_path, capsys):
    from core.cli import main

    assert main(["evaluate", "--run", "assets/default_run", "--radio-map", str(tmp_path / "none.zarr")]) == 2
    assert "no such map store" in capsys.readouterr().err
    assert main(["evaluate", "--run", "assets/default_run", "--radio-map", str(tmp_path), "--scene", "etoile"]) == 2
    assert "--radio-map and --scene" in capsys.readouterr().err


def test_shared_points_score_as_the_per_sample_evaluation():
    maps = SiteMaps.from_radio_map(shifted(RM), dtype=torch.float64)
    idx = np.arange(30)
    obs = _obs_at_path(maps, idx, 1)
    points = torch.as_tensor(np.random.default_rng(5).uniform(-60, 60, (50, 2)))
    for config in ({}, {"penalty": "huber"}):
        lik = RobustLikelihood(maps, CAL, LikelihoodConfig(cell_features=(), **config))
        prep = lik.prepare(obs)
        torch.testing.assert_close(lik.evaluate_shared(points, prep), lik.evaluate(points.expand(30, 50, 2), prep),
                                   rtol=1e-9, atol=1e-9)
