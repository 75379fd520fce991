"""k-path maps: the mixture likelihood over a site's paths, the anchor store contract, the path lookup."""

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
from core.stores.path_anchors import ABSENT, ANCHOR_LAYER, anchor_distance, decode_anchors, encode_anchors
from core.stores.radio_map import RadioMap

RM = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0), max_range_m=70.0)
DATA = synthetic_dataset(RM, 300, seed=0, nlos_prob=0.2)
CAL = calibrate(DATA, RM)
WALL_X = 150.0  # path 1 of every site: a reflection off the plane x = WALL_X (the site mirrored in it)
RX_HEIGHT = 1.5  # the analytic map's receivers (no ground, no attrs radio: the anchors' default)
SITES = np.array([q["position"] for q in RM.attrs["sites"]])


def with_anchors(rm: RadioMap, anchors: np.ndarray) -> RadioMap:
    """``rm`` with the k-path layer of float anchors ``[S, k, 4, H, W]`` (NaN: absent), encoded."""
    layer, meta = encode_anchors(anchors, (0.5 * (rm.bounds[0] + rm.bounds[2]), 0.5 * (rm.bounds[1] + rm.bounds[3])))
    return RadioMap(rm.values, rm.features, rm.bounds, valid=rm.valid,
                    attrs={**rm.attrs, "paths_per_site": anchors.shape[1], "path_anchors": meta},
                    layers={**rm.layers, ANCHOR_LAYER: layer})


def site_anchors(rm: RadioMap, paths=("direct", "mirror")) -> np.ndarray:
    """``[S, k, 4, H, W]``: path 0 the site itself (LOS), path 1 the site mirrored in ``x = WALL_X``; NaN where
    the site has no path."""
    h, w = rm.shape
    sites = np.array([q["position"] for q in rm.attrs["sites"]])
    excess_m = np.asarray(rm.attrs["generator"].get("excess_ns", 0.0)) * 0.299792458 * np.ones(len(sites))  # L0
    out = []
    for kind in paths:
        q = sites.copy()
        if kind == "mirror":
            q[:, 0] = 2 * WALL_X - q[:, 0]
        a = np.concatenate([q, excess_m[:, None]], 1)[:, :, None, None] * np.ones((1, 1, h, w))
        out.append(a)
    a = np.stack(out, 1)  # [S, k, 4, H, W]
    return np.where(np.isfinite(rm.layers["site_toa"])[:, None, None], a, np.nan)


def shifted(rm: RadioMap) -> RadioMap:
    """``rm`` as a 2-path map: the direct path and a reflection off the wall ``x = WALL_X``."""
    return with_anchors(rm, site_anchors(rm))


