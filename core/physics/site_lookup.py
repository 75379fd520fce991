"""Per-site map lookup: what the map predicts for every REPORTED site at a position.

The per-site map layout (``RadioMap.layers``): for every site ``s`` of ``attrs["sites"]``::

    site_path_gain  float32 [S, H, W]  path gain of site s            [dB]
    site_toa        float32 [S, H, W]  ToA of site s's strongest path [ns]
    site_aoa        float32 [S, H, W]  AoA of that path, (-180, 180]  [deg]

NaN (or -inf) where site ``s`` has no path to the cell. A measurement report lists up
to ``K`` sites by id (``site_ids [B, K]``, -1 = empty slot), so a position is compared
with the layers of exactly those sites.

:class:`SiteMaps` prepares the layers ONCE into one channels-last table
``[1, C, H, W]`` of ``C = 4 S + F_c`` channels, in groups of ``S``::

    [0, S)      path gain of site s [dB]          [S, 2S)    ToA [ns]
    [2S, 3S)    cos(AoA)                          [3S, 4S)   sin(AoA)
    [4S, 4S + F_c)  serving-map features ``cell_features`` (``RadioMap.values``), if asked

A k-path map (``k > 1``, :attr:`SiteMaps.paths`) adds every site's ``k`` paths per cell as ANCHORS
(:mod:`core.stores.path_anchors`: ``q``, its height above the cell's receiver ``dz`` and the length
before it ``L0``), in a separate table ``anchor_table [4 k S, H W]``. They are never interpolated:
:meth:`SiteMaps.path_components` evaluates each path of each of the four cells ``c`` of the bilinear
stencil around ``p`` AT ``p``::

    toa_{r,c}(p) = (L0 + sqrt(|q_xy - p|^2 + dz^2)) / c       (cos, sin)_{r,c}(p) = (q_xy - p) / |q_xy - p|

with the stencil's bilinear weights ``w_c(p)`` (sum 1; 1 on the cell itself at its centre): ``M = 4 k``
mixture components per site, each ONE path, exact inside a cell for a specular path, smooth in ``p``
(a component enters with weight 0 where the stencil changes). A path absent at a cell holds that cell's
path 0 (its weight goes to path 0); a cell the site does not cover holds the nearest covered cell's paths.
:meth:`SiteMaps.sample` with ``paths=True`` appends them to the table's channels::

    [A, A + 3 M S)   toa, cos, sin of path rank r of site s at stencil cell c, [3, k, S, 4]  (A = 4 S + F_c)
    [A + 3 M S, A + 3 M S + 4)   the stencil weights w_c

and a coverage bitmask per cell: bit ``s`` set where site ``s`` has a path AND the cell is
covered (``valid``), bit ``S`` = ``valid`` (the serving coverage). Holes are filled per
site with the nearest cell that site covers (:func:`~core.physics.lookup.fill_holes`), so
no NaN/inf can reach values or gradients. A lookup is ONE ``grid_sample`` of all channels
at all points (cell-centred bilinear, ``align_corners=False``, border padding, exactly as
:mod:`core.physics.lookup`) plus one gather of the bitmask of the cell under each point,
then a ``gather`` of each slot's site. Per slot ``k`` of site ``s = site_ids[b, k]`` at ``p``::

    path_gain = T_pg,s(p)     toa = T_toa,s(p)     aoa = atan2(T_sin,s(p), T_cos,s(p))
    covered   = bit s of the cell under p (nearest cell; beyond the bounds, the border cell)

so AoA is averaged on the circle (179 deg and -179 deg give 180 deg). The values are
differentiable in ``xy`` (coverage is a step: no gradient); the table never requires
grad and is never copied. (Coverage is a bitmask rather than interpolated channels: ``S``
more channels would cost about a fifth more grid_sample time, forward and backward.)

One scene per :class:`SiteMaps` (build one per scene for several).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import CoreError
from core.features import feature_spec
from core.physics.lookup import GridTable, angle_from_cos_sin, fill_holes
from core.stores.path_anchors import SPEED_OF_LIGHT

__all__ = ["SiteMaps", "SiteValues", "site_lookup", "prepare_site_maps", "SITE_LAYERS", "GROUPS"]

#: feature -> RadioMap layer name
SITE_LAYERS: dict[str, str] = {"path_gain": "site_path_gain", "toa": "site_toa", "aoa": "site_aoa"}
#: the per-site channel groups of the table, in order
GROUPS: tuple[str, ...] = ("path_gain", "toa", "cos", "sin")


class SiteValues(NamedTuple):
    """What :meth:`SiteMaps.lookup` returns (``...`` is ``[B]`` or ``[B, P]``).

    values: ``[..., K, 3]`` (path_gain [dB], toa [ns], aoa [deg] in (-180, 180]) of each
        slot's site; 0 in empty slots.
    coverage: float ``[..., K]``: 1 where the slot's site covers the cell under the point,
        else 0 (0 in empty slots; no gradient).
    covered: the same as bool.
    cell: ``[..., F_c]`` serving-map features (``SiteMaps.cell_features``), or None.
    cell_coverage: ``[...]`` serving coverage (``valid`` under the point) as 0/1, or None.
    """

    values: torch.Tensor
    coverage: torch.Tensor
    covered: torch.Tensor
    cell: torch.Tensor | None
    cell_coverage: torch.Tensor | None


def _circular_std_deg(deg: np.ndarray) -> float:
    """Circular standard deviation ``sqrt(-2 ln R)`` [deg] of angles ``deg`` (NaN if empty)."""
    if deg.size == 0:
        return float("nan")
    rad = np.deg2rad(deg.astype(np.float64))
    r = min(float(np.hypot(np.cos(rad).mean(), np.sin(rad).mean())), 1.0)
    return float(np.degrees(np.sqrt(-2.0 * np.log(r)))) if r > 0 else float("inf")


def _site_slabs(path_gain, toa, aoa, valid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Filled per-site channels ``[4, S, H, W]`` (float64), coverage ``[S, H, W]`` and spread ``[S, 3]``."""
    pg, tt, aa = (np.asarray(a, dtype=np.float64) for a in (path_gain, toa, aoa))
    cover = np.isfinite(pg) & np.isfinite(tt) & np.isfinite(aa) & valid[None]
    s, h, w = pg.shape
    slabs = np.zeros((4, s, h, w))
    spread = np.full((s, 3), np.nan)
    for i in range(s):
        c = cover[i]
        rad = np.deg2rad(np.where(c, aa[i], 0.0))
        chans = np.stack([np.where(c, pg[i], 0.0), np.where(c, tt[i], 0.0), np.cos(rad), np.sin(rad)])
        slabs[:, i] = fill_holes(chans, c)
        if c.any():
            spread[i] = [pg[i][c].std(), tt[i][c].std(), _circular_std_deg(aa[i][c])]
    return slabs, cover, spread


