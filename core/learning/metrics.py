"""Localization error metrics.

For errors ``e_n = |xy_pred,n - xy_true,n|`` [m]:

* ``median_m``, ``p67_m``, ``p90_m``: percentiles of ``e`` (linear interpolation);
* ``rmse_m = sqrt(mean e^2)``;
* ``success_Xm``: fraction (0..1) of samples with ``e <= X`` m, for X = 5, 10, 20;
* ``count``: number of samples.

An empty set gives ``count = 0`` and NaN metrics.
"""

from __future__ import annotations

import numpy as np

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
        return out
    out["median_m"] = float(np.median(e))
    out["rmse_m"] = float(np.sqrt(np.mean(e**2)))
    out["p67_m"] = float(np.percentile(e, 67))
    out["p90_m"] = float(np.percentile(e, 90))
    for r in SUCCESS_RADII_M:
        out[f"success_{r:g}m"] = float(np.mean(e <= r))
    return out


def grouped_metrics(errors, los, num_reports, sparse_below: int = 5) -> dict[str, dict[str, float]]:
    """Metrics overall and by group: ``all``, ``los``, ``nlos``, ``sparse`` (< ``sparse_below`` valid reports), ``dense``."""
    e = np.asarray(errors, dtype=np.float64)
    los = np.asarray(los, dtype=bool)
    sparse = np.asarray(num_reports) < sparse_below
    return {
        "all": error_metrics(e),
        "los": error_metrics(e[los]),
        "nlos": error_metrics(e[~los]),
        "sparse": error_metrics(e[sparse]),
        "dense": error_metrics(e[~sparse]),
    }


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
METRIC_KEYS = ("median_m", "rmse_m", "p67_m", "p90_m", "success_5m", "success_10m", "success_20m")
