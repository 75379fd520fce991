"""Multilateration: a position from the reported sites' known positions, ToA and AoA alone.

No map and no network: each reported slot of site ``q = (q_x, q_y, q_z)`` gives

* a **range** from its ToA: ``d = c toa 1e-9`` [m] is the 3-D path length; the horizontal
  range is ``r = sqrt(max(d^2 - (q_z - h)^2, 0))`` with ``h`` the UE height;
* a **bearing** from its AoA: the dataset's ``aoa`` is the azimuth of arrival AT THE UE
  of the site's strongest path, in the scene frame, degrees in (-180, 180], pointing
  from the UE towards where the wave comes from -- for a line-of-sight path, towards the
  site: ``aoa = atan2(q_y - y, q_x - x)`` (:mod:`core.raytracing.generation` builds the
  map's AoA as ``azimuth(q_s - p)`` plus a residual; :mod:`core.physics.synthetic` the same).

The estimate minimises the robust cost over ``p = (x, y)``::

    C(p) = sum_k  n_k [ rho_r((|p - q_k| - r_k) / sigma_r) + rho(wrap(phi_k(p) - aoa_k) / sigma_a) ]
    phi_k(p) = atan2(q_k,y - y, q_k,x - x)                         (the bearing UE -> site)
    rho(z)   = c^2 log(1 + z^2 / c^2)                              (Cauchy with scale c = robust_scale)

``n_k`` is the number of reports averaged into slot ``k`` (1 unless given; the dataset's
reports are pooled per site over the ONE report window, as for every other method, so a
mean of ``n`` has the scale ``sigma / sqrt(n)``). ``rho ~ z^2`` for ``|z| << c``: ``sigma``
is the noise, ``c`` (in sigmas) where a residual starts to count as an outlier -- non-line-
of-sight slots (AoA from a reflection, ToA late by a detour) whose influence redescends.
The range term is one-sided: a path is never shorter than the straight line, so ``r_k`` is
an upper bound on the distance; ``rho_r = rho`` for ``z <= 0`` (a late, NLOS path) but
``z^2`` for ``z > 0`` (the UE farther than its path allows: only noise can do that).

Minimisation is multi-start iteratively reweighted Gauss-Newton (IRLS, weights
``rho'(z) / 2z = 1 / (1 + z^2 / c^2)``) with a backtracking step, at most ``iterations``
steps, stopping once no start moves more than ``tol_m``. The starts (every one iterated,
the lowest final cost wins):

1. every slot's **single-site fix** ``q_k - r_k (cos aoa_k, sin aoa_k)`` (one site's ToA and
   AoA already pin a point; the site itself where it lacks one of them);
2. **pairwise intersections** of every two slots of different sites: the two crossings of
   their range circles (the closest points when the circles miss each other) and the
   crossing of their bearing rays -- what a single-site fix misses when that site is NLOS;
3. the ``grid_top`` best points of a **coarse grid** over ``bounds`` at ``grid_step_m``
   (the cost evaluated everywhere, no iteration): a basin no slot points at.

Slots with site id -1 or NaN features contribute nothing; a sample with no usable slot
gets the sites' centroid and ``cost = nan``. The defaults are tuned on the etoile VAL split
(``python -m core tune-baselines``; the sweep: docs/physics.md): ``sigma_range_m = 1``,
``sigma_aoa_deg = 3``, ``robust_scale = 1``, at most 40 iterations, and the single-site fixes
alone as starts -- the pairwise and grid starts find LOWER robust costs but not smaller errors
there (val median 1.004 m with the fixes alone, 1.008 m with pairs, 1.011 m with pairs and grid:
where the reports are NLOS the cost's minimum is not the UE), so they are options
(``pair_starts``, ``grid_top``), off by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from core.errors import CoreError
from core.features import REPORT_WINDOW_S

__all__ = ["MultilaterationConfig", "MultilaterationResult", "multilaterate", "multilaterate_dataset",
           "SPEED_OF_LIGHT"]

SPEED_OF_LIGHT = 299_792_458.0  # m/s


@dataclass(frozen=True)
class MultilaterationConfig:
    """``sigma_range_m`` / ``sigma_aoa_deg``: scales of the range and bearing residuals;
    ``robust_scale``: the Cauchy's ``c`` in sigmas; ``use_toa`` / ``use_aoa``; at most
    ``iterations`` IRLS steps, stopping when no start moves more than ``tol_m``; starts:
    ``pair_starts`` (pairwise intersections) and the ``grid_top`` best points of a grid at
    ``grid_step_m`` (0: none); ``ue_height_m``; ``window_s``: the present reports within this
    many seconds of a sample's latest one are pooled per site (the one report window; 0: the
    latest report only). Defaults: tuned on the etoile val split (module doc)."""

    sigma_range_m: float = 1.0
    sigma_aoa_deg: float = 3.0
    robust_scale: float = 1.0
    use_toa: bool = True
    use_aoa: bool = True
    iterations: int = 40
    tol_m: float = 1e-3
    pair_starts: bool = False
    grid_step_m: float = 16.0
    grid_top: int = 0
    ue_height_m: float = 1.5
    window_s: float = REPORT_WINDOW_S

    def __post_init__(self) -> None:
        if not (self.sigma_range_m > 0 and self.sigma_aoa_deg > 0 and self.robust_scale > 0 and self.iterations >= 0
                and self.window_s >= 0 and self.tol_m >= 0 and self.grid_step_m >= 0 and self.grid_top >= 0):
            raise CoreError("multilateration: sigmas and robust_scale must be > 0; iterations, tol_m, grid_step_m, "
                            "grid_top and window_s >= 0")
        if not (self.use_toa or self.use_aoa):
            raise CoreError("multilateration: use ToA, AoA or both")


class MultilaterationResult(NamedTuple):
    """``xy [B, 2]`` estimates [m], ``cost [B]`` robust cost there (nan: no usable slot), ``slots [B]`` used,
    ``starts [B]`` how many starts were iterated, ``iterations`` IRLS steps taken."""

    xy: torch.Tensor
    cost: torch.Tensor
    slots: torch.Tensor
    starts: int = 0
    iterations: int = 0


class _Slots(NamedTuple):
    """The usable slots of a batch, broadcast against ``[B, M]`` starts: ``q [B, 1, K, 2]`` site
    positions, ``r`` / ``aoa [B, 1, K]`` range [m] and AoA [rad], ``w_r`` / ``w_a [B, 1, K]`` weights
    (reports averaged; 0: unusable)."""

    q: torch.Tensor
    r: torch.Tensor
    aoa: torch.Tensor
    w_r: torch.Tensor
    w_a: torch.Tensor


def _cost_and_step(p, sl: _Slots, cfg: MultilaterationConfig, need_step: bool):
    """Cost ``[B, M]`` at ``p [B, M, 2]`` and the IRLS Gauss-Newton step ``[B, M, 2]`` (or None)."""
    c2 = cfg.robust_scale ** 2
    dxy = sl.q - p.unsqueeze(2)  # [B, M, K, 2] UE -> site
    dist = dxy.norm(dim=-1).clamp(min=0.1)
    z_r = (dist - sl.r) / cfg.sigma_range_m
    bearing = torch.atan2(dxy[..., 1], dxy[..., 0])
    d_a = torch.remainder(bearing - sl.aoa + math.pi, 2 * math.pi) - math.pi
    z_a = d_a / math.radians(cfg.sigma_aoa_deg)
    late = z_r <= 0  # the path was longer than the distance: NLOS excess delay, tolerated (Cauchy)
    rho_r = torch.where(late, c2 * torch.log1p(z_r * z_r / c2), z_r * z_r)  # farther than the path allows: quadratic
    cost = (rho_r * sl.w_r).sum(-1) + (c2 * torch.log1p(z_a * z_a / c2) * sl.w_a).sum(-1)
    if not need_step:
        return cost, None
    # Jacobians w.r.t. p: d|p - q|/dp = -(dxy)/dist ; d bearing/dp = (dy, -dx) / dist^2
    j_r = -dxy / dist.unsqueeze(-1) / cfg.sigma_range_m
    j_a = torch.stack([dxy[..., 1], -dxy[..., 0]], -1) / (dist * dist).unsqueeze(-1) / math.radians(cfg.sigma_aoa_deg)
    wr = (sl.w_r * torch.where(late, 1 / (1 + z_r * z_r / c2), 1.0)).unsqueeze(-1)  # IRLS weights rho'(z) / 2z
    wa = (sl.w_a / (1 + z_a * z_a / c2)).unsqueeze(-1)
    g = (wr * j_r * z_r.unsqueeze(-1) + wa * j_a * z_a.unsqueeze(-1)).sum(2)  # [B, M, 2]
    outer = lambda j, w: (w.unsqueeze(-1) * j.unsqueeze(-1) * j.unsqueeze(-2)).sum(2)  # noqa: E731  [B, M, 2, 2]
    h = outer(j_r, wr) + outer(j_a, wa)
    h = h + 1e-6 * torch.eye(2, dtype=h.dtype, device=h.device)
    det = h[..., 0, 0] * h[..., 1, 1] - h[..., 0, 1] * h[..., 1, 0]
    step_x = -(h[..., 1, 1] * g[..., 0] - h[..., 0, 1] * g[..., 1]) / det
    step_y = -(h[..., 0, 0] * g[..., 1] - h[..., 1, 0] * g[..., 0]) / det
    return cost, torch.stack([step_x, step_y], -1)


def _pair_starts(q, r, aoa, ids, both_r, both_a) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts [B, 3P, 2], usable [B, 3P])`` for the ``P`` slot pairs of different sites: the two
    range-circle crossings (closest points when they miss) and the bearing-ray crossing."""
    k = q.shape[1]
    i, j = torch.triu_indices(k, k, 1)
    qi, qj, ri, rj = q[:, i], q[:, j], r[:, i], r[:, j]
    diff = ids[:, i] != ids[:, j]
    d_vec = qj - qi
    d = d_vec.norm(dim=-1).clamp(min=1e-6)
    e = d_vec / d.unsqueeze(-1)
    perp = torch.stack([-e[..., 1], e[..., 0]], -1)
    a = (ri * ri - rj * rj + d * d) / (2 * d)
    h = (ri * ri - a * a).clamp(min=0.0).sqrt()
    base = qi + a.unsqueeze(-1) * e
    circle = [base + h.unsqueeze(-1) * perp, base - h.unsqueeze(-1) * perp]
    ok_r = diff & both_r[:, i] & both_r[:, j]
    # rays p = q_i - t_i u_i = q_j - t_j u_j (t >= 0): solve [u_i, -u_j] (t_i, t_j) = q_i - q_j
    ui = torch.stack([torch.cos(aoa[:, i]), torch.sin(aoa[:, i])], -1)
    uj = torch.stack([torch.cos(aoa[:, j]), torch.sin(aoa[:, j])], -1)
    rhs = qi - qj
    det = -ui[..., 0] * uj[..., 1] + ui[..., 1] * uj[..., 0]
    safe = torch.where(det.abs() > 1e-6, det, torch.ones_like(det))
    t_i = (-rhs[..., 0] * uj[..., 1] + rhs[..., 1] * uj[..., 0]) / safe
    t_j = (ui[..., 0] * rhs[..., 1] - ui[..., 1] * rhs[..., 0]) / safe
    ray = qi - t_i.unsqueeze(-1) * ui
    ok_a = diff & both_a[:, i] & both_a[:, j] & (det.abs() > 1e-6) & (t_i >= 0) & (t_j >= 0)
    return torch.cat([*circle, ray], 1), torch.cat([ok_r, ok_r, ok_a], 1)


