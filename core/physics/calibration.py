"""Calibration of the map against measurements: per site and feature, a bias and a scale.

At the TRUE positions ``p`` of the calibration split (every present report of every
sample, or only the latest one), each reported slot of site ``s`` gives a residual::

    r = measured_f - map_{s,f}(p)          (AoA: wrapped to (-180, 180] deg)

over the slots whose site covers ``p`` (:attr:`SiteValues.covered`). Per site ``s`` and
feature ``f`` (path_gain [dB], toa [ns], aoa [deg])::

    bias_{s,f}  = median(r)                                  (AoA: circular, see below)
    scale_{s,f} = max(1.4826 * median(|r - bias|), floor_f)  (Gaussian-consistent MAD)

The AoA median is taken on residuals re-centred at their circular mean and wrapped, so
it never straddles the +-180 deg seam. A site/feature with fewer than ``min_count``
residuals takes the values pooled over all sites; a feature with fewer than that in all
takes ``bias = 0`` and :data:`DEFAULT_SCALE`. ``miss_rate_s`` is the fraction of site
``s``'s reported slots whose true position the map says it does not reach.

Serving-cell features (snr, sinr, throughput, bler) are calibrated the same way against
``RadioMap.values`` (one bias and scale per feature, over covered true positions). Their
information criterion: ``ratio_f = scale_f / spread_f`` with ``spread_f`` the feature's
std over the map's covered cells. A ratio near 1 means the measurement cannot tell cells
apart better than a random cell draw; ``informative = ratio_f <= max_ratio`` (default
0.5: the map's spread is at least twice the measurement's error). The same ratio is
recorded for the per-site features (against each site's own spread).

A serving feature may also merely RE-COUNT what a per-site feature already carries: a UE
derives SNR (and, with the other sites' gains, SINR, throughput and BLER) from the same
measured path gains, so its error is the serving site's path-gain error again, and
counting both would count that noise twice. Calibration records ``corr_f``, the Spearman
rank correlation between the feature's residual and the serving slot's (slot 0)
path-gain residual over the reports where both are present and covered and the feature's
residual is not exactly 0 (a saturated BLER or throughput is 0 at both ends of its curve;
ranks: robust and blind to the monotone link curves), and::

    independent_f = |corr_f| <= max_corr          (default 0.5)
    informative_f = ratio_f <= max_ratio and independent_f

A calibration stored before ``independent`` was recorded has not shown it: its serving
features count as not informative (``cell_features: auto`` then uses none).

k-path maps (:attr:`SiteMaps.paths` ``k > 1``): ``path_weights`` ``pi [k]``, the per-rank
weights of the likelihood's mixture over a site's paths (:mod:`core.physics.likelihood`), fitted
by EM on the same residuals at the truth: every covered slot with ToA and AoA gives each path
rank ``j`` the likelihood ``L_j = pi_j sum_c w_c / ((1 + z_toa,jc^2)(1 + z_aoa,jc^2))`` over the
stencil cells ``c`` (bilinear weights ``w_c``; the Cauchy terms with this calibration's bias and
scale against each cell's path ``j`` evaluated from its anchor, AoA by its chord), and ``pi_j <- mean responsibility
L_j / sum_i L_i`` until it settles (100 steps). So ``pi_j`` is how often the report's
(strongest) path is the map's path ``j``. None for a map of one path per site.

:class:`Calibration` serialises to and from JSON (``to_json`` / ``from_json``, ``save`` /
``load``), to be stored with a run.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import CoreError
from core.features import wrap_degrees
from core.physics.site_lookup import SiteMaps, prepare_site_maps

__all__ = ["Calibration", "calibrate", "transfer_calibration", "robust_location_scale", "truth_residuals", "SITE_FEATURES",
           "CELL_FEATURES", "MIN_SCALE", "DEFAULT_SCALE"]

SITE_FEATURES: tuple[str, ...] = ("path_gain", "toa", "aoa")
CELL_FEATURES: tuple[str, ...] = ("snr", "sinr", "throughput", "bler")
#: floors of the scale (measurement resolution), feature units
MIN_SCALE = {"path_gain": 0.5, "toa": 1.0, "aoa": 0.5, "snr": 0.25, "sinr": 0.25, "throughput": 0.1, "bler": 0.005}
#: scales used when there is nothing to calibrate on (deliberately wide)
DEFAULT_SCALE = {"path_gain": 6.0, "toa": 30.0, "aoa": 15.0, "snr": 6.0, "sinr": 6.0, "throughput": 20.0, "bler": 0.2}
MAD_TO_SIGMA = 1.4826
FORMAT_VERSION = 1


def robust_location_scale(r: np.ndarray, angular: bool = False) -> tuple[float, float]:
    """``(median, 1.4826 * MAD)`` of residuals ``r [M]``; for angles [deg] on the circle.

    Angular: residuals are re-centred at their circular mean ``c`` and wrapped, the
    median ``m`` of those gives ``bias = wrap(c + m)``, and the MAD is taken of
    ``wrap(r - bias)``. Empty input gives ``(nan, nan)``.
    """
    r = np.asarray(r, dtype=np.float64).ravel()
    if r.size == 0:
        return float("nan"), float("nan")
    if not angular:
        med = float(np.median(r))
        return med, MAD_TO_SIGMA * float(np.median(np.abs(r - med)))
    rad = np.deg2rad(r)
    centre = math.degrees(math.atan2(np.sin(rad).mean(), np.cos(rad).mean()))
    bias = float(wrap_degrees(centre + np.median(wrap_degrees(r - centre))))
    return bias, MAD_TO_SIGMA * float(np.median(np.abs(wrap_degrees(r - bias))))


@dataclass
class Calibration:
    """Per-site and per-feature bias and scale of ``measured - map`` (see the module doc).

    Attributes:
        site_names: ``S`` names, in site-id order.
        bias, scale: float64 ``[S, 3]`` in feature units (path_gain dB, toa ns, aoa deg).
        count: int ``[S, 3]`` residuals each was estimated from (0: fallback values).
        spread: ``[S, 3]`` std of each site's map feature over the cells it covers.
        miss_rate: ``[S]`` fraction of reported slots at uncovered true positions.
        cell: ``{feature: {"bias", "scale", "count", "spread", "ratio", "informative"}}``.
        meta: free JSON (split, reports, max_ratio, ...).
        path_weights: ``[k]`` per-rank weights of a k-path map's mixture, or None (module doc).
    """

    site_names: list[str]
    bias: np.ndarray
    scale: np.ndarray
    count: np.ndarray
    spread: np.ndarray
    miss_rate: np.ndarray
    cell: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path_weights: list[float] | None = None

    def __post_init__(self) -> None:
        if self.path_weights is not None:
            pw = np.asarray(self.path_weights, dtype=np.float64)
            if pw.ndim != 1 or not (np.isfinite(pw).all() and (pw >= 0).all() and pw.sum() > 0):
                raise CoreError(f"Calibration: path_weights must be finite, >= 0 and not all 0, got {self.path_weights}")
            self.path_weights = [float(v) for v in pw / pw.sum()]
        s = len(self.site_names)
        self.bias, self.scale, self.spread = (np.asarray(a, dtype=np.float64).reshape(s, 3)
                                              for a in (self.bias, self.scale, self.spread))
        self.count = np.asarray(self.count, dtype=np.int64).reshape(s, 3)
        self.miss_rate = np.asarray(self.miss_rate, dtype=np.float64).reshape(s)
        if not (np.isfinite(self.bias).all() and np.isfinite(self.scale).all() and (self.scale > 0).all()):
            raise CoreError("Calibration: bias and scale must be finite and scale > 0")

    @property
    def num_sites(self) -> int:
        return len(self.site_names)

    @property
    def informative_cell_features(self) -> tuple[str, ...]:
        """Serving features whose calibration passes the information criterion and shows them
        independent of the serving path gain, in canonical order (see the module doc)."""
        return tuple(f for f in CELL_FEATURES if self.cell.get(f, {}).get("informative", False)
                     and self.cell.get(f, {}).get("independent", False))

    def ratio(self) -> np.ndarray:
        """``[S, 3]`` scale / spread per site and feature (NaN where the spread is unknown or 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.spread > 0, self.scale / self.spread, np.nan)

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        tolist = lambda a: [[_num(v) for v in row] for row in np.asarray(a).tolist()]  # noqa: E731
        return {
            "format_version": FORMAT_VERSION, "kind": "calibration", "site_features": list(SITE_FEATURES),
            "site_names": list(self.site_names), "bias": tolist(self.bias), "scale": tolist(self.scale),
            "count": self.count.tolist(), "spread": tolist(self.spread),
            "miss_rate": [_num(v) for v in self.miss_rate.tolist()],
            "cell": {k: {kk: _num(vv) if isinstance(vv, float) else vv for kk, vv in v.items()}
                     for k, v in self.cell.items()},
            "meta": self.meta,
        } | ({} if self.path_weights is None else {"path_weights": list(self.path_weights)})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        if d.get("kind") != "calibration" or d.get("format_version") != FORMAT_VERSION:
            raise CoreError(f"Calibration: not a calibration of format {FORMAT_VERSION}: "
                            f"kind={d.get('kind')!r}, format_version={d.get('format_version')!r}")
        if tuple(d.get("site_features", ())) != SITE_FEATURES:
            raise CoreError(f"Calibration: site_features must be {list(SITE_FEATURES)}, got {d.get('site_features')}")
        arr = lambda k: np.array([[np.nan if v is None else v for v in row] for row in d[k]], dtype=np.float64)  # noqa: E731
        return cls(list(d["site_names"]), arr("bias"), arr("scale"), np.array(d["count"]), arr("spread"),
                   np.array([np.nan if v is None else v for v in d["miss_rate"]], dtype=np.float64),
                   {k: dict(v) for k, v in d.get("cell", {}).items()}, dict(d.get("meta", {})), d.get("path_weights"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        try:
            return cls.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise CoreError(f"Calibration: invalid JSON: {exc}") from None

    def save(self, path: str | os.PathLike) -> Path:
        from core.stores.atomic import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        path = Path(path)
        if not path.exists():
            raise CoreError(f"{path}: no such calibration file")
        return cls.from_json(path.read_text())


def _num(v):
    """JSON-safe number: NaN/inf -> None."""
    return None if (isinstance(v, float) and not math.isfinite(v)) else v


def _reports(dataset, indices, reports: str) -> tuple[np.ndarray, ...]:
    """Flattened present reports of ``dataset[indices]``: ``xy [M, 2], ids [M, K], site [M, K, 3], cell [M, 4]``."""
    ids = dataset.site_ids[indices]
    present = dataset.report_mask[indices] & (ids[..., 0] >= 0)  # [n, T]
    if reports == "last":
        t_len = present.shape[1]
        latest = t_len - 1 - np.argmax(present[:, ::-1], axis=1)
        keep = np.zeros_like(present)
        keep[np.arange(len(keep)), latest] = present[np.arange(len(keep)), latest]
        present = keep
    elif reports != "all":
        raise CoreError(f"calibrate: reports must be 'all' or 'last', got {reports!r}")
    return (dataset.ue_xyz[indices][present][:, :2], ids[present], dataset.site_features[indices][present],
            dataset.cell_features[indices][present])


def _residuals(maps: SiteMaps, xy, ids, site, cell, chunk: int = 65536):
    """``(r [M, K, 3], ok [M, K, 3], reported [M, K], covered [M, K], r_cell [M, F_c], ok_cell [M, F_c])``."""
    r, cov, rc, cc = [], [], [], []
    with torch.no_grad():
        for s in range(0, len(xy), chunk):
            out = maps.lookup(torch.as_tensor(xy[s:s + chunk], dtype=maps.dtype), torch.as_tensor(ids[s:s + chunk]))
            r.append(out.values.double().cpu().numpy())
            cov.append(out.covered.cpu().numpy())
            if out.cell is not None:
                rc.append(out.cell.double().cpu().numpy())
                cc.append(out.cell_coverage.cpu().numpy() >= 0.5)
    k = ids.shape[1]
    mapped = np.concatenate(r) if r else np.zeros((0, k, 3))
    covered = np.concatenate(cov) if cov else np.zeros((0, k), bool)
    res = site.astype(np.float64) - mapped
    res[..., 2] = wrap_degrees(res[..., 2])
    reported = ids >= 0
    ok = reported[..., None] & covered[..., None] & np.isfinite(site)
    fc = len(maps.cell_features)
    if fc:
        cell_map = np.concatenate(rc)
        cols = [CELL_FEATURES.index(name) for name in maps.cell_features]
        r_cell = cell[:, cols].astype(np.float64) - cell_map
        ok_cell = np.concatenate(cc)[:, None] & np.isfinite(r_cell)
    else:
        r_cell, ok_cell = np.zeros((len(xy), 0)), np.zeros((len(xy), 0), bool)
    return np.where(ok, res, 0.0), ok, reported, covered, np.where(ok_cell, r_cell, 0.0), ok_cell


def truth_residuals(dataset, maps: SiteMaps, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The per-site residuals at the truth of every present report of samples ``indices``.

    Returns ``xy [M, 2]`` (each report's true position, m), ``ids [M, K]`` (site per slot, -1 empty),
    ``r [M, K, 3]`` (measured minus map: path gain dB, ToA ns, AoA deg wrapped; 0 where not ``ok``) and
    ``ok [M, K, 3]`` (reported, covered by the site's layer and finite).
    """
    xy, ids, site, cell = _reports(dataset, indices, "all")
    r, ok = _residuals(maps, xy, ids, site, cell)[:2]
    return xy, ids, r, ok


def _estimate(r: np.ndarray, name: str, min_count: int, pooled: tuple[float, float] | None):
    """``(bias, scale, count)`` of one feature's residuals, with the floor and the fallbacks."""
    if r.size >= min_count:
        bias, scale = robust_location_scale(r, angular=name == "aoa")
        count = int(r.size)
    elif pooled is not None:
        (bias, scale), count = pooled, 0
    else:
        bias, scale, count = 0.0, DEFAULT_SCALE[name], 0
    return bias, max(scale, MIN_SCALE[name]), count


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks ``0 .. M-1`` of ``x [M]``, tied values sharing their mean rank (float64 ``[M]``)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(x.size)
    _, tie, count = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie, weights=ranks) / count)[tie]


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of ``a [M]`` and ``b [M]``: Pearson's of their average ranks (NaN when either
    is constant). numpy only: pandas' ``corr(method="spearman")`` gives the same and costs every process that
    calibrates about 2 s of imports (pandas, scipy.stats)."""
    if a.size < 2:
        return float("nan")
    ra, rb = _average_ranks(np.asarray(a, np.float64)), _average_ranks(np.asarray(b, np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else float("nan")


def calibrate(dataset, maps, split: str | None = "train", reports: str = "all", min_count: int = 30,
              max_ratio: float = 0.5, max_corr: float = 0.5, walks: int | None = None,
              walks_seed: int = 0) -> Calibration:
    """Calibrate ``maps`` (a RadioMap with per-site layers, or a SiteMaps) on ``dataset``.

    Args:
        dataset: a :class:`~core.stores.dataset.MeasurementDataset` on the map's sites.
        split: "train" / "val" / "test", or None for every sample.
        reports: "all" present reports (each at its own true position ``ue_xyz``) or the
            "last" present one per sample.
        min_count: fewest residuals for a per-site estimate (else pooled, else default).
        max_ratio: the information criterion of serving features (see the module doc).
        max_corr: the largest |rank correlation| of a serving feature's residual with the
            serving path gain's that still counts as independent information.
        walks: calibrate on only this many labelled walks (samples) of the split, drawn without
            replacement with ``walks_seed`` (how many labelled walks in the world does
            calibration need: ``scripts/calibration_walks.py``, docs/world.md); None: all.

    A RadioMap is prepared with all its linear serving features (to calibrate them too);
    a SiteMaps calibrates the serving features it holds.
    """
    if not isinstance(maps, SiteMaps):
        names = [f for f in CELL_FEATURES if f in maps.features]
        maps = prepare_site_maps(maps, cell_features=names)
    indices = np.arange(dataset.num_samples) if split is None else dataset.indices(split)
    if walks is not None:
        if isinstance(walks, bool) or int(walks) != walks or walks < 1:
            raise CoreError(f"calibrate: walks must be an integer >= 1, got {walks!r}")
        indices = np.sort(np.random.default_rng(walks_seed).permutation(indices)[:int(walks)])
    xy, ids, site, cell = _reports(dataset, indices, reports)
    if ids.size and int(ids.max()) >= maps.num_sites:
        raise CoreError(f"calibrate: the dataset reports site {int(ids.max())}, the map has {maps.num_sites} sites")
    r, ok, reported, covered, r_cell, ok_cell = _residuals(maps, xy, ids, site, cell)
    s_n = maps.num_sites
    bias, scale, count = np.zeros((s_n, 3)), np.zeros((s_n, 3)), np.zeros((s_n, 3), np.int64)
    for f, name in enumerate(SITE_FEATURES):
        all_r = r[..., f][ok[..., f]]
        pooled = robust_location_scale(all_r, name == "aoa") if all_r.size >= min_count else None
        for s in range(s_n):
            sel = ok[..., f] & (ids == s)
            bias[s, f], scale[s, f], count[s, f] = _estimate(r[..., f][sel], name, min_count, pooled)
    heard = reported & np.isfinite(site).all(-1)
    miss = np.array([(~covered[heard & (ids == s)]).mean() if (heard & (ids == s)).any() else np.nan
                     for s in range(s_n)])
    cells = {}
    for c, name in enumerate(maps.cell_features):
        b, sc, n = _estimate(r_cell[:, c][ok_cell[:, c]], name, min_count, None)
        spread = maps.cell_spread.get(name, float("nan"))
        ratio = sc / spread if spread > 0 else float("inf")
        # where the feature moves at all (a saturated BLER or throughput has residual 0 at both ends)
        both = ok_cell[:, c] & (r_cell[:, c] != 0) & (ok[:, 0, 0] if ok.shape[1] else False)
        corr = _rank_correlation(r_cell[:, c][both], r[:, 0, 0][both]) if both.sum() >= min_count else float("nan")
        independent = bool(np.isfinite(corr) and abs(corr) <= max_corr)
        cells[name] = {"bias": b, "scale": sc, "count": n, "spread": spread, "ratio": ratio, "corr": corr,
                       "independent": independent, "informative": bool(n > 0 and ratio <= max_ratio and independent)}
    meta = {"split": split, "reports": reports, "min_count": min_count, "max_ratio": max_ratio, "max_corr": max_corr,
            "num_reports": int(len(xy)), "scene": dataset.attrs.get("scene")}
    if walks is not None:
        meta["walks"] = int(len(indices))
    weights = path_weights(maps, xy, ids, site, bias, scale) if maps.paths > 1 else None
    return Calibration(list(maps.site_names), bias, scale, count, maps.spread, miss, cells, meta, weights)


def path_weights(maps: SiteMaps, xy, ids, site, bias, scale, steps: int = 100, chunk: int = 65536) -> list[float]:
    """``pi [k]``: the EM fit of the per-rank path weights on the reports at the truth (module doc).

    ``xy [M, 2]``, ``ids [M, K]``, ``site [M, K, 3]`` the reports; ``bias``, ``scale [S, 3]`` this
    calibration's. Uniform when no slot has both ToA and AoA.
    """
    k = maps.paths
    lik_rank = []
    with torch.no_grad():
        for s in range(0, len(xy), chunk):
            i = torch.as_tensor(ids[s:s + chunk])
            q = torch.as_tensor(xy[s:s + chunk], dtype=maps.dtype)
            paths, weight = maps.path_lookup(q, i)  # [n, K, M, 2], [n, M]: component m = 4 r + c
            paths, weight = paths.double().cpu().numpy(), weight.double().cpu().numpy()
            cov = maps.lookup(q, i).covered.cpu().numpy()
            sid = np.clip(ids[s:s + chunk], 0, None)
            obs = site[s:s + chunk].astype(np.float64)
            ok = (ids[s:s + chunk] >= 0) & cov & np.isfinite(obs[..., 1]) & np.isfinite(obs[..., 2])
            z_t = (obs[..., 1, None] - bias[sid, 1, None] - paths[..., 0]) / scale[sid, 1, None]
            delta = np.deg2rad(wrap_degrees(obs[..., 2, None] - bias[sid, 2, None] - paths[..., 1]))
            z_a = 2 * np.sin(np.abs(delta) / 2) / np.deg2rad(scale[sid, 2, None])  # the chord
            rho = np.log1p(z_t**2) + np.log1p(z_a**2)  # [n, K, M]
            rho = rho - rho.min(-1, keepdims=True)
            per_rank = (np.exp(-rho) * weight[:, None]).reshape(*rho.shape[:2], k, 4).sum(-1)  # [n, K, k]
            lik_rank.append(per_rank[ok])
    lik = np.concatenate(lik_rank) if lik_rank else np.zeros((0, k))
    pi = np.full(k, 1.0 / k)
    if len(lik) == 0:
        return pi.tolist()
    for _ in range(steps):
        g = pi * lik
        pi = (g / g.sum(1, keepdims=True)).mean(0)
    return pi.tolist()


def transfer_calibration(sources: list[Calibration], maps, max_ratio: float = 0.5) -> Calibration:
    """A calibration for a scene whose labels are not to be used (a held-out scene): per feature the
    median, over every site of ``sources`` (other scenes' calibrations) estimated from data
    (``count > 0``), of its bias and of its scale, given to every site of ``maps`` (a RadioMap with
    per-site layers, or a SiteMaps); serving features likewise, ``informative`` judged against this
    map's spread (and ``independent`` only where every source found it so). ``count`` is 0 everywhere (nothing was estimated here); ``meta["transferred_from"]``
    names the source scenes."""
    if not isinstance(maps, SiteMaps):
        maps = prepare_site_maps(maps, cell_features=[f for f in CELL_FEATURES if f in maps.features])
    s_n = maps.num_sites
    bias, scale = np.zeros((s_n, 3)), np.zeros((s_n, 3))
    for f, name in enumerate(SITE_FEATURES):
        fit = [(c.bias[:, f][c.count[:, f] > 0], c.scale[:, f][c.count[:, f] > 0]) for c in sources]
        b, sc = (np.concatenate([x[i] for x in fit]) if fit else np.zeros(0) for i in (0, 1))
        bias[:, f] = float(np.median(b)) if b.size else 0.0
        scale[:, f] = float(np.median(sc)) if sc.size else DEFAULT_SCALE[name]
    cells = {}
    for name in maps.cell_features:
        fit = [c.cell[name] for c in sources if c.cell.get(name, {}).get("count", 0) > 0]
        b = float(np.median([e["bias"] for e in fit])) if fit else 0.0
        sc = float(np.median([e["scale"] for e in fit])) if fit else DEFAULT_SCALE[name]
        spread = maps.cell_spread.get(name, float("nan"))
        ratio = sc / spread if spread > 0 else float("inf")
        independent = bool(fit) and all(e.get("independent", False) for e in fit)
        cells[name] = {"bias": b, "scale": sc, "count": 0, "spread": spread, "ratio": ratio, "independent": independent,
                       "informative": bool(fit and ratio <= max_ratio and independent)}
    meta = {"transferred_from": [c.meta.get("scene") for c in sources], "max_ratio": max_ratio}
    fitted = [c.path_weights for c in sources if c.path_weights is not None and len(c.path_weights) == maps.paths]
    weights = np.mean(fitted, axis=0).tolist() if fitted and maps.paths > 1 else None
    return Calibration(list(maps.site_names), bias, scale, np.zeros((s_n, 3), np.int64), maps.spread,
                       np.full(s_n, np.nan), cells, meta, weights)
