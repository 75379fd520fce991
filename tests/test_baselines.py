"""Both classical baselines find the true cell on an analytic map."""

import numpy as np

from core.learning.baselines import covered_cells, knn_fingerprint, ml_map_matching, run_baselines
from core.physics.synthetic import analytic_radio_map, synthetic_dataset


def test_baselines_find_the_true_cell():
    m = analytic_radio_map(height=24, width=32, bounds=(-64.0, -48.0, 64.0, 48.0))
    rng = np.random.default_rng(0)
    centres, values = covered_cells(m)
    pick = rng.choice(len(centres), 40, replace=False)
    obs = values[pick]  # exact cell values
    for xy in (knn_fingerprint(m, obs, k=1), ml_map_matching(m, obs, loss="mse"), ml_map_matching(m, obs)):
        assert np.allclose(xy, centres[pick])
    # with a feature missing (NaN, masked out) the remaining ones still pin the cell
    obs_nan = obs.copy()
    obs_nan[:, m.index("aoa")] = np.nan
    xy = ml_map_matching(m, obs_nan, np.isfinite(obs_nan))
    assert np.allclose(xy, centres[pick])
    # k = 4 averages the exact cell with 3 others: the median estimate stays within a few cells
    assert np.median(np.linalg.norm(knn_fingerprint(m, obs, k=4) - centres[pick], axis=1)) <= 3 * m.cell_size


def test_baselines_respect_holes_and_noise():
    m = analytic_radio_map(height=16, width=16, bounds=(-64.0, -64.0, 64.0, 64.0))
    valid = np.ones((16, 16), bool)
    valid[:, :4] = False
    values = m.values.copy()
    values[:, ~valid] = np.nan
    from core.stores.radio_map import RadioMap

    holed = RadioMap(values, m.features, m.bounds, valid=valid, attrs=m.attrs)
    centres, _ = covered_cells(holed)
    assert len(centres) == valid.sum()
    ds = synthetic_dataset(m, 60, seed=1, noise=False)
    est = run_baselines(ds, holed, np.arange(60))
    x_min_covered = -64.0 + 4 * m.cell_size
    for name in ("knn", "ml"):  # the map-based ones answer covered cells only
        assert np.isfinite(est[name]).all() and (est[name][:, 0] > x_min_covered).all()
    assert np.isfinite(est["multilateration"]).all()  # map-free: it may answer a hole, where UEs walked


def test_run_baselines_adds_multilateration():
    m = analytic_radio_map(height=32, width=32, bounds=(-64.0, -64.0, 64.0, 64.0))
    ds = synthetic_dataset(m, 80, seed=2)
    est = run_baselines(ds, m, np.arange(80))
    assert set(est) == {"knn", "ml", "multilateration", "exhaustive"}
    err = np.linalg.norm(est["multilateration"] - ds.labels, axis=1)
    assert est["multilateration"].shape == (80, 2) and np.median(err) < 3.0  # free space: every slot is LOS
    err = np.linalg.norm(est["exhaustive"] - ds.labels, axis=1)  # the calibrated likelihood over the whole map
    assert np.median(err) < 3.0
    # without known site positions there is nothing to multilaterate
    ds.attrs["sites"] = []
    from core.stores.radio_map import RadioMap

    anonymous = RadioMap(m.values, m.features, m.bounds, attrs={**m.attrs, "sites": []})
    assert "multilateration" not in run_baselines(ds, anonymous, np.arange(10))


def test_tune_baselines_sweeps_on_val_and_picks_the_lowest_median(tmp_path):
    from core import resolve_path
    from core.cli import main
    from core.learning.baseline_tuning import EXHAUSTIVE_GRID, MULTILATERATION_GRID, tune
    from core.learning.config import load_config
    from core.physics.synthetic import synthetic_scene

    overrides = synthetic_scene(tmp_path, num_ues=120, height=16, width=16, cell=8.0, reports=4, k=3, seed=5)
    config = load_config(resolve_path("configs/model.yaml"), [f"{k}={v}" for k, v in overrides.items()])
    result = tune(config, "val")
    assert result["split"] == "val" and result["count"] == 12 and result["window_s"] == config.physics_loss.report_window_s
    for method, grid in (("multilateration", MULTILATERATION_GRID), ("exhaustive", EXHAUSTIVE_GRID)):
        rows = [r for r in result["rows"] if r["method"] == method]
        assert {r["axis"] for r in rows} <= set(grid) and len(rows) >= len(grid)
        best = result["best"][method]
        winner = min((r for r in rows if all(r[k] == v for k, v in best.items())), key=lambda r: r["median_m"])
        assert winner["median_m"] == min(r["median_m"] for r in rows if all(  # best along every axis
            r[k] == best[k] for k in best if k != winner["axis"]))
    assert main(["tune-baselines", "--out", str(tmp_path / "no" / "such.json")]) == 2  # refused before any work
