"""Terrain: UE heights follow a hilly city's ground, with real Sionna RT scene queries (no mocks).

san_francisco has 4,735 objects. While such a scene is alive every PathSolver call in the
process is slowed about 100-fold (Mitsuba's shape calls dispatch over every live shape:
0.8 s became 79 s for 64 points in the canyon), so it lives in this module only and is
released when the module ends (``conftest.py`` checks that no city scene outlives a module).
"""

from __future__ import annotations

import numpy as np
import pytest

from core.raytracing.scenes import resolve_scene
from core.raytracing.tracing import RadioConfig

pytestmark = pytest.mark.sionna


@pytest.fixture(scope="module")
def hilly_scene():
    """san_francisco: its ground rises from a few metres to over 80 m."""
    from core.raytracing.scenes import load_scene

    return load_scene(resolve_scene("san_francisco"))


def test_ground_height_follows_the_hill_under_roofs_too(hilly_scene):
    from core.raytracing.terrain import ground_height, measurement_points
    from core.raytracing.tracing import indoor_mask

    rng = np.random.default_rng(0)
    xy = np.stack([rng.uniform(-150, -70, 400), rng.uniform(-410, -330, 400)], 1)  # a slope (about 25 m of rise)
    ground = ground_height(hilly_scene, xy)
    assert ground.max() - ground.min() > 15.0
    xyz = measurement_points(hilly_scene, xy, RadioConfig().rx_height_m)
    np.testing.assert_allclose(xyz[:, 2], ground + 1.5)
    # on the terrain most points are outdoor; on the flat plane at 1.5 m every point is under the hill
    flat = np.concatenate([xy, np.full((len(xy), 1), 1.5)], 1)
    assert indoor_mask(hilly_scene, flat).mean() > 0.99
    assert indoor_mask(hilly_scene, xyz).mean() < 0.5
    # the height found is a real surface: an upward ray from 5 cm under it hits it
    below = np.concatenate([xy, (ground - 0.05)[:, None]], 1)
    assert indoor_mask(hilly_scene, below).all()


def test_ue_walks_follow_the_terrain(hilly_scene):
    from core.raytracing.measurements import WalkConfig, _draw_walks
    from core.raytracing.terrain import ground_height

    rng = np.random.default_rng(1)
    bounds = (-150.0, -410.0, -70.0, -330.0)
    walks, _ = _draw_walks(rng, hilly_scene, 40, 6, bounds, None, WalkConfig(), 1.5)
    xyz = walks.reshape(-1, 3)
    np.testing.assert_allclose(xyz[:, 2], ground_height(hilly_scene, xyz[:, :2]) + 1.5, atol=1e-4)
    assert np.ptp(xyz[:, 2]) > 5.0  # they are spread over the slope, not on one plane
