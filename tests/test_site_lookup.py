"""Per-site lookup: numpy reference, AoA on the circle, coverage, holes, candidates, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.site_lookup import SiteMaps, site_lookup
from core.physics.synthetic import analytic_radio_map, with_geometric_site_layers

BOUNDS = (-30.0, 12.0, 36.0, 42.0)  # 22 x 10 cells of 3 m


def bilinear(plane: np.ndarray, xy: np.ndarray, bounds) -> np.ndarray:
    """Independent reference: cell-centred bilinear interpolation of ``plane [H, W]`` with clamping."""
    h, w = plane.shape
    x_min, y_min, x_max, y_max = bounds
    dx, dy = (x_max - x_min) / w, (y_max - y_min) / h
    out = np.empty(len(xy))
    for n, (x, y) in enumerate(xy):
        fx = min(max((x - x_min) / dx - 0.5, 0.0), w - 1.0)
        fy = min(max((y - y_min) / dy - 0.5, 0.0), h - 1.0)
        j0, i0 = int(np.floor(fx)), int(np.floor(fy))
        j1, i1 = min(j0 + 1, w - 1), min(i0 + 1, h - 1)
        tx, ty = fx - j0, fy - i0
        out[n] = (1 - ty) * ((1 - tx) * plane[i0, j0] + tx * plane[i0, j1]) + ty * ((1 - tx) * plane[i1, j0] + tx * plane[i1, j1])
    return out


def nearest_cell(mask: np.ndarray, xy: np.ndarray, bounds) -> np.ndarray:
    h, w = mask.shape
    j = np.clip(np.floor((xy[:, 0] - bounds[0]) / (bounds[2] - bounds[0]) * w), 0, w - 1).astype(int)
    i = np.clip(np.floor((xy[:, 1] - bounds[1]) / (bounds[3] - bounds[1]) * h), 0, h - 1).astype(int)
    return mask[i, j]


def random_layers(rng, s=4, h=10, w=22):
    pg = rng.normal(-80, 10, (s, h, w))
    toa = rng.uniform(50, 900, (s, h, w))
    aoa = rng.uniform(-180, 180, (s, h, w))
    return pg, toa, aoa


def test_matches_numpy_reference_per_slot():
    rng = np.random.default_rng(0)
    pg, toa, aoa = random_layers(rng)
    maps = SiteMaps(pg, toa, aoa, BOUNDS, dtype=torch.float64)
    xy = np.stack([rng.uniform(-40, 46, 300), rng.uniform(5, 50, 300)], 1)  # some outside: border clamping
    ids = rng.integers(-1, 4, (300, 3))
    out = maps.lookup(torch.from_numpy(xy), torch.from_numpy(ids))
    assert out.values.shape == (300, 3, 3) and out.covered.shape == (300, 3)
    rad = np.deg2rad(aoa)
    for k in range(3):
        for s in range(4):
            sel = ids[:, k] == s
            if not sel.any():
                continue
            got = out.values[sel, k].numpy()
            np.testing.assert_allclose(got[:, 0], bilinear(pg[s], xy[sel], BOUNDS), atol=1e-9)
            np.testing.assert_allclose(got[:, 1], bilinear(toa[s], xy[sel], BOUNDS), atol=1e-9)
            ref = np.degrees(np.arctan2(bilinear(np.sin(rad[s]), xy[sel], BOUNDS), bilinear(np.cos(rad[s]), xy[sel], BOUNDS)))
            d = (got[:, 2] - ref + 180) % 360 - 180
            np.testing.assert_allclose(d, 0.0, atol=1e-7)
        empty = ids[:, k] < 0
        assert (out.values[empty, k] == 0).all() and not out.covered[empty, k].any()


def test_exact_at_cell_centres_and_aoa_seam():
    h, w = 2, 2
    pg = np.full((1, h, w), -70.0)
    toa = np.arange(4.0).reshape(1, h, w)
    aoa = np.array([[[179.0, -179.0], [179.0, -179.0]]])
    maps = SiteMaps(pg, toa, aoa, (0.0, 0.0, 2.0, 2.0))
    centres = torch.tensor([[0.5, 0.5], [1.5, 0.5], [1.5, 1.5]])
    out = maps.lookup(centres, torch.zeros(3, 1, dtype=torch.long))
    np.testing.assert_allclose(out.values[:, 0, 1].numpy(), [0.0, 1.0, 3.0], atol=1e-6)
    mid = maps.lookup(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 1, dtype=torch.long)).values[0, 0, 2]
    assert abs(abs(float(mid)) - 180.0) < 1e-3  # on the circle: 179 and -179 average to 180, not 0


def test_holes_coverage_and_no_nan_in_values_or_gradients():
    rng = np.random.default_rng(1)
    pg, toa, aoa = random_layers(rng, s=2)
    pg[0, :, :8] = np.nan  # site 0 has no path on the left
    toa[1, 3:6, 10:14] = -np.inf  # nor site 1 in a box
    valid = np.ones((10, 22), bool)
    valid[0, :] = False  # and nothing is covered in the first row
    maps = SiteMaps(pg, toa, aoa, BOUNDS, valid=valid, dtype=torch.float64)
    xy = torch.from_numpy(np.stack([rng.uniform(-35, 40, 500), rng.uniform(8, 46, 500)], 1)).requires_grad_(True)
    ids = torch.tensor([[0, 1]]).expand(500, 2)
    out = maps.lookup(xy, ids)
    (grad,) = torch.autograd.grad(out.values.sum(), xy)
    assert torch.isfinite(out.values).all() and torch.isfinite(grad).all()
    p = xy.detach().numpy()
    cover0 = np.isfinite(pg[0]) & valid
    cover1 = np.isfinite(toa[1]) & valid
    np.testing.assert_array_equal(out.covered[:, 0].numpy(), nearest_cell(cover0, p, BOUNDS))
    np.testing.assert_array_equal(out.covered[:, 1].numpy(), nearest_cell(cover1, p, BOUNDS))
    # where all four taps are covered, the value is the raw layer's interpolation
    inside = np.array([cover0[i0:i0 + 2, j0:j0 + 2].all() if i0 < 9 and j0 < 21 else False
                       for i0, j0 in zip(np.floor((p[:, 1] - 12) / 3 - 0.5).astype(int), np.floor((p[:, 0] + 30) / 3 - 0.5).astype(int))])
    inside &= (p[:, 0] > -28.5) & (p[:, 0] < 34.5) & (p[:, 1] > 13.5) & (p[:, 1] < 40.5)
    np.testing.assert_allclose(out.values[inside, 0, 0].detach().numpy(), bilinear(np.nan_to_num(pg[0]), p[inside], BOUNDS), atol=1e-9)


def test_candidates_match_single_points_and_gradcheck():
    rm = analytic_radio_map(height=12, width=16, bounds=(-32.0, -24.0, 32.0, 24.0), max_range_m=45.0)
    maps = SiteMaps.from_radio_map(rm, cell_features=("snr",), dtype=torch.float64)
    rng = np.random.default_rng(2)
    xy = torch.from_numpy(rng.uniform(-30, 30, (5, 7, 2)))
    ids = torch.tensor([[0, 1, 2], [2, -1, 0], [1, 0, -1], [0, 2, 1], [-1, -1, 1]])
    many = maps.lookup(xy, ids)
    assert many.values.shape == (5, 7, 3, 3) and many.cell.shape == (5, 7, 1) and many.cell_coverage.shape == (5, 7)
    for p in range(7):
        one = maps.lookup(xy[:, p], ids)
        torch.testing.assert_close(many.values[:, p], one.values)
        torch.testing.assert_close(many.covered[:, p], one.covered)
    pts = torch.from_numpy(rng.uniform(-20, 20, (6, 2))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: maps.lookup(q, ids[:1].expand(6, 3)).values[..., :2], (pts,))
    assert torch.autograd.gradcheck(lambda q: maps.lookup(q, ids[:1].expand(6, 3)).values[..., 2], (pts,), atol=1e-5)
    # the functional form prepares a RadioMap on the fly
    torch.testing.assert_close(site_lookup(rm, xy[:, 0].float(), ids).values, maps.lookup(xy[:, 0], ids).values.float())


def test_block_stats_match_numpy():
    rng = np.random.default_rng(3)
    pg, toa, aoa = random_layers(rng, s=2, h=10, w=22)
    maps = SiteMaps(pg, toa, aoa, BOUNDS, dtype=torch.float64)
    centres, mean, var = maps.block_stats(4)
    assert centres.shape == (3 * 6, 2) and mean.shape == (18, 4 * 2 + 2 + 1)
    blk = pg[1, 8:10, 20:22]  # the last (partial) block, row-major: index 17
    np.testing.assert_allclose(mean[17, 1].item(), blk.mean())
    np.testing.assert_allclose(var[17, 1].item(), blk.var(), atol=1e-9)
    np.testing.assert_allclose(centres[17].numpy(), [-30 + 21 * 3, 12 + 9 * 3])  # mean of the cell centres
    np.testing.assert_allclose(mean[:, -1].numpy(), 1.0)  # all valid


def test_errors():
    rng = np.random.default_rng(4)
    maps = SiteMaps(*random_layers(rng, s=2), BOUNDS)
    with pytest.raises(CoreError, match="site_ids"):
        maps.lookup(torch.zeros(3, 2), torch.tensor([[0, 2], [0, 1], [1, 1]]))
    with pytest.raises(CoreError, match="site_ids"):
        maps.lookup(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(CoreError, match="xy"):
        maps.lookup(torch.zeros(3), torch.zeros(3, 2, dtype=torch.long))
    rm = analytic_radio_map(height=8, width=8, bounds=(-8.0, -8.0, 8.0, 8.0))
    from core.stores.radio_map import RadioMap

    bare = RadioMap(rm.values, rm.features, rm.bounds, attrs=rm.attrs, layers={"site_path_gain": rm.layers["site_path_gain"]})
    with pytest.raises(CoreError, match="site_toa"):
        SiteMaps.from_radio_map(bare)
    geo = with_geometric_site_layers(bare)  # straight-line ToA/AoA: the analytic model exactly
    np.testing.assert_allclose(geo.layers["site_toa"], rm.layers["site_toa"], rtol=1e-6)