def _anchor_table(anchors, cover: np.ndarray) -> np.ndarray:
    """``[4 k S, H W]`` float64 lookup table (rows: coordinate, rank, site) of anchors ``[S, k, 4, H, W]``
    (``(q_x, q_y, dz, L0)`` [m], NaN absent; :meth:`~core.stores.radio_map.RadioMap.path_anchors`): absent
    paths hold the cell's path 0, cells site ``s`` does not cover (``cover [S, H, W]``) the nearest covered
    cell's paths."""
    a = np.asarray(anchors, dtype=np.float64)
    s, k, four, h, w = a.shape
    if four != 4 or cover.shape != (s, h, w):
        raise CoreError(f"SiteMaps: anchors must be [S, k, 4, {h}, {w}] with S = {cover.shape[0]}, got {a.shape}")
    out = np.empty_like(a)
    for i in range(s):
        has0 = np.isfinite(a[i, 0]).all(0) & cover[i]
        present = np.isfinite(a[i]).all(1, keepdims=True)  # [k, 1, H, W]
        filled = np.where(present, a[i], a[i, :1])
        filled = np.where(has0[None, None], filled, 0.0)
        out[i] = fill_holes(filled.reshape(k * 4, h, w), has0).reshape(k, 4, h, w)
    return out.transpose(2, 1, 0, 3, 4).reshape(4 * k * s, h * w)


