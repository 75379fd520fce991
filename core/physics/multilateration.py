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

    C(p) = sum_k  rho_r((|p - q_k| - r_k) / sigma_r) + rho(wrap(phi_k(p) - aoa_k) / sigma_a)
    phi_k(p) = atan2(q_k,y - y, q_k,x - x)                         (the bearing UE -> site)

with the Cauchy ``rho(z) = log(1 + z^2)``: non-line-of-sight slots (AoA from a reflection,
ToA late by a detour) are outliers whose influence redescends. The range term is
one-sided: a path is never shorter than the straight line, so ``r_k`` is an upper bound
on the distance; ``rho_r(z) = log(1 + z^2)`` for ``z <= 0`` (a late, NLOS path) but
``z^2`` for ``z > 0`` (the UE farther than its path allows: only noise can do that).
On the shipped etoile test split this cut the 90th percentile error several-fold over a
symmetric Cauchy range term. Minimisation is
multi-start iteratively reweighted Gauss-Newton (IRLS, Cauchy weights ``1 / (1 + z^2)``)
with a backtracking step: the starts are every slot's single-site fix
``q_k - r_k (cos aoa_k, sin aoa_k)`` (one site's ToA and AoA already pin a point), the
lowest final cost wins. Slots with site id -1 or NaN features contribute nothing; a
sample with no usable slot gets the sites' centroid and ``cost = nan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from core.errors import CoreError

__all__ = ["MultilaterationConfig", "MultilaterationResult", "multilaterate", "multilaterate_dataset",
           "SPEED_OF_LIGHT"]

SPEED_OF_LIGHT = 299_792_458.0  # m/s


@dataclass(frozen=True)
class MultilaterationConfig:
    """``sigma_range_m`` / ``sigma_aoa_deg``: scales of the range and bearing residuals;
    ``use_toa`` / ``use_aoa``; ``iterations`` of IRLS; ``ue_height_m``; ``window_s``: the
    present reports within this many seconds of a sample's latest one are pooled (the UE
    moves little in between; 0: the latest report only)."""

    sigma_range_m: float = 2.0
    sigma_aoa_deg: float = 3.0
    use_toa: bool = True
    use_aoa: bool = True
    iterations: int = 12
    ue_height_m: float = 1.5
    window_s: float = 0.5

    def __post_init__(self) -> None:
        if not (self.sigma_range_m > 0 and self.sigma_aoa_deg > 0 and self.iterations >= 0 and self.window_s >= 0):
            raise CoreError("multilateration: sigmas must be > 0, iterations >= 0, window_s >= 0")
        if not (self.use_toa or self.use_aoa):
            raise CoreError("multilateration: use ToA, AoA or both")


class MultilaterationResult(NamedTuple):
    """``xy [B, 2]`` estimates [m], ``cost [B]`` robust cost there (nan: no usable slot), ``slots [B]`` used."""

    xy: torch.Tensor
    cost: torch.Tensor
    slots: torch.Tensor


def _cost_and_step(p, q, r, aoa, w_r, w_a, cfg, need_step: bool):
    """Cost ``[B, M]`` at ``p [B, M, 2]`` and the IRLS Gauss-Newton step ``[B, M, 2]`` (or None).

    ``q [B, 1, K, 2]`` site positions, ``r``/``aoa [B, 1, K]`` range [m] and AoA [rad],
    ``w_r``/``w_a [B, 1, K]`` 0/1 usable.
    """
    dxy = q - p.unsqueeze(2)  # [B, M, K, 2] UE -> site
    dist = dxy.norm(dim=-1).clamp(min=0.1)
    z_r = (dist - r) / cfg.sigma_range_m
    bearing = torch.atan2(dxy[..., 1], dxy[..., 0])
    d_a = torch.remainder(bearing - aoa + math.pi, 2 * math.pi) - math.pi
    z_a = d_a / math.radians(cfg.sigma_aoa_deg)
    late = z_r <= 0  # the path was longer than the distance: NLOS excess delay, tolerated (Cauchy)
    rho_r = torch.where(late, torch.log1p(z_r * z_r), z_r * z_r)  # farther than the path allows: quadratic
    cost = (rho_r * w_r).sum(-1) + (torch.log1p(z_a * z_a) * w_a).sum(-1)
    if not need_step:
        return cost, None
    # Jacobians w.r.t. p: d|p - q|/dp = -(dxy)/dist ; d bearing/dp = (dy, -dx) / dist^2
    j_r = -dxy / dist.unsqueeze(-1) / cfg.sigma_range_m
    j_a = torch.stack([dxy[..., 1], -dxy[..., 0]], -1) / (dist * dist).unsqueeze(-1) / math.radians(cfg.sigma_aoa_deg)
    wr = (w_r * torch.where(late, 1 / (1 + z_r * z_r), 1.0)).unsqueeze(-1)  # IRLS weights rho'(z) / 2z
    wa = (w_a / (1 + z_a * z_a)).unsqueeze(-1)
    g = (wr * j_r * z_r.unsqueeze(-1) + wa * j_a * z_a.unsqueeze(-1)).sum(2)  # [B, M, 2]
    outer = lambda j, w: (w.unsqueeze(-1) * j.unsqueeze(-1) * j.unsqueeze(-2)).sum(2)  # noqa: E731  [B, M, 2, 2]
    h = outer(j_r, wr) + outer(j_a, wa)
    h = h + 1e-6 * torch.eye(2, dtype=h.dtype, device=h.device)
    det = h[..., 0, 0] * h[..., 1, 1] - h[..., 0, 1] * h[..., 1, 0]
    step_x = -(h[..., 1, 1] * g[..., 0] - h[..., 0, 1] * g[..., 1]) / det
    step_y = -(h[..., 0, 0] * g[..., 1] - h[..., 1, 0] * g[..., 0]) / det
    return cost, torch.stack([step_x, step_y], -1)


def multilaterate(site_xyz, site_ids, site_features, config: MultilaterationConfig | None = None,
                  bounds=None) -> MultilaterationResult:
    """Robust ToA + AoA positioning (see the module doc).

    Args:
        site_xyz: ``[S, 3]`` site positions [m].
        site_ids: integer ``[B, K]`` (-1: empty slot).
        site_features: ``[B, K, 3]`` (path_gain [dB], toa [ns], aoa [deg]); NaN: absent.
        config: a :class:`MultilaterationConfig`.
        bounds: optional ``(x_min, y_min, x_max, y_max)`` the estimate is kept inside
            (the area of interest; the starts and every step are clamped to it).

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
    real = ids >= 0
    q3 = sites[ids.clamp(min=0)]  # [B, K, 3]
    path = SPEED_OF_LIGHT * feats[..., 1] * 1e-9
    r = torch.sqrt((path * path - (q3[..., 2] - cfg.ue_height_m) ** 2).clamp(min=0.0))
    aoa = torch.deg2rad(feats[..., 2])
    w_r = (real & torch.isfinite(r) & cfg.use_toa).double()
    w_a = (real & torch.isfinite(aoa) & cfg.use_aoa).double()
    r, aoa = torch.nan_to_num(r), torch.nan_to_num(aoa)
    q = q3[..., :2]
    # starts: each slot's single-site fix (the site itself where it has no ToA or no AoA)
    fix = q - r.unsqueeze(-1) * torch.stack([torch.cos(aoa), torch.sin(aoa)], -1) * (w_r * w_a).unsqueeze(-1)
    lo = hi = None
    if bounds is not None:
        lo = torch.tensor(bounds[:2], dtype=torch.float64)
        hi = torch.tensor(bounds[2:], dtype=torch.float64)
    clamp = (lambda v: v) if lo is None else (lambda v: torch.maximum(torch.minimum(v, hi), lo))  # noqa: E731
    p = clamp(fix)  # [B, M = K, 2]
    args = (q.unsqueeze(1), r.unsqueeze(1), aoa.unsqueeze(1), w_r.unsqueeze(1), w_a.unsqueeze(1), cfg)
    cost, step = _cost_and_step(p, *args, need_step=True)
    for _ in range(cfg.iterations):
        best_cost, best_p = cost, p
        for scale in (1.0, 0.25):  # backtracking: keep the first scale that lowers the cost
            trial = clamp(p + scale * step.nan_to_num())
            c_trial, _ = _cost_and_step(trial, *args, need_step=False)
            better = c_trial < best_cost
            best_p = torch.where(better.unsqueeze(-1), trial, best_p)
            best_cost = torch.where(better, c_trial, best_cost)
        p = best_p
        cost, step = _cost_and_step(p, *args, need_step=True)
    win = cost.argmin(dim=1)
    rows = torch.arange(len(p))
    xy, final = p[rows, win], cost[rows, win]
    slots = ((w_r + w_a) > 0).sum(1)
    none = slots == 0
    xy[none] = clamp(sites[:, :2].mean(0))
    final[none] = math.nan
    return MultilaterationResult(xy, final, slots)


def multilaterate_dataset(dataset, indices=None, site_xyz=None, config: MultilaterationConfig | None = None,
                          bounds=None, chunk: int = 8192) -> np.ndarray:
    """``[N, 2]`` multilateration of samples ``indices`` of a MeasurementDataset.

    The slots of the present reports within ``config.window_s`` of each sample's latest
    present report are pooled. ``site_xyz`` defaults to the positions in
    ``dataset.attrs["sites"]``; ``bounds`` as in :func:`multilaterate`.
    """
    cfg = config or MultilaterationConfig()
    if site_xyz is None:
        sites = dataset.attrs.get("sites") or []
        if not sites:
            raise CoreError("multilateration: the dataset has no attrs['sites'] and no site_xyz was given")
        site_xyz = np.array([s["position"] for s in sites], dtype=np.float64)
    idx = np.arange(dataset.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    present = dataset.report_mask[idx]
    t = np.where(present, dataset.t[idx], -np.inf)
    keep = present & (t >= t.max(axis=1, keepdims=True) - cfg.window_s - 1e-6)  # [N, T]
    n, r = len(idx), max(int(keep.sum(axis=1).max()) if len(idx) else 1, 1)
    pos = np.argsort(~keep, axis=1, kind="stable")[:, :r]  # the kept reports first
    rows = np.arange(n)[:, None]
    kept = keep[rows, pos]
    ids = np.where(kept[..., None], dataset.site_ids[idx][rows, pos], -1).reshape(n, -1)
    feats = np.where(kept[..., None, None], dataset.site_features[idx][rows, pos], np.nan).reshape(n, -1, 3)
    out = [multilaterate(site_xyz, ids[s:s + chunk], feats[s:s + chunk], cfg, bounds).xy.numpy()
           for s in range(0, n, chunk)]
    return np.concatenate(out) if out else np.zeros((0, 2))
