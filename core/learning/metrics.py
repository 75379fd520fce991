"""Localization error metrics.

For errors ``e_n = |xy_pred,n - xy_true,n|`` [m]:

* ``median_m``, ``p67_m``, ``p90_m``: percentiles of ``e`` (linear interpolation);
* ``rmse_m = sqrt(mean e^2)``;
* ``success_Xm``: fraction (0..1) of samples with ``e <= X`` m, for X = 5, 10, 20;
* ``beyond_20m = 1 - success_20m``: the share of samples more than 20 m off;
* ``worst2_share``: the share of ``sum e^2`` carried by the worst 2 % of samples
  (:func:`core.learning.groups.worst_share`; near 1: the RMSE is the tail's);
* ``count``: number of samples.

:func:`grouped_metrics` gives them per group of :func:`core.learning.groups.ue_groups`.

An empty set gives ``count = 0`` and NaN metrics.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from core.errors import CoreError
from core.learning.groups import worst_share

SUCCESS_RADII_M = (5.0, 10.0, 20.0)


def position_errors(pred_xy, true_xy) -> np.ndarray:
    """``[N]`` Euclidean errors [m] between ``[N, 2]`` arrays."""
    return np.linalg.norm(np.asarray(pred_xy, np.float64) - np.asarray(true_xy, np.float64), axis=-1)


def error_metrics(errors) -> dict[str, float]:
    """The metrics above from ``errors [N]`` in metres."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    out: dict[str, float] = {"count": int(e.size)}
    if e.size == 0:
        out.update({k: float("nan") for k in ("median_m", "rmse_m", "p67_m", "p90_m")})
        out.update({f"success_{r:g}m": float("nan") for r in SUCCESS_RADII_M})
        out.update(beyond_20m=float("nan"), worst2_share=float("nan"))
        return out
    out["median_m"] = float(np.median(e))
    out["rmse_m"] = float(np.sqrt(np.mean(e**2)))
    out["p67_m"] = float(np.percentile(e, 67))
    out["p90_m"] = float(np.percentile(e, 90))
    for r in SUCCESS_RADII_M:
        out[f"success_{r:g}m"] = float(np.mean(e <= r))
    out["beyond_20m"] = float(np.mean(e > 20.0))
    out["worst2_share"] = worst_share(e, 0.02)
    return out


def grouped_metrics(errors, groups: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """``{group: metrics}`` of ``errors [N]`` for each boolean mask ``[N]`` of ``groups``
    (:func:`core.learning.groups.ue_groups`: all, los, nlos, last_missing, sites_1..sites_4+, sparse, dense)."""
    e = np.asarray(errors, dtype=np.float64)
    out = {}
    for name, mask in groups.items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != e.shape:
            raise CoreError(f"grouped_metrics: group {name!r} has {mask.shape[0]} entries, errors {e.shape[0]}")
        out[name] = error_metrics(e[mask])
    return out


def error_cdf(errors, points: int = 200, max_m: float | None = None) -> dict[str, list[float]]:
    """Empirical CDF of ``errors`` on ``points`` thresholds from 0 to ``max_m`` (default: the 99th percentile)."""
    e = np.sort(np.asarray(errors, dtype=np.float64).ravel())
    if e.size == 0:
        return {"error_m": [], "fraction": []}
    top = max_m if max_m is not None else float(np.percentile(e, 99))
    grid = np.linspace(0.0, max(top, 1e-6), points)
    frac = np.searchsorted(e, grid, side="right") / e.size
    return {"error_m": grid.tolist(), "fraction": frac.tolist()}


#: the headline metric keys, in report order
METRIC_KEYS = ("median_m", "rmse_m", "p67_m", "p90_m", "success_5m", "success_10m", "success_20m", "beyond_20m",
               "worst2_share")
