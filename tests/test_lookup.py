"""Differentiable lookup: conventions, exactness, angles, holes, scenes, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.lookup import PreparedMaps, in_bounds, lookup
from core.physics.synthetic import analytic_radio_map
from core.stores.radio_map import RadioMap


def bilinear_reference(maps: np.ndarray, xy: np.ndarray, bounds) -> np.ndarray:
    """Independent reference: cell-centred bilinear interpolation with clamping, in numpy."""
    n_feat, height, width = maps.shape
    x_min, y_min, x_max, y_max = bounds
    dx, dy = (x_max - x_min) / width, (y_max - y_min) / height
    out = np.empty((len(xy), n_feat))
    for n, (x, y) in enumerate(xy):
        fx = min(max((x - x_min) / dx - 0.5, 0.0), width - 1.0)  # continuous column index
        fy = min(max((y - y_min) / dy - 0.5, 0.0), height - 1.0)
        j0, i0 = int(np.floor(fx)), int(np.floor(fy))
        j1, i1 = min(j0 + 1, width - 1), min(i0 + 1, height - 1)
        tx, ty = fx - j0, fy - i0
        out[n] = (
            (1 - ty) * ((1 - tx) * maps[:, i0, j0] + tx * maps[:, i0, j1])
            + ty * ((1 - tx) * maps[:, i1, j0] + tx * maps[:, i1, j1])
        )
    return out


def random_points(rng, bounds, n, margin=0.2):
    x_min, y_min, x_max, y_max = bounds
    w, h = x_max - x_min, y_max - y_min
    return np.stack(
        [rng.uniform(x_min - margin * w, x_max + margin * w, n), rng.uniform(y_min - margin * h, y_max + margin * h, n)],
        axis=1,
    )


@pytest.mark.parametrize("shape,bounds", [((3, 7, 11), (-3.2, 10.5, 19.0, 25.0)), ((2, 13, 5), (100.0, -40.0, 105.0, -1.0))])
def test_matches_independent_bilinear_reference(shape, bounds):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=shape) * 10
    xy = random_points(rng, bounds, 400)
    got = lookup(torch.from_numpy(maps), torch.from_numpy(xy), bounds).numpy()
    np.testing.assert_allclose(got, bilinear_reference(maps, xy, bounds), rtol=0, atol=1e-10)


def test_prepared_maps_match_reference_float32():
    rng = np.random.default_rng(1)
    bounds = (-30.0, 12.0, 36.0, 42.0)  # 22 x 10 cells of 3 m
    values = (rng.normal(size=(4, 10, 22)) * 20).astype(np.float32)
    rm = RadioMap(values, ["path_gain", "toa", "snr", "bler"], bounds)
    xy = random_points(rng, bounds, 300)
    got = PreparedMaps(rm).lookup(torch.from_numpy(xy).float()).numpy()
    np.testing.assert_allclose(got, bilinear_reference(values.astype(np.float64), xy, bounds), atol=2e-4)


def test_exact_at_cell_centres():
    rm = analytic_radio_map(height=12, width=20, bounds=(-40.0, 6.0, 40.0, 54.0))
    gx, gy = np.meshgrid(*rm.cell_centers())
    xy = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], axis=1))
    expected = rm.values.reshape(len(rm.features), -1).T.astype(np.float64)
    got64 = PreparedMaps(rm, dtype=torch.float64).lookup(xy).numpy()
    aoa = rm.index("aoa")
    lin = [f for f in range(len(rm.features)) if f != aoa]
    np.testing.assert_allclose(got64[:, lin], expected[:, lin], rtol=0, atol=1e-9)
    # AoA goes through cos/sin: exact up to the float32 storage of the map
    np.testing.assert_allclose(got64[:, aoa], expected[:, aoa], rtol=0, atol=1e-4)
    got32 = PreparedMaps(rm).lookup(xy.float()).numpy()
    np.testing.assert_allclose(got32[:, lin], expected[:, lin], rtol=1e-5, atol=1e-4)
    # the raw tensor path too
    raw = lookup(torch.from_numpy(rm.values).double(), xy, rm.bounds).numpy()
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-9)


def test_border_clamping():
    values = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    bounds = (0.0, 0.0, 4.0, 3.0)  # 1 m cells; centres at 0.5 .. 3.5 and 0.5 .. 2.5
    maps = torch.from_numpy(values)
    # beyond the outermost centres (between edge and centre, and far outside) -> border value
    xy = torch.tensor([[0.1, 0.2], [-50.0, -50.0], [3.9, 2.9], [99.0, 1.5], [2.0, -7.0]], dtype=torch.float64)
    got = lookup(maps, xy, bounds)
    torch.testing.assert_close(got[0], maps[:, 0, 0])
    torch.testing.assert_close(got[1], maps[:, 0, 0])
    torch.testing.assert_close(got[2], maps[:, 2, 3])
    torch.testing.assert_close(got[3], maps[:, 1, 3])  # y = 1.5 is row 1's centre; x clamps to column 3
    torch.testing.assert_close(got[4], 0.5 * (maps[:, 0, 1] + maps[:, 0, 2]))  # x = 2.0 halfway between columns 1 and 2


def test_gradcheck_float64_raw_and_prepared():
    rng = np.random.default_rng(2)
    bounds = (-5.0, -3.0, 6.0, 8.0)
    maps = torch.from_numpy(rng.normal(size=(3, 11, 11)))
    xy = torch.from_numpy(rng.uniform(-4.0, 5.0, size=(16, 2))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: lookup(maps, p, bounds), (xy,))

    rm = analytic_radio_map(height=16, width=24, bounds=(-48.0, -32.0, 48.0, 32.0))
    prepared = PreparedMaps(rm, dtype=torch.float64)
    xy = torch.from_numpy(rng.uniform([-40, -25], [40, 25], size=(12, 2))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: prepared.lookup(p), (xy,))


def test_output_differentiable_maps_never_require_grad():
    rm = analytic_radio_map(height=8, width=12, bounds=(0.0, 0.0, 24.0, 16.0))
    prepared = PreparedMaps(rm)
    assert not prepared.table.requires_grad
    xy = torch.tensor([[3.0, 4.0], [20.0, 9.0]], requires_grad=True)
    out = prepared.lookup(xy)
    assert out.requires_grad and out.shape == (2, len(rm.features))
    out.sum().backward()
    assert torch.isfinite(xy.grad).all() and (xy.grad != 0).any()
    assert prepared.table.grad is None
    # raw maps that require grad are detached, not differentiated
    maps = torch.randn(2, 4, 5, requires_grad=True)
    lookup(maps, xy, (0.0, 0.0, 24.0, 16.0)).sum().backward()
    assert maps.grad is None


def test_multi_scene_equals_per_scene():
    rng = np.random.default_rng(3)
    feats = ["path_gain", "toa", "aoa", "snr"]
    scenes = []
    for s, bounds in enumerate([(0.0, 0.0, 26.0, 18.0), (-100.0, 50.0, -48.0, 86.0), (5.0, 5.0, 18.0, 14.0)]):
        v = rng.normal(size=(4, 9, 13)) * 10 ** (s + 1)
        v[2] = rng.uniform(-180, 180, size=(9, 13))
        scenes.append(RadioMap(v.astype(np.float32), feats, bounds))
    multi = PreparedMaps(scenes, dtype=torch.float64)
    n = 600
    scene_index = torch.from_numpy(rng.integers(0, 3, n))
    xy = torch.empty(n, 2, dtype=torch.float64)
    for s, rm in enumerate(scenes):
        sel = scene_index == s
        xy[sel] = torch.from_numpy(random_points(rng, rm.bounds, int(sel.sum())))
    got = multi.lookup(xy, scene_index)
    for s, rm in enumerate(scenes):
        sel = scene_index == s
        ref = PreparedMaps(rm, dtype=torch.float64).lookup(xy[sel])
        torch.testing.assert_close(got[sel], ref, rtol=0, atol=1e-9 * 10 ** (s + 1))

    # raw [S, F, H, W] with per-scene bounds; other scenes hold huge values to expose any leak
    raw = torch.from_numpy(rng.normal(size=(4, 2, 6, 7)))
    bounds = torch.tensor([[0.0, 0.0, 7.0, 6.0], [1.0, 1.0, 15.0, 13.0], [0.0, 0.0, 7.0, 6.0], [-7.0, -6.0, 0.0, 0.0]])
    for s in range(4):
        poisoned = raw.clone()
        poisoned[torch.arange(4) != s] = 1e9
        pts = torch.from_numpy(random_points(rng, bounds[s].tolist(), 50))
        got = lookup(poisoned, pts, bounds, torch.full((50,), s))
        torch.testing.assert_close(got, lookup(raw[s], pts, bounds[s].tolist()), rtol=0, atol=1e-9)


def test_multi_scene_float32_has_no_leak():
    rng = np.random.default_rng(4)
    feats = ["path_gain", "snr"]
    base = rng.normal(size=(2, 6, 8)).astype(np.float32)
    scenes = [RadioMap(base if s == 1 else np.full_like(base, 1e6), feats, (0.0, 0.0, 8.0, 6.0)) for s in range(3)]
    xy = torch.from_numpy(random_points(rng, (0.0, 0.0, 8.0, 6.0), 500)).float()
    got = PreparedMaps(scenes).lookup(xy, torch.ones(500, dtype=torch.long))
    torch.testing.assert_close(got, PreparedMaps(scenes[1]).lookup(xy), rtol=0, atol=1e-4)


def test_aoa_seam_interpolates_on_the_circle():
    aoa = np.array([[179.0, -179.0], [179.0, -179.0]], dtype=np.float32)
    rm = RadioMap(np.stack([aoa, np.zeros_like(aoa)]), ["aoa", "path_gain"], (0.0, 0.0, 2.0, 2.0))
    prepared = PreparedMaps(rm, dtype=torch.float64)
    xy = torch.tensor([[1.0, 1.0], [0.75, 1.0], [1.25, 0.5]], dtype=torch.float64, requires_grad=True)
    out = prepared.lookup(xy)
    assert abs(abs(out[0, 0].item()) - 180.0) < 1e-9  # the midpoint is 180, not 0
    assert out[0, 0].item() == 180.0  # and in (-180, 180]
    assert abs(out[1, 0].item() - 179.5) < 1e-3
    assert abs(out[2, 0].item() + 179.5) < 1e-3
    out[:, 0].sum().backward()
    assert torch.isfinite(xy.grad).all()


def test_opposite_angles_give_no_nan():
    aoa = np.array([[90.0, -90.0]], dtype=np.float32)
    rm = RadioMap(aoa[None], ["aoa"], (0.0, 0.0, 2.0, 1.0))
    xy = torch.tensor([[1.0, 0.5]], requires_grad=True)
    out = PreparedMaps(rm).lookup(xy)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xy.grad).all()


def test_holes_leak_no_nan_and_report_coverage():
    rm_full = analytic_radio_map(height=10, width=10, bounds=(0.0, 0.0, 50.0, 50.0))
    values = rm_full.values.copy()
    valid = np.ones((10, 10), dtype=bool)
    valid[3:6, 4:7] = False
    values[:, ~valid] = np.nan
    values[0, 4, 5] = -np.inf
    rm = RadioMap(values, rm_full.features, rm_full.bounds, valid=valid)
    prepared = PreparedMaps(rm)
    assert prepared.has_holes and torch.isfinite(prepared.table).all()
    xy = torch.tensor([[27.5, 22.5], [24.0, 21.0], [5.0, 5.0], [36.0, 31.0]], requires_grad=True)
    out = prepared.lookup(xy)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(xy.grad).all()
    assert prepared.coverage(xy).tolist() == [0.0, 0.0, 1.0, 1.0]
    # a covered point far from the hole reads the true map
    torch.testing.assert_close(out[2], PreparedMaps(rm_full).lookup(xy[2:3].detach())[0])


def test_batch_of_one_and_empty_batch():
    prepared = PreparedMaps(analytic_radio_map(height=8, width=8, bounds=(0.0, 0.0, 16.0, 16.0)))
    one = prepared.lookup(torch.tensor([[3.0, 3.0]]))
    assert one.shape == (1, 7) and torch.isfinite(one).all()
    assert prepared.lookup(torch.zeros(0, 2)).shape == (0, 7)


def test_in_bounds_mask():
    xy = torch.tensor([[0.0, 0.0], [10.0, 5.0], [10.01, 5.0], [-0.01, 2.0], [5.0, 2.5]])
    assert in_bounds(xy, (0.0, 0.0, 10.0, 5.0)).tolist() == [True, True, False, False, True]
    prepared = PreparedMaps(
        [
            RadioMap(np.zeros((1, 5, 10), np.float32), ["snr"], (0.0, 0.0, 10.0, 5.0)),
            RadioMap(np.zeros((1, 5, 10), np.float32), ["snr"], (10.0, 0.0, 20.0, 5.0)),
        ]
    )
    assert in_bounds(xy, prepared, torch.tensor([0, 1, 1, 0, 1])).tolist() == [True, True, True, False, False]


def test_bad_inputs_are_clear_errors():
    maps = torch.zeros(2, 4, 4)
    with pytest.raises(CoreError, match="xy"):
        lookup(maps, torch.zeros(3, 3), (0, 0, 4, 4))
    with pytest.raises(CoreError, match="scene_index"):
        lookup(torch.zeros(2, 1, 4, 4), torch.zeros(3, 2), (0, 0, 4, 4))
    with pytest.raises(CoreError, match="out of range"):
        lookup(torch.zeros(2, 1, 4, 4), torch.zeros(3, 2), (0, 0, 4, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(CoreError, match="bounds"):
        lookup(maps, torch.zeros(3, 2), (4, 0, 0, 4))
    a = RadioMap(np.zeros((1, 4, 4), np.float32), ["snr"], (0, 0, 4, 4))
    b = RadioMap(np.zeros((1, 4, 4), np.float32), ["sinr"], (0, 0, 4, 4))
    with pytest.raises(CoreError, match="features"):
        PreparedMaps([a, b])


def test_coverage_per_scene():
    valid = np.ones((4, 6), dtype=bool)
    valid[1, 2] = False
    values = np.zeros((1, 4, 6), np.float32)
    values[0, 1, 2] = np.nan
    holed = RadioMap(values, ["snr"], (10.0, 10.0, 16.0, 14.0), valid=valid)
    full = RadioMap(np.zeros((1, 4, 6), np.float32), ["snr"], (0.0, 0.0, 6.0, 4.0))
    prepared = PreparedMaps([full, holed])
    xy = torch.tensor([[12.5, 11.5], [2.5, 1.5], [12.5, 12.5], [100.0, 100.0]])
    cover = prepared.coverage(xy, torch.tensor([1, 0, 1, 1]))
    assert cover.tolist() == [0.0, 1.0, 1.0, 1.0]  # the far point clamps to the covered corner cell
    assert torch.isfinite(prepared.lookup(xy, torch.tensor([1, 0, 1, 1]))).all()
