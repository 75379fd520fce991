"""Seed-aware statistics for comparing localization methods.

A comparison has arms (methods) evaluated on the SAME test UEs for each of the same
seeds, so errors are paired: ``errors[arm][s]`` is a ``[N]`` array of errors [m] for
seed ``s``, UE ``n`` being the same UE in every arm.

Change of a metric ``M`` (median, P90, RMSE or the share beyond 20 m) of ``arm`` against ``reference``::

    delta = mean_s [ M(errors[arm][s]) - M(errors[reference][s]) ]

Its 95 % confidence interval comes from a two-level paired bootstrap: resample the
seeds with replacement, then for each drawn seed resample the UEs with replacement
(the same UE indices for both arms, which keeps the pairing), and recompute ``delta``.
The interval is the 2.5 and 97.5 percentiles of ``n_boot`` such replicates. Both
sources of noise, training seed and test sample, are in it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

METRICS: dict[str, Callable[[np.ndarray], float]] = {
    "median_m": lambda e: float(np.median(e)),
    "p90_m": lambda e: float(np.percentile(e, 90)),
    "rmse_m": lambda e: float(np.sqrt(np.mean(np.square(e)))),
    "beyond_20m": lambda e: float(np.mean(e > 20.0)),
}


def _metric_rows(errors: np.ndarray, idx: np.ndarray, metric: str) -> np.ndarray:
    """``M`` of each row of ``errors[:, idx]``: errors ``[S, N]``, idx ``[S, N]`` -> ``[S]``."""
    sample = np.take_along_axis(errors, idx, axis=1)
    if metric == "median_m":
        return np.median(sample, axis=1)
    if metric == "p90_m":
        return np.percentile(sample, 90, axis=1)
    if metric == "rmse_m":
        return np.sqrt(np.mean(np.square(sample), axis=1))
    if metric == "beyond_20m":
        return np.mean(sample > 20.0, axis=1)
    raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")


def _stack(per_seed: Sequence[np.ndarray], name: str) -> np.ndarray:
    arrays = [np.asarray(e, dtype=np.float64).ravel() for e in per_seed]
    if not arrays:
        raise ValueError(f"arm {name!r} has no seeds")
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"arm {name!r}: every seed must be evaluated on the same UEs")
    return np.stack(arrays)


def paired_delta(arm: Sequence[np.ndarray], reference: Sequence[np.ndarray], metric: str = "median_m",
                 n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Change of ``metric`` of ``arm`` against ``reference`` with its bootstrap 95 % CI.

    ``arm`` and ``reference``: one ``[N]`` error array [m] per seed, same seeds, same UEs.
    Returns ``{"delta", "ci_low", "ci_high", "ratio", "ratio_ci_low", "ratio_ci_high"}`` where ``ratio`` is
    the mean over seeds of ``M(arm) / M(reference)`` and its CI comes from the same bootstrap replicates.
    """
    a, r = _stack(arm, "arm"), _stack(reference, "reference")
    if a.shape != r.shape:
        raise ValueError(f"arm and reference differ in seeds or UEs: {a.shape} vs {r.shape}")
    n_seeds, n = a.shape
    identity = np.broadcast_to(np.arange(n), (n_seeds, n))
    m_a, m_r = _metric_rows(a, identity, metric), _metric_rows(r, identity, metric)
    rng = np.random.default_rng(seed)
    deltas, ratios = np.empty(n_boot), np.empty(n_boot)
    for b in range(n_boot):
        seeds = rng.integers(0, n_seeds, size=n_seeds)
        ues = rng.integers(0, n, size=(n_seeds, n))
        ma, mr = _metric_rows(a[seeds], ues, metric), _metric_rows(r[seeds], ues, metric)
        deltas[b] = np.mean(ma - mr)
        ratios[b] = np.mean(ma / np.maximum(mr, 1e-12))
    low, high = np.percentile(deltas, [2.5, 97.5])
    r_low, r_high = np.percentile(ratios, [2.5, 97.5])
    return {"delta": float(np.mean(m_a - m_r)), "ci_low": float(low), "ci_high": float(high),
            "ratio": float(np.mean(m_a / np.maximum(m_r, 1e-12))), "ratio_ci_low": float(r_low),
            "ratio_ci_high": float(r_high)}


def seed_summary(per_seed: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean and sample sd over seeds of each metric in :data:`METRICS`: ``{"median_m": .., "median_m_sd": ..}``."""
    e = _stack(per_seed, "arm")
    out: dict[str, float] = {"seeds": int(e.shape[0])}
    for name, fn in METRICS.items():
        values = np.array([fn(row) for row in e])
        out[name] = float(values.mean())
        out[f"{name}_sd"] = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return out


def compare_arms(errors: Mapping[str, Sequence[np.ndarray]], reference: str, n_boot: int = 2000,
                 seed: int = 0) -> list[dict[str, float | str]]:
    """One row per arm: mean ± sd over seeds and, for every arm but ``reference``, the
    paired change of each metric against it with its 95 % CI."""
    if reference not in errors:
        raise KeyError(f"reference arm {reference!r} not among {sorted(errors)}")
    rows: list[dict[str, float | str]] = []
    for name, per_seed in errors.items():
        row: dict[str, float | str] = {"arm": name, **seed_summary(per_seed)}
        if name != reference:
            for metric in METRICS:
                d = paired_delta(per_seed, errors[reference], metric, n_boot=n_boot, seed=seed)
                row.update({f"d_{metric}": d["delta"], f"d_{metric}_lo": d["ci_low"],
                            f"d_{metric}_hi": d["ci_high"], f"{metric}_ratio": d["ratio"]})
        rows.append(row)
    return rows
