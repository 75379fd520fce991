"""Reached vs heard coverage (core.raytracing.coverage): a cell some site reaches is not a cell a UE hears."""

import math

import numpy as np

from core.raytracing.coverage import coverage_figures, coverage_line, heard_coverage, heard_threshold_db
from core.raytracing.generation import _heard_attrs
from core.stores.radio_map import RadioMap


def serving_map(attrs: dict) -> RadioMap:
    """4 x 4 cells: 12 outdoor (the last row is under a roof), path gain -100 .. -250 dB, one hole."""
    pg = np.linspace(-100.0, -250.0, 16).reshape(4, 4).astype(np.float32)
    valid = np.ones((4, 4), bool)
    valid[0, 0] = False
    pg[0, 0] = np.nan
    valid[3] = False
    pg[3] = np.nan
    outdoor = np.ones((4, 4), bool)
    outdoor[3] = False
    return RadioMap(pg[None], ("path_gain",), (0.0, 0.0, 4.0, 4.0), valid=valid, outdoor=outdoor, attrs=attrs)


def test_heard_counts_only_what_the_sensitivity_allows():
    assert heard_threshold_db(43.0, -100.0) == -143.0 and heard_threshold_db(43.0, None) == -math.inf
    m = serving_map({"radio": {"tx_power_dbm": 43.0}})
    pg = m.feature("path_gain")
    expect = int((np.nan_to_num(pg, nan=-np.inf)[:3] >= -143.0).sum())  # -110 .. -140 dB (-100 dB is the hole)
    figures = coverage_figures(m, -100.0)
    assert figures["reached"] == 11 / 12  # every outdoor cell but the hole
    assert figures["heard"] == expect / 12 and expect == 4
    assert figures["threshold_db"] == -143.0
    assert coverage_figures(m, -70.0)["heard"] == 1 / 12  # -113 dB: only the -110 dB cell (the -100 dB one is a hole)
    assert coverage_figures(m, -60.0)["heard"] == 0.0
    assert coverage_figures(m, None)["heard"] == 11 / 12  # no sensitivity: heard = reached
    assert "heard (≥ -143 dB" in coverage_line(figures)
    # a map that records it (a new map) is read, not recomputed; another sensitivity is computed
    recorded = serving_map({"radio": {"tx_power_dbm": 43.0}, **_heard_attrs(pg, m.valid, ~m.outdoor, 43.0)})
    assert recorded.attrs["coverage_heard"] == expect / 12 and recorded.attrs["coverage_heard_threshold_db"] == -143.0
    stamped = serving_map({"radio": {"tx_power_dbm": 43.0}, "coverage_heard": 0.5,
                           "coverage_heard_sensitivity_dbm": -100.0})
    assert coverage_figures(stamped, -100.0)["heard"] == 0.5 and coverage_figures(stamped, -90.0)["heard"] == 3 / 12
    assert heard_coverage(pg, m.valid, None, -143.0) == 4 / 16  # without an outdoor mask: of all cells
