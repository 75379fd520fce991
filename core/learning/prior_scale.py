"""The network prior's sigma chosen on held-out walks: ``evaluate --prior-sigma-scale auto``.

Every search with the network's prior uses ``N(mu, max(s sigma, m)^2)`` with its outlier floor
(:mod:`core.physics.prior`), ``sigma`` the network's own (the fine head's spread plus the spread of its
coarse cells), ``s`` the scale (1 by default) and ``m`` the sigma floor (1 m by default: an overconfident
network cannot pin the search). The network's sigma is trained to be right on average over the map, not to
be the right WIDTH for a prior against this likelihood: where the map is an imperfect twin, the reports
pooled over a window share the map's error at the place and the likelihood is sharper than it should be,
and a two-street coarse spread widens sigma far beyond the fine head's error. So both are chosen, not
assumed, one after the other::

    s* = argmin_{s in SIGMA_SCALES}      median_i | MAP_{s, m0}(i) - truth_i |     i over the CHOICE split (val)
    m* = argmin_{m in MIN_SIGMAS_M}      median_i | MAP_{s*, m}(i) - truth_i |

``m0`` the run's floor; ties go to the ``s`` nearest 1 (the network as it is) and to the larger floor.
The floor matters once ``s`` is small: then ``s sigma < m`` for most walks and the prior's width is the
floor's (on etoile's realistic world the scale chosen alone sat at the grid's end, 0.0625, where most
walks' width was the 1 m floor). Only the Gaussian's width changes: the outlier floor, the probability that
the network is grossly wrong, keeps its cost, so a far basin the reports clearly prefer still wins. The
split a run is scored on is never the one they were chosen on (:func:`check_scored_split`). Cost: one
network pass over the choice split and one MAP search per grid point (1–3 s per 2,000 walks each on the
2-core CPU, scan starts included).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from typing import Any

import numpy as np

from core.cli_types import number
from core.errors import CoreError

__all__ = ["SIGMA_SCALES", "MIN_SIGMAS_M", "CHOICE_SPLIT", "apply_sigma_scale", "check_scored_split", "choose_sigma_scale",
           "sigma_scale_arg"]

#: the scales tried
SIGMA_SCALES: tuple[float, ...] = (2.0, 1.0, 0.5, 0.25, 0.125, 0.0625)
#: the sigma floors tried at the chosen scale [m]
MIN_SIGMAS_M: tuple[float, ...] = (1.0, 0.5, 0.25)
#: the split ``s`` is chosen on
CHOICE_SPLIT = "val"


def check_scored_split(scored_split: str, split: str = CHOICE_SPLIT) -> None:
    """Refuses (:class:`CoreError`) to score ``scored_split`` with a scale chosen on it."""
    if scored_split == split:
        raise CoreError(f"--prior-sigma-scale auto chooses the scale on the {split} split; score another split "
                        f"(e.g. --split test) or give a number")


def choose_sigma_scale(run, scored_split: str, grid: tuple[float, ...] = SIGMA_SCALES,
                       split: str = CHOICE_SPLIT, prediction=None, search=None,
                       floors: tuple[float, ...] = MIN_SIGMAS_M) -> dict[str, Any]:
    """Chooses ``s``, then the floor ``m`` at ``s``, for ``run`` (a :class:`~core.learning.inference.LoadedRun`,
    its likelihood as it will be scored: silence, map override) by the median error of network + MAP on ``split``.

    ``prediction``: the prediction of ``split``'s walks whose estimate is the prior (default: ``run``'s network's;
    scripts/ensemble_prior.py gives an ensemble's pooled one); ``search``: the MAP search settings (default: the
    run's, :func:`~core.learning.inference.map_search_config`; its ``min_sigma_m`` is the floor ``s`` is chosen
    at); ``floors``: the floors then tried [m] (empty: the search's floor is kept).

    Returns ``{"scale": s*, "min_sigma_m": m*, "search": the search settings with m*, "split": split, "count": N,
    "grid": [{"scale", "min_sigma_m", "median_m", "p90_m", "beyond_20m"}, ...]}`` (every point tried, the scales
    first). Raises :class:`CoreError` when ``scored_split`` is ``split``, ``split`` has no walks or a grid holds a
    value that is not a finite number > 0.
    """
    from core.learning.inference import map_search_config, predict, refine_prediction
    from core.learning.metrics import error_metrics, position_errors

    check_scored_split(scored_split, split)
    for name, values, required in (("scale", grid, True), ("sigma floor", floors, False)):
        if (required and not values) or any(not (np.isfinite(v) and v > 0) for v in values):
            raise CoreError(f"prior {name} grid must hold finite values > 0, got {list(values)}")
    idx = run.dataset.indices(split)
    if len(idx) == 0:
        raise CoreError(f"--prior-sigma-scale auto: the {split} split of {run.config.data.dataset} is empty")
    pred = predict(run, idx) if prediction is None else prediction
    search = search or map_search_config(run.config)
    rows = []

    def score(s: float, floor: float) -> dict[str, Any]:
        ref = refine_prediction(run, pred, use_prior=True, sigma_scale=s, search=replace(search, min_sigma_m=floor))
        m = error_metrics(position_errors(ref.xy, pred.true_xy))
        rows.append({"scale": s, "min_sigma_m": floor, "median_m": m["median_m"], "p90_m": m["p90_m"],
                     "beyond_20m": m["beyond_20m"]})
        return rows[-1]

    base = float(search.min_sigma_m)
    scales = [score(float(s), base) for s in grid]
    best = min(scales, key=lambda r: (r["median_m"], abs(math.log(r["scale"]))))
    tried = [best] + [score(best["scale"], float(m)) for m in floors if float(m) != base]
    best = min(tried, key=lambda r: (r["median_m"], -r["min_sigma_m"]))
    return {"scale": best["scale"], "min_sigma_m": best["min_sigma_m"],
            "search": replace(search, min_sigma_m=best["min_sigma_m"]), "split": split, "count": int(len(idx)),
            "grid": rows}


def apply_sigma_scale(run, scored_split: str, scale: float | str | None, members: list = ()) -> dict[str, Any]:
    """Sets the run's ``physics_loss.refinement.prior_sigma_scale`` (a number, "auto": chosen on val with the
    sigma floor ``prior_min_sigma_m``, for the ensemble of ``run`` and ``members`` when there are members; None:
    kept) and returns what ``result["prior_sigma_scale"]`` records: ``{"scale", "min_sigma_m", "split"}`` (the
    split they were chosen on, None when given) and, for "auto", the choice's ``count`` and ``grid``."""
    r = run.config.physics_loss.refinement
    if scale == "auto":
        from core import progress

        progress.report(0.3, "choosing the prior's sigma scale on val")
        val = None
        if members:
            from core.learning.ensemble import predict_ensemble

            val = predict_ensemble([run, *members], run.dataset.indices(CHOICE_SPLIT))
        choice = choose_sigma_scale(run, scored_split, prediction=val)
        r.prior_sigma_scale, r.prior_min_sigma_m = choice["scale"], choice["min_sigma_m"]
        return {k: v for k, v in choice.items() if k != "search"}
    if scale is not None:
        r.prior_sigma_scale = float(scale)
    return {"scale": float(r.prior_sigma_scale), "min_sigma_m": float(r.prior_min_sigma_m), "split": None}


def sigma_scale_arg(text: str) -> float | str:
    """``--prior-sigma-scale``: "auto" or a finite number in (0, 100]."""
    if text == "auto":
        return text
    try:
        return number(0.0, 100.0, low_open=True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be auto or a finite number in (0, 100], got {text!r}") from None
