"""Whole-walk estimation: the MAP trajectory of a walk's ``T`` reports under a pedestrian motion model.

A walk has reports ``r = 0 .. T-1`` at times ``t_r`` [s] and positions ``p_r`` [m]. Every
report is scored by the calibrated robust likelihood on its OWN position (no pooling:
:class:`~core.physics.likelihood.RobustLikelihood`, one row per report), and the positions
follow a constant velocity ``v`` with a small random-walk deviation. In nats::

    J(p, v) = sum_r NLL_r(p_r)                                                  (missing reports: 0)
            + sum_{r>0} |p_r - p_{r-1} - v dt_r|^2 / (2 q^2 dt_r)                (process noise q [m/sqrt(s)])
            + |v|^2 / (2 sigma_v^2)                                             (walking speed prior)
            + prior_nll(p_{T-1})                                                (the network's, if given)
            + |v - v_dev|^2 / (2 sigma_dev^2)                                     (the device's own motion, if given)

``v_dev`` is a velocity the phone measures itself (pedestrian dead reckoning: step length and
heading from its inertial sensors; no shipped dataset records one yet) with its std
``sigma_dev`` [m/s]; the optimisation then starts at it.

``sigma_v`` per axis makes the speed Rayleigh-distributed with its mode at ``sigma_v``
(1 m/s: a walking pace). The estimate is ``p_{T-1}``, the position of the label.

Parametrisation: ``p_r = p + v (t_r - t_{T-1}) + d_r`` with ``d_{T-1} = 0``, so the rigid
motion ``(p, v)`` moves all positions at once and the deviations ``d_r`` stay small
(the motion term reads ``|d_r - d_{r-1}|^2 / (2 q^2 dt_r)``). ``J`` is minimised batched
over walks with Adam (learning rate decaying as a cosine from ``lr_m`` to ``lr_m / 20``,
deviations at a tenth of it), each walk keeping the best point it visited.

Starts: one position per walk for ``p`` (``v = 0``, ``d = 0``); :func:`whole_walk` makes them
without a network by a global scan and the snapshot MAP search of the pooled window
(:class:`~core.physics.refinement.MapRefiner` with a flat prior), or takes the network +
MAP estimate, with the network's Gaussian as the prior on ``p_{T-1}``.

Basins (``WalkConfig.basins = K > 0``): the snapshot search ranks basins by the pooled window
alone; the walk scores all ``T`` reports and the motion, so it is the better judge between them.
The walk then also starts from up to ``K`` runner-up basins of that search
(:func:`runner_up_basins`: its other starts' best points, at least ``basin_separation_m`` from
the winner and from each other, whose posterior is within ``basin_margin_nats`` of the winner's),
and each walk keeps the start whose optimised ``J`` is lowest. Where one basin dominates (most
walks that hear three or more sites) nothing more is run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from core.errors import CoreError
from core.physics.bounded_scan import DEFAULT_BLOCK
from core.physics.observation import SiteObservation
from core.physics.prior import PositionPrior

__all__ = ["WalkConfig", "WalkResult", "WalkSmoother", "walk_observation", "scan_starts", "snapshot_search",
           "runner_up_basins", "whole_walk"]


@dataclass(frozen=True)
class WalkConfig:
    """Motion model, optimiser and no-network start settings (see the module doc)."""

    process_noise_m: float = 0.1  #: q [m/sqrt(s)]: deviation from constant velocity
    speed_sigma_mps: float = 1.0  #: sigma_v per axis [m/s]
    steps: int = 40  #: Adam steps
    lr_m: float = 0.3  #: first step size [m] (and m/s for the velocity)
    chunk_size: int = 512  #: walks per batch
    device_motion: bool = True  #: use the dataset's device-motion channel when it records one
    #: the no-network start's scan: lattice points per side of the blocks its lower bound prunes
    #: (:class:`~core.physics.bounded_scan.BoundedScan`, same picks as scoring every point); 0: score every point
    scan_block: int = DEFAULT_BLOCK
    basins: int = 0  #: runner-up basins of the snapshot search the walk also starts from (0: its one start)
    basin_margin_nats: float = 10.0  #: ... those whose snapshot posterior is within this of the winner's
    basin_separation_m: float = 10.0  #: ... at least this far from the winner and from each other

    def __post_init__(self) -> None:
        for name in ("process_noise_m", "speed_sigma_mps", "lr_m", "basin_margin_nats", "basin_separation_m"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise CoreError(f"whole-walk: {name} must be > 0, got {v}")
        if self.steps < 0 or self.chunk_size < 1 or self.scan_block < 0 or self.basins < 0:
            raise CoreError("whole-walk: steps must be >= 0, chunk_size >= 1, scan_block >= 0 and basins >= 0")


class WalkResult(NamedTuple):
    """``xy [N, 2]`` the position at the last report, ``path [N, T, 2]``, ``velocity [N, 2]`` [m/s],
    ``cost [N]`` J at the estimate [nats], ``seconds`` of the optimisation."""

    xy: torch.Tensor
    path: torch.Tensor
    velocity: torch.Tensor
    cost: torch.Tensor
    seconds: float


def walk_observation(dataset, indices) -> tuple[SiteObservation, np.ndarray]:
    """``(obs with N * T rows (walk-major), t [N, T] s)``: every report of ``dataset[indices]`` as its own row.

    A missing report has no slots (site ids -1, NaN features): it contributes 0 to the NLL.
    """
    idx = np.asarray(indices, dtype=np.int64)
    present = np.asarray(dataset.report_mask[idx])
    n, t_len = present.shape
    ids = np.where(present[..., None], dataset.site_ids[idx], -1).astype(np.int64)
    site = np.where(present[..., None, None], dataset.site_features[idx], np.nan).astype(np.float32)
    cell = np.where(present[..., None], dataset.cell_features[idx], np.nan).astype(np.float32)
    k = ids.shape[-1]
    room = present & ((ids >= 0).sum(-1) < k)  # a free slot: the sites the report lacks were not heard
    obs = SiteObservation(torch.from_numpy(ids.reshape(n * t_len, k)), torch.from_numpy(site.reshape(n * t_len, k, 3)),
                          torch.from_numpy(cell.reshape(n * t_len, -1)), room=torch.from_numpy(room.reshape(-1)))
    return obs, np.asarray(dataset.t[idx], dtype=np.float64)


class WalkSmoother:
    """The whole-walk MAP of the module doc over one likelihood; build once, call per batch of walks.

    ``smoother(obs [N * T rows], t [N, T], start [N, 2], prior=None, velocity=None, velocity_sigma=None,
    alternatives=None) -> WalkResult`` (``prior``: a :class:`~core.physics.prior.PositionPrior` on the last
    position, ``[N]``; ``velocity [N, 2]`` m/s and ``velocity_sigma`` (a number or ``[N]``, default 0.1) m/s:
    the device's own motion measurement; ``alternatives``: ``(points [N, K, 2], valid bool [N, K])``, more
    starts per walk (:func:`runner_up_basins`): each walk keeps the start whose ``J`` ends lowest).
    """

    def __init__(self, likelihood, config: WalkConfig | None = None) -> None:
        self.lik = likelihood
        self.config = config or WalkConfig()
        maps = likelihood.maps
        self.lo, self.hi = maps.lo, maps.hi

    def cost(self, p, v, d, tau, dt, prep, prior: PositionPrior | None, motion=None):
        """``J [B]`` (see the module doc) for ``p [B, 2]``, ``v [B, 2]``, deviations ``d [B, T, 2]``,
        ``tau [B, T]`` = t_r - t_{T-1}, ``dt [B, T-1]`` > 0; ``motion``: ``(v_dev [B, 2], sigma_dev [B])`` or None."""
        c = self.config
        b, t_len = tau.shape
        path = p[:, None] + v[:, None] * tau[..., None] + d
        path = torch.maximum(torch.minimum(path, self.hi), self.lo)
        nll = self.lik.evaluate(path.reshape(b * t_len, 2), prep).view(b, t_len).sum(1)
        step = (d[:, 1:] - d[:, :-1]).square().sum(-1)
        smooth = (step / (2 * c.process_noise_m**2 * dt)).sum(1)
        total = nll + smooth + v.square().sum(-1) / (2 * c.speed_sigma_mps**2)
        if prior is not None:
            total = total + prior.nll(path[:, -1])
        if motion is not None:
            total = total + (v - motion[0]).square().sum(-1) / (2 * motion[1].square())
        return total, path

    def _chunk(self, prep, tau, dt, start, prior, motion=None):
        c = self.config
        b, t_len = tau.shape
        p = start.clone().requires_grad_(True)
        v = (torch.zeros_like(start) if motion is None else motion[0].clone()).requires_grad_(True)
        d = torch.zeros(b, t_len, 2, dtype=start.dtype, device=start.device, requires_grad=True)
        keep = torch.ones(1, t_len, 1, dtype=start.dtype, device=start.device)
        keep[:, -1] = 0.0  # d_{T-1} = 0: p is the last position
        opt = torch.optim.Adam([{"params": [p, v]}, {"params": [d], "lr": 0.1 * c.lr_m}], lr=c.lr_m)
        base = [g["lr"] for g in opt.param_groups]
        best_j = torch.full((b,), math.inf, dtype=start.dtype, device=start.device)
        best_path = start[:, None].expand(b, t_len, 2).clone()
        best_v = v.detach().clone()
        for k in range(c.steps + 1):
            with torch.enable_grad():
                j, path = self.cost(p, v, d * keep, tau, dt, prep, prior, motion)
                better = j.detach() < best_j
                best_j = torch.where(better, j.detach(), best_j)
                best_path = torch.where(better[:, None, None], path.detach(), best_path)
                best_v = torch.where(better[:, None], v.detach(), best_v)
                if k == c.steps:
                    break
                opt.zero_grad(set_to_none=True)
                j.sum().backward()
            frac = 0.5 * (1 + math.cos(math.pi * k / max(c.steps, 1)))
            for g, lr in zip(opt.param_groups, base):
                g["lr"] = lr * (0.05 + 0.95 * frac)
            opt.step()
        return best_path, best_v, best_j

    def __call__(self, obs: SiteObservation, t, start, prior: PositionPrior | None = None, velocity=None,
                 velocity_sigma=None, alternatives=None) -> WalkResult:
        t0 = time.perf_counter()
        maps = self.lik.maps
        dt_, dev = maps.dtype, maps.device
        t = torch.as_tensor(np.asarray(t), dtype=torch.float64).to(dev, dt_)
        start = torch.as_tensor(start).to(dev, dt_)
        n, t_len = t.shape
        if start.shape != (n, 2) or obs.batch != n * t_len:
            raise CoreError(f"whole-walk: start must be [N, 2] and the observation N * T rows; got {tuple(start.shape)}, "
                            f"{obs.batch} rows for t {tuple(t.shape)}")
        steps = t[:, 1:] - t[:, :-1]
        if t_len > 1 and not bool((steps > 0).all()):
            raise CoreError("whole-walk: report times must increase along each walk")
        tau = t - t[:, -1:]
        motion = None
        if velocity is not None:
            v_dev = torch.as_tensor(np.asarray(velocity)).to(dev, dt_)
            sig = torch.as_tensor(np.asarray(0.1 if velocity_sigma is None else velocity_sigma)).to(dev, dt_)
            sig = sig.expand(n) if sig.ndim == 0 else sig
            if v_dev.shape != (n, 2) or sig.shape != (n,) or not bool((sig > 0).all()):
                raise CoreError(f"whole-walk: velocity must be [N, 2] m/s and velocity_sigma > 0 (a number or [N]); got "
                                f"{tuple(v_dev.shape)}, {tuple(sig.shape)}")
            motion = (v_dev, sig)
        path, vel, cost = self._walks(obs, tau, steps, start, prior, motion)
        if alternatives is not None:
            self._other_starts(alternatives, (path, vel, cost), obs, tau, steps, prior, motion)
        return WalkResult(path[:, -1], path, vel, cost, time.perf_counter() - t0)

    def _walks(self, obs, tau, steps, start, prior, motion):
        """``(path [N, T, 2], velocity [N, 2], J [N])`` of the walks from ``start [N, 2]``, in chunks."""
        n, t_len = tau.shape
        paths, vels, costs = [], [], []
        size = self.config.chunk_size
        for s in range(0, n, size):
            sl = slice(s, min(s + size, n))
            prep = self.lik.prepare(obs.take(slice(s * t_len, sl.stop * t_len)))
            pri = None if prior is None else prior.take(sl)
            mot = None if motion is None else (motion[0][sl], motion[1][sl])
            path, v, j = self._chunk(prep, tau[sl], steps[sl], start[sl], pri, mot)
            paths.append(path)
            vels.append(v)
            costs.append(j)
        if not paths:
            return start.new_zeros(0, t_len, 2), start.new_zeros(0, 2), start.new_zeros(0)
        return torch.cat(paths), torch.cat(vels), torch.cat(costs)

    def _other_starts(self, alternatives, best, obs, tau, steps, prior, motion) -> None:
        """The walks from ``alternatives = (points [N, K, 2], valid bool [N, K])`` too (only the valid ones);
        ``best = (path, velocity, J)`` keeps, per walk, the lowest ``J`` (updated in place)."""
        path, vel, cost = best
        n, t_len = tau.shape
        points = torch.as_tensor(alternatives[0]).to(path.device, path.dtype)
        valid = torch.as_tensor(alternatives[1]).to(path.device, torch.bool)
        if points.ndim != 3 or points.shape[0] != n or points.shape[2] != 2 or valid.shape != points.shape[:2]:
            raise CoreError(f"whole-walk: alternatives must be points [N, K, 2] and valid [N, K] for N = {n}; got "
                            f"{tuple(points.shape)}, {tuple(valid.shape)}")
        rows = torch.arange(t_len)
        for k in range(points.shape[1]):
            ids = torch.nonzero(valid[:, k]).squeeze(1)
            if len(ids) == 0:
                continue
            sub = obs.take((ids.cpu()[:, None] * t_len + rows).reshape(-1))
            p_k, v_k, j_k = self._walks(sub, tau[ids], steps[ids], points[ids, k], None if prior is None else prior.take(ids),
                                        None if motion is None else (motion[0][ids], motion[1][ids]))
            better = j_k < cost[ids]
            won = ids[better]
            path[won], vel[won], cost[won] = p_k[better], v_k[better], j_k[better]


@torch.no_grad()
def scan_starts(likelihood, obs: SiteObservation, step_m: float = 5.0, top: int = 6, blocks: int | None = None,
                chunk: int = 32, bound_block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``[N, top, 2]`` the ``top`` best distinct points of a scan of the likelihood alone.

    ``blocks=None``: every covered point of a lattice of ``step_m`` over the whole map (cell
    centres under it: :func:`~core.physics.bounded_scan.scan_lattice`) is a candidate for every
    observation. ``bound_block=n`` (default :data:`~core.physics.bounded_scan.DEFAULT_BLOCK`):
    coarse to fine without loss -- blocks of ``n x n`` lattice points whose lower bound cannot beat
    the ``top``-th pick are never scored, with the same picks
    (:class:`~core.physics.bounded_scan.BoundedScan`); ``bound_block=0``: every point is scored
    (:meth:`~core.physics.likelihood.RobustLikelihood.evaluate_shared`). ``blocks=n``: coarse to fine
    WITH loss -- the ``n`` best blocks of the global scan (:class:`~core.physics.map_scan.GlobalScan`,
    block statistics) and a grid of ``step_m`` over each. Picks are greedy, each removing the points
    within ``2 step_m`` of it.
    """
    from core.physics.bounded_scan import BoundedScan, scan_lattice
    from core.physics.map_scan import GlobalScan

    maps = likelihood.maps
    if int(bound_block) < 0:
        raise CoreError(f"whole-walk: bound_block must be >= 0, got {bound_block}")
    bounded = None
    if blocks is None:
        lattice = scan_lattice(maps, step_m)
        pts = lattice.points
        if bound_block:
            bounded = BoundedScan(likelihood, lattice, bound_block)
    else:
        scan = GlobalScan(likelihood)
        n = int(math.floor(0.5 * scan.block_m / step_m + 1e-9))
        r = torch.arange(-n, n + 1, dtype=maps.dtype, device=maps.device) * step_m
        gx, gy = torch.meshgrid(r, r, indexing="xy")
        offsets = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)  # [Q, 2]
    out = []
    for s in range(0, obs.batch, chunk):
        prep = likelihood.prepare(obs.take(slice(s, min(s + chunk, obs.batch))))
        if bounded is not None:
            out.append(bounded.top(prep, top, 2 * step_m))
            continue
        if blocks is None:
            cand = pts.unsqueeze(0)
            cost = likelihood.evaluate_shared(pts, prep)  # [B, P]
        else:
            centres = scan.top(prep, blocks)  # [B, n, 2]
            cand = (centres.unsqueeze(2) + offsets).flatten(1, 2)  # [B, n Q, 2]
            cand = torch.maximum(torch.minimum(cand, maps.hi), maps.lo)
            cost = likelihood.evaluate(cand, prep)
        b = cost.shape[0]
        picks = []
        for _ in range(top):
            arg = cost.argmin(dim=1)
            best = cand.expand(b, -1, 2)[torch.arange(b), arg]  # [B, 2]
            picks.append(best)
            cost.masked_fill_((cand - best.unsqueeze(1)).norm(dim=-1) <= 2 * step_m, math.inf)
        out.append(torch.stack(picks, 1))
    return torch.cat(out) if out else maps.lo.new_zeros(0, top, 2)


