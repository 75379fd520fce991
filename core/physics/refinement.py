"""Test-time MAP refinement: the most probable position given the network's estimate and the report.

For each sample the posterior, in nats, is::

    J(p) = NLL(p) + prior_nll(p)

with ``NLL`` the calibrated robust likelihood of its report
(:class:`~core.physics.likelihood.RobustLikelihood`) and ``prior_nll`` the network's
Gaussian ``N(mu, sigma^2)`` with a uniform outlier floor (:mod:`core.physics.prior`), or any
:class:`~core.physics.prior.PositionPrior` given to the call (the network's heatmap).
The MAP estimate ``argmin J`` is searched, batched over samples (in chunks, so memory
does not grow with ``N`` beyond the outputs), in five stages:

1. **window**: a grid of ``+-window_m`` at ``window_step_m`` around ``mu``; its best point.
2. **centres** (optional ``[N, k, 2]``, e.g. the network's top-k coarse cells): a grid of
   ``+-start_radius_m`` at ``start_step_m`` around each; the best point of each.
3. **global**: the ``global_top`` best blocks of the whole map by likelihood alone
   (:class:`~core.physics.map_scan.GlobalScan`, skipping the window), each searched like a
   centre -- so a gross network miss can be recovered when the report says so.
   **scan** (``scan_top > 0``): also the ``scan_top`` best points of the EXACT scan of the likelihood
   alone over a lattice ``scan_step_m`` apart (:class:`~core.physics.bounded_scan.BoundedScan`: the
   points exhaustive map matching would rank, without scoring most of them; at least two steps
   apart), each searched like a centre. Block statistics rank a block by its mean and can miss the
   one basin a report points to; the exact scan cannot, so the MAP search then holds every start
   exhaustive search has and the prior chooses between them.
4. **pattern search** from every start's best point: its 8 neighbours at step ``h``,
   moving to the best, ``h`` halved from ``max(window_step_m, start_step_m) / 2`` down to
   ``fine_step_m``.
5. **polish** of the best start: ``polish_steps`` Adam steps on ``J`` (step
   ``polish_lr_m``), positions clamped to the map; the best point seen is returned.

Every sample is refined unless ``confidence`` and a ``threshold`` are given (then only
``confidence < threshold``; the others come back unchanged). The result records the
path (which start won, its coarse and pattern-search points, the polish path) and the
likelihood's per-term breakdown at ``mu`` and at the result, for an inspector.
A trained run uses it through :func:`core.learning.inference.refine_prediction`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from core.errors import CoreError
from core.physics.bounded_scan import BoundedScan, scan_lattice
from core.physics.likelihood import LikelihoodTerms, PreparedObservation, RobustLikelihood
from core.physics.map_scan import GlobalScan
from core.physics.observation import SiteObservation
from core.physics.prior import PositionPrior, position_prior

__all__ = ["MapSearchConfig", "MapRefiner", "MapResult", "map_refine", "SOURCE_WINDOW", "SOURCE_CENTRE",
           "SOURCE_GLOBAL", "SOURCE_SCAN"]

SOURCE_WINDOW, SOURCE_CENTRE, SOURCE_GLOBAL, SOURCE_SCAN = 0, 1, 2, 3
_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


@dataclass(frozen=True)
class MapSearchConfig:
    """Search settings (metres unless stated; see the module doc for the stages)."""

    window_m: float = 20.0
    window_step_m: float = 2.0
    centre_radius_m: float = 8.0
    start_step_m: float = 4.0
    global_top: int = 2
    global_block: int | None = None  #: block size in cells (None: about 32 blocks along the longer side)
    scan_top: int = 0  #: best points of the exact lattice scan searched as starts (0: off)
    scan_step_m: float = 5.0  #: that lattice's step
    fine_step_m: float = 0.5
    polish_steps: int = 5
    polish_lr_m: float = 0.25
    outlier_prob: float = 0.05  #: prior probability of a gross network miss
    min_sigma_m: float = 1.0
    chunk_size: int = 64

    def __post_init__(self) -> None:
        for name in ("window_m", "window_step_m", "centre_radius_m", "start_step_m", "fine_step_m", "polish_lr_m",
                     "min_sigma_m", "scan_step_m"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise CoreError(f"MAP search: {name} must be > 0, got {getattr(self, name)}")
        if self.global_top < 0 or self.scan_top < 0 or self.polish_steps < 0 or self.chunk_size < 1:
            raise CoreError("MAP search: global_top, scan_top and polish_steps must be >= 0, chunk_size >= 1")


@dataclass
class MapResult:
    """What :class:`MapRefiner` returns (detached tensors; ``N`` samples, ``M = 1 + k + g`` starts).

    xy ``[N, 2]`` the MAP position; posterior, nll, prior_nll ``[N]`` there (nats);
    posterior_start, nll_start, prior_nll_start ``[N]`` at ``mu``; source int8 ``[N]`` the
    winning start (:data:`SOURCE_WINDOW`, ``_CENTRE``, ``_GLOBAL``) and source_rank ``[N]``
    its index among its kind; starts ``[N, M, 2]`` and start_posterior ``[N, M]`` each
    start's best grid point; coarse_xy, pattern_xy ``[N, 2]`` the winner before and after
    the pattern search; path ``[polish_steps + 1, N, 2]`` and path_posterior the polish;
    refined bool ``[N]``; terms_before / terms_after the likelihood's
    :class:`~core.physics.likelihood.LikelihoodTerms` at ``mu`` and at ``xy``; seconds.
    """

    xy: torch.Tensor
    posterior: torch.Tensor
    nll: torch.Tensor
    prior_nll: torch.Tensor
    posterior_start: torch.Tensor
    nll_start: torch.Tensor
    prior_nll_start: torch.Tensor
    source: torch.Tensor
    source_rank: torch.Tensor
    starts: torch.Tensor
    start_posterior: torch.Tensor
    coarse_xy: torch.Tensor
    pattern_xy: torch.Tensor
    path: torch.Tensor
    path_posterior: torch.Tensor
    refined: torch.Tensor
    terms_before: LikelihoodTerms
    terms_after: LikelihoodTerms
    seconds: float


def _grid(radius: float, step: float, dtype, device) -> torch.Tensor:
    """``[P, 2]`` offsets ``(i step, j step)`` with ``|i step|, |j step| <= radius`` (0 included)."""
    n = int(math.floor(radius / step + 1e-9))
    r = torch.arange(-n, n + 1, dtype=dtype, device=device) * step
    gx, gy = torch.meshgrid(r, r, indexing="xy")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


class MapRefiner:
    """The MAP search of the module doc over one :class:`RobustLikelihood`; build once, call per batch.

    ``refiner(mu [N, 2], sigma (number, [N] or [N, 2]), obs: SiteObservation,
    centres=None [N, k, 2], confidence=None [N], threshold=None) -> MapResult``.
    """

    def __init__(self, likelihood: RobustLikelihood, config: MapSearchConfig | None = None) -> None:
        self.lik = likelihood
        self.config = c = config or MapSearchConfig()
        maps = likelihood.maps
        dt, dev = maps.dtype, maps.device
        self.lo, self.hi = maps.lo, maps.hi
        self.scan = GlobalScan(likelihood, c.global_block) if c.global_top else None
        self.window = _grid(c.window_m, c.window_step_m, dt, dev)
        self.centre_grid = _grid(c.centre_radius_m, c.start_step_m, dt, dev)
        self.block_grid = _grid(0.5 * self.scan.block_m, c.start_step_m, dt, dev) if self.scan else None
        self.lattice_scan = BoundedScan(likelihood, scan_lattice(maps, c.scan_step_m)) if c.scan_top else None
        self.neighbours = torch.tensor(_NEIGHBOURS, dtype=dt, device=dev)
        cell = maps.cell_size
        self.area = float(maps.cover[-1].sum()) * cell * cell if bool(maps.cover[-1].any()) else \
            (maps.bounds[2] - maps.bounds[0]) * (maps.bounds[3] - maps.bounds[1])

    # -- pieces ---------------------------------------------------------------------------
    def posterior(self, xy: torch.Tensor, prep: PreparedObservation, prior: PositionPrior) -> torch.Tensor:
        """``J = NLL + prior_nll`` at ``xy [B, 2]`` or ``[B, P, 2]``."""
        return self.lik.evaluate(xy, prep) + prior.nll(xy)

    def _clamp(self, xy: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(xy, self.hi), self.lo)

    def _best_of(self, centres, offsets, prep, prior) -> tuple[torch.Tensor, torch.Tensor]:
        """Best grid point around each of ``centres [B, M, 2]``: ``(xy [B, M, 2], J [B, M])``."""
        b, m = centres.shape[:2]
        p = offsets.shape[0]
        cand = self._clamp(centres.unsqueeze(2) + offsets).view(b, m * p, 2)
        j = self.posterior(cand, prep, prior).view(b, m, p)
        best, arg = j.min(dim=2)
        xy = torch.gather(cand.view(b, m, p, 2), 2, arg.view(b, m, 1, 1).expand(b, m, 1, 2)).squeeze(2)
        return xy, best

    def _pattern(self, xy, j, prep, prior) -> tuple[torch.Tensor, torch.Tensor]:
        """8-neighbour pattern search from every start, halving the step down to ``fine_step_m``."""
        c = self.config
        h = 0.5 * max(c.window_step_m, c.start_step_m)
        b, m = xy.shape[:2]
        while h >= c.fine_step_m * (1 - 1e-6):
            cand = self._clamp(xy.unsqueeze(2) + self.neighbours * h)  # [B, M, 8, 2]
            jn = self.posterior(cand.view(b, m * 8, 2), prep, prior).view(b, m, 8)
            best, arg = jn.min(dim=2)
            better = best < j
            step = torch.gather(cand, 2, arg.view(b, m, 1, 1).expand(b, m, 1, 2)).squeeze(2)
            xy = torch.where(better.unsqueeze(-1), step, xy)
            j = torch.where(better, best, j)
            h *= 0.5
        return xy, j

    def _polish(self, xy, j, prep, prior):
        """Adam on ``J`` from ``xy [B, 2]``: ``(best xy, best J, path [T+1, B, 2], J along it [T+1, B])``."""
        c = self.config
        path, path_j = [xy], [j]
        best_xy, best_j = xy, j
        p, m1, m2 = xy.clone(), torch.zeros_like(xy), torch.zeros_like(xy)
        for k in range(c.polish_steps):
            with torch.enable_grad():
                q = p.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(self.posterior(q, prep, prior).sum(), q)
            m1.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
            m2.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
            denom = (m2 / (1 - _BETA2 ** (k + 1))).sqrt_().add_(_EPS)
            p = self._clamp(p.addcdiv(m1, denom, value=-c.polish_lr_m / (1 - _BETA1 ** (k + 1))))
            jp = self.posterior(p, prep, prior)
            better = jp < best_j
            best_xy = torch.where(better.unsqueeze(-1), p, best_xy)
            best_j = torch.where(better, jp, best_j)
            path.append(p)
            path_j.append(jp)
        return best_xy, best_j, torch.stack(path), torch.stack(path_j)

    @torch.no_grad()
    def _chunk(self, prep: PreparedObservation, prior: PositionPrior, centres) -> dict[str, torch.Tensor]:
        """The whole search for one chunk of samples (see the module doc)."""
        c, mu = self.config, prior.mu
        groups = [self._best_of(mu.unsqueeze(1), self.window, prep, prior)]
        kinds = [torch.zeros(1, dtype=torch.int8)]
        if centres is not None and centres.shape[1]:
            groups.append(self._best_of(centres, self.centre_grid, prep, prior))
            kinds.append(torch.full((centres.shape[1],), SOURCE_CENTRE, dtype=torch.int8))
        if self.scan is not None:
            radius = c.window_m + 0.5 * self.scan.block_m
            blocks = self.scan.top(prep, c.global_top, avoid=mu, avoid_radius=radius)
            groups.append(self._best_of(blocks, self.block_grid, prep, prior))
            kinds.append(torch.full((blocks.shape[1],), SOURCE_GLOBAL, dtype=torch.int8))
        if self.lattice_scan is not None:
            picks = self.lattice_scan.top(prep, c.scan_top, 2 * c.scan_step_m)
            groups.append(self._best_of(picks, self.centre_grid, prep, prior))
            kinds.append(torch.full((picks.shape[1],), SOURCE_SCAN, dtype=torch.int8))
        starts = torch.cat([g[0] for g in groups], dim=1)  # [B, M, 2]
        start_j = torch.cat([g[1] for g in groups], dim=1)
        kind = torch.cat(kinds).to(mu.device)
        rank = torch.cat([torch.arange(len(k)) for k in kinds]).to(mu.device)
        pat_xy, pat_j = self._pattern(starts, start_j, prep, prior)
        win = pat_j.argmin(dim=1)
        rows = torch.arange(mu.shape[0], device=mu.device)
        xy, j, path, path_j = self._polish(pat_xy[rows, win], pat_j[rows, win], prep, prior)
        nll = self.lik.evaluate(xy, prep)
        return {"xy": xy, "posterior": j, "nll": nll, "prior_nll": j - nll, "source": kind[win],
                "source_rank": rank[win], "starts": starts, "start_posterior": start_j,
                "coarse_xy": starts[rows, win], "pattern_xy": pat_xy[rows, win], "path": path, "path_posterior": path_j}

    # -- the call -------------------------------------------------------------------------
    def __call__(self, mu, sigma, obs: SiteObservation, centres=None, confidence=None,
                 threshold: float | None = None, prior: PositionPrior | None = None) -> MapResult:
        t0 = time.perf_counter()
        maps, c = self.lik.maps, self.config
        mu = torch.as_tensor(mu).to(device=maps.device, dtype=maps.dtype)
        n = mu.shape[0]
        if mu.shape != (n, 2) or obs.batch != n:
            raise CoreError(f"MAP search: mu must be [N, 2] with one observation per row, got {tuple(mu.shape)} "
                            f"for {obs.batch} observations")
        if prior is None:
            prior = position_prior(mu, sigma, self.area, c.outlier_prob, c.min_sigma_m)
        elif prior.mu.shape != mu.shape:
            raise CoreError(f"MAP search: the prior is for {prior.mu.shape[0]} samples, mu for {n}")
        if centres is not None:
            centres = torch.as_tensor(centres).to(device=maps.device, dtype=maps.dtype)
            if centres.ndim != 3 or centres.shape[0] != n or centres.shape[2] != 2:
                raise CoreError(f"MAP search: centres must be [N, k, 2], got {tuple(centres.shape)}")
        refined = torch.ones(n, dtype=torch.bool, device=maps.device)
        if confidence is not None and threshold is not None:
            conf = torch.as_tensor(confidence, device=maps.device)
            if conf.shape != (n,):
                raise CoreError(f"MAP search: confidence must be [{n}], got {tuple(conf.shape)}")
            refined = conf < threshold
        out = _Outputs(n, mu, self)
        for s in range(0, n, c.chunk_size):
            sl = slice(s, min(s + c.chunk_size, n))
            prep = self.lik.prepare(obs.take(sl))
            pri = prior.take(sl)
            out.start(sl, prep, pri)
            idx = refined[sl].nonzero().squeeze(1)
            if idx.numel():
                sub, sub_prior = (prep, pri) if idx.numel() == sl.stop - sl.start else (prep.take(idx), pri.take(idx))
                res = self._chunk(sub, sub_prior, None if centres is None else centres[sl][idx])
                out.write(sl.start, idx, res, sub)
        return out.result(refined, time.perf_counter() - t0)


class _Outputs:
    """Preallocated ``[N, ...]`` outputs of a :class:`MapRefiner` call, filled chunk by chunk."""

    def __init__(self, n: int, mu: torch.Tensor, refiner: MapRefiner) -> None:
        c, dt, dev = refiner.config, mu.dtype, mu.device
        self.refiner, self.mu = refiner, mu
        z = lambda *shape, dtype=dt: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        self.v = {"xy": mu.clone(), "posterior": z(n), "nll": z(n), "prior_nll": z(n), "posterior_start": z(n),
                  "nll_start": z(n), "prior_nll_start": z(n), "source": z(n, dtype=torch.int8),
                  "source_rank": z(n, dtype=torch.long), "coarse_xy": mu.clone(), "pattern_xy": mu.clone(),
                  "path": mu.unsqueeze(0).repeat(c.polish_steps + 1, 1, 1), "path_posterior": z(c.polish_steps + 1, n)}
        self.starts, self.start_j = None, None
        self.before, self.after = [], []
        self.n = n

    def start(self, sl: slice, prep, prior) -> None:
        lik = self.refiner.lik
        nll = lik.evaluate(prior.mu, prep)
        pn = prior.nll(prior.mu)
        v = self.v
        v["nll_start"][sl], v["prior_nll_start"][sl], v["posterior_start"][sl] = nll, pn, nll + pn
        v["nll"][sl], v["prior_nll"][sl], v["posterior"][sl] = nll, pn, nll + pn
        v["path_posterior"][:, sl] = (nll + pn).unsqueeze(0)
        terms = lik.terms(prior.mu, prep)
        self.before.append(terms)
        self.after.append(terms)
        self._prep = prep

    def write(self, first: int, local: torch.Tensor, res: dict, prep) -> None:
        """Rows ``first + local`` from a :meth:`MapRefiner._chunk` result (``prep``: its observation)."""
        v, rows = self.v, first + local
        for key in ("xy", "posterior", "nll", "prior_nll", "source", "source_rank", "coarse_xy", "pattern_xy"):
            v[key][rows] = res[key]
        v["path"][:, rows] = res["path"]
        v["path_posterior"][:, rows] = res["path_posterior"]
        if self.starts is None:
            m = res["starts"].shape[1]
            self.starts = self.mu.unsqueeze(1).repeat(1, m, 1)
            self.start_j = torch.full((self.n, m), math.nan, dtype=self.mu.dtype, device=self.mu.device)
        self.starts[rows], self.start_j[rows] = res["starts"], res["start_posterior"]
        terms = self.refiner.lik.terms(res["xy"], prep)
        self.after[-1] = _merge_terms(self.after[-1], local, terms)

    def result(self, refined: torch.Tensor, seconds: float) -> MapResult:
        v = self.v
        if self.starts is None:
            self.starts, self.start_j = self.mu.unsqueeze(1), v["posterior_start"].unsqueeze(1).clone()
        return MapResult(**v, starts=self.starts, start_posterior=self.start_j, refined=refined,
                         terms_before=_cat_terms(self.before), terms_after=_cat_terms(self.after), seconds=seconds)


def _merge_terms(base: LikelihoodTerms, rows: torch.Tensor, new: LikelihoodTerms) -> LikelihoodTerms:
    """``base`` with rows ``rows`` replaced by ``new``."""
    out = []
    for a, b in zip(base[:-1], new[:-1]):
        a = a.clone()
        a[rows] = b
        out.append(a)
    return LikelihoodTerms(*out, base.cell_features)


def _cat_terms(parts: list[LikelihoodTerms]) -> LikelihoodTerms:
    return LikelihoodTerms(*(torch.cat([p[i] for p in parts]) for i in range(len(parts[0]) - 1)),
                           parts[0].cell_features)


def map_refine(mu, sigma, obs: SiteObservation, likelihood: RobustLikelihood, centres=None,
               config: MapSearchConfig | None = None, confidence=None, threshold: float | None = None) -> MapResult:
    """One-off :class:`MapRefiner` call (build a MapRefiner to reuse its global scan tables)."""
    return MapRefiner(likelihood, config)(mu, sigma, obs, centres, confidence, threshold)
