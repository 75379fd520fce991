"""The consistency command's numerics: the cell-centred bilinear lookup and residual statistics."""

from __future__ import annotations

import numpy as np
import pytest

from core.raytracing.consistency import bilinear, residual_stats

BOUNDS = (10.0, -4.0, 14.0, 2.0)  # 4 x 6 m: W = 4, H = 6 cells of 1 m


def _plane():
    i, j = np.mgrid[0:6, 0:4]
    return (3.0 * j - 2.0 * i + 1.0).astype(np.float32)  # linear in the cell indices


def _centre(i, j):
    return 10.0 + j + 0.5, -4.0 + i + 0.5


def test_exact_at_centres_and_linear_between():
    plane = _plane()
    pts = np.array([_centre(i, j) for i in range(6) for j in range(4)])
    np.testing.assert_allclose(bilinear(plane, BOUNDS, pts), plane.reshape(-1), atol=1e-9)
    x, y = _centre(2, 1)
    mid = bilinear(plane, BOUNDS, np.array([[x + 0.25, y + 0.5]]))
    assert mid[0] == pytest.approx(3.0 * 1.25 - 2.0 * 2.5 + 1.0)
    # beyond the outermost centres the border value holds (clamped, not extrapolated)
    edge = bilinear(plane, BOUNDS, np.array([[10.1, -3.9], [13.99, 1.99]]))
    np.testing.assert_allclose(edge, [plane[0, 0], plane[5, 3]])


def test_nan_neighbours_are_left_out_and_all_nan_is_nan():
    plane = _plane()
    plane[2, 2] = np.nan
    x, y = _centre(2, 1)
    got = bilinear(plane, BOUNDS, np.array([[x + 0.5, y + 0.5]]))[0]  # corners (2,1) (2,2) (3,1) (3,2)
    assert got == pytest.approx((plane[2, 1] + plane[3, 1] + plane[3, 2]) / 3)
    plane[2:4, 1:3] = np.nan
    assert np.isnan(bilinear(plane, BOUNDS, np.array([[x + 0.5, y + 0.5]]))[0])


def test_angles_on_the_circle_and_one_plane_per_point():
    planes = np.zeros((2, 6, 4), np.float32)
    planes[0] = 170.0
    planes[0, :, 2:] = -170.0  # across the +-180 seam: the mean is 180, not 0
    planes[1] = 20.0
    x, y = _centre(1, 1)
    pts = np.array([[x + 0.5, y], [x + 0.5, y]])
    got = bilinear(planes, BOUNDS, pts, index=np.array([0, 1]), angular=True)
    assert abs(((got[0] - 180.0) + 180.0) % 360.0 - 180.0) < 1e-6 and got[0] > -180.0
    assert got[1] == pytest.approx(20.0)


def test_residual_statistics():
    r = np.array([-1.0, 0.0, 1.0, 2.0, 40.0, np.nan])
    st = residual_stats(r, gross=30.0)
    assert st["n"] == 5 and st["map_nan"] == 1
    assert st["median"] == 1.0
    assert st["robust_std"] == pytest.approx(1.4826 * 1.0)  # median |r - 1| = 1
    assert st["std"] == pytest.approx(np.std([-1.0, 0.0, 1.0, 2.0, 40.0]))
    assert st["p90_abs"] == pytest.approx(np.quantile([1.0, 0.0, 1.0, 2.0, 40.0], 0.9))
    assert st["gross"] == pytest.approx(0.2)
    empty = residual_stats(np.array([np.nan]), gross=1.0)
    assert empty["n"] == 0 and np.isnan(empty["median"])