class SiteMaps(GridTable):
    """Per-site layers of one scene made ready for lookup (see the module doc for the table).

    Args:
        path_gain, toa, aoa: ``[S, H, W]`` arrays [dB, ns, deg]; NaN/-inf: no path.
        bounds: ``(x_min, y_min, x_max, y_max)``, the grid's OUTER edges [m].
        valid: bool ``[H, W]`` serving coverage (all true when omitted); a site never
            covers a cell outside it.
        cell: ``{name: [H, W]}`` serving-map features to look up too (finite where valid).
        sites: ``[S, 3]`` site positions [m] (kept as ``site_xyz``), optional.
        site_names: ``S`` names (default ``site0``...).
        anchors: ``[S, k, 4, H, W]`` every site's ``k`` paths' anchors ``(q_x, q_y, dz, L0)`` [m] per cell,
            ``dz`` the anchor's height above the cell's receiver, NaN where absent
            (:meth:`RadioMap.path_anchors`), or None (k = 1).

    Buffers (non-persistent; ``.to(device)`` moves them): ``table``; ``cover_bits``
    int64 ``[H * W]``; ``cover`` bool ``[S + 1, H, W]`` (sites, then ``valid``);
    ``scale, offset [2]`` with ``grid = offset + xy * scale``; ``lo, hi [2]`` the outer
    bounds; ``site_xyz``.
    k-path maps: ``anchor_table [4 k S, H W]`` (:func:`_anchor_table`).
    Attributes: ``num_sites``, ``paths`` (k: 1, or the k-path map's), ``cell_features``, ``spread [S, 3]`` (numpy: std of each
    site's path gain, ToA and circular std of AoA over the cells it covers), ``cell_spread``
    ``{name: std over valid cells}``, ``bounds``, ``shape (H, W)``, ``cell_size``.
    """

    def __init__(self, path_gain, toa, aoa, bounds, valid=None, cell: dict | None = None, sites=None,
                 site_names=None, device=None, dtype: torch.dtype = torch.float32, anchors=None) -> None:
        super().__init__()
        shape = np.shape(path_gain)
        if len(shape) != 3 or np.shape(toa) != shape or np.shape(aoa) != shape:
            raise CoreError(f"SiteMaps: path_gain, toa, aoa must all be [S, H, W], got {shape}, {np.shape(toa)}, {np.shape(aoa)}")
        s, h, w = shape
        if s + 1 > 63:
            raise CoreError(f"SiteMaps: at most 62 sites per scene (coverage bitmask), got {s}")
        valid = np.ones((h, w), bool) if valid is None else np.asarray(valid, dtype=bool)
        if valid.shape != (h, w):
            raise CoreError(f"SiteMaps: valid must be [{h}, {w}], got {valid.shape}")
        self.bounds = tuple(float(b) for b in bounds)
        x_min, y_min, x_max, y_max = self.bounds
        if not (x_max > x_min and y_max > y_min):
            raise CoreError(f"SiteMaps: bounds {self.bounds} must have x_max > x_min and y_max > y_min")
        slabs, cover, self.spread = _site_slabs(path_gain, toa, aoa, valid)
        anchor_table = None if anchors is None else _anchor_table(anchors, cover)  # [4 k S, H W]
        self.paths = 1 if anchor_table is None else anchor_table.shape[0] // (4 * s)
        cell = dict(cell or {})
        self.cell_features = tuple(cell)
        planes = [slabs.reshape(4 * s, h, w)]
        self.cell_spread = {}
        for name, plane in cell.items():
            plane = np.asarray(plane, dtype=np.float64)
            if plane.shape != (h, w):
                raise CoreError(f"SiteMaps: cell feature {name!r} must be [{h}, {w}], got {plane.shape}")
            self.cell_spread[name] = float(plane[valid].std()) if valid.any() else float("nan")
            planes.append(fill_holes(np.where(valid, plane, 0.0)[None], valid))
        table = torch.from_numpy(np.concatenate(planes)).to(dtype).unsqueeze(0)
        bits = np.zeros((h, w), np.int64)
        for i, c in enumerate(list(cover) + [valid]):
            bits |= c.astype(np.int64) << i
        self.num_sites = s
        self.site_names = list(site_names) if site_names is not None else [f"site{i}" for i in range(s)]
        self.covered_fraction = cover.reshape(s, -1).mean(axis=1)
        lo = torch.tensor([x_min, y_min], dtype=torch.float64)
        hi = torch.tensor([x_max, y_max], dtype=torch.float64)
        scale = 2.0 / (hi - lo)
        self.register_buffer("table", table.contiguous(memory_format=torch.channels_last), persistent=False)
        self.register_buffer("cover_bits", torch.from_numpy(bits.reshape(-1)), persistent=False)
        self.register_buffer("bit_shifts", torch.arange(s + 1, dtype=torch.int64), persistent=False)
        self.register_buffer("cover", torch.from_numpy(np.concatenate([cover, valid[None]])), persistent=False)
        self.register_buffer("scale", scale.to(dtype), persistent=False)
        self.register_buffer("offset", (-1.0 - lo * scale).to(dtype), persistent=False)
        self.register_buffer("lo", lo.to(dtype), persistent=False)
        self.register_buffer("inv_cell", (torch.tensor([w, h], dtype=torch.float64) / (hi - lo)).to(dtype), persistent=False)
        self.register_buffer("hi", hi.to(dtype), persistent=False)
        xyz = None if sites is None else torch.as_tensor(np.asarray(sites, dtype=np.float64).reshape(s, 3))
        self.register_buffer("site_xyz", xyz, persistent=False)
        table_a = None if anchor_table is None else torch.from_numpy(anchor_table).to(dtype)
        self.register_buffer("anchor_table", table_a, persistent=False)
        if device is not None:
            self.to(device)

    @classmethod
    def from_radio_map(cls, radio_map, cell_features=(), device=None, dtype: torch.dtype = torch.float32,
                       paths: bool = True) -> SiteMaps:
        """From a :class:`~core.stores.radio_map.RadioMap` with the three per-site layers.

        ``cell_features``: serving-map feature names to add (each must be in the map).
        ``paths``: read a k-path map's path anchors too (False: path 0 only, as a k = 1 map).
        A missing layer is a :class:`CoreError` naming it; a map of the first k-path layout (interpolated
        ``site_alt_*`` values) is refused with ``paths`` (one line, with the command that regenerates it).
        """
        missing = [layer for layer in SITE_LAYERS.values() if layer not in radio_map.layers]
        if missing:
            raise CoreError(f"radio map {radio_map.source or radio_map.attrs.get('scene', '')}: no per-site layer(s) "
                            f"{', '.join(missing)} (it has {sorted(radio_map.layers)}); regenerate it with per-site layers")
        layers = [radio_map.layers[SITE_LAYERS[f]] for f in ("path_gain", "toa", "aoa")]
        sites = radio_map.attrs.get("sites") or []
        pos = np.array([q["position"] for q in sites], dtype=np.float64) if len(sites) == len(layers[0]) else None
        names = [q.get("name", f"site{i}") for i, q in enumerate(sites)] if pos is not None else None
        cell = {name: radio_map.values[radio_map.index(name)] for name in cell_features}
        for name in cell:
            if feature_spec(name).angular:
                raise CoreError(f"SiteMaps: cell feature {name!r} is angular; only linear serving features are supported")
        anchors = None
        if paths and radio_map.paths_per_site > 1:
            anchors = radio_map.path_anchors()  # the first k-path layout: a StoreError, one line
        return cls(*layers, radio_map.bounds, valid=radio_map.valid, cell=cell, sites=pos, site_names=names,
                   device=device, dtype=dtype, anchors=anchors)

    # -- facts ------------------------------------------------------------------------
    @property
    def cell_size(self) -> float:
        return (self.bounds[2] - self.bounds[0]) / self.shape[1]

    @property
    def num_channels(self) -> int:
        return self.table.shape[1]

    def extra_repr(self) -> str:
        h, w = self.shape
        return f"sites={self.num_sites}, grid={h}x{w}, cell_features={list(self.cell_features)}"

    # -- sampling ---------------------------------------------------------------------
    def sample(self, xy: torch.Tensor, paths: bool = False) -> torch.Tensor:
        """All table channels at ``xy [N, 2]`` metres: channel-major ``[C, N]`` (a view of ONE grid_sample's output).

        ``paths`` (a k-path map): followed by :meth:`path_components`' rows (module doc)."""
        n = xy.shape[0]
        grid = torch.addcmul(self.offset, xy, self.scale)
        out = F.grid_sample(self.table, grid.view(1, 1, n, 2), mode="bilinear", padding_mode="border",
                            align_corners=False)  # [1, C, 1, N], contiguous
        out = out.view(self.num_channels, n)
        if paths and self.paths > 1:
            out = torch.cat([out, self.path_components(xy)])
        return out

    def site_part(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw [C, N]`` -> ``[4, S, N]`` per-site groups (a view; order :data:`GROUPS`)."""
        return raw[: 4 * self.num_sites].view(4, self.num_sites, raw.shape[1])

    def cell_part(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw [C, N]`` -> serving features ``[F_c, N]`` (a view)."""
        return raw[4 * self.num_sites: 4 * self.num_sites + len(self.cell_features)]

    @property
    def components(self) -> int:
        """``M = 4 k``: the mixture components per site (every path of the four stencil cells)."""
        return 4 * self.paths

    def path_part(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``raw`` of :meth:`sample` with ``paths`` -> ``(values [3, k, S, 4, N]`` (ToA [ns], cos, sin of path rank
        ``r`` of site ``s`` at stencil cell ``c``), ``weight [4, N]`` (the cells' bilinear weights)), views."""
        a = self.num_channels
        n, m, s = raw.shape[1], self.components, self.num_sites
        return raw[a: a + 3 * m * s].view(3, self.paths, s, 4, n), raw[a + 3 * m * s: a + 3 * m * s + 4]

    def path_components(self, xy: torch.Tensor) -> torch.Tensor:
        """Every path of the four stencil cells around ``xy [N, 2]`` evaluated at ``xy`` (module doc):
        ``[3 M S + 4, N]`` (:meth:`path_part` splits it), differentiable in ``xy``."""
        n, (h, w) = xy.shape[0], self.shape
        s, k = self.num_sites, self.paths
        u = ((xy[:, 0] - self.lo[0]) * self.inv_cell[0] - 0.5).clamp(0, w - 1)
        v = ((xy[:, 1] - self.lo[1]) * self.inv_cell[1] - 0.5).clamp(0, h - 1)
        j0 = u.detach().floor().clamp_(max=max(w - 2, 0))
        i0 = v.detach().floor().clamp_(max=max(h - 2, 0))
        fu, fv = u - j0, v - i0
        j0, i0 = j0.long(), i0.long()
        j1, i1 = (j0 + 1).clamp_(max=w - 1), (i0 + 1).clamp_(max=h - 1)
        idx = torch.stack([i0 * w + j0, i0 * w + j1, i1 * w + j0, i1 * w + j1])  # [4, N]
        weight = torch.stack([(1 - fv) * (1 - fu), (1 - fv) * fu, fv * (1 - fu), fv * fu])  # [4, N]
        a = self.anchor_table.index_select(1, idx.view(-1)).view(4, k, s, 4, n)  # [coords, k, S, cells, N]
        dx, dy = a[0] - xy[:, 0], a[1] - xy[:, 1]
        h2 = dx * dx + dy * dy
        inv_h = h2.clamp(min=1e-12).rsqrt()  # right under an anchor the azimuth is undefined: (0, 0), finite
        toa = (h2 + a[2] * a[2]).clamp(min=1e-12).sqrt().add(a[3]).mul(1e9 / SPEED_OF_LIGHT)
        return torch.cat([toa.view(-1, n), (dx * inv_h).view(-1, n), (dy * inv_h).view(-1, n), weight])

    def path_lookup(self, xy: torch.Tensor, site_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Every mixture component's ``(toa [ns], aoa [deg])`` of each slot's site at ``xy [B, 2]``:
        ``([B, K, M, 2], weight [B, M])``, component ``m = 4 r + c`` (path rank ``r``, stencil cell ``c``)
        with its cell's bilinear weight; 0 in empty slots. Differentiable in ``xy``."""
        ids = self.check_site_ids(site_ids, xy.shape[0])
        b, k = ids.shape
        xy = xy.to(device=self.device, dtype=self.dtype)
        m, s = self.components, self.num_sites
        comp = self.path_components(xy)
        chans = comp[: 3 * m * s].view(3, self.paths, s, 4, b).transpose(2, 3).reshape(3, m, s, b)
        weight = comp[3 * m * s:]
        idx = ids.clamp(min=0).t().reshape(1, 1, k, b).expand(3, m, k, b)
        slots = torch.gather(chans, 2, idx)  # [3, M, K, B]
        aoa = angle_from_cos_sin(slots[1], slots[2])
        out = torch.stack([slots[0], aoa], -1).permute(2, 1, 0, 3)  # [B, K, M, 2]
        out = torch.where((ids >= 0)[..., None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out, weight.t().repeat(1, self.paths)

    @torch.no_grad()
    def coverage(self, xy: torch.Tensor) -> torch.Tensor:
        """Float ``[S + 1, N]``: 1 where the cell under ``xy [N, 2]`` is covered by site ``s`` (row ``S``:
        ``valid``), else 0. Points beyond the bounds take the border cell, like the lookup."""
        h, w = self.shape
        ij = ((xy.detach() - self.lo) * self.inv_cell).floor_()
        j = ij[:, 0].clamp_(0, w - 1).long()
        i = ij[:, 1].clamp_(0, h - 1).long()
        bits = self.cover_bits.index_select(0, i.mul_(w).add_(j))
        return ((bits.unsqueeze(0) >> self.bit_shifts.unsqueeze(1)) & 1).to(self.dtype)

    def check_site_ids(self, site_ids, batch: int | None = None) -> torch.Tensor:
        """Validated long ``[B, K]`` site ids on the maps' device (-1 = empty slot)."""
        ids = torch.as_tensor(site_ids, device=self.device)
        if ids.ndim != 2 or ids.dtype.is_floating_point or (batch is not None and ids.shape[0] != batch):
            raise CoreError(f"site lookup: site_ids must be an integer tensor [B, K], got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.long()
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_sites):
            raise CoreError(f"site lookup: site_ids must lie in [-1, {self.num_sites}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids

    def lookup(self, xy: torch.Tensor, site_ids) -> SiteValues:
        """Each slot's site values at ``xy [B, 2]`` or candidates ``xy [B, P, 2]`` (see :class:`SiteValues`).

        ``site_ids``: integer ``[B, K]`` into the sites, -1 for an empty slot.
        """
        if not isinstance(xy, torch.Tensor) or xy.ndim not in (2, 3) or xy.shape[-1] != 2:
            raise CoreError(f"site lookup: xy must be a tensor [B, 2] or [B, P, 2] in metres, got {getattr(xy, 'shape', xy)}")
        single = xy.ndim == 2
        xy3 = (xy.unsqueeze(1) if single else xy).to(device=self.device, dtype=self.dtype)
        b, p = xy3.shape[:2]
        ids = self.check_site_ids(site_ids, b)
        k = ids.shape[1]
        flat = xy3.reshape(b * p, 2)
        raw = self.sample(flat)
        cov = self.coverage(flat)  # [S + 1, N]
        groups = self.site_part(raw).permute(2, 0, 1).reshape(b, p, 4, self.num_sites)  # a view
        slots = torch.gather(groups, 3, ids.clamp(min=0).view(b, 1, 1, k).expand(b, p, 4, k))  # [B, P, 4, K]
        present = (ids >= 0).unsqueeze(1)  # [B, 1, K]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        aoa = angle_from_cos_sin(slots[:, :, 2], slots[:, :, 3])
        values = torch.where(present.unsqueeze(-1), torch.stack([slots[:, :, 0], slots[:, :, 1], aoa], dim=-1), zero)
        site_cov = torch.gather(cov[:-1].t().reshape(b, p, -1), 2, ids.clamp(min=0).view(b, 1, k).expand(b, p, k))
        covered = present & (site_cov > 0.5)
        cell = cell_cov = None
        if self.cell_features:
            cell, cell_cov = self.cell_part(raw).t().reshape(b, p, -1), cov[-1].reshape(b, p)
        out = SiteValues(values, covered.to(self.dtype), covered, cell, cell_cov)
        if single:
            out = SiteValues(*(None if v is None else v.squeeze(1) for v in out))
        return out

    # -- coarse statistics (global search) --------------------------------------------
    @torch.no_grad()
    def block_stats(self, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean and variance of every table channel, then of every coverage mask, over ``block x block`` cells.

        Returns ``(centres [G, 2] m, mean [G, C + S + 1], var [G, C + S + 1])`` (columns: the
        table's ``C = 4 S + F_c`` channels -- a k-path map's anchors are not pooled: the global
        scan reads path 0 --, the ``S`` site coverages, ``valid``) with ``G = ceil(H/block) *
        ceil(W/block)`` blocks in row-major order (rows along +y); the last blocks may be
        partial (only real cells count) and a centre is the mean of its cells' centres.
        """
        if int(block) < 1:
            raise CoreError(f"block_stats: block must be >= 1 cells, got {block}")
        block = int(block)
        t = torch.cat([self.table, self.cover.unsqueeze(0).to(self.dtype)], dim=1).to(torch.float64)
        pool = lambda v: F.avg_pool2d(v, block, block, ceil_mode=True, count_include_pad=False)  # noqa: E731
        mean, sq = pool(t), pool(t * t)
        var = (sq - mean * mean).clamp(min=0.0)
        h, w = self.shape
        cell = self.cell_size
        ys = self.bounds[1] + (torch.arange(h, dtype=torch.float64, device=self.device) + 0.5) * cell
        xs = self.bounds[0] + (torch.arange(w, dtype=torch.float64, device=self.device) + 0.5) * cell
        cy = pool(ys.view(1, 1, h, 1).expand(1, 1, h, w).contiguous())[0, 0]
        cx = pool(xs.view(1, 1, 1, w).expand(1, 1, h, w).contiguous())[0, 0]
        centres = torch.stack([cx, cy], dim=-1).reshape(-1, 2)
        flat = lambda v: v[0].flatten(1).t().to(self.dtype).contiguous()  # noqa: E731
        return centres.to(self.dtype), flat(mean), flat(var)


def prepare_site_maps(maps, cell_features=(), device=None, dtype: torch.dtype = torch.float32,
                      paths: bool = True) -> SiteMaps:
    """A :class:`SiteMaps` from a RadioMap, or a SiteMaps (returned as is, moved to ``device`` if given).
    ``paths``: see :meth:`SiteMaps.from_radio_map`."""
    if isinstance(maps, SiteMaps):
        return maps if device is None else maps.to(device)
    return SiteMaps.from_radio_map(maps, cell_features=cell_features, device=device, dtype=dtype, paths=paths)


def site_lookup(maps, xy: torch.Tensor, site_ids) -> SiteValues:
    """Functional form of :meth:`SiteMaps.lookup` (``maps``: a SiteMaps or a RadioMap, prepared per call)."""
    return prepare_site_maps(maps, device=xy.device).lookup(xy, site_ids)
