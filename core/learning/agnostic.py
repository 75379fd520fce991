"""The scene-agnostic map-conditioned transformer (``model.kind: agnostic``).

The memorizing model (:class:`~core.learning.model.MapConditionedTransformer`) reads learned
embeddings of site ids and Fourier features of absolute cell centres: it learns WHERE in its
training city a report pattern occurs. This model reads only quantities that mean the same in
every city: what each reported site measured MINUS what the map predicts for THAT site at a
candidate position, the spread of the map inside the candidate cell, and the site's geometry
RELATIVE to the candidate. No site identity, no absolute position enters it; a site id only
selects which map layer and which site position a slot is compared with.

Shapes: ``B`` samples, ``T`` reports, ``K`` site slots per report, ``S`` sites of the scene
(padded to the largest of the scenes of a batch), ``C = G x G`` coarse cells, ``P = s x s``
sub-points per cell (``spec.fine_subgrid``), ``N`` candidate cells (``spec.num_candidates``).

Inputs per sample (:func:`core.learning.data_loading.build_tensors` with ``kind="agnostic"``):
``feats[B, T, 4K + 1]`` = per slot (path gain dB, ToA ns, AoA deg, present), then the time before
the last report [s]; ``site_index[B, T, K]`` = site id + 1 (0 = empty slot); ``mask[B, T]``.
Per scene, once (:class:`SceneTable`, from the radio map's per-site layers): every site's path
gain, ToA and AoA at the ``P`` sub-points of every cell, its coverage there, the site's position
relative to each sub-point, per-cell statistics over the sub-points, and each cell's outdoor and
covered share.

1. **Observation**: the reports of the last ``spec.report_window_s`` before the latest present
   one, pooled per site (mean; AoA on the circle), as the physics term's likelihood does:
   ``o[B, S, 4]`` (path gain, ToA, cos AoA, sin AoA), ``n[B, S]`` reports pooled.
2. **Coarse match over every cell** (:class:`CoarseMatch`, 11 learned scalars): a robust
   likelihood of ``o`` against each cell's per-site mean, with the within-cell variance added to
   a learned noise variance::

       z_f = (o_f - mean_f(s, c)) / sqrt(sigma_f^2 + var_f(s, c))        f = path gain, ToA
       z_aoa^2 = 2 (1 - cos(o_aoa - mean_aoa(s, c))) / (sigma_aoa^2 + 2 (1 - R(s, c)))
       base_c = - sum_{s heard} [w_pg log(1+z_pg^2) + w_toa log(1+z_toa^2) + w_aoa log(1+z_aoa^2)
                                 + w_cov (1 - cover(s, c))]
                - sum_{s not heard} w_miss softplus((mean_pg(s, c) - theta) / 5 dB)
                + w_out log(outdoor share_c + 0.05) + w_valid log(covered share_c + 0.05)

3. **Candidates (map tokens)**: the ``N`` best cells of ``base``. For each candidate ``c`` and
   each report slot ``(t, k)`` of site ``s`` (:data:`SLOT_FEATURES`, 15 values): measured minus
   the cell's mean of that site's layers (path gain / 10 dB, asinh(ToA / 10 ns), AoA difference
   as sin/cos), the within-cell spreads, the coverage share, log range to the site, the measured
   AoA minus the geometric bearing from ``c`` to the site (sin/cos), the site's height over the UE,
   the excess delay ``c0 * ToA - range``, and the measured path gain. Per slot an MLP, summed over
   the present slots: a report token ``[B, N, T, d_r]`` (+ time embedding). **Temporal
   self-attention over the reports, per candidate**, then mean ‖ last pooling -> a candidate token
   ``[B, N, d]`` (+ its base score, shares, and its offset to the best candidate in metres), then
   ``num_layers`` blocks of **self-attention between the candidates**. ``delta_n = w . token_n``.
4. **Coarse logits** over all ``G x G`` cells: ``logits = base + scatter(candidates, delta)``
   (cross-entropy = ``L_coarse`` as for the memorizing model).
5. **Fine head** (:class:`FineHead`, module ``fine``) at a cell (the argmax, or the true cell in
   training): one token per sub-point ``p`` from ``o`` against the sub-point's own map values and
   geometry (12 values per heard site, an MLP, summed over sites) + the sub-point's offset in the
   cell + the attention-pooled candidate context, a residual MLP, then ``w_p = softmax(score_p)``: ``offset = sum_p w_p u_p + 0.5 / s tanh(.)`` [cell
   units], ``logvar = log(sum_p w_p (u_p - offset)^2 + softplus(.) / s^2)``.
6. Outputs as the memorizing model's (:meth:`~core.learning.model.CellGrid.position`);
   ``head_xy`` is the fine head with the candidate context detached (the physics gradient reaches
   the fine head only).

Invariances (tests/test_agnostic.py): relabelling the sites (permuting the layers, the site list
and the reports' ids consistently) and shifting the scene frame leave the outputs (relative to the
bounds) unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.learning.model import MLP, Attention, CellGrid, ModelOutput, ModelSpec, SceneMaps

SPEED_OF_LIGHT = 299_792_458.0  # m/s
UE_HEIGHT_M = 1.5  # receiver height above the ground [m]
#: the fixed physical scales every input is divided by (the same in every city)
PG_SCALE_DB, TOA_SCALE_NS, RANGE_SCALE_M, HEIGHT_SCALE_M, EXCESS_SCALE_M = 10.0, 10.0, 50.0, 30.0, 10.0
#: per-cell statistics of :attr:`SceneTable.cell`, in order
CELL_STATS = ("pg_mean", "pg_std", "toa_mean", "toa_std", "cos_mean", "sin_mean", "cover", "rel_x", "rel_y", "rel_z")
#: what the candidate stage reads per (candidate, report, slot)
SLOT_FEATURES = ("d_pg", "pg_std", "d_toa", "toa_std", "sin_d_aoa", "cos_d_aoa", "aoa_R", "cover", "log_range",
                 "sin_d_bearing", "cos_d_bearing", "height", "excess", "pg", "present")
#: what the fine head reads per (sub-point, heard site)
POINT_FEATURES = ("d_pg", "d_toa", "sin_d_aoa", "cos_d_aoa", "cover", "log_range", "sin_d_bearing",
                  "cos_d_bearing", "height", "excess", "log_n", "one")


def agnostic_token_dim(k: int) -> int:
    """``feats`` width of the agnostic model: 4 values per slot and the time before the last report."""
    return 4 * k + 1


@dataclass
class SceneTable:
    """What the agnostic model reads of one scene's map (``M`` scenes after :meth:`stack`), float32.

    sub      [M, S, 4, C, P]  per-site path gain [dB], ToA [ns], cos AoA, sin AoA at the ``P`` sub-points of
                              each cell (cell ``i * G + j``, sub-points as :func:`cell_subpoints`); holes filled
                              with the nearest covered cell, as the likelihood's lookup
    cover    [M, S, C, P]     1 where the site has a path in the map cell under the sub-point
    rel      [M, S, C, P, 3]  site minus sub-point: (dx, dy) [m] and the site's height over the UE (ground + 1.5 m)
    cell     [M, S, C, 10]    statistics over the sub-points (:data:`CELL_STATS`): mean and std of path gain and
                              ToA, mean cos and sin of AoA, coverage share, mean ``rel``
    shares   [M, C, 2]        share of outdoor map cells and of covered (valid) map cells in each coarse cell
    site_ok  bool [M, S]      a real site (False: padding to the largest ``S`` of the stacked scenes)
    """

    sub: torch.Tensor
    cover: torch.Tensor
    rel: torch.Tensor
    cell: torch.Tensor
    shares: torch.Tensor
    site_ok: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.sub.device

    @property
    def num_sites(self) -> int:
        return self.sub.shape[1]

    def to(self, device) -> SceneTable:
        return SceneTable(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def __getitem__(self, m) -> SceneTable:
        """Scene(s) ``m`` (an index keeps the leading dim)."""
        m = [m] if isinstance(m, int) else m
        return SceneTable(*(getattr(self, f)[m] for f in self.__dataclass_fields__))

    @classmethod
    def stack(cls, tables: list[SceneTable]) -> SceneTable:
        """One table of several scenes' (each ``M = 1``), sites padded to the largest ``S`` (``site_ok`` False)."""
        s_max = max(t.num_sites for t in tables)

        def pad(x: torch.Tensor, fill=0.0) -> torch.Tensor:
            if x.shape[1] == s_max:
                return x
            extra = x.new_full((x.shape[0], s_max - x.shape[1], *x.shape[2:]), fill)
            return torch.cat([x, extra], 1)

        return cls(torch.cat([pad(t.sub) for t in tables]), torch.cat([pad(t.cover) for t in tables]),
                   torch.cat([pad(t.rel) for t in tables]), torch.cat([pad(t.cell) for t in tables]),
                   torch.cat([t.shares for t in tables]), torch.cat([pad(t.site_ok, False) for t in tables]))

    @classmethod
    def from_radio_map(cls, radio_map, grid: int, subgrid: int) -> SceneTable:
        """The table of ``radio_map`` (its per-site layers and ``attrs["sites"]`` positions) for a
        ``grid x grid`` model with ``subgrid x subgrid`` sub-points per cell (M = 1)."""
        from core.learning.coarse_physics import cell_subpoints
        from core.physics.site_lookup import SiteMaps

        maps = SiteMaps.from_radio_map(radio_map, dtype=torch.float64)
        if maps.site_xyz is None:
            raise ValueError(f"radio map {radio_map.source or ''}: no site positions (attrs['sites'])")
        c, p, s = grid * grid, subgrid * subgrid, maps.num_sites
        pts = cell_subpoints(radio_map.bounds, grid, subgrid)  # [C * P, 2] float64, cell-major
        with torch.no_grad():
            sub = maps.site_part(maps.sample(pts)).reshape(4, s, c, p).permute(1, 0, 2, 3)  # [S, 4, C, P]
            cover = maps.coverage(pts)[:s].reshape(s, c, p)
        ground = _ground_at(radio_map, pts.numpy())  # [C * P]
        site = maps.site_xyz.to(torch.float64)  # [S, 3]
        dxy = site[:, None, :2] - pts[None]  # [S, C * P, 2], differences in float64
        dz = site[:, None, 2] - torch.from_numpy(ground + UE_HEIGHT_M)[None]
        rel = torch.cat([dxy, dz[..., None]], -1).reshape(s, c, p, 3)
        stats = torch.stack([sub[:, 0].mean(-1), sub[:, 0].std(-1, unbiased=False), sub[:, 1].mean(-1),
                             sub[:, 1].std(-1, unbiased=False), sub[:, 2].mean(-1), sub[:, 3].mean(-1),
                             cover.mean(-1), *rel.mean(2).unbind(-1)], -1)  # [S, C, 10]
        valid = torch.from_numpy(np.asarray(radio_map.valid, dtype=np.float64))
        outdoor = radio_map.outdoor
        outdoor = valid if outdoor is None else torch.from_numpy(np.asarray(outdoor, dtype=np.float64))
        shares = F.adaptive_avg_pool2d(torch.stack([outdoor, valid])[None], grid)[0].flatten(1).t()  # [C, 2]
        f32 = lambda x: x.to(torch.float32)[None].contiguous()  # noqa: E731
        return cls(f32(sub), f32(cover), f32(rel), f32(stats), f32(shares), torch.ones(1, s, dtype=torch.bool))


