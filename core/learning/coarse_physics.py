"""The coarse physics term: the map likelihood's posterior over the model's coarse cells.

The fine (offset) part of the physics term cannot change which cell the network picks. This
part does. For a train walk with observation ``o`` the map likelihood alone (no network) gives
each of the model's ``G x G`` coarse cells ``c`` the score::

    NLL_c = min_{p in P_c} NLL(p | o)          P_c: an s x s sub-grid of points in cell c
    q(c)  = softmax_c(-NLL_c / T)              (uniform prior over cells, temperature T)

``NLL`` is the calibrated robust per-site likelihood (:class:`~core.physics.likelihood.RobustLikelihood`,
the same one as the offset term). ``q`` is computed ONCE before training, without gradient, in
chunks of walks (memory bounded by :data:`CHUNK_ELEMENTS`), and only its ``k`` largest entries
are kept (renormalised; memory ``O(N k)`` instead of ``O(N G^2)``). Training then adds to the
physics term, per walk that carries ``q``::

    L_coarse_phys = - sum_c q(c) log softmax(logits)(c)          (cross-entropy to the physics posterior)

whose gradient reaches the coarse head (logits) and, through it, the trunk -- like the
supervised ``L_coarse`` with a soft label.

The cell alone leaves the fine head to the few labelled walks. The MODE part gives it the
unlabelled walks too: in each walk's most likely cell ``c*`` the likelihood's best point of a
finer ``m x m`` sub-grid, ``p* = argmin_{p in P_m(c*)} NLL(p | o)``, is the target of the fine
head evaluated at ``c*``, with the supervised fine loss's Gaussian NLL, weighted by ``q(c*)``::

    L_mode = sum_n q_n(c*) * 0.5 * mean_xy(logvar + (off(p*) - offset(c*))^2 / exp(logvar)) / N_post

On etoile (5 % labels, 15,200 unlabelled train walks) ``c*`` is the true cell for 86 % of the
walks and ``p*`` lies 1.25 m (median; P90 3.3 m) from the true position, at 8 x 8 points per
16 m cell, computed in 1.5 s.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

#: at most this many (site, walk, point) elements per chunk of the precomputation
CHUNK_ELEMENTS = 1 << 22


def cell_subpoints(bounds, grid: int, subgrid: int) -> torch.Tensor:
    """``[G*G*s*s, 2]`` points [m]: an ``s x s`` sub-grid centred in each cell, cell-major in the
    model's order (cell ``i * G + j``, row ``i`` along +y), sub-points at ``(k + 0.5) / s`` of the cell."""
    x_min, y_min, x_max, y_max = (float(v) for v in bounds)
    w, h = (x_max - x_min) / grid, (y_max - y_min) / grid
    u = (torch.arange(subgrid, dtype=torch.float64) + 0.5) / subgrid
    sy, sx = torch.meshgrid(u, u, indexing="ij")
    sub = torch.stack([sx.ravel(), sy.ravel()], -1)  # [s*s, 2] in cell units
    i, j = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")
    corner = torch.stack([j.ravel(), i.ravel()], -1)  # [G*G, 2] (x, y) in cell units
    pts = (corner[:, None] + sub[None]) * torch.tensor([w, h], dtype=torch.float64)
    return (pts + torch.tensor([x_min, y_min], dtype=torch.float64)).reshape(-1, 2)


