"""k-path maps from real Sionna on the tiny scene: k = 1 unchanged, the next paths explain strongest-path switches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from core.features import wrap_degrees
from core.raytracing.tracing import PropagationSettings, trace_points
from core.stores.path_anchors import ANCHOR_LAYER, anchor_distance, stencil_paths
from core.stores.radio_map import SITE_LAYERS

pytestmark = pytest.mark.sionna


@pytest.fixture(scope="module")
def kpath_map(tiny_map, tiny_map_settings):
    from core.raytracing.generation import generate_map
    from core.raytracing.scenes import resolve_scene

    return generate_map(resolve_scene("simple_street_canyon"), replace(tiny_map_settings, paths_per_site=3))


def test_k1_arrays_are_computed_as_before(tiny_scene, tiny_map):
    """One PathSolver result summarised with 1 and with 3 paths: the strongest path's arrays are the same bytes."""
    from core.raytracing.tracing import _set_targets, _strongest_paths, import_sionna_rt

    rt = import_sionna_rt()
    settings = PropagationSettings.from_dict(tiny_map.attrs["propagation"])
    xs, ys = tiny_map.cell_centers()
    xyz = np.stack([np.repeat(xs[::8], 8)[:64], np.tile(ys[::8], 8)[:64], np.full(64, 1.5)], -1).astype(np.float32)
    _set_targets(tiny_scene, xyz)
    result = rt.PathSolver()(tiny_scene, **settings.solver_kwargs())
    one, three = _strongest_paths(result, xyz, rt, 1), _strongest_paths(result, xyz, rt, 3)
    assert set(one) < set(three) and {"alt_toa", "alt_aoa", "alt_power", "alt_image", "alt_offset"} <= set(three)
    for key, arr in one.items():
        np.testing.assert_array_equal(three[key], arr, err_msg=key)
    has = np.isfinite(three["alt_power"][..., 0])
    assert has.any()
    assert (three["alt_power"][..., 0][has] <= three["power"][has] + 1e-6).all()  # ranked by power
    assert (three["power"][has] <= three["path_gain"][has] + 1e-6).all()


def test_kpath_map_keeps_the_k1_arrays_and_adds_the_anchors(tiny_map, kpath_map):
    assert kpath_map.paths_per_site == 3 and tiny_map.paths_per_site == 1
    s = tiny_map.layers["site_toa"].shape[0]
    layer = kpath_map.layers[ANCHOR_LAYER]
    assert layer.dtype == np.int16 and layer.shape == (4 * s * 3,) + tiny_map.shape
    assert ANCHOR_LAYER not in tiny_map.layers and "paths_per_site" not in tiny_map.attrs["generator"]
    # the same arrays up to Dr.Jit's thread order (two k = 1 runs differ by as much)
    for name in SITE_LAYERS:
        np.testing.assert_allclose(kpath_map.layers[name], tiny_map.layers[name], atol=2e-3, equal_nan=True)
    np.testing.assert_array_equal(kpath_map.valid, tiny_map.valid)
    a = kpath_map.path_anchors()  # [S, 3, 4, H, W], q_z relative to the cell's receiver
    has = np.isfinite(a[:, :, 0])
    base = np.isfinite(kpath_map.layers["site_toa"])
    np.testing.assert_array_equal(has[:, 0], base)  # path 0 wherever the site has a path
    assert not (has[:, 1:] & ~base[:, None]).any() and has[:, 1].mean() > 0.2 * base.mean()
    # at every cell centre path 0's anchor gives the stored site_toa / site_aoa, to the quantum (module doc)
    quantum = kpath_map.attrs["path_anchors"]["quantum_m"]
    xs, ys = kpath_map.cell_centers()
    p = np.stack(np.meshgrid(xs, ys), -1)  # [H, W, 2]
    toa, aoa = anchor_distance(np.moveaxis(a[:, 0], 1, -1), p)  # [S, H, W]
    d_xy = np.hypot(a[:, 0, 0] - p[..., 0], a[:, 0, 1] - p[..., 1])
    assert np.abs(toa - kpath_map.layers["site_toa"])[base].max() <= (np.sqrt(3) + 1) * quantum / 2 / 0.299792458 + 1e-3
    bound = np.degrees(np.arcsin(np.minimum(1.0, quantum / np.sqrt(2) / d_xy))) + 1e-3
    assert (np.abs(wrap_degrees(aoa - kpath_map.layers["site_aoa"])) <= bound)[base].all()


def test_the_next_paths_explain_the_strongest_path_off_the_nodes(tiny_scene, kpath_map):
    """PathSolver afresh at points the map only reconstructed: the nearest path of the stencil cells (each evaluated
    at the point from its anchor, as the likelihood's mixture does) misses far less often than path 0."""
    rng = np.random.default_rng(1)
    h, w = kpath_map.shape
    f = kpath_map.attrs["generator"]["toa_decimation"]
    cand = np.argwhere(kpath_map.valid & (np.arange(h)[:, None] % f != 0) & (np.arange(w)[None] % f != 0))
    ii, jj = cand[rng.choice(len(cand), 300, replace=False)].T
    xs, ys = kpath_map.cell_centers()
    xy = np.stack([xs[jj], ys[ii]], -1) + rng.uniform(-0.5, 0.5, (300, 2)) * kpath_map.cell_size  # inside the cells
    xyz = np.concatenate([xy, kpath_map.ground[ii, jj, None] + 1.5], -1)
    traced = trace_points(tiny_scene, xyz, PropagationSettings.from_dict(kpath_map.attrs["propagation"]))
    p, s = np.nonzero(np.isfinite(traced["toa"]) & np.isfinite(kpath_map.layers["site_toa"][:, ii, jj].T))
    from core.raytracing.consistency import bilinear

    t0 = bilinear(kpath_map.layers["site_toa"], kpath_map.bounds, xy[p], s)
    a0 = bilinear(kpath_map.layers["site_aoa"], kpath_map.bounds, xy[p], s, angular=True)
    toa, aoa, weight = stencil_paths(kpath_map.path_anchors(), kpath_map.bounds, xy[p], s)  # [n, 3, 4]
    gross0 = (np.abs(traced["toa"][p, s] - t0) > 30) | (np.abs(wrap_degrees(traced["aoa"][p, s] - a0)) > 30)
    near = np.abs(traced["toa"][p, s, None, None] - toa) <= 30
    near &= np.abs(wrap_degrees(traced["aoa"][p, s, None, None] - aoa)) <= 30
    near &= weight[:, None, :] > 0
    gross_k = gross0 & ~near.any((1, 2))
    assert gross0.sum() >= 5  # the canyon's nodes are 8 m apart: the strongest path switches between them
    assert gross_k.sum() <= 0.3 * gross0.sum()