def multilaterate(site_xyz, site_ids, site_features, config: MultilaterationConfig | None = None,
                  bounds=None, weight=None) -> MultilaterationResult:
    """Robust ToA + AoA positioning (see the module doc).

    Args:
        site_xyz: ``[S, 3]`` site positions [m].
        site_ids: integer ``[B, K]`` (-1: empty slot).
        site_features: ``[B, K, 3]`` (path_gain [dB], toa [ns], aoa [deg]); NaN: absent.
        config: a :class:`MultilaterationConfig`.
        bounds: optional ``(x_min, y_min, x_max, y_max)`` the estimate is kept inside
            (the area of interest; the starts and every step are clamped to it; the grid
            starts need it).
        weight: optional ``[B, K, 3]`` reports averaged into each value (default 1).

    Returns a :class:`MultilaterationResult` (float64 tensors).
    """
    cfg = config or MultilaterationConfig()
    sites = torch.as_tensor(np.asarray(site_xyz, dtype=np.float64))
    ids = torch.as_tensor(np.asarray(site_ids)).long()
    feats = torch.as_tensor(np.asarray(site_features, dtype=np.float64))
    if sites.ndim != 2 or sites.shape[1] != 3 or ids.ndim != 2 or feats.shape != (*ids.shape, 3):
        raise CoreError(f"multilaterate: expected sites [S, 3], ids [B, K], features [B, K, 3]; got "
                        f"{tuple(sites.shape)}, {tuple(ids.shape)}, {tuple(feats.shape)}")
    if ids.numel() and int(ids.max()) >= len(sites):
        raise CoreError(f"multilaterate: site id {int(ids.max())} but only {len(sites)} sites")
    n_w = torch.ones(feats.shape, dtype=torch.float64) if weight is None else \
        torch.as_tensor(np.asarray(weight, dtype=np.float64)).nan_to_num().clamp(min=0.0)
    if n_w.shape != feats.shape:
        raise CoreError(f"multilaterate: weight must be {tuple(feats.shape)}, got {tuple(n_w.shape)}")
    real = ids >= 0
    q3 = sites[ids.clamp(min=0)]  # [B, K, 3]
    path = SPEED_OF_LIGHT * feats[..., 1] * 1e-9
    r = torch.sqrt((path * path - (q3[..., 2] - cfg.ue_height_m) ** 2).clamp(min=0.0))
    aoa = torch.deg2rad(feats[..., 2])
    has_r = real & torch.isfinite(r) & cfg.use_toa
    has_a = real & torch.isfinite(aoa) & cfg.use_aoa
    w_r, w_a = has_r * n_w[..., 1], has_a * n_w[..., 2]
    r, aoa = torch.nan_to_num(r), torch.nan_to_num(aoa)
    q = q3[..., :2]
    lo = hi = None
    if bounds is not None:
        lo = torch.tensor(bounds[:2], dtype=torch.float64)
        hi = torch.tensor(bounds[2:], dtype=torch.float64)
    clamp = (lambda v: v) if lo is None else (lambda v: torch.maximum(torch.minimum(v, hi), lo))  # noqa: E731
    sl = _Slots(q.unsqueeze(1), r.unsqueeze(1), aoa.unsqueeze(1), w_r.unsqueeze(1), w_a.unsqueeze(1))
    # starts: each slot's single-site fix (the site itself where it has no ToA or no AoA) ...
    fix = q - r.unsqueeze(-1) * torch.stack([torch.cos(aoa), torch.sin(aoa)], -1) * (has_r & has_a).unsqueeze(-1)
    starts, usable = [fix], [real & (has_r | has_a)]
    if cfg.pair_starts and q.shape[1] > 1:  # ... the pairwise crossings ...
        pairs, ok = _pair_starts(q, r, aoa, ids, has_r, has_a)
        starts.append(pairs)
        usable.append(ok)
    if cfg.grid_top and cfg.grid_step_m > 0 and lo is not None:  # ... and the coarse grid's best points
        starts.append(_grid_starts(sl, cfg, lo, hi))
        usable.append(torch.ones(starts[-1].shape[:2], dtype=torch.bool))
    p = clamp(torch.cat(starts, 1))  # [B, M, 2]
    usable = torch.cat(usable, 1)
    cost, step = _cost_and_step(p, sl, cfg, need_step=True)
    done = 0
    while done < cfg.iterations:
        done += 1
        best_cost, best_p = cost, p
        for scale in (1.0, 0.25):  # backtracking: keep the first scale that lowers the cost
            trial = clamp(p + scale * step.nan_to_num())
            c_trial, _ = _cost_and_step(trial, sl, cfg, need_step=False)
            better = c_trial < best_cost
            best_p = torch.where(better.unsqueeze(-1), trial, best_p)
            best_cost = torch.where(better, c_trial, best_cost)
        moved = float((best_p - p).norm(dim=-1).max()) if p.numel() else 0.0
        p = best_p
        cost, step = _cost_and_step(p, sl, cfg, need_step=True)
        if moved <= cfg.tol_m:
            break
    win = cost.masked_fill(~usable, math.inf).argmin(dim=1)
    rows = torch.arange(len(p))
    xy, final = p[rows, win], cost[rows, win]
    slots = (has_r | has_a).sum(1)
    none = slots == 0
    xy[none] = clamp(sites[:, :2].mean(0))
    final[none] = math.nan
    return MultilaterationResult(xy, final, slots, int(p.shape[1]), done)


