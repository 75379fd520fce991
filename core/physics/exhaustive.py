"""Exhaustive map matching: the calibrated likelihood searched over the WHOLE map, no network.

The strongest map-only baseline: the same objective as test-time MAP refinement (the calibrated
robust likelihood :class:`~core.physics.likelihood.RobustLikelihood` of the reports pooled over
the one report window), with no prior and no network start. Coarse to fine, per sample:

1. **scan**: the exact NLL at every point of a grid ``step_m`` apart over the map (cell-centred,
   only where some site has a path: :meth:`SiteMaps.coverage`), keeping the ``top`` best points,
   greedily at least two steps apart (``O(G S)`` per sample for ``G`` grid points: 65,536 at
   2 m on a 512 m map);
2. **search** them with :class:`~core.physics.refinement.MapRefiner` under a flat prior
   (``sigma = FLAT_SIGMA_M``; its NLL varies by < 0.01 nats over a kilometre): the best point
   is the window start, the others centre starts, each a grid of ``+-step_m`` at ``step_m / 2``,
   then the pattern search down to ``fine_step_m`` (0.5 m) from every start and the Adam polish
   of the best (``MapSearchConfig``; its block-statistics global stage,
   :class:`~core.physics.map_scan.GlobalScan`, is off: the dense scan replaces it -- ranking
   16 m blocks by their statistics missed the true block for 1.4 % of the val UEs, the dense
   4 m scan for 0.4 %).

``argmin_p NLL(p)`` over the map up to the scan's resolution: a basin narrower than the grid
step whose grid points all score worse than ``top`` others is missed. The defaults (2 m, 4
points) are tuned on the etoile val split (``python -m core tune-baselines``, docs/physics.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import NamedTuple

import torch

from core.errors import CoreError
from core.physics.likelihood import RobustLikelihood
from core.physics.observation import SiteObservation
from core.physics.refinement import MapRefiner, MapSearchConfig

__all__ = ["ExhaustiveMatcher", "ExhaustiveResult", "FLAT_SIGMA_M", "DEFAULT_STEP_M", "DEFAULT_TOP"]

#: the flat prior's sigma [m]
FLAT_SIGMA_M = 1.0e4
#: the scan's grid step [m] and how many of its best points are searched finely (tuned on the etoile val split:
#: docs/physics.md)
DEFAULT_STEP_M = 2.0
DEFAULT_TOP = 4


class ExhaustiveResult(NamedTuple):
    """``xy [N, 2]`` [m], ``nll [N]`` there [nats], ``seconds`` the whole search took."""

    xy: torch.Tensor
    nll: torch.Tensor
    seconds: float


class ExhaustiveMatcher:
    """The search of the module doc over one likelihood; build once, call per batch of observations.

    Args:
        likelihood: the calibrated RobustLikelihood (its maps and calibration).
        top: how many of the scan's best grid points are searched finely (>= 1).
        step_m: the scan's grid step [m] (> 0).
        search: the fine search's MapSearchConfig (default: windows of one scan step around each
            point at half a step, then its pattern search and polish; ``global_top`` is set to 0).
    """

    def __init__(self, likelihood: RobustLikelihood, top: int = DEFAULT_TOP, step_m: float = DEFAULT_STEP_M,
                 search: MapSearchConfig | None = None) -> None:
        if int(top) < 1 or not step_m > 0:
            raise CoreError(f"exhaustive map matching: top must be >= 1 and step_m > 0, got {top}, {step_m}")
        self.lik, self.top, self.step_m = likelihood, int(top), float(step_m)
        maps = likelihood.maps
        self.grid = _scan_grid(maps, self.step_m)
        if search is None:
            search = MapSearchConfig(window_m=self.step_m, window_step_m=self.step_m / 2,
                                     centre_radius_m=self.step_m, start_step_m=self.step_m / 2)
        self.search = replace(search, global_top=0)
        self.refiner = MapRefiner(likelihood, self.search)

    @torch.no_grad()
    def scan(self, obs: SiteObservation, chunk: int = 8) -> torch.Tensor:
        """``[B, top, 2]``: the ``top`` grid points of lowest NLL per sample, best first, at least two steps apart."""
        out = []
        g = self.grid
        for s in range(0, obs.batch, chunk):
            part = obs.take(slice(s, min(s + chunk, obs.batch)))
            cost = self.lik.evaluate(g.expand(part.batch, -1, -1), self.lik.prepare(part))  # [b, G]
            picks = []
            for _ in range(min(self.top, g.shape[0])):
                c = g[cost.argmin(1)]  # [b, 2]
                picks.append(c)
                near = (g.unsqueeze(0) - c.unsqueeze(1)).abs().amax(-1) < 2 * self.step_m - 1e-6
                cost.masked_fill_(near, math.inf)
            out.append(torch.stack(picks, 1))
        return torch.cat(out) if out else g.new_zeros(0, self.top, 2)

    def __call__(self, obs: SiteObservation) -> ExhaustiveResult:
        t0 = time.perf_counter()
        maps = self.lik.maps
        starts = self.scan(obs)
        flat = torch.full((obs.batch, 2), FLAT_SIGMA_M, dtype=maps.dtype, device=maps.device)
        res = self.refiner(starts[:, 0], flat, obs, centres=starts[:, 1:] if starts.shape[1] > 1 else None)
        return ExhaustiveResult(res.xy, res.nll, time.perf_counter() - t0)


def _scan_grid(maps, step_m: float) -> torch.Tensor:
    """``[G, 2]`` points ``step_m`` apart over the map's bounds (centred), only where some site has a path."""
    lo, hi = maps.lo.double().cpu(), maps.hi.double().cpu()
    axes = [lo[d] + (torch.arange(max(1, int(math.ceil(float(hi[d] - lo[d]) / step_m))), dtype=torch.float64)
                     + 0.5) * step_m for d in (0, 1)]
    axes = [a[a < hi[d]] for d, a in enumerate(axes)]
    g = torch.stack(torch.meshgrid(*axes, indexing="xy"), -1).reshape(-1, 2).to(device=maps.device, dtype=maps.dtype)
    keep = maps.coverage(g).amax(0) > 0  # some site has a path in the cell under the point
    return g[keep] if bool(keep.any()) else g