def _ground_at(radio_map, pts: np.ndarray) -> np.ndarray:
    """float64 ``[N]`` terrain height [m] of the map cell under each point (0 without a ground layer)."""
    ground = radio_map.ground
    if ground is None:
        return np.zeros(len(pts))
    x_min, y_min, x_max, y_max = radio_map.bounds
    h, w = ground.shape
    j = np.clip(((pts[:, 0] - x_min) / (x_max - x_min) * w).astype(int), 0, w - 1)
    i = np.clip(((pts[:, 1] - y_min) / (y_max - y_min) * h).astype(int), 0, h - 1)
    return np.nan_to_num(np.asarray(ground, dtype=np.float64)[i, j])


def scene_table(radio_map, spec: ModelSpec) -> SceneTable:
    """:meth:`SceneTable.from_radio_map` at the model's grid and fine sub-grid."""
    return SceneTable.from_radio_map(radio_map, spec.grid_size, spec.fine_subgrid)


def _wrap(a: torch.Tensor) -> torch.Tensor:
    return torch.atan2(torch.sin(a), torch.cos(a))


def _softplus_inv(y: float) -> float:
    return math.log(math.expm1(y))


class CoarseMatch(nn.Module):
    """Stage 2 of the module doc: a robust per-site likelihood of the pooled observation against every
    cell's per-site statistics, with learned noise scales and term weights (11 scalars)."""

    def __init__(self) -> None:
        super().__init__()
        # softplus-parameterised: sigma_pg [dB], sigma_toa [ns], sigma_aoa [rad]; weights pg, toa, aoa, cov, miss
        self.sigma = nn.Parameter(torch.tensor([_softplus_inv(4.0), _softplus_inv(10.0), _softplus_inv(0.15)]))
        self.weight = nn.Parameter(torch.tensor([_softplus_inv(1.0)] * 3 + [_softplus_inv(3.0), _softplus_inv(0.3)]))
        self.theta = nn.Parameter(torch.tensor(-125.0))  # path gain [dB] above which an unheard site counts against
        self.share = nn.Parameter(torch.tensor([1.0, 1.0]))

    def forward(self, o, heard, cell, shares, site_ok):
        """``o[B, S, 4]``, ``heard[B, S]`` bool, ``cell[B or 1, S, C, 10]``, ``shares[B or 1, C, 2]``,
        ``site_ok[B or 1, S]`` -> ``base[B, C]``."""
        sig = F.softplus(self.sigma)
        w = F.softplus(self.weight)
        mean_pg, var_pg = cell[..., 0], cell[..., 1].pow(2)
        mean_toa, var_toa = cell[..., 2], cell[..., 3].pow(2)
        mc, ms = cell[..., 4], cell[..., 5]
        r = torch.sqrt(mc * mc + ms * ms).clamp(max=1.0)
        z_pg = (o[..., 0:1] - mean_pg).pow(2) / (sig[0] ** 2 + var_pg)
        z_toa = (o[..., 1:2] - mean_toa).pow(2) / (sig[1] ** 2 + var_toa)
        cos_d = (o[..., 2:3] * mc + o[..., 3:4] * ms) / r.clamp(min=1e-6)  # cos(o_aoa - mean_aoa)
        z_aoa = 2.0 * (1.0 - cos_d) / (sig[2] ** 2 + 2.0 * (1.0 - r))
        rho = w[0] * torch.log1p(z_pg) + w[1] * torch.log1p(z_toa) + w[2] * torch.log1p(z_aoa)  # [B, S, C]
        heard_f = heard.to(o.dtype)
        unheard = (site_ok & ~heard).to(o.dtype)
        cov_cost = w[3] * (1.0 - cell[..., 6])  # [B or 1, S, C]
        miss = w[4] * F.softplus((mean_pg - self.theta) / 5.0)
        total = _site_sum(heard_f, rho) + _site_sum(heard_f, cov_cost) + _site_sum(unheard, miss)  # [B, C]
        return -total + (self.share * torch.log(shares + 0.05)).sum(-1)


