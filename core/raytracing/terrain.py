"""Terrain: the ground height under a point, and the UE measurement points that follow it.

Maps and UE walks sit at ``z = ground(x, y) + rx_height`` (``RadioConfig.rx_height_m``,
1.5 m), so a scene with a hill is measured 1.5 m above its slope rather than on a flat
plane that may lie under the ground.

``ground(x, y)`` is found by a downward ray cast against the scene from above its
bounding box: the ray is continued through every surface it hits, and the ground is
the LOWEST surface found, so roofs, building floors, overhangs and cars above the
terrain are passed through (a cell under a roof gets the ground under the building;
whether a point is under a roof is :func:`~core.raytracing.tracing.indoor_mask`'s
upward ray, cast from the measurement point). Where a vertical line hits nothing at
all (outside the scene's ground), the ground is ``z = 0``.
"""

from __future__ import annotations

import numpy as np

MAX_SURFACES = 16  # surfaces a vertical line may cross before the ground (roofs, floors, ...)
STEP_M = 1e-3  # how far past a hit the continued ray starts [m]


def ground_height(scene, xy: np.ndarray, default: float = 0.0) -> np.ndarray:
    """float64 ``[N]``: the lowest surface's height [m] under each point ``xy [N, 2]``; ``default`` where none.

    ``scene``: a loaded Sionna scene. One vectorised ray cast per surface crossed
    (at most :data:`MAX_SURFACES`).
    """
    import drjit as dr
    import mitsuba as mi

    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    top = float(scene.mi_scene.bbox().max[2]) + 1.0
    lowest = np.full(n, np.nan)
    z = np.full(n, top)
    active = np.ones(n, bool)
    for _ in range(MAX_SURFACES):
        idx = np.flatnonzero(active)
        if len(idx) == 0:
            break
        o = mi.Point3f(mi.Float(xy[idx, 0].astype(np.float32)), mi.Float(xy[idx, 1].astype(np.float32)),
                       mi.Float(z[idx].astype(np.float32)))
        ray = mi.Ray3f(o, dr.zeros(mi.Vector3f, len(idx)) + mi.Vector3f(0.0, 0.0, -1.0))
        si = scene.mi_scene.ray_intersect(ray)
        hit = np.asarray(si.is_valid(), dtype=bool)
        t = np.asarray(si.t, dtype=np.float64)
        z_hit = z[idx] - np.where(hit, t, 0.0)
        lowest[idx[hit]] = z_hit[hit]
        z[idx] = z_hit - STEP_M
        active[idx[~hit]] = False
    return np.where(np.isfinite(lowest), lowest, default)


def measurement_points(scene, xy: np.ndarray, rx_height_m: float) -> np.ndarray:
    """float64 ``[N, 3]``: points ``xy [N, 2]`` raised to ``ground(x, y) + rx_height_m``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return np.concatenate([xy, (ground_height(scene, xy) + rx_height_m)[:, None]], axis=1)
