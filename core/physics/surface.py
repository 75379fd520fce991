"""The likelihood and posterior of ONE sample on a grid of positions: what an inspector draws.

For a sample's observation and prior, on the grid ``x_j = cx + j h``, ``y_i = cy + i h``
(``|j h|, |i h| <= half``)::

    nll[i, j]       = NLL(x_j, y_i)                       (RobustLikelihood, nats)
    site[k, i, j]   = sum_f NLL term of slot k, feature f    (its coverage mix included)
    cell[i, j]      = sum_c NLL term of serving feature c
    silence[i, j]   = the silence term: what the sites the sample did NOT hear add
                      (:mod:`core.physics.silence`; None when the likelihood has none)
    prior[i, j]     = prior_nll(x_j, y_i)                 (0 without a prior)
    posterior[i, j] = nll + prior

so ``nll = sum_k site[k] + cell (+ silence)`` (the terms of :meth:`RobustLikelihood.terms`). Points
outside the map's bounds are NaN in every layer (the lookup would clamp them to the
border). The grid is evaluated in chunks of ``chunk`` points; the observation is
prepared once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from core.errors import CoreError

__all__ = ["LikelihoodSurface", "likelihood_surface", "MAX_POINTS_PER_SIDE"]

#: a surface has at most this many points per side (the step grows to fit)
MAX_POINTS_PER_SIDE = 161


class LikelihoodSurface(NamedTuple):
    """One sample's surfaces (numpy, float64): xs ``[W]``, ys ``[H]`` [m]; nll, prior,
    posterior, cell ``[H, W]`` and site ``[K, H, W]`` [nats], NaN outside the map; site_ids
    ``[K]`` (-1 empty slot); step [m]; silence ``[H, W]`` [nats] the silence term, None when the
    likelihood or the observation has none."""

    xs: np.ndarray
    ys: np.ndarray
    nll: np.ndarray
    prior: np.ndarray
    posterior: np.ndarray
    site: np.ndarray
    cell: np.ndarray
    site_ids: np.ndarray
    step: float
    silence: np.ndarray | None = None


@torch.no_grad()
def likelihood_surface(likelihood, obs, centre, half_m: float, step_m: float | None = None, prior=None,
                       chunk: int = 8192) -> LikelihoodSurface:
    """The surfaces of the module doc for ONE sample.

    Args:
        likelihood: a :class:`~core.physics.likelihood.RobustLikelihood`.
        obs: a :class:`~core.physics.observation.SiteObservation` of one sample (``B = 1``).
        centre: ``(x, y)`` [m] of the grid's centre.
        half_m: half-width of the square grid [m].
        step_m: grid step [m] (None: ``2 half / (MAX_POINTS_PER_SIDE - 1)``; never finer
            than that).
        prior: a :class:`~core.physics.prior.PositionPrior` of that sample, or None.
    """
    if obs.batch != 1:
        raise CoreError(f"likelihood surface: one sample at a time, got {obs.batch}")
    if not (half_m > 0 and math.isfinite(half_m)):
        raise CoreError(f"likelihood surface: half-width must be > 0 m, got {half_m}")
    finest = 2.0 * half_m / (MAX_POINTS_PER_SIDE - 1)
    step = max(float(step_m) if step_m else finest, finest)
    n = int(math.floor(half_m / step + 1e-9))
    offsets = np.arange(-n, n + 1) * step
    xs, ys = float(centre[0]) + offsets, float(centre[1]) + offsets
    gx, gy = np.meshgrid(xs, ys, indexing="xy")  # [H, W]: row i is y_i
    maps = likelihood.maps
    pts = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=maps.dtype, device=maps.device)
    prep = likelihood.prepare(obs)
    total, site, cell, silent = [], [], [], []
    for s in range(0, len(pts), chunk):
        xy = pts[s:s + chunk]
        t = likelihood.terms(xy, prep.take(torch.zeros(len(xy), dtype=torch.long, device=maps.device)))
        total.append(t.total)
        site.append(t.site.sum(-1))
        cell.append(t.cell.sum(-1))
        silent.append(t.silence)
    shape = gx.shape
    to = lambda parts: torch.cat(parts).double().cpu().numpy()  # noqa: E731
    nll = to(total).reshape(shape)
    site_n = to(site).T.reshape(-1, *shape)
    pri = np.zeros(shape) if prior is None else prior.nll(pts.unsqueeze(0))[0].double().cpu().numpy().reshape(shape)
    x0, y0, x1, y1 = maps.bounds
    outside = (gx < x0) | (gx > x1) | (gy < y0) | (gy > y1)
    cell_n = to(cell).reshape(shape)
    silence = to(silent).reshape(shape) if prep.unheard is not None else None
    for layer in (nll, pri, cell_n) + (() if silence is None else (silence,)):
        layer[outside] = np.nan
    site_n[:, outside] = np.nan
    return LikelihoodSurface(xs, ys, nll, pri, nll + pri, site_n, cell_n, obs.site_ids[0].cpu().numpy(), step,
                             silence)
