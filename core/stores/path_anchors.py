"""k-path maps' path anchors: their compact storage and their evaluation at a point.

A k-path map (``generate-maps --paths-per-site k``, :mod:`core.raytracing.generation`) keeps, per
site ``s``, cell ``(i, j)`` and path rank ``r = 0 .. k-1`` (0 = the strongest, the path of
``site_toa`` / ``site_aoa``), the path's ANCHOR: the point ``q`` it comes from as a straight line
once unfolded (the virtual source of a specular path, the site itself for the direct one, the
diffraction point of a diffracted one) and the path length before it ``L0`` (0 for specular
paths). At any point ``p`` near the cell the same path has::

    toa = (L0 + |q - p|) / c   [ns]        aoa = atan2(q_y - p_y, q_x - p_x)   [deg]

exact for specular paths, to second order for diffracted ones (Keller's law: the path length is
stationary along the edge), and never a mix of two paths: the lookup evaluates each stencil
cell's anchors at ``p`` (:func:`stencil_paths`, and the torch version in
:class:`~core.physics.site_lookup.SiteMaps`) instead of interpolating values.

Storage: ONE layer ``site_anchor`` int16 ``[4 S k, H, W]``, plane ``4 (s k + r) + c`` holding
coordinate ``c`` of ``(q_x, q_y, q_z, L0)``, as ``round((v - origin_c) / quantum)``;
:data:`ABSENT` where the site has no path of that rank at the cell. ``attrs["path_anchors"] =
{"quantum_m": Q, "origin_m": [x0, y0, 0, 0], "layout": ...}``: ``Q = 1/64 m``, doubled until every
anchor fits int16 (``+-32767 Q``: 512 m about the map centre at 1/64 m, 2 km at 1/16 m). Anchors are piecewise constant
over the cells where one path holds a rank, so zstd stores them in a fraction of the bytes of
the interpolated delay and azimuth they replace.

Quantisation error: every coordinate within ``Q / 2``, so ``|q - p|`` within ``sqrt(3) Q / 2`` and
``L0`` within ``Q / 2``: ToA within ``(sqrt(3) + 1) Q / 2 / c`` (0.28 ns at ``Q = 1/16 m``, 0.07 ns at
1/64 m); AoA within ``asin(Q / sqrt(2) / d_xy)`` at horizontal distance ``d_xy`` from the anchor
(``Q = 1/16 m``: 0.25 deg at 10 m, 0.05 deg at 50 m) -- far below the 3 ns / 3 deg measurement
noise except within a metre or two of an anchor (under a site, where the azimuth of a steep path
is ill-defined anyway). The map's ``attrs["path_anchors"]["quantum_m"]`` says which ``Q``.
"""

from __future__ import annotations

import numpy as np

from core.features import wrap_degrees
from core.stores.grid_stencil import bilinear_stencil

#: the layer name and the int16 code of an absent path
ANCHOR_LAYER = "site_anchor"
ABSENT = np.iinfo(np.int16).min
BASE_QUANTUM_M = 1.0 / 64.0
_LIMIT = np.iinfo(np.int16).max
SPEED_OF_LIGHT = 299_792_458.0
LAYOUT = "plane 4 (s k + r) + c: (q_x, q_y, q_z, L0) of site s's path of rank r; int16 (v - origin) / quantum"


def encode_anchors(anchors: np.ndarray, origin_xy: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """``(layer int16 [4 S k, H, W], meta)`` of float anchors ``[S, k, 4, H, W]`` [m] (NaN: absent).

    ``meta`` (``attrs["path_anchors"]``): ``quantum_m`` (the smallest ``2^n / 64`` m that fits
    every anchor), ``origin_m`` ``[x0, y0, 0, 0]``, ``layout``."""
    a = np.asarray(anchors, dtype=np.float64)
    s, k, four, h, w = a.shape
    if four != 4:
        raise ValueError(f"encode_anchors: anchors must be [S, k, 4, H, W], got {a.shape}")
    origin = np.array([origin_xy[0], origin_xy[1], 0.0, 0.0])
    rel = a - origin[None, None, :, None, None]
    present = np.isfinite(rel).all(2, keepdims=True)
    span = float(np.abs(np.where(present, rel, 0.0)).max(initial=0.0))
    quantum = BASE_QUANTUM_M
    while span / quantum > _LIMIT - 1:
        quantum *= 2.0
    code = np.where(present, np.rint(np.where(present, rel, 0.0) / quantum), ABSENT).astype(np.int16)
    meta = {"quantum_m": quantum, "origin_m": [float(v) for v in origin], "layout": LAYOUT}
    return code.reshape(4 * s * k, h, w), meta


def decode_anchors(layer: np.ndarray, meta: dict, num_sites: int) -> np.ndarray:
    """float64 ``[S, k, 4, H, W]`` [m] from :func:`encode_anchors`' layer and meta; NaN where absent."""
    layer = np.asarray(layer)
    h, w = layer.shape[-2:]
    k = layer.shape[0] // (4 * num_sites)
    code = layer.reshape(num_sites, k, 4, h, w)
    origin = np.asarray(meta["origin_m"], dtype=np.float64)
    out = code.astype(np.float64) * float(meta["quantum_m"]) + origin[None, None, :, None, None]
    return np.where((code != ABSENT).all(2, keepdims=True), out, np.nan)


def anchor_distance(q: np.ndarray, p: np.ndarray, dz: np.ndarray | float = 0.0):
    """``(toa [ns], aoa [deg])`` of anchors ``q [..., 4]`` ``(q_x, q_y, dz, L0)`` at points ``p [..., 2]`` (broadcast):
    ``dz`` is already the anchor's height above the receiver (see :func:`stencil_paths`)."""
    dx, dy = q[..., 0] - p[..., 0], q[..., 1] - p[..., 1]
    d = np.sqrt(dx * dx + dy * dy + q[..., 2] ** 2)
    return (q[..., 3] + d) / SPEED_OF_LIGHT * 1e9, wrap_degrees(np.degrees(np.arctan2(dy, dx)))


def stencil_paths(rel: np.ndarray, bounds, xy: np.ndarray, sites: np.ndarray):
    """Every path of the four cells of the bilinear stencil around ``xy [N, 2]``, for site ``sites [N]``.

    ``rel [S, k, 4, H, W]``: :meth:`RadioMap.path_anchors` (``q_z`` relative to the cell's receiver height). Returns ``toa [N, k, 4]`` [ns], ``aoa [N, k, 4]``
    [deg] (NaN where the cell has no such path) and the cells' bilinear weights ``weight [N, 4]``
    (:func:`core.stores.grid_stencil.bilinear_stencil`: cell-centred, clamped to the outermost centres;
    cells in order (i0, j0), (i0, j0+1), (i0+1, j0), (i0+1, j0+1))."""
    xy = np.asarray(xy, dtype=np.float64)
    toa, aoa, weight = [], [], []
    for ii, jj, wt in bilinear_stencil(bounds, rel.shape[-2:], xy):
        q = rel[sites, :, :, ii, jj]  # [N, k, 4] (advanced indices apart: their dimension first)
        t, a = anchor_distance(q, xy[:, None, :])
        toa.append(t)
        aoa.append(a)
        weight.append(wt)
    return np.stack(toa, -1), np.stack(aoa, -1), np.stack(weight, -1)