def geometric(q: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(toa [ns], aoa [deg])`` of anchors ``q [..., 3]`` (L0 = 0) at receivers ``xy [..., 2]`` at the UE height."""
    rel = np.concatenate([q[..., :2], q[..., 2:3] - RX_HEIGHT, np.zeros(q.shape[:-1] + (1,))], -1)
    return anchor_distance(rel, xy)


def test_kpath_layers_are_checked_and_read():
    k2 = shifted(RM)
    assert k2.paths_per_site == 2 and RM.paths_per_site == 1
    assert k2.layers[ANCHOR_LAYER].dtype == np.int16 and k2.layers[ANCHOR_LAYER].shape == (4 * 3 * 2,) + RM.shape
    maps = SiteMaps.from_radio_map(k2, dtype=torch.float64)
    assert maps.paths == 2 and maps.components == 8 and SiteMaps.from_radio_map(k2, paths=False).paths == 1
    bad = {**k2.layers, ANCHOR_LAYER: k2.layers[ANCHOR_LAYER][:4]}
    with pytest.raises(StoreError, match="k-path layers|4 S k"):
        RadioMap(RM.values, RM.features, RM.bounds, valid=RM.valid, attrs=k2.attrs, layers=bad)
    with pytest.raises(StoreError, match="int16"):
        RadioMap(RM.values, RM.features, RM.bounds, valid=RM.valid, attrs=k2.attrs,
                 layers={**k2.layers, ANCHOR_LAYER: k2.layers[ANCHOR_LAYER].astype(np.float32)})


def test_the_first_kpath_layout_loads_but_its_paths_are_refused_in_one_line(tmp_path):
    from core.raytracing.consistency import consistency_rows

    s = RM.layers["site_toa"].shape[0]
    old = {name: np.repeat(RM.layers["site_toa"], 2, 0) for name in ("site_alt_toa", "site_alt_aoa", "site_alt_power")}
    legacy = RadioMap(RM.values, RM.features, RM.bounds, valid=RM.valid, attrs={**RM.attrs, "paths_per_site": 3},
                      layers={**RM.layers, **old})
    legacy.save(tmp_path / "analytic.zarr")
    back = RadioMap.load(tmp_path / "analytic.zarr")  # the store reads; path 0 is intact
    assert back.paths_per_site == 3 and back.layers["site_alt_toa"].shape[0] == 2 * s
    assert SiteMaps.from_radio_map(back, paths=False).paths == 1
    for read in (lambda: SiteMaps.from_radio_map(back), lambda: consistency_rows(DATA, back, "all")):
        with pytest.raises(StoreError, match="first k-path layout") as err:
            read()
        assert "\n" not in str(err.value) and "--paths-per-site 3 --force" in str(err.value)


def test_anchor_quantisation_round_trip_is_within_half_a_quantum():
    rng = np.random.default_rng(0)
    a = rng.uniform(-400, 400, (2, 3, 4, 5, 6))
    a[0, 1, :, 2, 3] = np.nan  # an absent path
    layer, meta = encode_anchors(a, (10.0, -20.0))
    assert layer.dtype == np.int16 and meta["quantum_m"] == 1 / 64  # +-420 m of the centre fits 1/64 m
    back = decode_anchors(layer, meta, 2)
    assert np.isnan(back[0, 1, :, 2, 3]).all() and (layer.reshape(2, 3, 4, 5, 6)[0, 1, :, 2, 3] == ABSENT).all()
    ok = np.isfinite(a)
    assert np.abs(back - a)[ok].max() <= meta["quantum_m"] / 2 + 1e-9
    far = a * 10  # up to 4 km: the quantum doubles until it fits (1/8 m: +-4.1 km), the bound stays half of it
    layer, meta = encode_anchors(far, (0.0, 0.0))
    assert meta["quantum_m"] == 1 / 8
    assert np.abs(decode_anchors(layer, meta, 2) - far)[ok].max() <= meta["quantum_m"] / 2 + 1e-9
    # the ToA / AoA bound of the module doc at Q: (sqrt 3 + 1) Q / 2 / c and asin(Q / sqrt 2 / d_xy)
    q = 1 / 16
    t_a, a_a = anchor_distance(np.array([30.0, 40.0, 20.0, 5.0]), np.zeros(2))
    t_b, a_b = anchor_distance(np.array([30.0 + q / 2, 40.0 - q / 2, 20.0 + q / 2, 5.0 + q / 2]), np.zeros(2))
    assert abs(t_b - t_a) <= (np.sqrt(3) + 1) * q / 2 / 299_792_458.0 * 1e9 + 1e-12
    assert abs(a_b - a_a) <= np.degrees(np.arcsin(q / np.sqrt(2) / 50.0)) + 1e-12


def test_the_anchor_lookup_is_exact_for_a_los_path_inside_a_cell():
    """Anywhere inside the cells, every component of the LOS map is the straight line to the site (up to the quantum)."""
    maps = SiteMaps.from_radio_map(shifted(RM), dtype=torch.float64)
    idx = np.arange(50)
    ids = torch.as_tensor(DATA.site_ids[idx, -1])
    xy = DATA.labels[idx] + np.random.default_rng(1).uniform(-1.9, 1.9, (50, 2))  # anywhere in the cells
    paths, weight = maps.path_lookup(torch.as_tensor(xy), ids)  # [B, K, 8, 2], [B, 8]
    torch.testing.assert_close(weight.view(-1, 2, 4).sum(-1), torch.ones(50, 2, dtype=torch.float64))
    q = SITES[ids.clamp(min=0).numpy()]  # [B, K, 3]
    mirror = q.copy()
    mirror[..., 0] = 2 * WALL_X - mirror[..., 0]
    inner = ids.numpy() >= 0
    for r, anchor in enumerate((q, mirror)):
        t, a = geometric(anchor, xy[:, None])
        for c in range(4):  # every cell of the stencil holds the same path: exact at any point
            got = paths[:, :, 4 * r + c].numpy()
            np.testing.assert_allclose(got[..., 0][inner], t[inner], atol=0.1)  # ns: the 1/64 m quantum
            d_xy = np.hypot(*(anchor[..., :2] - xy[:, None]).transpose(2, 0, 1))  # the module doc's AoA bound
            bound = np.degrees(np.arcsin(np.minimum(1.0, (1 / 64) / np.sqrt(2) / d_xy)))
            assert (np.abs(wrap_degrees(got[..., 1] - a)) <= bound + 1e-9)[inner].all()


def test_the_anchor_lookup_never_interpolates_across_two_paths():
    """Path 1 is one reflection on the west half of the map and another on the east half: between the halves each
    component is exactly one of the two, weighted by its cell, never a blend."""
    a = site_anchors(RM)
    h, w = RM.shape
    other = SITES.copy()
    other[:, 1] = -2 * 80.0 - other[:, 1]  # the site mirrored in y = -80
    east = a[:, 1, :3, :, w // 2:]
    a[:, 1, :3, :, w // 2:] = np.where(np.isfinite(east), other[:, :, None, None], np.nan)
    maps = SiteMaps.from_radio_map(with_anchors(RM, a), dtype=torch.float64)
    xs, ys = RM.cell_centers()
    x_mid = 0.5 * (xs[w // 2 - 1] + xs[w // 2])  # halfway between a west and an east cell
    xy = np.stack([np.full(9, x_mid) + np.linspace(-0.9, 0.9, 9) * RM.cell_size / 2, np.full(9, ys[h // 2] + 0.7)], -1)
    ids = torch.zeros(9, 1, dtype=torch.long)  # site 0 covers the middle of the map
    paths, weight = maps.path_lookup(torch.as_tensor(xy), ids)
    t_w, _ = geometric(np.broadcast_to(a[0, 1, :3, 0, 0], (9, 3)).copy(), xy)
    t_e, _ = geometric(np.broadcast_to(other[0], (9, 3)).copy(), xy)
    for c, is_east in enumerate((False, True, False, True)):  # stencil cells: (i0, j0), (i0, j0+1), ...
        np.testing.assert_allclose(paths[:, 0, 4 + c, 0].numpy(), t_e if is_east else t_w, atol=0.1)
    assert (np.abs(t_w - t_e) > 100).all()  # two paths hundreds of ns apart: a blend would be neither
    np.testing.assert_allclose(weight[:, 1].numpy() + weight[:, 3].numpy(),
                               (xy[:, 0] - xs[w // 2 - 1]) / RM.cell_size, atol=1e-9)  # the east cells' weight


def test_the_anchor_lookup_equals_the_stored_path_at_cell_centres():
    """At a cell centre only the cell itself has weight, and its path 0 is the stored site_toa / site_aoa."""
    maps = SiteMaps.from_radio_map(shifted(RM), dtype=torch.float64)
    idx = np.arange(60)
    ids = torch.as_tensor(DATA.site_ids[idx, -1])
    xy = _centres(idx)
    paths, weight = maps.path_lookup(xy, ids)
    own = weight[:, :4].argmax(1)
    assert torch.all(weight[:, :4].max(1).values == 1.0)
    base = maps.lookup(xy, ids)
    cov = base.covered
    p0 = paths[torch.arange(60), :, own]  # [B, K, 2]
    torch.testing.assert_close(p0[..., 0][cov], base.values[..., 1][cov], atol=0.1, rtol=0)
    d_xy = np.hypot(*(SITES[ids.clamp(min=0).numpy(), :2] - xy.numpy()[:, None]).transpose(2, 0, 1))
    bound = np.degrees(np.arcsin(np.minimum(1.0, (1 / 64) / np.sqrt(2) / d_xy))) + 1e-4  # + float32 storage
    assert (np.abs(wrap_degrees((p0[..., 1] - base.values[..., 2]).numpy())) <= bound)[cov.numpy()].all()


def _centres(idx) -> torch.Tensor:
    """The centres of the cells of ``DATA[idx]``'s labels ``[B, 2]`` (where the lookup is the cell's value)."""
    i, j = RM.cell_of(DATA.labels[idx])
    xs, ys = RM.cell_centers()
    return torch.as_tensor(np.stack([xs[j], ys[i]], -1))


def _obs_at_path(maps: SiteMaps, idx, path: int) -> SiteObservation:
    """Reports of ``DATA[idx]`` whose ToA and AoA are the map's path ``path`` at :func:`_centres` (+ the bias):
    the path of the cell itself (the stencil cell of weight 1 there)."""
    obs = site_observation(DATA, idx)
    ids = torch.as_tensor(obs.site_ids)
    paths, weight = maps.path_lookup(_centres(idx), ids)
    own = 4 * path + weight[:, :4].argmax(1)  # [B]
    paths = paths.double()[torch.arange(len(idx)), :, own]  # [B, K, 2]
    site = torch.as_tensor(obs.site).double().clone()
    bias = torch.as_tensor(CAL.bias)[ids.clamp(min=0)]  # [B, K, 3]
    site[..., 1] = paths[..., 0] + bias[..., 1]
    site[..., 2] = torch.as_tensor(wrap_degrees((paths[..., 1] + bias[..., 2]).numpy()))
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
    # a k-path map whose next paths are all absent: the mixture renormalises onto path 0 (at the cell centres,
    # where the interpolated single path is exact too; up to the anchors' 1/64 m quantum)
    a = site_anchors(RM)
    a[:, 1] = np.nan
    empty = RobustLikelihood(SiteMaps.from_radio_map(with_anchors(RM, a), dtype=torch.float64), CAL,
                             LikelihoodConfig(cell_features=()))
    assert empty.paths == 2
    centres = _centres(idx)
    torch.testing.assert_close(empty(centres, obs), single(centres, obs), rtol=0, atol=0.05)


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
    assert float(single(truth, on0).max()) < 1e-3  # the anchors' quantum against the stored path 0
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

    maps = SiteMaps.from_radio_map(shifted(RM), dtype=torch.float64)
    idx = _covered_samples(maps, 30)
    xy = _centres(idx) + 0.3  # off the centre: inside one cell
    ids = torch.as_tensor(site_observation(DATA, idx).site_ids)
    on = lambda path: _obs_at_path(maps, idx, path).site - torch.as_tensor(CAL.bias)[ids.clamp(min=0)]  # noqa: E731
    g0, cov = slot_gradients(maps, xy, ids)
    g_on0, _ = slot_gradients(maps, xy, ids, on(0), (2.0, 3.0, 3.0))
    g_on1, _ = slot_gradients(maps, xy, ids, on(1), (2.0, 3.0, 3.0))
    torch.testing.assert_close(g_on0[..., 0, :], g0[..., 0, :])  # path gain: the interpolated layer, as always
    sel = cov & (ids >= 0)
    assert int(sel.sum()) > 20
    p = xy.numpy()[:, None]  # [B, 1, 2]
    for g, mirror in ((g_on0, False), (g_on1, True)):  # ToA and AoA: the nearest path's own geometry
        q = SITES[ids.clamp(min=0).numpy()].copy()
        if mirror:
            q[..., 0] = 2 * WALL_X - q[..., 0]
        d = q[..., :2] - p
        dist = np.sqrt((d ** 2).sum(-1) + (q[..., 2] - RX_HEIGHT) ** 2)
        d_toa = -d / dist[..., None] / 299_792_458.0 * 1e9  # ns/m
        h2 = (d ** 2).sum(-1)[..., None]
        d_aoa = np.degrees(np.concatenate([d[..., 1:], -d[..., :1]], -1) / h2)  # deg/m
        # to the anchors' quantum (1/128 m off, some 50 m away: a few 1e-4 relative)
        np.testing.assert_allclose(g[..., 1, :][sel].numpy(), d_toa[sel.numpy()], rtol=5e-3, atol=1e-4)
        np.testing.assert_allclose(g[..., 2, :][sel].numpy(), d_aoa[sel.numpy()], rtol=5e-3, atol=1e-4)
    assert not torch.allclose(g_on1[..., 1, :][sel], g_on0[..., 1, :][sel])


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
    rows = {(r["variant"], r["feature"], r["group"]): r for r in result["rows"]}
    near = rows[("clean", "toa", "site layer, nearest of 2 paths")]
    ctrl = rows[("clean", "toa", "site layer, nearest of 2 paths, control 10 cells off")]
    path0 = rows[("clean", "toa", "site layer, all slots")]
    assert near["gross"] <= path0["gross"] and abs(near["median"]) < 0.1  # the truth: the anchors fit as path 0
    assert ctrl["gross"] > 5 * max(near["gross"], 0.01)  # 10 cells off: far fewer paths fit
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