def _grid_starts(sl: _Slots, cfg: MultilaterationConfig, lo, hi, chunk: int = 256) -> torch.Tensor:
    """``[B, grid_top, 2]``: the grid points (``grid_step_m`` apart, cell-centred in the bounds) of lowest
    cost, greedily at least two grid steps apart."""
    nx = max(1, int(math.ceil(float(hi[0] - lo[0]) / cfg.grid_step_m)))
    ny = max(1, int(math.ceil(float(hi[1] - lo[1]) / cfg.grid_step_m)))
    gx = lo[0] + (torch.arange(nx, dtype=torch.float64) + 0.5) * (hi[0] - lo[0]) / nx
    gy = lo[1] + (torch.arange(ny, dtype=torch.float64) + 0.5) * (hi[1] - lo[1]) / ny
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).reshape(-1, 2)  # [G, 2]
    out = []
    for s in range(0, sl.q.shape[0], chunk):
        part = _Slots(*(v[s:s + chunk] for v in sl))
        b = part.q.shape[0]
        cost, _ = _cost_and_step(grid.expand(b, -1, -1), part, cfg, need_step=False)  # [b, G]
        picks = []
        for _ in range(cfg.grid_top):
            best = cost.argmin(1)
            c = grid[best]
            picks.append(c)
            near = (grid.unsqueeze(0) - c.unsqueeze(1)).abs().amax(-1) < 2 * cfg.grid_step_m
            cost = cost.masked_fill(near, math.inf)
        out.append(torch.stack(picks, 1))
    return torch.cat(out) if out else torch.zeros(0, cfg.grid_top, 2, dtype=torch.float64)


