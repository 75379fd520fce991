"""Outdoor coverage of a radio map, and the check that refuses a map that covers too little.

A map is judged by the fraction of its OUTDOOR cells that are covered::

    outdoor_coverage = #(valid cells) / #(outdoor cells)

(``valid`` implies outdoor: nothing is traced under a roof). A map whose outdoor
coverage is below ``min_coverage`` (``generate-maps --min-coverage``, default
:data:`DEFAULT_MIN_COVERAGE`) is an error, never ``ok``, and is not written. The error is
one line naming the scene and the likely cause, told apart by what the map shows:

* almost no outdoor cell (< :data:`MIN_OUTDOOR_FRACTION` of the grid): the measurement
  points lie under the terrain or inside geometry;
* no site has a path to any outdoor cell: no site reaches the area;
* otherwise the sites reach too little of it (shadowed, too few rays, too shallow a depth).
"""

from __future__ import annotations

import numpy as np

from core.errors import CoreError

DEFAULT_MIN_COVERAGE = 0.9  # fraction of the outdoor cells (issue 11: every street scene reaches it)
MIN_OUTDOOR_FRACTION = 0.02  # fewer outdoor cells than this fraction of the grid: the points are buried


def outdoor_coverage(valid: np.ndarray, outdoor: np.ndarray) -> float:
    """``sum(valid & outdoor) / sum(outdoor)`` (0 without outdoor cells); bool ``[H, W]`` masks."""
    n_out = int(outdoor.sum())
    return float((valid & outdoor).sum() / n_out) if n_out else 0.0


def check_coverage(scene: str, valid: np.ndarray, outdoor: np.ndarray, site_covered: np.ndarray,
                   min_coverage: float) -> float:
    """The map's outdoor coverage; :class:`CoreError` (one line, names ``scene``) when below ``min_coverage``.

    Args:
        scene: scene name.
        valid, outdoor: bool ``[H, W]`` coverage and outdoor masks.
        site_covered: bool ``[S, H, W]``, cells each site has a path to.
        min_coverage: the smallest acceptable outdoor coverage, in [0, 1].
    """
    cov = outdoor_coverage(valid, outdoor)
    if cov >= min_coverage:
        return cov
    head = f"{scene}: radio map covers {cov:.1%} of the outdoor cells, below --min-coverage {min_coverage:.0%}"
    outdoor_frac = float(outdoor.mean())
    if outdoor_frac < MIN_OUTDOOR_FRACTION:
        cause = (f"likely cause: the measurement points lie under the terrain or inside geometry "
                 f"(only {outdoor_frac:.1%} of the cells are not under a surface)")
    elif not (site_covered & outdoor).any():
        cause = "likely cause: no site reaches the area (check the sites' positions and --center)"
    else:
        per_site = ", ".join(f"{(c & outdoor).sum() / outdoor.sum():.0%}" for c in site_covered)
        cause = (f"likely cause: the sites reach too little of the area (per site {per_site}); "
                 f"raise --samples-per-tx or --max-depth, or move the sites")
    raise CoreError(f"{head}; {cause}; the map was not written")
