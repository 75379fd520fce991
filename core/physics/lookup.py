"""Differentiable lookup of radio maps at continuous positions.

A map value is a cell average and cell ``(i, j)`` is centred at
``(x_min + (j + 0.5) * cell, y_min + (i + 0.5) * cell)`` (see :mod:`core.stores.radio_map`).
The lookup interpolates bilinearly between cell centres, so it returns the stored value
exactly at a centre; positions beyond the outermost centres take the border value.

With ``bounds = (x_min, y_min, x_max, y_max)`` the OUTER edges, the normalised
coordinate that ``torch.nn.functional.grid_sample(align_corners=False)`` expects is::

    u = 2 (x - x_min) / (x_max - x_min) - 1,    v = 2 (y - y_min) / (y_max - y_min) - 1

(``u = -1`` is the left edge of column 0, not its centre: that is what
``align_corners=False`` means, and why it is exact at centres). ``padding_mode="border"``
clamps to the outermost centres. Every batch is ONE ``grid_sample`` call on the shared
map; the map is never copied per sample and never requires grad; the output is
differentiable w.r.t. ``xy``.

Several scenes on grids of the same shape are looked up in one call too: the table is
``[1, C, D, H, W]`` (scenes along depth) and each point's depth coordinate is the exact
centre of its scene's slice, so trilinear sampling gives the other scenes zero weight
(exactly zero when ``D`` is a power of two: :class:`PreparedMaps` pads to one). Scenes
may have different bounds (each point is normalised with its own scene's bounds).

Two functions and one object:

* :func:`lookup` -- the plain differentiable bilinear lookup of raw tensors (or of a
  :class:`PreparedMaps`, which adds angle- and hole-awareness).
* :func:`in_bounds` -- which points lie inside the outer bounds.
* :class:`PreparedMaps` -- maps made ready for lookup ONCE (holes filled, angles as
  cos/sin, channels-last, coverage masks, statistics, on the device) and reused by the
  physics loss and the refinement.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import CoreError
from core.features import feature_spec

__all__ = ["lookup", "in_bounds", "normalize_xy", "PreparedMaps", "prepare_maps", "angle_from_cos_sin", "fill_holes"]


# -- plain tensor lookup ------------------------------------------------------------------
def _bounds_tensor(bounds, num_scenes: int, device, dtype) -> torch.Tensor:
    """``[S, 4]`` bounds tensor from a 4-tuple, a ``[4]`` or an ``[S, 4]`` array."""
    b = torch.as_tensor(bounds, dtype=torch.float64)
    if b.ndim == 1:
        b = b.unsqueeze(0).expand(num_scenes, 4)
    if b.shape != (num_scenes, 4):
        raise CoreError(f"lookup: bounds must be (x_min, y_min, x_max, y_max) or [{num_scenes}, 4], got {tuple(b.shape)}")
    if not bool(((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()):
        raise CoreError(f"lookup: bounds {b.tolist()} must have x_max > x_min and y_max > y_min")
    return b.to(device=device, dtype=dtype)


def _affine_from_bounds(bounds64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale [S, 2]`` and ``offset [S, 2]`` with ``grid = offset + xy * scale`` (float64 math)."""
    lo, hi = bounds64[:, :2], bounds64[:, 2:]
    scale = 2.0 / (hi - lo)
    offset = -1.0 - lo * scale
    return scale, offset


def normalize_xy(xy: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scene_index=None) -> torch.Tensor:
    """``[N, 2]`` grid coordinates in ``[-1, 1]`` (``align_corners=False`` convention).

    ``scale`` and ``offset`` are ``[S, 2]`` (see :func:`_affine_from_bounds`); with one
    scene, or ``scene_index=None``, scene 0 applies to every point.
    """
    if scale.shape[0] == 1 or scene_index is None:
        return torch.addcmul(offset[0], xy, scale[0])
    return torch.addcmul(offset[scene_index], xy, scale[scene_index])


def _depth_coordinate(scene_index: torch.Tensor, depth: int, dtype) -> torch.Tensor:
    """``[N]`` normalised depth at the centre of each point's scene slice, ``(2s + 1) / D - 1``.

    With ``align_corners=False`` grid_sample maps it back to ``((z + 1) D - 1) / 2 = s``;
    every step is exact when ``D`` is a power of two, so the other slices get weight 0.
    Otherwise float rounding may leave a weight of order 1e-7 on a neighbouring slice.
    """
    return ((2.0 * scene_index.to(torch.float64) + 1.0) / depth - 1.0).to(dtype)


