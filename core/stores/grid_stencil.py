"""The cell-centred bilinear stencil of a map grid (numpy): which four cells a point reads, and their weights.

Cell ``(i, j)`` of an ``H x W`` grid over ``bounds = (x_min, y_min, x_max, y_max)`` is centred at
``(x_min + (j + .5) c, y_min + (i + .5) c)`` with ``c = (x_max - x_min) / W``. The fractional index
``u = (x - x_min) / c - 0.5`` is clamped to ``[0, W - 1]`` (``v`` likewise), so points beyond the outer
centres take the border cells; the stencil is cells ``(i0 + di, j0 + dj)``, ``di, dj`` in {0, 1}, with
weights ``(1 - fv)(1 - fu)``, ``(1 - fv) fu``, ``fv (1 - fu)``, ``fv fu`` (sum 1).
"""

from __future__ import annotations

import numpy as np

__all__ = ["bilinear_stencil"]


def bilinear_stencil(bounds, shape: tuple[int, int], xy) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The four ``(i [N], j [N], weight [N])`` of the stencil around ``xy [N, 2]`` [m], in the order
    (i0, j0), (i0, j0 + 1), (i0 + 1, j0), (i0 + 1, j0 + 1) (see the module doc)."""
    xy = np.asarray(xy, dtype=np.float64)
    h, w = shape
    x_min, y_min, x_max, _ = bounds
    c = (x_max - x_min) / w
    u = np.clip((xy[:, 0] - x_min) / c - 0.5, 0.0, w - 1)
    v = np.clip((xy[:, 1] - y_min) / c - 0.5, 0.0, h - 1)
    j0 = np.minimum(np.floor(u).astype(np.int64), max(w - 2, 0))
    i0 = np.minimum(np.floor(v).astype(np.int64), max(h - 2, 0))
    fu, fv = u - j0, v - i0
    return [(np.minimum(i0 + di, h - 1), np.minimum(j0 + dj, w - 1), wt)
            for di, dj, wt in ((0, 0, (1 - fv) * (1 - fu)), (0, 1, (1 - fv) * fu), (1, 0, fv * (1 - fu)), (1, 1, fv * fu))]
