"""The prior's weight chosen on held-out walks: ``evaluate --prior-weight auto``.

Every search with the network's prior minimises ``J = NLL - w log p_prior``
(:mod:`core.physics.prior`). ``w = 1`` is Bayes' rule as written, and right when the likelihood's
nats are worth what they claim. They are not where the map is an imperfect twin: the reports
pooled over a window sit within a metre or two of each other, so they share the map's error at that
place, and summing their NLLs as if independent makes the likelihood too sharp against the network.
``w`` is then chosen, not assumed::

    w* = argmin_{w in grid} median_i | MAP_w(i) - truth_i |        i over the CHOICE split (val)

ties go to the smaller ``w`` (closest to Bayes' rule). The split a run is scored on is never the one
``w`` was chosen on (:func:`choose_prior_weight` refuses). Cost: one network pass over the choice
split and one MAP search per grid point (about 1 s per 2,000 walks each on the 2-core CPU).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from core.errors import CoreError

__all__ = ["PRIOR_WEIGHTS", "CHOICE_SPLIT", "check_scored_split", "choose_prior_weight"]

#: the weights tried, 1 (Bayes' rule) first
PRIOR_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
#: the split ``w`` is chosen on
CHOICE_SPLIT = "val"


def check_scored_split(scored_split: str, split: str = CHOICE_SPLIT) -> None:
    """Refuses (:class:`CoreError`) to score ``scored_split`` with a weight chosen on it."""
    if scored_split == split:
        raise CoreError(f"--prior-weight auto chooses the weight on the {split} split; score another split "
                        f"(e.g. --split test) or give a number")


def choose_prior_weight(run, scored_split: str, grid: tuple[float, ...] = PRIOR_WEIGHTS,
                        split: str = CHOICE_SPLIT) -> dict[str, Any]:
    """Chooses ``w`` for ``run`` (a :class:`~core.learning.inference.LoadedRun`, its likelihood as it will be
    scored: silence, map override) by the median error of network + MAP on ``split``.

    Returns ``{"weight": w*, "split": split, "count": N, "grid": [{"weight", "median_m", "p90_m",
    "beyond_20m"}, ...]}``. Raises :class:`CoreError` when ``scored_split`` is ``split`` (the choice would be
    scored on the walks it was made on) or ``split`` has no walks.
    """
    from core.learning.inference import map_search_config, predict, refine_prediction
    from core.learning.metrics import error_metrics, position_errors

    check_scored_split(scored_split, split)
    if not grid or any(not (np.isfinite(w) and w > 0) for w in grid):
        raise CoreError(f"prior weight grid must hold finite weights > 0, got {list(grid)}")
    idx = run.dataset.indices(split)
    if len(idx) == 0:
        raise CoreError(f"--prior-weight auto: the {split} split of {run.config.data.dataset} is empty")
    pred = predict(run, idx)
    base = map_search_config(run.config)
    rows = []
    for w in grid:
        ref = refine_prediction(run, pred, search=replace(base, prior_weight=float(w)), use_prior=True)
        m = error_metrics(position_errors(ref.xy, pred.true_xy))
        rows.append({"weight": float(w), "median_m": m["median_m"], "p90_m": m["p90_m"], "beyond_20m": m["beyond_20m"]})
    best = min(rows, key=lambda r: (r["median_m"], r["weight"]))
    return {"weight": best["weight"], "split": split, "count": int(len(idx)), "grid": rows}
