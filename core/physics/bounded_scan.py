"""The exhaustive scan of a point lattice, coarse to fine WITHOUT loss: blocks pruned by a lower bound.

The whole walk's no-network start (:func:`~core.physics.trajectory.scan_starts`) scores the
calibrated likelihood (:class:`~core.physics.likelihood.RobustLikelihood`) of the pooled window at
every covered point of a lattice ``step`` apart over the whole map and keeps the ``top`` best
points, greedily at least ``radius`` apart (non-maximum suppression, NMS). That is ``O(S P)`` per
walk for ``P`` lattice points (65,536 on a 1 km map at 4 m) and almost all of it is spent far from
any basin. This module returns the SAME picks while scoring a small fraction of the points.

**Blocks.** The lattice is cut into blocks of ``block x block`` points. Once per map, for every
block ``g`` and every table channel ``c`` (path gain, ToA, AoA cos/sin per site, serving features,
the next paths' ToA and AoA) the range ``[lo_{c,g}, hi_{c,g}]`` of the map's values AT THE BLOCK'S
LATTICE POINTS is stored, with whether site ``s`` covers all / any of them.

**Lower bound.** For a report (bias-corrected ``o``, weights ``inv2 = m n / sigma^2``) every
point ``p`` of block ``g`` has::

    z2_f(p) = (o_f - map_f(p))^2 inv2_f   >=   gap(o_f, [lo, hi])^2 inv2_f           f = path gain, ToA
    z2_aoa(p) = |u - v(p)|^2 inv2_aoa     >=   (gap(u_c, [lo, hi]_cos)^2 + gap(u_s, [lo, hi]_sin)^2) inv2_aoa

with ``gap(o, [lo, hi]) = max(lo - o, 0) + max(o - hi, 0)`` (0 when the range holds ``o``), and
``rho`` (Cauchy or Huber) is non-decreasing in ``z2``. So, per site, with
``t_lb = sum_f w_f rho(z2_f lb)`` and the miss cost ``R_s``::

    LB_s = t_lb                  every point of the block covered by s
         = min(t_lb, R_s)        some
         = R_s                   none

(a k-path mixture ``-log sum_m omega_m exp(-r_m) >= min_m r_m`` as its weights ``omega_m = pi_r w_c``
sum to 1: the ToA/AoA part is the minimum over the ``M = 4 k`` anchored paths of the stencil cells of
each one's bound, from the block's ranges of their values at its points), the serving features likewise with the serving coverage, and
``LB_g = sum_s LB_s + LB_cell <= NLL(p)`` for every lattice point of the block.

**Exact picks.** Per sample: score the points of the ``seed_blocks`` blocks of lowest bound,
run the NMS on the scored points and let ``tau`` be the cost of its ``top``-th pick; score every
block with ``LB_g <= tau`` (+ a float tolerance) not scored yet, and repeat until no block is
added. Every point left unscored then costs more than ``tau`` >= every pick's cost, so the greedy
NMS over all points (ties broken by lattice order, as the full scan's ``argmin``) makes the same
picks as over the scored ones: the full scan's picks, up to float rounding of the scored costs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from core.errors import CoreError

__all__ = ["BoundedScan", "ScanLattice", "scan_lattice", "DEFAULT_BLOCK", "DEFAULT_SEED_BLOCKS"]

#: lattice points per block side (4: 16 blocks of points per bound; tuned on the bench map and etoile, docs/physics.md)
DEFAULT_BLOCK = 4
#: blocks of lowest bound scored first per sample, to get the first threshold
DEFAULT_SEED_BLOCKS = 4
#: the bound must exceed the threshold by this much (relative, and absolute in nats) to prune: float rounding
_TOL = 1e-4
#: Cauchy factors are capped in the likelihood (``_DEN_MAX``); the bound caps ``z2`` lower still
_Z2_MAX = 1e11


class ScanLattice(NamedTuple):
    """``points [P, 2]`` m (cell centres under a lattice ``every`` cells apart, where the serving map is valid),
    ``rows, cols [P]`` long: each point's lattice row and column; ``step_m`` the lattice pitch [m]."""

    points: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    step_m: float