def _masked_mlp_sum(mlp: nn.Sequential, x: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    """``sum over dim of mask * mlp(x)`` for ``mlp = (Linear, GELU, Linear)``, with the last Linear applied
    AFTER the sum (it is linear: ``W sum_k m_k h_k + (sum_k m_k) b``), so it runs on the summed rows only."""
    m = mask.to(x.dtype)
    h = (mlp[1](mlp[0](x)) * m[..., None]).sum(dim)
    return F.linear(h, mlp[2].weight) + m.sum(dim)[..., None] * mlp[2].bias


def _site_sum(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_s weight[b, s] x[b or 0, s, c]`` -> ``[B, C]`` (a matmul when ``x`` is shared by the batch)."""
    if x.shape[0] == 1:
        return weight @ x[0]
    return torch.einsum("bs,bsc->bc", weight, x)


class SelfBlock(nn.Module):
    """Self-attention and MLP, pre-LN residuals."""

    def __init__(self, d: int, heads: int, ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        self.mlp = MLP(d, ratio, dropout)

    def forward(self, x, mask=None, return_attention=False):
        h = self.ln1(x)
        a, w = self.attn(h, h, mask, return_attention)
        x = x + a
        return x + self.mlp(self.ln2(x)), w


class FineHead(nn.Module):
    """Stage 5 of the module doc: the offset and log-variance in a given cell from its sub-points."""

    def __init__(self, d: int, df: int, subgrid: int, dropout: float) -> None:
        super().__init__()
        self.subgrid = subgrid
        self.point = nn.Sequential(nn.Linear(len(POINT_FEATURES), df), nn.GELU(), nn.Linear(df, df))
        self.pos = nn.Linear(2, df)
        self.context = nn.Linear(d, df)
        self.ln1, self.ln = nn.LayerNorm(df), nn.LayerNorm(df)
        self.mlp = MLP(df, 2, dropout)
        self.score = nn.Linear(df, 1)
        self.out = nn.Linear(df, 4)
        u = (torch.arange(subgrid, dtype=torch.float32) + 0.5) / subgrid - 0.5
        vv, uu = torch.meshgrid(u, u, indexing="ij")
        self.register_buffer("u", torch.stack([uu.ravel(), vv.ravel()], -1), persistent=False)  # [P, 2] cell units

    def forward(self, o, n, heard, sub, cover, rel, context):
        """``o[B, S, 4]``, ``n[B, S]``, ``heard[B, S]``; the cell's ``sub[B, S, 4, P]``, ``cover[B, S, P]``,
        ``rel[B, S, P, 3]``; ``context[B, d]`` -> ``(offset [B, 2], logvar [B, 2])`` in cell units, and ``w [B, P]``
        the sub-points' weights (softmax; sub-point ``p`` at :attr:`u` ``[p]`` cell units from the centre)."""
        o_ang = torch.atan2(o[..., 3], o[..., 2])[..., None]  # [B, S, 1]
        m_ang = torch.atan2(sub[:, :, 3], sub[:, :, 2])  # [B, S, P]
        rng = rel.norm(dim=-1).clamp(min=1.0)
        bearing = torch.atan2(rel[..., 1], rel[..., 0])
        d_aoa, d_bear = o_ang - m_ang, o_ang - bearing
        excess = o[..., 1:2] * (1e-9 * SPEED_OF_LIGHT) - rng
        feats = torch.stack([
            (o[..., 0:1] - sub[:, :, 0]) / PG_SCALE_DB, torch.asinh((o[..., 1:2] - sub[:, :, 1]) / TOA_SCALE_NS),
            torch.sin(d_aoa), torch.cos(d_aoa), cover, torch.log(rng / RANGE_SCALE_M), torch.sin(d_bear),
            torch.cos(d_bear), rel[..., 2] / HEIGHT_SCALE_M, torch.asinh(excess / EXCESS_SCALE_M),
            torch.log(n.clamp(min=1.0))[..., None].expand_as(cover), torch.ones_like(cover)], -1)  # [B, S, P, 12]
        h = _masked_mlp_sum(self.point, feats, heard[..., None].expand_as(cover), 1)  # [B, P, df]
        h = h + self.pos(self.u) + self.context(context)[:, None]
        h = self.ln(h + self.mlp(self.ln1(h)))
        w = self.score(h)[..., 0].softmax(-1)  # [B, P]
        raw = self.out((w[..., None] * h).sum(1))  # [B, 4]
        offset = w @ self.u + (0.5 / self.subgrid) * torch.tanh(raw[:, :2])
        spread = (w[..., None] * (self.u[None] - offset[:, None]).pow(2)).sum(1)
        logvar = torch.log(spread + F.softplus(raw[:, 2:]) / self.subgrid**2 + 1e-6).clamp(-8.0, 4.0)
        return offset, logvar, w


class AgnosticTransformer(CellGrid):
    """See the module doc. ``forward`` has the memorizing model's signature and :class:`ModelOutput`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        d, dr = spec.d_model, spec.d_report
        heads_r = max(1, min(spec.num_heads, dr // 16))
        self.k = (spec.token_dim - 1) // 4
        self.match = CoarseMatch()
        self.slot = nn.Sequential(nn.Linear(len(SLOT_FEATURES), dr), nn.GELU(), nn.Linear(dr, dr))
        self.time = nn.Linear(2, dr)
        self.missing = nn.Parameter(torch.zeros(dr))
        self.temporal = SelfBlock(dr, heads_r, 2, spec.dropout)
        self.ln_r = nn.LayerNorm(dr)
        self.report_pool = nn.Linear(2 * dr, d)
        self.cand_in = nn.Linear(5, d)
        self.blocks = nn.ModuleList(SelfBlock(d, spec.num_heads, spec.mlp_ratio, spec.dropout)
                                    for _ in range(spec.num_layers))
        self.ln_c = nn.LayerNorm(d)
        self.cand_out = nn.Linear(d, 1)
        nn.init.zeros_(self.cand_out.weight)
        nn.init.zeros_(self.cand_out.bias)
        self.fine = FineHead(d, dr, spec.fine_subgrid, spec.dropout)

    # -- pieces ---------------------------------------------------------------------------
    def _reports(self, feats, site_index, mask):
        """``(values [B, T, K, 4] (pg dB, toa ns, aoa rad, present), tau [B, T] s, in_window [B, T] bool)``."""
        b, t, _ = feats.shape
        k = site_index.shape[-1]
        vals = feats[..., : 4 * k].reshape(b, t, k, 4)
        present = (vals[..., 3] > 0.5) & (site_index > 0) & mask[..., None]
        vals = torch.cat([vals[..., :2], torch.deg2rad(vals[..., 2:3]), present[..., None].to(vals.dtype)], -1)
        tau = feats[..., 4 * k]
        latest = torch.where(mask, tau, torch.full_like(tau, float("inf"))).amin(1, keepdim=True)
        in_window = mask & (tau <= latest + self.spec.report_window_s + 1e-6)
        return vals, tau, in_window

    @staticmethod
    def _observation(vals, site_index, in_window, num_sites: int):
        """Per-site pooling over the window: ``(o [B, S, 4] (pg, toa, cos, sin of the circular mean), n [B, S])``."""
        use = vals[..., 3] * in_window[..., None].to(vals.dtype)  # [B, T, K]
        onehot = F.one_hot((site_index - 1).clamp(min=0), num_sites).to(vals.dtype) * use[..., None]
        x = torch.stack([vals[..., 0], vals[..., 1], torch.cos(vals[..., 2]), torch.sin(vals[..., 2])], -1)
        n = onehot.sum((1, 2))  # [B, S]
        o = torch.einsum("btks,btkf->bsf", onehot, x) / n.clamp(min=1.0)[..., None]
        ang = torch.atan2(o[..., 3], o[..., 2])
        return torch.stack([o[..., 0], o[..., 1], torch.cos(ang), torch.sin(ang)], -1), n

    def _slot_features(self, vals, stats):
        """``vals[B, 1, T, K, 4]`` against ``stats[B, N, T, K, 10]`` -> ``[B, N, T, K, 15]`` (:data:`SLOT_FEATURES`)."""
        pg, toa, aoa, present = vals.unbind(-1)
        m_ang = torch.atan2(stats[..., 5], stats[..., 4])
        r = torch.sqrt(stats[..., 4] ** 2 + stats[..., 5] ** 2).clamp(max=1.0)
        rel = stats[..., 7:10]
        rng = rel.norm(dim=-1).clamp(min=1.0)
        d_aoa, d_bear = aoa - m_ang, aoa - torch.atan2(rel[..., 1], rel[..., 0])
        f = torch.stack([
            (pg - stats[..., 0]) / PG_SCALE_DB, stats[..., 1] / PG_SCALE_DB,
            torch.asinh((toa - stats[..., 2]) / TOA_SCALE_NS), torch.asinh(stats[..., 3] / TOA_SCALE_NS),
            torch.sin(d_aoa), torch.cos(d_aoa), r, stats[..., 6], torch.log(rng / RANGE_SCALE_M),
            torch.sin(d_bear), torch.cos(d_bear), rel[..., 2] / HEIGHT_SCALE_M,
            torch.asinh((toa * (1e-9 * SPEED_OF_LIGHT) - rng) / EXCESS_SCALE_M),
            ((pg + 100.0) / (2 * PG_SCALE_DB)).expand_as(r), torch.ones_like(r)], -1)
        return f * present[..., None]

    def _fine_at(self, table: SceneTable, scene, cell, o, n, heard, context):
        m = torch.zeros_like(cell) if scene is None else scene
        return self.fine(o, n, heard, table.sub[m, :, :, cell], table.cover[m, :, cell], table.rel[m, :, cell], context)

    # -- forward --------------------------------------------------------------------------
    def forward(self, feats, site_index, mask, map_image, target_cell=None, return_attention=False,
                head_xy=False, scene_index=None) -> ModelOutput:
        """As :meth:`MapConditionedTransformer.forward`; ``map_image``: a :class:`SceneTable` (one scene, the
        spec's bounds) or a :class:`~core.learning.model.SceneMaps` of ``M`` scene tables.

        ``return_attention``: ``out.attention`` = ``{"temporal": [[B, H, T, T]]`` (the best candidate's),
        ``"candidates": [[B, H, N, N]]`` per candidate layer (query candidate, key candidate), ``"candidate_cells":
        [[B, N]]`` (cell indices, best ``base`` first), ``"candidate_temporal": [[B, N, H, T, T]]`` (every
        candidate's temporal attention), ``"candidate_base": [[B, N]]`` (their coarse-match score ``base``, log
        units), ``"subpoint_weights": [[B, P]]`` (the fine head's softmax over the sub-points of the chosen cell)}``.
        """
        frame = self.frame(map_image, scene_index)
        table = map_image.images if isinstance(map_image, SceneMaps) else map_image
        scene = frame.scene
        b, t_len, k = site_index.shape
        n_sites = table.num_sites
        pick = (lambda x: x) if scene is None else (lambda x: x[scene])  # noqa: E731  [1 or B, ...]
        mask_any = mask | ~mask.any(1, keepdim=True)  # a walk with no report attends to all (never NaN)

        vals, tau, in_window = self._reports(feats, site_index, mask)
        o, n = self._observation(vals, site_index, in_window, n_sites)
        heard = n > 0
        base = self.match(o, heard, pick(table.cell), pick(table.shares), pick(table.site_ok))  # [B, C]

        n_cand = min(self.spec.num_candidates, base.shape[1])
        cand = base.detach().topk(n_cand, dim=-1).indices  # [B, N]
        m_idx = (torch.zeros(b, dtype=torch.long, device=cand.device) if scene is None else scene)
        sid = (site_index - 1).clamp(min=0)
        stats = table.cell[m_idx[:, None, None, None], sid[:, None], cand[:, :, None, None]]  # [B, N, T, K, 10]
        slot_all = torch.ones(b, n_cand, t_len, k, dtype=torch.bool, device=vals.device)  # an empty slot's features are 0
        x = _masked_mlp_sum(self.slot, self._slot_features(vals[:, None], stats), slot_all, 3)  # [B, N, T, dr]
        x = x + self.time(torch.stack([tau, in_window.to(tau.dtype)], -1))[:, None]
        x = torch.where(mask[:, None, :, None], x, x + self.missing)
        dr = x.shape[-1]
        x = x.reshape(b * n_cand, t_len, dr)
        key_mask = mask_any[:, None].expand(b, n_cand, t_len).reshape(b * n_cand, t_len)
        x, w_time = self.temporal(x, key_mask, return_attention)
        h = self.ln_r(x)
        mf = key_mask[..., None].to(h.dtype)
        mean = (h * mf).sum(1) / mf.sum(1)
        last_idx = (key_mask.long() * torch.arange(t_len, device=h.device)).argmax(1)
        last = h[torch.arange(h.shape[0], device=h.device), last_idx]
        tok = self.report_pool(torch.cat([mean, last], -1)).view(b, n_cand, -1)  # [B, N, d]

        cframe_xy = self.cell_centre(cand.reshape(-1), _rows(frame, n_cand)).view(b, n_cand, 2)
        cand_base = base.gather(1, cand)
        cand_shares = pick(table.shares).expand(b, -1, -1).gather(1, cand[..., None].expand(-1, -1, 2))
        extra = torch.cat([((cand_base - cand_base[:, :1]) / 10.0)[..., None], cand_shares,
                           (cframe_xy - cframe_xy[:, :1]) / RANGE_SCALE_M], -1)  # relative to the best candidate
        tok = tok + self.cand_in(extra)
        cand_att = []
        for block in self.blocks:
            tok, w = block(tok, None, return_attention)
            cand_att.append(w)
        tok = self.ln_c(tok)
        delta = self.cand_out(tok)[..., 0]  # [B, N]
        logits = base.scatter_add(1, cand, delta)

        cand_logits = cand_base + delta
        context = (cand_logits.softmax(-1)[..., None] * tok).sum(1)  # [B, d]
        cell = logits.argmax(-1)
        if target_cell is None:
            offset, logvar, w_sub = self._fine_at(table, scene, cell, o, n, heard, context)
        else:  # the chosen and the true cell in one pass
            two = lambda x: None if x is None else torch.cat([x, x])  # noqa: E731
            off2, lv2, w2 = self._fine_at(table, two(scene), torch.cat([cell, target_cell]), two(o), two(n),
                                          two(heard), two(context))
            offset, logvar, w_sub = off2[:b], lv2[:b], w2[:b]
        centre, xy, sigma, confidence = self.position(logits, cell, offset, logvar, frame)
        out = ModelOutput(logits, cell, offset, logvar, xy, sigma, confidence)
        if target_cell is not None:
            out.target_offset_pred, out.target_logvar = off2[b:], lv2[b:]
        if head_xy:
            off = self._fine_at(table, scene, cell, o, n, heard, context.detach())[0]
            out.head_xy = centre + off * frame.cell_wh
        if return_attention:
            best = cand_logits.argmax(-1)
            per_cand = w_time.view(b, n_cand, *w_time.shape[1:])  # [B, N, H, T, T]
            wt = per_cand[torch.arange(b, device=best.device), best]
            out.attention = {"temporal": [wt], "candidates": cand_att, "candidate_cells": [cand],
                             "candidate_temporal": [per_cand], "candidate_base": [cand_base],
                             "subpoint_weights": [w_sub]}
        return out


def _rows(frame, n: int):
    """``frame`` with each sample's origin and cell size repeated ``n`` times (for ``[B * n]`` cells)."""
    from core.learning.model import Frame

    return Frame(frame.origin.repeat_interleave(n, 0) if frame.origin.shape[0] > 1 else frame.origin,
                 frame.cell_wh.repeat_interleave(n, 0) if frame.cell_wh.shape[0] > 1 else frame.cell_wh)
