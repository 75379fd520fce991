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

**Reached vs heard.** A cell is *reached* when some site has a path to it, however weak
(florence has cells reached at -283 dB). A UE *hears* a site only when the received power
``P_tx + G`` is at least the sensitivity of the dataset's measurement model
(:class:`~core.stores.measurement_model.MeasurementModel`, default -100 dBm), i.e. when the
strongest site's path gain is at least::

    G_heard = sensitivity_dbm - tx_power_dbm         (-100 dBm - 43 dBm = -143 dB by default)

``heard coverage = #(outdoor cells with serving path_gain >= G_heard) / #(outdoor cells)``
(:func:`heard_coverage`). New maps record it in their attrs (``coverage_heard``, with
``coverage_heard_sensitivity_dbm`` and ``coverage_heard_threshold_db``); for an older map
:func:`coverage_figures` computes it from the map on load.
"""

from __future__ import annotations

import numpy as np

from core.errors import CoverageError
from core.stores.measurement_model import MeasurementModel

DEFAULT_MIN_COVERAGE = 0.9  # fraction of the outdoor cells (issue 11: every street scene reaches it)
MIN_OUTDOOR_FRACTION = 0.02  # fewer outdoor cells than this fraction of the grid: the points are buried


def outdoor_coverage(valid: np.ndarray, outdoor: np.ndarray) -> float:
    """``sum(valid & outdoor) / sum(outdoor)`` (0 without outdoor cells); bool ``[H, W]`` masks."""
    n_out = int(outdoor.sum())
    return float((valid & outdoor).sum() / n_out) if n_out else 0.0


def check_coverage(scene: str, valid: np.ndarray, outdoor: np.ndarray, site_covered: np.ndarray,
                   min_coverage: float) -> float:
    """The map's outdoor coverage; :class:`~core.errors.CoverageError` (one line, names ``scene``) when below
    ``min_coverage``.

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
    raise CoverageError(f"{head}; {cause}; the map was not written")


def heard_threshold_db(tx_power_dbm: float, sensitivity_dbm: float | None) -> float:
    """The weakest path gain [dB] a UE hears: ``sensitivity_dbm - tx_power_dbm`` (-inf: no sensitivity)."""
    return -np.inf if sensitivity_dbm is None else float(sensitivity_dbm) - float(tx_power_dbm)


def heard_coverage(serving_path_gain: np.ndarray, valid: np.ndarray, outdoor: np.ndarray | None,
                   threshold_db: float) -> float:
    """Fraction of the outdoor cells (all cells without an outdoor mask) whose serving path gain [dB]
    ``[H, W]`` is at least ``threshold_db`` (uncovered cells never count)."""
    pg = np.asarray(serving_path_gain, dtype=np.float64)
    heard = np.asarray(valid, bool) & np.isfinite(pg) & (np.where(np.isfinite(pg), pg, -np.inf) >= threshold_db)
    area = np.ones_like(heard) if outdoor is None else np.asarray(outdoor, bool)
    n = int(area.sum())
    return float((heard & area).sum() / n) if n else 0.0


def map_tx_power_dbm(radio_map) -> float:
    """The sites' transmit power [dBm] the map was made with (``attrs["radio"]``; the default radio's otherwise)."""
    radio = radio_map.attrs.get("radio") or {}
    if "tx_power_dbm" in radio:
        return float(radio["tx_power_dbm"])
    from core.raytracing.tracing import RadioConfig

    return float(RadioConfig().tx_power_dbm)


def coverage_figures(radio_map, sensitivity_dbm: float | None = MeasurementModel().sensitivity_dbm) -> dict:
    """``{"reached", "heard", "sensitivity_dbm", "tx_power_dbm", "threshold_db", "of"}``: the share of outdoor
    cells (all cells for a map without an outdoor mask) some site reaches, and the share where the strongest
    site is heard at ``sensitivity_dbm`` (default: the default measurement model's). Read from the map's attrs
    when it recorded that sensitivity, else computed from the map."""
    attrs = radio_map.attrs
    reached = radio_map.outdoor_coverage
    of = "outdoor cells" if reached is not None else "all cells"
    reached = radio_map.coverage if reached is None else reached
    tx = map_tx_power_dbm(radio_map)
    threshold = heard_threshold_db(tx, sensitivity_dbm)
    if "coverage_heard" in attrs and attrs.get("coverage_heard_sensitivity_dbm") == sensitivity_dbm:
        heard = float(attrs["coverage_heard"])
    else:
        heard = heard_coverage(radio_map.feature("path_gain"), radio_map.valid, radio_map.outdoor, threshold)
    return {"reached": float(reached), "heard": heard, "sensitivity_dbm": sensitivity_dbm, "tx_power_dbm": tx,
            "threshold_db": threshold, "of": of}


def coverage_line(figures: dict) -> str:
    """``"96.6 % of outdoor cells reached, 91.2 % heard (≥ -143 dB: -100 dBm at 43 dBm)"``."""
    sens = figures["sensitivity_dbm"]
    heard = "" if sens is None else (f", {figures['heard']:.1%} heard (≥ {figures['threshold_db']:g} dB: "
                                     f"{sens:g} dBm at {figures['tx_power_dbm']:g} dBm)")
    return f"{figures['reached']:.1%} of {figures['of']} reached{heard}"


def heard_sensitivity(dataset_path) -> tuple[float | None, str]:
    """``(sensitivity [dBm] or None, where it came from)``: the measurement model recorded by the dataset at
    ``dataset_path`` when there is one, else the default model's."""
    from pathlib import Path

    from core.errors import StoreError
    from core.stores.dataset import recorded_measurement_model

    if Path(dataset_path).is_dir():
        try:
            model = recorded_measurement_model(dataset_path)
        except StoreError:
            model = None
        if model is not None:
            return model.sensitivity_dbm, f"the measurement model of {Path(dataset_path).name}'s dataset"
    return MeasurementModel().sensitivity_dbm, "the default measurement model"
