"""Error metrics against hand-computed values."""

import math

import numpy as np

from core.learning.groups import worst_share
from core.learning.metrics import error_cdf, error_metrics, grouped_metrics, position_errors


def test_metrics_hand_values():
    pred = np.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [0.0, 30.0]])
    true = np.zeros((4, 2))
    e = position_errors(pred, true)
    assert np.allclose(e, [5.0, 0.0, 10.0, 30.0])
    m = error_metrics(e)
    assert m["count"] == 4
    assert m["median_m"] == 7.5  # mean of 5 and 10
    assert math.isclose(m["rmse_m"], math.sqrt((25 + 0 + 100 + 900) / 4))
    # linear interpolation: position 0.9 * 3 = 2.7 between 10 and 30
    assert math.isclose(m["p90_m"], 10 + 0.7 * 20)
    assert math.isclose(m["p67_m"], 10 + (0.67 * 3 - 2) * 20)  # sorted [0, 5, 10, 30], position 2.01
    assert m["success_5m"] == 0.5 and m["success_10m"] == 0.75 and m["success_20m"] == 0.75


def test_groups_and_empty():
    e = np.array([1.0, 2.0, 3.0, 4.0])
    los = np.array([True, False, True, False])
    g = grouped_metrics(e, {"all": np.ones(4, bool), "los": los, "nlos": ~los})
    assert g["los"]["median_m"] == 2.0 and g["nlos"]["median_m"] == 3.0 and g["all"]["count"] == 4
    empty = error_metrics([])
    assert empty["count"] == 0 and math.isnan(empty["median_m"]) and math.isnan(empty["worst2_share"])


def test_tail_metrics():
    e = np.r_[np.ones(98), 10.0, 20.0]  # the worst 2 % carry (100 + 400) / (98 + 500) of sum e^2
    m = error_metrics(e)
    assert math.isclose(m["worst2_share"], 500 / 598) and m["beyond_20m"] == 0.0
    assert error_metrics(np.r_[e, 21.0])["beyond_20m"] == 1 / 101
    assert math.isclose(worst_share(np.arange(1.0, 11.0), 0.2), (100 + 81) / 385)  # ceil(0.2 * 10) = 2 worst


def test_cdf_is_monotone_and_ends_at_one():
    cdf = error_cdf(np.arange(101.0), points=11, max_m=100.0)
    assert cdf["error_m"][0] == 0.0 and cdf["error_m"][-1] == 100.0
    assert np.all(np.diff(cdf["fraction"]) >= 0) and cdf["fraction"][-1] == 1.0
    assert math.isclose(cdf["fraction"][5], 51 / 101)