@torch.no_grad()
def cell_posterior(likelihood, obs, bounds, grid: int, subgrid: int = 3, temperature: float = 1.0,
                   topk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cells long [N, k], q float32 [N, k])``: the ``k`` most likely coarse cells of each walk of
    ``obs`` (a :class:`~core.physics.observation.SiteObservation`) and their probabilities (sum 1)."""
    points = cell_subpoints(bounds, grid, subgrid).to(likelihood.maps.device, likelihood.maps.dtype)
    n, n_cells, n_sub = obs.site_ids.shape[0], grid * grid, subgrid * subgrid
    k = min(topk, n_cells)
    chunk = max(1, CHUNK_ELEMENTS // (points.shape[0] * (likelihood.maps.num_sites + 1)))
    cells, probs = torch.empty(n, k, dtype=torch.long), torch.empty(n, k, dtype=torch.float32)
    for s in range(0, n, chunk):
        idx = torch.arange(s, min(s + chunk, n))
        nll = likelihood.evaluate_shared(points, likelihood.prepare(obs.take(idx)))  # [b, P]
        cost = nll.view(len(idx), n_cells, n_sub).amin(-1).double()
        logq = torch.log_softmax(-cost / temperature, dim=-1)
        top, at = logq.topk(k, dim=-1)
        cells[idx], probs[idx] = at.cpu(), torch.softmax(top, dim=-1).float().cpu()
    return cells, probs


@torch.no_grad()
def cell_mode(likelihood, obs, cells: torch.Tensor, bounds, grid: int, subgrid: int = 8,
              chunk: int = 512) -> torch.Tensor:
    """``float32 [N, 2]`` [m]: for each walk of ``obs``, the point of lowest NLL among an ``m x m``
    sub-grid centred in its cell ``cells[N]`` (cell ``i * G + j``, the model's order)."""
    per_cell = cell_subpoints(bounds, grid, subgrid).view(grid * grid, subgrid * subgrid, 2)  # [G*G, m*m, 2]
    out = torch.empty(len(cells), 2, dtype=torch.float32)
    for s in range(0, len(cells), chunk):
        idx = torch.arange(s, min(s + chunk, len(cells)))
        pts = per_cell[cells[idx]].to(likelihood.maps.device, likelihood.maps.dtype)  # [b, m*m, 2]
        part = obs.take(idx)
        nll = torch.stack([likelihood(pts[:, k], part) for k in range(pts.shape[1])], 1)  # [b, m*m]
        out[idx] = pts[torch.arange(len(idx)), nll.argmin(1)].float().cpu()
    return out


def attach_cell_posterior(data, likelihood, bounds, grid: int, config) -> dict[str, float]:
    """Compute ``q`` for the walks of ``data`` (a TensorData) that get the coarse term -- the unlabelled
    ones, or all with ``physics_loss.coarse_on_labelled`` -- and store it as ``data.phys_cells`` /
    ``data.phys_q`` (``q = 0`` rows for the others), and with ``physics_loss.mode_weight > 0`` the mode
    of the most likely cell as ``data.phys_xy``. Returns ``{"walks", "seconds"}`` (the one-off cost)."""
    from core.physics.observation import SiteObservation

    p = config.physics_loss
    t0 = time.perf_counter()
    use = torch.ones(len(data), dtype=torch.bool) if p.coarse_on_labelled else ~data.labeled
    idx = torch.nonzero(use).flatten()
    k = min(p.coarse_topk, grid * grid)
    data.phys_cells = torch.zeros(len(data), k, dtype=torch.long)
    data.phys_q = torch.zeros(len(data), k, dtype=torch.float32)
    if len(idx):
        obs = SiteObservation(data.obs_site_ids[idx], data.obs_site[idx], data.obs_cell[idx], data.obs_weight[idx])
        cells, q = cell_posterior(likelihood, obs, bounds, grid, p.coarse_subgrid, p.coarse_temperature, k)
        data.phys_cells[idx], data.phys_q[idx] = cells, q
    if p.mode_weight > 0:
        data.phys_xy = torch.zeros(len(data), 2, dtype=torch.float32)
        if len(idx):
            data.phys_xy[idx] = cell_mode(likelihood, obs, cells[:, 0], bounds, grid, p.mode_subgrid)
    return {"walks": int(len(idx)), "seconds": time.perf_counter() - t0}


def coarse_physics_term(logits: torch.Tensor, cells: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over the walks with a posterior (``q.sum(1) > 0``) of ``-sum_c q(c) log softmax(logits)(c)``
    (0, still in the graph, when there are none)."""
    logp = F.log_softmax(logits, dim=-1).gather(1, cells.to(logits.device))
    per = -(q.to(logp.dtype) * logp).sum(1)
    have = q.sum(1) > 0
    return per.sum() / have.sum().clamp(min=1)


def mode_term(offset: torch.Tensor, logvar: torch.Tensor, target_offset: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``L_mode``: ``sum_n w_n * 0.5 * mean_xy(logvar + (target - offset)^2 / exp(logvar)) / #(w > 0)``;
    ``offset``, ``logvar``, ``target_offset`` ``[B, 2]`` in cell units (the fine head at the mode's
    cell, and the mode there), ``weight [B]`` (``q(c*)``; 0 = walk left out). 0, in the graph, when none."""
    per = (0.5 * (logvar + (target_offset - offset).pow(2) * torch.exp(-logvar))).mean(-1)
    return (weight.to(per.dtype) * per).sum() / (weight > 0).sum().clamp(min=1)