def snapshot_search(refiner, obs: SiteObservation, step_m: float = 5.0, top: int = 6,
                    blocks: int | None = None, bound_block: int = DEFAULT_BLOCK):
    """The snapshot MAP search without a network (a :class:`~core.physics.refinement.MapResult`; its ``xy [N, 2]``
    the positions): the best points of a scan (:func:`scan_starts`), then the MAP search
    (:class:`~core.physics.refinement.MapRefiner`) around the best (its window) and the others (as centres),
    with a flat prior."""
    starts = scan_starts(refiner.lik, obs, step_m, top, blocks, bound_block=bound_block)
    mu = starts[:, 0]
    return refiner(mu, torch.full_like(mu, 1.0e4), obs, centres=starts[:, 1:])


@torch.no_grad()
def runner_up_basins(xy, posterior, starts, start_posterior, count: int, margin_nats: float = 10.0,
                     separation_m: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(points [N, count, 2], valid bool [N, count])``: a MAP search's runner-up basins, best first.

    ``xy [N, 2]`` and ``posterior [N]``: the search's winner and its ``J`` [nats]; ``starts [N, M, 2]`` and
    ``start_posterior [N, M]``: each start's best point and its ``J`` (NaN: not searched). A start is a basin
    when ``start_posterior - posterior < margin_nats`` and it lies more than ``separation_m`` from ``xy`` and
    from every basin picked before it (greedy, lowest ``J`` first). Invalid slots hold ``xy``.
    """
    xy, post = torch.as_tensor(xy), torch.as_tensor(posterior)
    pts, sp = torch.as_tensor(starts).to(xy.dtype), torch.as_tensor(start_posterior).to(post.dtype)
    n, m = sp.shape
    if xy.shape != (n, 2) or post.shape != (n,) or pts.shape != (n, m, 2) or count < 0:
        raise CoreError(f"basins: xy [N, 2], posterior [N], starts [N, M, 2], start_posterior [N, M] and count >= 0; "
                        f"got {tuple(xy.shape)}, {tuple(post.shape)}, {tuple(pts.shape)}, {tuple(sp.shape)}, {count}")
    free = torch.isfinite(sp) & (sp - post[:, None] < margin_nats)
    free &= (pts - xy[:, None]).norm(dim=-1) > separation_m
    score = torch.where(free, sp, torch.full_like(sp, math.inf))
    points = xy[:, None].repeat(1, count, 1)
    valid = torch.zeros(n, count, dtype=torch.bool, device=xy.device)
    rows = torch.arange(n, device=xy.device)
    for k in range(count):
        arg = score.argmin(dim=1)
        ok = torch.isfinite(score[rows, arg])
        pick = pts[rows, arg]
        points[:, k] = torch.where(ok[:, None], pick, xy)
        valid[:, k] = ok
        near = (pts - pick[:, None]).norm(dim=-1) <= separation_m
        score = score.masked_fill(near & ok[:, None], math.inf)
    return points, valid


def whole_walk(dataset, indices, refiner, config: WalkConfig | None = None, window_s: float = 1.0,
               start=None, prior: PositionPrior | None = None, velocity=None, velocity_sigma=None,
               alternatives=None) -> WalkResult:
    """The whole-walk estimate of walks ``dataset[indices]`` (see the module doc).

    ``refiner``: a :class:`~core.physics.refinement.MapRefiner` over the calibrated likelihood
    (its likelihood scores the reports). ``start [N, 2]``: where to start (e.g. network + MAP);
    None: :func:`snapshot_search` on the reports pooled over ``window_s`` (no network), and with
    ``config.basins`` its runner-up basins as ``alternatives``. ``alternatives``: ``(points [N, K, 2],
    valid [N, K])`` more starts (:func:`runner_up_basins` of the network + MAP search), see :class:`WalkSmoother`.
    ``prior``: the network's prior on the last position, or None. ``velocity``, ``velocity_sigma``:
    the device's motion measurement (see :class:`WalkSmoother`); by default the dataset's device-motion
    channel when it records one and ``config.device_motion`` (:func:`~core.stores.motion_model.velocity_measurement`).
    ``seconds``: the whole call
    (the snapshot start included).
    """
    from core.physics.observation import site_observation

    t0 = time.perf_counter()
    config = config or WalkConfig()
    if start is None:
        search = snapshot_search(refiner, site_observation(dataset, indices, window_s=window_s),
                                 bound_block=config.scan_block)
        start = search.xy
        if config.basins:
            alternatives = runner_up_basins(search.xy, search.posterior, search.starts, search.start_posterior,
                                            config.basins, config.basin_margin_nats, config.basin_separation_m)
    obs, t = walk_observation(dataset, indices)
    if velocity is None and config.device_motion and dataset.motion is not None:
        from core.stores.motion_model import velocity_measurement

        idx = np.asarray(indices)
        velocity, velocity_sigma = velocity_measurement(dataset.motion[idx], dataset.t[idx],
                                                        dataset.measurement_model.motion)
    result = WalkSmoother(refiner.lik, config)(obs, t, start, prior, velocity, velocity_sigma, alternatives)
    return result._replace(seconds=time.perf_counter() - t0)