def _sample(table: torch.Tensor, grid_xy: torch.Tensor, scene_index: torch.Tensor | None) -> torch.Tensor:
    """One ``grid_sample`` call. ``table`` is ``[1, C, H, W]`` or ``[1, C, S, H, W]``.

    Returns ``[C, N]`` (a view of grid_sample's output; channel-major).
    """
    n = grid_xy.shape[0]
    if table.ndim == 4:
        out = F.grid_sample(table, grid_xy.view(1, 1, n, 2), mode="bilinear", padding_mode="border", align_corners=False)
        return out.view(table.shape[1], n)
    depth = table.shape[2]
    if scene_index is None:
        if depth != 1:
            raise CoreError(f"lookup: {depth} scenes need a scene_index [N]")
        scene_index = torch.zeros(n, dtype=torch.long, device=grid_xy.device)
    z = _depth_coordinate(scene_index, depth, grid_xy.dtype)
    grid = torch.cat([grid_xy, z.unsqueeze(1)], dim=1)
    out = F.grid_sample(table, grid.view(1, 1, 1, n, 3), mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(table.shape[1], n)


def _check_scene_index(scene_index, n: int, num_scenes: int, device) -> torch.Tensor | None:
    if scene_index is None:
        if num_scenes > 1:
            raise CoreError(f"lookup: {num_scenes} scenes need scene_index, a [N] long tensor")
        return None
    scene_index = torch.as_tensor(scene_index, device=device)
    if scene_index.shape != (n,) or scene_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise CoreError(f"lookup: scene_index must be an integer tensor [{n}], got {scene_index.dtype} {tuple(scene_index.shape)}")
    scene_index = scene_index.long()
    if n and (int(scene_index.min()) < 0 or int(scene_index.max()) >= num_scenes):
        raise CoreError(f"lookup: scene_index out of range [0, {num_scenes})")
    return scene_index


def _check_xy(xy: torch.Tensor) -> None:
    if not isinstance(xy, torch.Tensor) or xy.ndim != 2 or xy.shape[1] != 2:
        shape = tuple(xy.shape) if isinstance(xy, torch.Tensor) else type(xy).__name__
        raise CoreError(f"lookup: xy must be a tensor [N, 2] in metres, got {shape}")


def lookup(maps, xy: torch.Tensor, bounds=None, scene_index: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear lookup of maps at positions ``xy``.

    Args:
        maps: float ``[F, H, W]``, or ``[S, F, H, W]`` for ``S`` scenes on grids of the
            same shape; or a :class:`PreparedMaps` (then ``bounds`` is taken from it and
            angles/holes are handled, see :meth:`PreparedMaps.lookup`); or a RadioMap
            or list of them (prepared on every call: prepare once for repeated use).
        xy: ``[N, 2]`` positions ``(x, y)`` in scene metres.
        bounds: ``(x_min, y_min, x_max, y_max)`` OUTER edges [m], or ``[S, 4]`` per scene.
        scene_index: long ``[N]``, the scene of each point (required when ``S > 1``).

    Returns:
        ``[N, F]`` interpolated values, in the maps' units and dtype; differentiable
        w.r.t. ``xy`` (the maps are detached). Raw tensors are interpolated channel by
        channel: pass angles through :class:`PreparedMaps` to interpolate them on the
        circle, and fill holes (NaN/-inf) first.
    """
    if isinstance(maps, PreparedMaps):
        return maps.lookup(xy, scene_index)
    from core.stores.radio_map import RadioMap

    if isinstance(maps, RadioMap) or (isinstance(maps, (list, tuple)) and maps and isinstance(maps[0], RadioMap)):
        return PreparedMaps(maps, device=xy.device).lookup(xy, scene_index)  # convenience: prepares every call
    _check_xy(xy)
    if not isinstance(maps, torch.Tensor) or maps.ndim not in (3, 4):
        raise CoreError("lookup: maps must be a tensor [F, H, W] or [S, F, H, W] (or a PreparedMaps)")
    if bounds is None:
        raise CoreError("lookup: bounds (x_min, y_min, x_max, y_max) are required with a raw map tensor")
    maps = maps.detach()
    num_scenes = 1 if maps.ndim == 3 else maps.shape[0]
    scene_index = _check_scene_index(scene_index, xy.shape[0], num_scenes, xy.device)
    b = _bounds_tensor(bounds, num_scenes, xy.device, torch.float64)
    scale, offset = (t.to(maps.dtype) for t in _affine_from_bounds(b))
    grid = normalize_xy(xy.to(maps.dtype), scale, offset, scene_index)
    if maps.ndim == 3:
        table = maps.unsqueeze(0)
    else:  # [S, F, H, W] -> [1, F, S, H, W], a view (no copy of the maps)
        table = maps.permute(1, 0, 2, 3).unsqueeze(0)
    return _sample(table, grid, scene_index).t()


def in_bounds(xy: torch.Tensor, bounds, scene_index: torch.Tensor | None = None) -> torch.Tensor:
    """bool ``[N]``: points inside the OUTER bounds (edges included).

    ``bounds`` is a 4-tuple, an ``[S, 4]`` tensor (with ``scene_index [N]``), or a
    :class:`PreparedMaps`.
    """
    _check_xy(xy)
    if isinstance(bounds, PreparedMaps):
        b = bounds.bounds.to(device=xy.device, dtype=torch.float64)
    else:
        b = torch.as_tensor(bounds, dtype=torch.float64, device=xy.device).reshape(-1, 4)
    b = b[0:1].expand(xy.shape[0], 4) if (scene_index is None or b.shape[0] == 1) else b[torch.as_tensor(scene_index, device=xy.device).long()]
    p = xy.detach().to(torch.float64)
    return (p[:, 0] >= b[:, 0]) & (p[:, 0] <= b[:, 2]) & (p[:, 1] >= b[:, 1]) & (p[:, 1] <= b[:, 3])


def angle_from_cos_sin(c: torch.Tensor, s: torch.Tensor, wrap: bool = True) -> torch.Tensor:
    """Angle in degrees of the (unnormalised) vector ``(c, s)``: ``atan2(s, c)``.

    In (-180, 180]; with ``wrap=False`` in [-180, 180] (skips one op when the caller
    wraps anyway). Where ``(c, s)`` is (nearly) zero -- two opposite directions averaged
    -- the angle is undefined; it is 0 with zero gradient there instead of NaN.
    """
    tiny = (c * c + s * s) < 1e-12
    # the double where keeps NaN out of the backward (atan2's gradient at 0 is 0/0)
    deg = torch.rad2deg(torch.atan2(torch.where(tiny, 0.0, s), torch.where(tiny, 1.0, c)))
    return torch.where(deg <= -180.0, deg + 360.0, deg) if wrap else deg


# -- prepared maps ------------------------------------------------------------------------
def fill_holes(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``values [C, H, W]`` whose uncovered cells (``valid [H, W]`` false) hold their nearest
    covered cell's value (Euclidean distance in cells); all zeros when nothing is covered.

    Returns ``values`` itself when everything is covered, else a new array. NaN/-inf in
    uncovered cells never survive.
    """
    if valid.all():
        return values
    if not valid.any():
        return np.zeros_like(values)
    from scipy.ndimage import distance_transform_edt

    ii, jj = distance_transform_edt(~valid, return_distances=False, return_indices=True)
    return values[:, ii, jj]


def _pooled_stats(maps: Sequence, f: int, angular: bool) -> tuple[float, float]:
    """(mean, std) of feature channel ``f`` over the covered cells of all scenes."""
    if len(maps) == 1:
        st = maps[0].stats[maps[0].features[f]]
        return st.mean, st.std
    from core.stores.radio_map import feature_stats

    v = np.concatenate([m.values[f][m.valid] for m in maps])
    st = feature_stats(v, angular)
    return st.mean, st.std


class GridTable(torch.nn.Module):
    """A module whose maps live in one buffer ``table [..., H, W]``: its device, dtype and grid shape."""

    @property
    def device(self) -> torch.device:
        return self.table.device

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return tuple(self.table.shape[-2:])


class PreparedMaps(GridTable):
    """One or several radio maps made ready for fast, safe lookup -- built once, reused.

    Build it with :func:`prepare_maps` (or ``PreparedMaps(maps)``) from a
    :class:`~core.radio_map.RadioMap` or a list of them (same features, same ``H x W``;
    bounds may differ per scene). It is an ``nn.Module`` holding non-persistent buffers,
    so ``.to(device)`` moves it and it never lands in a checkpoint.

    The lookup table has ``C = L + 2A`` channels, grouped so that the loss can work on
    contiguous slices (``L`` linear features, ``A`` angular ones)::

        [0, L)            the linear (non-angular) features, in map order (``linear``)
        [L, L + A)        cos of each angular feature (``angular``)
        [L + A, L + 2A)   sin of each angular feature

    It is stored channels-last (``[1, C, H, W]`` or ``[1, C, S, H, W]`` with the channel
    stride 1): each bilinear tap then reads one contiguous run of ``C`` values instead of
    ``C`` far-apart planes, which makes ``grid_sample`` about twice as fast on the CPU.

    Holes: uncovered cells are filled with their nearest covered cell's value (cos/sin
    likewise), so no NaN/-inf can reach values or gradients. :meth:`coverage` says
    whether the cell under a point is covered (``valid``), so callers can drop points
    that sit in holes.

    Buffers and attributes:
        table: the channels-last table above, in ``dtype``.
        valid: bool ``[S, H, W]`` coverage masks.
        bounds: float64 ``[S, 4]`` outer edges per scene [m].
        scale, offset: ``[S, 2]`` with ``grid = offset + xy * scale`` in [-1, 1].
        mean, std: float64 ``[F]`` feature statistics over covered cells of all scenes
            (circular for angles; raw ``std`` in the feature's unit, not guarded).
        features: names in map order; ``linear`` / ``angular``: their indices by kind.
    """

    def __init__(self, maps, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from core.stores.radio_map import RadioMap

        if isinstance(maps, RadioMap):
            maps = [maps]
        maps = list(maps)
        if not maps or not all(isinstance(m, RadioMap) for m in maps):
            raise CoreError("PreparedMaps: expected a RadioMap or a non-empty list of RadioMaps")
        first = maps[0]
        for m in maps[1:]:
            where = m.source or m.attrs.get("scene", "?")
            if m.features != first.features:
                raise CoreError(f"PreparedMaps: scene {where} has features {list(m.features)}, expected {list(first.features)}")
            if m.shape != first.shape:
                raise CoreError(f"PreparedMaps: scene {where} has a {m.shape} grid, expected {first.shape}")
        self.features: tuple[str, ...] = tuple(first.features)
        self.angular: tuple[int, ...] = tuple(f for f, n in enumerate(self.features) if feature_spec(n).angular)
        self.linear: tuple[int, ...] = tuple(f for f in range(len(self.features)) if f not in self.angular)
        self.num_scenes = len(maps)
        self.has_holes = not all(bool(m.valid.all()) for m in maps)
        self.scene_names = [str(m.attrs.get("scene", m.source or f"scene{s}")) for s, m in enumerate(maps)]

        slabs = []
        for m in maps:
            values = np.where(m.valid[None], m.values.astype(np.float64), 0.0)  # holes may hold NaN/-inf
            rad = np.deg2rad(values[list(self.angular)])
            table = np.concatenate([values[list(self.linear)], np.cos(rad), np.sin(rad)], axis=0)
            table = fill_holes(table, m.valid)
            slabs.append(table)
        if self.num_scenes == 1:
            table = torch.from_numpy(slabs[0]).to(dtype).unsqueeze(0).contiguous(memory_format=torch.channels_last)
        else:
            # Depth padded with zero slices to a power of two: then each scene's depth centre
            # (2s + 1) / D - 1 and grid_sample's unnormalisation are exact in any float type
            # and on any device, so neighbouring scenes get exactly zero weight.
            depth = 1 << (self.num_scenes - 1).bit_length()
            slabs += [np.zeros_like(slabs[0])] * (depth - self.num_scenes)
            stacked = torch.from_numpy(np.stack(slabs, axis=1)).to(dtype).unsqueeze(0)  # [1, C, D, H, W]
            table = stacked.contiguous(memory_format=torch.channels_last_3d)
        bounds = torch.tensor([m.bounds for m in maps], dtype=torch.float64)
        scale, offset = _affine_from_bounds(bounds)
        mean, std = zip(*(_pooled_stats(maps, f, f in self.angular) for f in range(len(self.features))))
        # order[k] = feature index of the k-th value in "linear then angular" order
        order = torch.tensor(self.linear + self.angular, dtype=torch.long)
        self._identity_order = self.linear + self.angular == tuple(range(len(self.features)))
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("valid", torch.from_numpy(np.stack([m.valid for m in maps])), persistent=False)
        self.register_buffer("bounds", bounds, persistent=False)
        self.register_buffer("scale", scale.to(dtype), persistent=False)
        self.register_buffer("offset", offset.to(dtype), persistent=False)
        self.register_buffer("lo", bounds[:, :2].to(dtype), persistent=False)
        self.register_buffer("hi", bounds[:, 2:].to(dtype), persistent=False)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64), persistent=False)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("linear_index", torch.tensor(self.linear, dtype=torch.long), persistent=False)
        self.register_buffer("angular_index", torch.tensor(self.angular, dtype=torch.long), persistent=False)
        self.register_buffer("inverse_order", torch.argsort(order), persistent=False)
        if device is not None:
            self.to(device)

    # -- facts --------------------------------------------------------------------------
    @property
    def num_features(self) -> int:
        return len(self.features)

    def index(self, name: str) -> int:
        """Feature index of ``name`` (in map order)."""
        if name not in self.features:
            raise CoreError(f"radio map has no feature {name!r} (it has {list(self.features)})")
        return self.features.index(name)

    def check_scene_index(self, scene_index, n: int) -> torch.Tensor | None:
        """Validated long ``[N]`` scene index on the maps' device (``None`` for one scene)."""
        if self.num_scenes == 1:
            if scene_index is not None:
                _check_scene_index(scene_index, n, 1, self.device)
            return None
        return _check_scene_index(scene_index, n, self.num_scenes, self.device)

    def box(self, scene_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``, ``[N or 1, 2]`` each: the outer bounds per point, for clamping."""
        if self.num_scenes == 1 or scene_index is None:
            return self.lo, self.hi
        return self.lo[scene_index], self.hi[scene_index]

    # -- lookup -------------------------------------------------------------------------
    def sample(self, xy: torch.Tensor, scene_index: torch.Tensor | None = None) -> torch.Tensor:
        """Raw table channels at ``xy [N, 2]``: channel-major ``[C, N]`` (order: see the class doc).

        One ``grid_sample``; the result is a view of its output (memory order ``[N, C]``).
        ``scene_index`` must already be validated (see :meth:`check_scene_index`).
        """
        grid = normalize_xy(xy, self.scale, self.offset, scene_index)
        return _sample(self.table, grid, scene_index)

    def split(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``raw [C, N]`` -> ``(linear [L, N], cos [A, N], sin [A, N])``.

        One ``split`` (not three slices), so the backward writes one gradient buffer.
        """
        n_ang = len(self.angular)
        return raw.split([len(self.linear), n_ang, n_ang], dim=0)

    def to_feature_order(self, linear: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        """``[N, L]`` and ``[N, A]`` (in ``linear`` / ``angular`` order) -> ``[N, F]`` in map order."""
        if not self.angular:
            return linear
        both = torch.cat([linear, angles], dim=1)
        return both if self._identity_order else both.index_select(1, self.inverse_order)

    def lookup(self, xy: torch.Tensor, scene_index=None) -> torch.Tensor:
        """Feature values at ``xy [N, 2]`` metres: ``[N, F]`` in map units and map order.

        Linear features are interpolated bilinearly; angles are interpolated on the unit
        circle (their cos and sin) and returned in degrees in (-180, 180]. Holes were
        filled from the nearest covered cell. Differentiable w.r.t. ``xy``.
        """
        _check_xy(xy)
        xy = xy.to(device=self.device, dtype=self.dtype)
        scene_index = self.check_scene_index(scene_index, xy.shape[0])
        lin, c, s = self.split(self.sample(xy, scene_index))
        return self.to_feature_order(lin.t(), angle_from_cos_sin(c, s).t())

    def coverage(self, xy: torch.Tensor, scene_index=None) -> torch.Tensor:
        """Float ``[N]``: 1 where the cell under ``xy`` is covered, else 0 (no gradient).

        Points beyond the outer bounds take the nearest border cell, like the lookup.
        """
        n = xy.shape[0]
        if not self.has_holes:
            return torch.ones(n, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            xy = xy.detach().to(device=self.device, dtype=torch.float64)
            h, w = self.shape
            b = self.bounds if (scene_index is None or self.num_scenes == 1) else self.bounds[scene_index]
            b = b.expand(n, 4) if b.shape[0] == 1 else b
            j = ((xy[:, 0] - b[:, 0]) / (b[:, 2] - b[:, 0]) * w).floor().clamp(0, w - 1).long()
            i = ((xy[:, 1] - b[:, 1]) / (b[:, 3] - b[:, 1]) * h).floor().clamp(0, h - 1).long()
            s = torch.zeros_like(i) if (scene_index is None or self.num_scenes == 1) else scene_index
            return self.valid[s, i, j].to(self.dtype)

    def extra_repr(self) -> str:
        h, w = self.shape
        return f"features={list(self.features)}, scenes={self.num_scenes}, grid={h}x{w}, holes={self.has_holes}"


def prepare_maps(maps, device=None, dtype: torch.dtype = torch.float32) -> PreparedMaps:
    """A :class:`PreparedMaps` from a RadioMap, a list of them, or a PreparedMaps (returned as is,
    moved to ``device`` if given)."""
    if isinstance(maps, PreparedMaps):
        return maps if device is None else maps.to(device)
    return PreparedMaps(maps, device=device, dtype=dtype)
