import numpy as np
import pytest

from core.learning.statistics import compare_arms, paired_delta, seed_summary


def _errors(rng, seeds=3, n=400, scale=1.0):
    return [np.abs(rng.normal(0, scale, n)) + 0.1 for _ in range(seeds)]


def test_identical_arms_have_zero_delta_and_ci_around_zero():
    ref = _errors(np.random.default_rng(0))
    d = paired_delta(ref, ref, "median_m", n_boot=300)
    assert d["delta"] == 0 and d["ci_low"] == 0 and d["ci_high"] == 0 and d["ratio"] == pytest.approx(1)


def test_halved_errors_give_negative_delta_whose_ci_excludes_zero():
    ref = _errors(np.random.default_rng(1))
    arm = [0.5 * e for e in ref]
    d = paired_delta(arm, ref, "p90_m", n_boot=300)
    expected = np.mean([-0.5 * np.percentile(e, 90) for e in ref])
    assert d["delta"] == pytest.approx(expected)
    assert d["ci_low"] < d["delta"] < d["ci_high"] < 0
    assert d["ratio"] == pytest.approx(0.5)


def test_bootstrap_matches_a_loop_reference():
    rng = np.random.default_rng(2)
    ref, arm = _errors(rng, n=50), _errors(rng, n=50, scale=1.3)
    d = paired_delta(arm, ref, "rmse_m", n_boot=40, seed=7)
    draw = np.random.default_rng(7)
    a, r = np.stack(arm), np.stack(ref)
    reps = []
    for _ in range(40):
        seeds = draw.integers(0, 3, size=3)
        ues = draw.integers(0, 50, size=(3, 50))
        diffs = [np.sqrt(np.mean(a[s][u] ** 2)) - np.sqrt(np.mean(r[s][u] ** 2)) for s, u in zip(seeds, ues)]
        reps.append(np.mean(diffs))
    assert d["ci_low"] == pytest.approx(np.percentile(reps, 2.5))
    assert d["ci_high"] == pytest.approx(np.percentile(reps, 97.5))


def test_seed_noise_widens_the_interval():
    rng = np.random.default_rng(3)
    ref = _errors(rng, seeds=4)
    steady = [0.9 * e for e in ref]
    noisy = [f * e for f, e in zip((0.6, 1.2, 0.7, 1.1), ref)]
    w_steady = np.subtract(*reversed(list(paired_delta(steady, ref, n_boot=300).values())[1:3]))
    w_noisy = np.subtract(*reversed(list(paired_delta(noisy, ref, n_boot=300).values())[1:3]))
    assert w_noisy > 3 * w_steady


def test_unpaired_inputs_are_refused():
    rng = np.random.default_rng(4)
    with pytest.raises(ValueError, match="same UEs"):
        paired_delta([np.ones(5), np.ones(6)], [np.ones(5), np.ones(5)])
    with pytest.raises(ValueError, match="differ"):
        paired_delta(_errors(rng, seeds=2), _errors(rng, seeds=3))


def test_compare_arms_and_seed_summary():
    rng = np.random.default_rng(5)
    ref = _errors(rng)
    rows = compare_arms({"base": ref, "better": [0.8 * e for e in ref]}, reference="base", n_boot=200)
    assert [r["arm"] for r in rows] == ["base", "better"]
    assert "d_median_m" not in rows[0] and rows[1]["d_median_m_hi"] < 0
    s = seed_summary(ref)
    assert s["seeds"] == 3 and s["median_m_sd"] > 0
    with pytest.raises(KeyError, match="reference arm"):
        compare_arms({"a": ref}, reference="b")
