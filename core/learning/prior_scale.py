"""The network prior's sigma chosen on held-out walks: ``evaluate --prior-sigma-scale auto``.

Every search with the network's prior uses ``N(mu, (s sigma)^2)`` with its outlier floor
(:mod:`core.physics.prior`; ``sigma`` floored at 1 m there), ``sigma`` the network's own (the fine head's
spread plus the spread of its coarse cells) and ``s`` the scale, 1 by default. The network's sigma is
trained to be right on average over the map, not to be the right WIDTH for a prior against this
likelihood: where the map is an imperfect twin, the reports pooled over a window share the map's error
at the place and the likelihood is sharper than it should be, and a two-street coarse spread widens sigma
far beyond the fine head's error. So ``s`` is chosen, not assumed::

    s* = argmin_{s in grid} median_i | MAP_s(i) - truth_i |        i over the CHOICE split (val)

ties go to the ``s`` nearest 1 (the network as it is). Only the Gaussian's width changes: the outlier
floor, the probability that the network is grossly wrong, keeps its cost, so a far basin the reports
clearly prefer still wins. The split a run is scored on is never the one ``s`` was chosen on
(:func:`check_scored_split`). Cost: one network pass over the choice split and one MAP search per grid
point (about 1 s per 2,000 walks each on the 2-core CPU).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from core.errors import CoreError

__all__ = ["SIGMA_SCALES", "CHOICE_SPLIT", "check_scored_split", "choose_sigma_scale"]

#: the scales tried
SIGMA_SCALES: tuple[float, ...] = (2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)
#: the split ``s`` is chosen on
CHOICE_SPLIT = "val"


def check_scored_split(scored_split: str, split: str = CHOICE_SPLIT) -> None:
    """Refuses (:class:`CoreError`) to score ``scored_split`` with a scale chosen on it."""
    if scored_split == split:
        raise CoreError(f"--prior-sigma-scale auto chooses the scale on the {split} split; score another split "
                        f"(e.g. --split test) or give a number")


def choose_sigma_scale(run, scored_split: str, grid: tuple[float, ...] = SIGMA_SCALES,
                       split: str = CHOICE_SPLIT, prediction=None, search=None) -> dict[str, Any]:
    """Chooses ``s`` for ``run`` (a :class:`~core.learning.inference.LoadedRun`, its likelihood as it will be
    scored: silence, map override) by the median error of network + MAP on ``split``.

    ``prediction``: the prediction of ``split``'s walks whose estimate is the prior (default: ``run``'s network's;
    scripts/ensemble_prior.py gives an ensemble's pooled one); ``search``: the MAP search settings (default: the
    run's).

    Returns ``{"scale": s*, "split": split, "count": N, "grid": [{"scale", "median_m", "p90_m", "beyond_20m"},
    ...]}``. Raises :class:`CoreError` when ``scored_split`` is ``split`` or ``split`` has no walks.
    """
    from core.learning.inference import predict, refine_prediction
    from core.learning.metrics import error_metrics, position_errors

    check_scored_split(scored_split, split)
    if not grid or any(not (np.isfinite(s) and s > 0) for s in grid):
        raise CoreError(f"prior sigma scale grid must hold finite scales > 0, got {list(grid)}")
    idx = run.dataset.indices(split)
    if len(idx) == 0:
        raise CoreError(f"--prior-sigma-scale auto: the {split} split of {run.config.data.dataset} is empty")
    pred = predict(run, idx) if prediction is None else prediction
    rows = []
    for s in grid:
        ref = refine_prediction(run, pred, use_prior=True, sigma_scale=float(s), search=search)
        m = error_metrics(position_errors(ref.xy, pred.true_xy))
        rows.append({"scale": float(s), "median_m": m["median_m"], "p90_m": m["p90_m"], "beyond_20m": m["beyond_20m"]})
    best = min(rows, key=lambda r: (r["median_m"], abs(math.log(r["scale"]))))
    return {"scale": best["scale"], "split": split, "count": int(len(idx)), "grid": rows}
