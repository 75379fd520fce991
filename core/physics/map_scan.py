"""Coarse global scan of the likelihood: the best blocks of the whole map for each report.

The map is cut into blocks of ``b x b`` cells (:meth:`SiteMaps.block_stats`). Within a
block the position is unknown, so the block's prediction for site ``s`` and feature ``f``
is the block mean ``M`` with the block variance ``V`` added to the calibrated one::

    z^2_{s,f}   = (o_{s,f} - M_{s,f})^2 / (sigma_{s,f}^2 + V_{s,f})          path gain, ToA
    z^2_{s,aoa} = |u(o) - M_dir|^2 / (sigma_aoa^2 + 1 - R^2)                  AoA [rad]

with ``M_dir`` the block's mean AoA direction normalised, ``R`` its mean resultant length
(``1 - R^2 = E|u - mean u|^2``: the chord variance of the directions in the block). The
block cost is the likelihood's, with the block's covered fraction as the coverage::

    NLL_block = sum_s  c_s (sum_f w_f m_f rho(z_{s,f}) - R_s) + R_s           (+ serving features likewise)

(the serving features enter like the per-site ones; the silence term, when the observation has
one, at the block's mean path gain: ``sum_s unheard_s c_s silence_cost(M_pg,s)``). Blocks where no cell is covered
(``valid``) are excluded. :meth:`GlobalScan.top` returns the ``top`` best blocks per sample,
greedily non-maximum-suppressed (each pick removes blocks within ``1.5`` block widths),
optionally ignoring blocks near given centres (the window the search covers anyway).
Cost: ``O(B S G)`` per batch for ``G`` blocks -- about ``32 x 32`` by default.
"""

from __future__ import annotations

import math

import torch

from core.errors import CoreError
from core.physics.silence import silence_cost

__all__ = ["GlobalScan"]