def multilaterate_dataset(dataset, indices=None, site_xyz=None, config: MultilaterationConfig | None = None,
                          bounds=None, chunk: int = 1024) -> np.ndarray:
    """``[N, 2]`` multilateration of samples ``indices`` of a MeasurementDataset.

    The present reports within ``config.window_s`` of each sample's latest present report are
    pooled per site (:func:`core.physics.observation.site_observation`: the same observation as
    MAP's, each value weighted by the reports averaged into it). ``site_xyz`` defaults to the
    positions in ``dataset.attrs["sites"]``; ``bounds`` as in :func:`multilaterate`.
    """
    from core.physics.observation import site_observation

    cfg = config or MultilaterationConfig()
    if site_xyz is None:
        sites = dataset.attrs.get("sites") or []
        if not sites:
            raise CoreError("multilateration: the dataset has no attrs['sites'] and no site_xyz was given")
        site_xyz = np.array([s["position"] for s in sites], dtype=np.float64)
    idx = np.arange(dataset.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    obs = site_observation(dataset, idx, "latest", window_s=cfg.window_s)
    weight = None if obs.weight is None else obs.weight.numpy()
    out = [multilaterate(site_xyz, obs.site_ids[s:s + chunk].numpy(), obs.site[s:s + chunk].numpy(), cfg, bounds,
                         None if weight is None else weight[s:s + chunk]).xy.numpy()
           for s in range(0, len(idx), chunk)]
    return np.concatenate(out) if out else np.zeros((0, 2))