def scan_lattice(maps, step_m: float) -> ScanLattice:
    """The scan's lattice over ``maps`` (:class:`~core.physics.site_lookup.SiteMaps`): every
    ``round(step_m / cell)``-th cell centre (at least every cell), starting half a pitch in, kept where
    the serving map is valid; row-major (the order the full scan ranks ties in)."""
    h, w = maps.shape
    every = max(1, int(round(step_m / maps.cell_size)))
    ii, jj = torch.meshgrid(torch.arange(every // 2, h, every), torch.arange(every // 2, w, every), indexing="ij")
    rr, cc = torch.meshgrid(torch.arange(ii.shape[0]), torch.arange(ii.shape[1]), indexing="ij")
    keep = maps.cover[-1].cpu()[ii, jj]
    ii, jj, rr, cc = ii[keep], jj[keep], rr[keep], cc[keep]
    cell = maps.cell_size
    pts = torch.stack([maps.bounds[0] + (jj + 0.5) * cell, maps.bounds[1] + (ii + 0.5) * cell], -1)
    if pts.shape[0] == 0:
        raise CoreError("whole-walk: the map covers no cell to scan")
    dev = maps.device
    return ScanLattice(pts.to(dev, maps.dtype), rr.to(dev), cc.to(dev), every * cell)


def _gap(lo: torch.Tensor, hi: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """``[..., S, B, G]`` distance from ``o [S, B]`` to the interval ``[lo, hi]`` (``[..., S, G]``), 0 inside it."""
    o = o.unsqueeze(-1)
    lo, hi = lo.unsqueeze(-2), hi.unsqueeze(-2)
    return (lo - o).clamp_(min=0.0).add_((o - hi).clamp_(min=0.0))


def _first_in_order(val: torch.Tensor, idx: torch.Tensor, width: int, fill: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(val [B, L], idx [B, L])``: the first ``L = width`` finite entries of each row of ``val, idx [B, N]``
    in (value, index) order, as a stable sort by index then by value gives them; a row with fewer is padded
    with ``(inf, fill)``. Only the finite entries at or below each row's ``L``-th smallest value (those ``L``
    and their ties) are sorted: ``O(B N)`` for the threshold, ``O(B L log(B L))`` for the sort."""
    b = val.shape[0]
    kth = val.topk(width, dim=1, largest=False).values[:, -1:]  # [B, 1]
    r, j = ((val <= kth) & torch.isfinite(val)).nonzero(as_tuple=True)
    v, i = val[r, j], idx[r, j]
    order = torch.argsort(i, stable=True)
    order = order[torch.argsort(v[order], stable=True)]
    order = order[torch.argsort(r[order], stable=True)]
    r, v, i = r[order], v[order], i[order]
    per = torch.bincount(r, minlength=b)
    rank = torch.arange(r.numel(), device=r.device) - (torch.cumsum(per, 0) - per)[r]
    keep = rank < width
    out_val = torch.full((b, width), math.inf, dtype=val.dtype, device=val.device)
    out_idx = torch.full((b, width), fill, dtype=idx.dtype, device=idx.device)
    out_val[r[keep], rank[keep]] = v[keep]
    out_idx[r[keep], rank[keep]] = i[keep]
    return out_val, out_idx


class BoundedScan:
    """The lattice's map table and block ranges for one likelihood, made once; :meth:`top` per batch.

    Args:
        likelihood: the calibrated RobustLikelihood.
        lattice: the points to scan (:func:`scan_lattice`).
        block: lattice points per block side (>= 1; 1 scores every point, as the full scan).
        seed_blocks: blocks of lowest bound scored first per sample (>= 1).

    Attributes: ``table [C, P]`` the map's channels at the points, ``cover [S + 1, P]`` 0/1,
    ``lo, hi [C, G]`` per-block ranges, ``cov_all, cov_any [S + 1, G]`` bool, ``members [G, block^2]``
    point indices of each block (-1: none), ``scored`` / ``offered`` points scored / (points x
    samples) over the calls so far (diagnostics).
    """

    def __init__(self, likelihood, lattice: ScanLattice, block: int = DEFAULT_BLOCK,
                 seed_blocks: int = DEFAULT_SEED_BLOCKS) -> None:
        if int(block) < 1 or int(seed_blocks) < 1:
            raise CoreError(f"bounded scan: block and seed_blocks must be >= 1, got {block}, {seed_blocks}")
        self.lik, self.block, self.seed_blocks = likelihood, int(block), int(seed_blocks)
        maps = likelihood.maps
        self.points = lattice.points
        n = self.points.shape[0]
        with torch.no_grad():
            self.table = maps.sample(self.points, paths=likelihood.paths > 1).contiguous()  # [C, P]
            self.cover = maps.coverage(self.points)  # [S + 1, P]
        br, bc = lattice.rows // self.block, lattice.cols // self.block
        key = br * (int(bc.max()) + 1) + bc
        uniq, gid = torch.unique(key, return_inverse=True)  # blocks holding at least one point
        g = uniq.shape[0]
        order = torch.argsort(gid * n + torch.arange(n, device=gid.device))  # block-major, lattice order within
        counts = torch.bincount(gid, minlength=g)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.arange(n, device=gid.device) - first[gid[order]]
        self.members = torch.full((g, self.block**2), -1, dtype=torch.long, device=gid.device)
        self.members[gid[order], slot] = order
        idx = gid.unsqueeze(0)
        c = self.table.shape[0]
        self.lo = torch.full((c, g), math.inf, dtype=self.table.dtype, device=self.table.device).scatter_reduce(
            1, idx.expand(c, -1), self.table, "amin")
        self.hi = torch.full((c, g), -math.inf, dtype=self.table.dtype, device=self.table.device).scatter_reduce(
            1, idx.expand(c, -1), self.table, "amax")
        s1 = self.cover.shape[0]
        cov = self.cover > 0
        self.cov_all = torch.ones((s1, g), dtype=torch.bool, device=cov.device).scatter_reduce(
            1, idx.expand(s1, -1), cov, "amin")
        self.cov_any = torch.zeros((s1, g), dtype=torch.bool, device=cov.device).scatter_reduce(
            1, idx.expand(s1, -1), cov, "amax")
        self.scored = 0
        self.offered = 0

    @property
    def num_blocks(self) -> int:
        return self.members.shape[0]

    def _rho(self, z2: torch.Tensor, w: float) -> torch.Tensor:
        return self.lik.rho(z2.clamp_(max=_Z2_MAX)).mul_(w)

    @torch.no_grad()
    def bound(self, prep) -> torch.Tensor:
        """``[B, G]`` nats: a lower bound of the NLL of every lattice point of each block (module doc)
        for a :class:`~core.physics.likelihood.PreparedObservation` of ``B`` samples."""
        lik, s = self.lik, self.lik.maps.num_sites
        w_pg, w_toa, w_aoa = lik.w
        lo, hi = self.lo, self.hi
        b, g = prep.site_ids.shape[0], self.num_blocks
        t = torch.zeros((s, b, g), dtype=lo.dtype, device=lo.device)
        if w_pg:
            t.add_(self._rho(_gap(lo[:s], hi[:s], prep.o_pg).square_().mul_(prep.inv2_pg.unsqueeze(-1)), w_pg))
        k = lik.paths
        # ToA and AoA of every mixture component: [M, S, G] ranges (a k-path map: the M = 4 k anchored paths of the
        # stencil cells, SiteMaps.path_part; the mixture is >= its smallest component's cost, its weights sum to 1)
        if k > 1:
            comp = lambda a: lik.maps.path_part(a)[0].transpose(2, 3).reshape(3, 4 * k, s, g)  # noqa: E731
            rng = [comp(lo)[q] for q in range(3)], [comp(hi)[q] for q in range(3)]
        else:
            rng = [lo[(1 + q) * s:(2 + q) * s].unsqueeze(0) for q in range(3)], \
                  [hi[(1 + q) * s:(2 + q) * s].unsqueeze(0) for q in range(3)]
        r = torch.zeros((rng[0][0].shape[0], s, b, g), dtype=lo.dtype, device=lo.device)
        if w_toa:
            r.add_(self._rho(_gap(rng[0][0], rng[1][0], prep.o_toa).square_().mul_(prep.inv2_toa.unsqueeze(-1)), w_toa))
        if w_aoa:
            z2 = _gap(rng[0][1], rng[1][1], prep.u_c).square_().add_(_gap(rng[0][2], rng[1][2], prep.u_s).square_())
            r.add_(self._rho(z2.mul_(prep.inv2_aoa.unsqueeze(-1)), w_aoa))
        t.add_(r.amin(0))
        miss = prep.r_miss.unsqueeze(-1).expand(s, b, g)
        all_, any_ = self.cov_all[:s].unsqueeze(1), self.cov_any[:s].unsqueeze(1)
        site = torch.where(all_, t, torch.where(any_, torch.minimum(t, miss), miss))
        total = site.sum(0)  # [B, G]
        if lik.cell_features:
            fc, a = len(lik.cell_features), 4 * s
            tc = torch.zeros((b, g), dtype=lo.dtype, device=lo.device)
            for f in range(fc):
                z2 = _gap(lo[a + f: a + f + 1], hi[a + f: a + f + 1], prep.o_cell[f: f + 1]).square_()
                tc.add_(self._rho(z2.mul_(prep.inv2_cell[f].view(1, b, 1)), lik.wc[f])[0])
            mc = prep.r_miss_cell.unsqueeze(-1).expand(b, g)
            all_c, any_c = self.cov_all[s].unsqueeze(0), self.cov_any[s].unsqueeze(0)
            total.add_(torch.where(all_c, tc, torch.where(any_c, torch.minimum(tc, mc), mc)))
        return total

    @torch.no_grad()
    def _score(self, prep, walk: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``[n, block^2]`` NLL of the points of block ``blocks[i]`` for sample ``walk[i]`` (inf: no point)."""
        pts = self.members[blocks]  # [n, M]
        ok = pts >= 0
        safe = pts.clamp(min=0).reshape(-1)
        cost = self.lik.evaluate_sampled(self.table.index_select(1, safe), self.cover.index_select(1, safe),
                                         prep.take(walk))  # [n, M] (index_select: 2-4x faster than [:, safe] on a CPU)
        self.scored += int(ok.sum())
        return cost.masked_fill_(~ok, math.inf)

    @torch.no_grad()
    def _nms(self, walk, blocks, cost, b: int, top: int, radius: float):
        """Greedy picks over the scored points: ``(xy [B, top, 2], cost [B, top])``; a pick removes the points
        within ``radius`` [m] (Euclidean) of it; ties go to the lowest lattice index.

        The greedy visits each sample's scored points in (NLL, lattice index) order and runs on the first ``L``
        of them (doubling ``L`` while a sample with more points gets fewer than ``top`` finite picks): its
        picks are those over all of them. Those first ``L`` come from :func:`_first_in_order`, which sorts
        only the points at or below each sample's ``L``-th smallest NLL, not all of them."""
        m2 = self.block**2
        p = self.points.shape[0]
        pts = self.members[blocks].reshape(-1)  # [T] (-1: padding)
        w = walk.repeat_interleave(m2)
        order = torch.argsort(w, stable=True)  # one row per sample: [B, N] NLL and lattice index
        w, pts, c = w[order], pts[order], cost.reshape(-1)[order]
        n_per = torch.bincount(w, minlength=b)
        col = torch.arange(w.numel(), device=w.device) - (torch.cumsum(n_per, 0) - n_per)[w]
        n = max(1, int(n_per.max()) if w.numel() else 1)
        val = torch.full((b, n), math.inf, dtype=c.dtype, device=c.device)
        idx = torch.full((b, n), p, dtype=torch.long, device=w.device)  # p: no point (padding or empty)
        val[w, col] = c
        idx[w, col] = torch.where(pts >= 0, pts, p)
        finite = torch.isfinite(val).sum(1)
        width = min(8 * top, n)
        rows = torch.arange(b, device=w.device)
        table = torch.cat([self.points, self.points[:1]])  # no point -> point 0, NLL inf
        while True:
            first_val, first_idx = _first_in_order(val, idx, width, p)
            xy = table[first_idx]  # [B, L, 2]
            picks, costs = [], []
            for _ in range(top):
                arg = first_val.argmin(dim=1)
                best = xy[rows, arg]
                costs.append(first_val[rows, arg])  # none left (inf): point 0, as the full scan's argmin of all-inf
                picks.append(torch.where(torch.isfinite(costs[-1]).unsqueeze(1), best, self.points[0]))
                first_val.masked_fill_((xy - best.unsqueeze(1)).norm(dim=-1) <= radius, math.inf)
            costs = torch.stack(costs, 1)
            short = ~torch.isfinite(costs[:, -1]) & (finite > width)
            if not bool(short.any()):
                return torch.stack(picks, 1), costs
            width = min(2 * width, n)

    @torch.no_grad()
    def top(self, prep, top: int, radius: float) -> torch.Tensor:
        """``[B, top, 2]``: the full scan's greedy NMS picks (see the module doc) for ``prep`` (``B`` samples),
        each removing the points within ``radius`` [m] of it, best first."""
        b, g = prep.site_ids.shape[0], self.num_blocks
        dev = self.members.device
        if b == 0:
            return self.points.new_zeros(0, top, 2)
        lb = self.bound(prep)
        done = torch.zeros((b, g), dtype=torch.bool, device=dev)
        walk = blocks = cost = None
        pick_cost = torch.full((b, top), math.inf, dtype=lb.dtype, device=dev)
        extra = self.seed_blocks
        need = torch.ones((b,), dtype=torch.bool, device=dev)  # rows still without a finite threshold
        while True:
            if bool(need.any()):  # the next blocks of lowest bound for rows without ``top`` finite picks
                rows = need.nonzero(as_tuple=True)[0]
                free = lb[rows].masked_fill(done[rows], math.inf)
                k = min(extra, g)
                pick = free.topk(k, dim=1, largest=False)
                keep = pick.values < math.inf
                add = (rows.unsqueeze(1).expand(-1, k)[keep], pick.indices[keep])
                extra *= 2
            else:  # every block that might beat the threshold
                add = None
            if add is None or add[0].numel() == 0:
                tau = pick_cost[:, -1]
                grow = (lb <= (tau + _TOL * (1.0 + tau.abs())).unsqueeze(1)) & ~done
                if not bool(grow.any()):
                    break
                add = grow.nonzero(as_tuple=True)
            done[add[0], add[1]] = True
            new_cost = self._score(prep, *add)
            walk = add[0] if walk is None else torch.cat([walk, add[0]])
            blocks = add[1] if blocks is None else torch.cat([blocks, add[1]])
            cost = new_cost if cost is None else torch.cat([cost, new_cost])
            xy, pick_cost = self._nms(walk, blocks, cost, b, top, radius)
            need = ~torch.isfinite(pick_cost[:, -1]) & ~done.all(1)
        self.offered += b * self.points.shape[0]
        return xy