class GlobalScan:
    """Block statistics of a :class:`~core.physics.likelihood.RobustLikelihood`'s map, made once.

    Args:
        likelihood: the RobustLikelihood (its maps, calibration and config are used).
        block: block size in cells (None: ``ceil(max(H, W) / 32)``).
    """

    def __init__(self, likelihood, block: int | None = None) -> None:
        maps = likelihood.maps
        h, w = maps.shape
        self.block = int(block) if block is not None else max(1, math.ceil(max(h, w) / 32))
        if self.block < 1:
            raise CoreError(f"global scan: block must be >= 1 cells, got {block}")
        self.block_m = self.block * maps.cell_size
        self.lik = likelihood
        s, fc = maps.num_sites, len(likelihood.cell_features)
        centres, mean, var = maps.block_stats(self.block)  # columns: 4S table, F_c cell, S cover, valid
        self.centres = centres  # [G, 2]
        cal = likelihood.calibration
        dt, dev = maps.dtype, maps.device
        sig2 = torch.as_tensor(cal.scale, dtype=torch.float64).to(dev, dt) ** 2  # [S, 3], AoA in deg^2
        sig2[:, 2] = sig2[:, 2] * (math.pi / 180.0) ** 2
        t = lambda a, b: mean[:, a:b].t().contiguous()  # noqa: E731  [S, G]
        self.pg, self.toa = t(0, s), t(s, 2 * s)
        c, sn = t(2 * s, 3 * s), t(3 * s, 4 * s)
        r = torch.sqrt(c * c + sn * sn)
        self.dir_c, self.dir_s = c / r.clamp(min=1e-6), sn / r.clamp(min=1e-6)
        self.inv2_pg = 1.0 / (sig2[:, 0:1] + var[:, 0:s].t())
        self.inv2_toa = 1.0 / (sig2[:, 1:2] + var[:, s:2 * s].t())
        self.inv2_aoa = 1.0 / (sig2[:, 2:3] + (1.0 - r * r).clamp(min=0.0))
        base = 4 * s + fc
        self.cover = t(base, base + s)  # [S, G] covered fraction per site
        self.valid = mean[:, base + s]  # [G]
        self.cell = t(4 * s, base)  # [F_c, G]
        cell_sig2 = torch.tensor([cal.cell[f]["scale"] ** 2 for f in likelihood.cell_features], dtype=dt, device=dev)
        self.inv2_cell = 1.0 / (cell_sig2.unsqueeze(1) + var[:, 4 * s:base].t())
        self.excluded = self.valid <= 0  # [G] blocks with no covered cell
        self._silence = None  # [S, G] the silence cost per site and block, made on first use

    @torch.no_grad()
    def nll(self, prep) -> torch.Tensor:
        """``[B, G]`` block NLL of a :class:`PreparedObservation` (see the module doc)."""
        lik = self.lik
        rho = lik.rho
        un = lambda v: v.unsqueeze(-1)  # noqa: E731  [S, B] -> [S, B, 1]
        gm = lambda v: v.unsqueeze(1)  # noqa: E731  [S, G] -> [S, 1, G]
        t = None
        for f, w in enumerate(lik.w):
            if not w:
                continue
            if f < 2:
                o, m2 = (prep.o_pg, prep.inv2_pg) if f == 0 else (prep.o_toa, prep.inv2_toa)
                mp, inv = (self.pg, self.inv2_pg) if f == 0 else (self.toa, self.inv2_toa)
                z2 = (gm(mp) - un(o)).square_().mul_(gm(inv)).mul_(un(m2 > 0))
            else:
                z2 = (gm(self.dir_c) - un(prep.u_c)).square_()
                z2.add_((gm(self.dir_s) - un(prep.u_s)).square_()).mul_(gm(self.inv2_aoa)).mul_(un(prep.inv2_aoa > 0))
            r = rho(z2).mul_(w)
            t = r if t is None else t.add_(r)
        miss = un(prep.r_miss)
        total = t.sub_(miss).mul_(gm(self.cover)).add_(miss).sum(0)  # [B, G]
        if lik.cell_features:
            z2 = (self.cell.unsqueeze(1) - prep.o_cell.unsqueeze(-1)).square_().mul_(self.inv2_cell.unsqueeze(1))
            z2.mul_((prep.inv2_cell > 0).unsqueeze(-1))
            wc = torch.as_tensor(lik.wc, dtype=z2.dtype, device=z2.device).view(-1, 1, 1)
            tc = rho(z2).mul_(wc).sum(0).sub_(prep.r_miss_cell.unsqueeze(1))
            total.add_(tc.mul_(self.valid).add_(prep.r_miss_cell.unsqueeze(1)))
        if prep.unheard is not None:  # the silence term at the block's mean path gain, weighted by its coverage
            if self._silence is None:
                self._silence = silence_cost(self.pg, lik.bias_t[0], lik.pg_scale, lik.silence).mul_(self.cover)
            total.add_(prep.unheard.t() @ self._silence)
        return total

    @torch.no_grad()
    def top(self, prep, top: int, avoid: torch.Tensor | None = None, avoid_radius: float = 0.0) -> torch.Tensor:
        """Centres ``[B, top, 2]`` of the ``top`` best distinct blocks per sample.

        ``avoid [B, 2]``: blocks whose centre is within ``avoid_radius`` (Chebyshev, metres)
        of it are skipped. Non-maximum suppression radius: 1.5 block widths.
        """
        cost = self.nll(prep)  # [B, G]
        cost.masked_fill_(self.excluded.unsqueeze(0), math.inf)
        cent = self.centres
        if avoid is not None:
            near = (cent.unsqueeze(0) - avoid.unsqueeze(1)).abs().amax(-1) <= avoid_radius  # [B, G]
            cost.masked_fill_(near, math.inf)
        picks = []
        for _ in range(top):
            best = cost.argmin(dim=1)  # all-inf rows pick block 0: harmless, the search scores it
            c = cent[best]  # [B, 2]
            picks.append(c)
            close = (cent.unsqueeze(0) - c.unsqueeze(1)).norm(dim=-1) <= 1.5 * self.block_m
            cost.masked_fill_(close, math.inf)
        return torch.stack(picks, dim=1) if picks else cent.new_zeros(prep.site_ids.shape[0], 0, 2)
