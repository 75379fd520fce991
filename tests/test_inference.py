"""The app's API (load_run, predict, MAP refine_prediction and its inspector helpers, the run lister)
and `python -m core evaluate`."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.cli import main
from core.errors import CoreError, StoreError
from core.learning.config import load_config
from core.learning.groups import GROUPS
from core.learning.inference import (
    RESIDUAL_COLUMNS,
    calibrate_run,
    load_run,
    predict,
    refine_prediction,
    refinement_surface,
    residual_table,
    serving_table,
)
from core.learning.training import train
from core.physics.synthetic import synthetic_scene
from core.stores.run import list_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    overrides = synthetic_scene(root / "scene", num_ues=150, height=24, width=24, cell=4.0, reports=6, k=3, seed=2)
    sets = [f"{k}={v}" for k, v in overrides.items()] + [
        "model.preset=tiny", "training.epochs=2", "training.batch_size=32", "physics_loss.lambda_phys=0.1",
        "physics_loss.refinement.min_confidence_threshold=1.0"]
    train(load_config(ROOT / "configs" / "model.yaml", sets), root / "runs" / "tiny", show_progress=False)
    return root / "runs" / "tiny"


def test_load_and_predict_with_attention(run_dir):
    run = load_run(run_dir)
    assert not run.model.training and len(run.metrics) == 2 and "val_median_m" in run.metrics
    idx = run.dataset.indices("test")[:7]
    pred = predict(run, idx, return_attention=True)
    n, t = len(idx), run.dataset.num_reports
    assert pred.xy.shape == (n, 2) and pred.sigma.shape == (n, 2) and pred.confidence.shape == (n,)
    assert np.allclose(pred.true_xy, run.dataset.labels[idx])
    assert np.allclose(pred.error_m, np.linalg.norm(pred.xy - pred.true_xy, axis=1), atol=1e-4)
    assert np.array_equal(pred.num_reports, run.dataset.report_mask[idx].sum(1))
    rows, cols = pred.patch_grid
    p = rows * cols
    assert pred.patch_bounds.shape == (p, 4)
    x_min, y_min, x_max, y_max = run.radio_map.bounds
    assert pred.patch_bounds[0, 0] == x_min and pred.patch_bounds[0, 1] == y_min
    assert np.isclose(pred.patch_bounds[-1, 2], x_max) and np.isclose(pred.patch_bounds[-1, 3], y_max)
    heads = run.model.spec.num_heads
    for w in pred.attention["temporal"]:
        assert w.shape == (n, heads, t, t) and np.allclose(w.sum(-1), 1, atol=1e-5)
    for w in pred.attention["cross"]:
        assert w.shape == (n, heads, t, p) and np.allclose(w.sum(-1), 1, atol=1e-5)


def test_only_calibrate_run_makes_and_stores_the_calibration(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "calibration.json").unlink()
    run = load_run(copy)
    predict(run, run.dataset.indices("test")[:4])
    assert run.calibration is None and not (copy / "calibration.json").exists()  # loading and predicting never write
    cal = calibrate_run(run)
    assert run.calibration is cal and (copy / "calibration.json").exists()
    assert cal.meta["dataset"]["id"] == run.dataset.ref.id
    assert calibrate_run(run) is cal  # set once: a second call makes nothing


def test_predict_returns_the_most_likely_coarse_cells(run_dir):
    run = load_run(run_dir)
    idx = run.dataset.indices("test")[:9]
    pred = predict(run, idx, top_k=3)
    assert pred.coarse_xy.shape == (9, 3, 2) and pred.coarse_prob.shape == (9, 3)
    assert (np.diff(pred.coarse_prob, axis=1) <= 1e-7).all() and (pred.coarse_prob.sum(1) <= 1 + 1e-5).all()
    cell = run.model.spec.grid_size
    wh = (np.array(run.radio_map.bounds[2:]) - np.array(run.radio_map.bounds[:2])) / cell
    assert (np.abs(pred.xy - pred.coarse_xy[:, 0]) <= wh / 2 + 1e-4).all()  # the mean lies in the most likely cell


def test_refine_prediction_is_map_on_every_sample(run_dir):
    run = load_run(run_dir)
    pred = predict(run, run.dataset.indices("test"))
    ref = refine_prediction(run, pred, top_k=2)
    n = len(pred.indices)
    assert (run_dir / "calibration.json").exists()  # the run carries its likelihood scales
    assert ref.refined.all() and ref.xy.shape == (n, 2) and ref.top_k == 2 and ref.threshold is None
    p = ref.path.shape[0]
    assert ref.path.shape == (p, n, 2) and len(ref.path_labels) == p == run.config.physics_loss.refinement.num_steps + 3
    assert ref.path_labels[:3] == ("network", "best start", "pattern search")
    assert np.allclose(ref.path[0], pred.xy) and np.allclose(ref.path_posterior[0], ref.posterior_before)
    assert ref.start_labels[:3] == ("window", "centre 1", "centre 2") and ref.starts.shape[1] == len(ref.start_labels)
    # the MAP estimate is the best point of its path, never worse than the network's estimate
    assert (ref.posterior_after <= ref.path_posterior.min(0) + 1e-4).all()
    assert (ref.posterior_after <= ref.posterior_before + 1e-4).all()
    assert np.allclose(ref.posterior_after, ref.nll_after + ref.prior_after, atol=1e-3)
    assert np.allclose(ref.error_after_m, np.linalg.norm(ref.xy - pred.true_xy, axis=1), atol=1e-4)
    assert np.median(ref.error_after_m) < np.median(ref.error_before_m)
    k = ref.site_ids.shape[1]
    for name in ("site_nats_before", "site_z_after", "residual_after", "weight"):
        assert getattr(ref, name).shape == (n, k, 3), name
    present = ref.site_ids >= 0
    assert np.isnan(ref.site_z_after[~present]).all() and (ref.weight[present].max(-1) >= 1).all()
    assert np.allclose(ref.site_nats_after.sum((1, 2)) + ref.cell_nats_after.sum(1), ref.nll_after, atol=1e-3)
    # the confidence gate is an option: nothing below 0 -> nothing moves, bit for bit
    none = refine_prediction(run, pred, threshold=0.0)
    assert not none.refined.any() and np.array_equal(none.xy, pred.xy)
    assert [none.source_name(i) for i in range(2)] == ["not refined"] * 2


def test_inference_runs_on_the_configured_threads_and_restores_them(run_dir, monkeypatch):
    import torch

    from core.learning import inference

    run = load_run(run_dir)
    assert run.config.training.num_threads == 1
    seen = []
    real = inference._predict
    monkeypatch.setattr(inference, "_predict", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        predict(run, run.dataset.indices("test")[:3])
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_inspector_helpers(run_dir):
    run = load_run(run_dir)
    pred = predict(run, run.dataset.indices("test")[:6])
    ref = refine_prediction(run, pred)
    row = 2
    table = residual_table(run, ref, row)
    assert list(table.columns) == list(RESIDUAL_COLUMNS) and len(table) == int((ref.site_ids[row] >= 0).sum())
    assert np.allclose(table["NLL MAP"], ref.site_nats_after[row].sum(-1)[ref.site_ids[row] >= 0])
    assert list(serving_table(ref, row)["feature"]) == list(ref.cell_features)
    surf = refinement_surface(run, ref, row, half_m=6.0, centre=ref.xy[row], step_m=0.5)
    assert surf.xs.shape == (25,) and surf.nll.shape == surf.prior.shape == (25, 25) and surf.step == 0.5
    assert surf.site.shape == (ref.site_ids.shape[1], 25, 25)
    assert np.allclose(surf.nll, surf.site.sum(0) + surf.cell, atol=1e-3) and surf.silence is None  # no silence term
    assert np.allclose(surf.posterior, surf.nll + surf.prior)
    # the grid's centre is the MAP estimate: the same posterior as the search found there
    assert np.isclose(surf.posterior[12, 12], ref.posterior_after[row], atol=1e-3)
    assert np.isclose(surf.xs[12], ref.xy[row, 0]) and np.isclose(surf.ys[12], ref.xy[row, 1])
    # beyond the map's bounds: NaN, not the border's values
    x0, y0, x1, y1 = run.radio_map.bounds
    edge = refinement_surface(run, ref, row, half_m=8.0, centre=(x1, y0), step_m=1.0)
    gx, gy = np.meshgrid(edge.xs, edge.ys)
    out = (gx > x1) | (gy < y0)
    assert out.any() and np.isnan(edge.nll[out]).all() and np.isnan(edge.site[:, out]).all()
    assert np.isfinite(edge.posterior[~out]).all()
    with pytest.raises(CoreError, match="row"):
        refinement_surface(run, ref, 99)


def test_list_runs(run_dir, tmp_path):
    (info,) = list_runs(run_dir.parent)
    assert info.name == "tiny" and info.path == run_dir and info.scene == "analytic"
    assert info.state == "done" and (info.epochs_done, info.epochs) == (2, 2) and info.has_checkpoint
    assert info.lambda_phys == 0.1 and info.config.training.epochs == 2 and not info.problem
    assert info.best_val_median_m == pytest.approx(load_run(run_dir).metrics["val_median_m"].min())
    assert info.last_epoch_s > 0
    assert list_runs(tmp_path / "nothing") == []
    # by path from another folder, and the extra runs (the shipped one) after those of runs_dir
    named = list_runs(run_dir.parent, extra=[ROOT / "assets" / "default_run"], relative_to=run_dir.parent.parent)
    assert [r.name for r in named] == ["runs/tiny", str(ROOT / "assets" / "default_run")]


def test_missing_or_corrupt_files_are_store_errors(run_dir, tmp_path):
    with pytest.raises(StoreError, match="no such run"):
        load_run(tmp_path / "absent")
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StoreError, match="best.pt"):
        load_run(broken)
    (broken / "config.yaml").unlink()
    with pytest.raises(StoreError, match="config.yaml"):
        load_run(broken)


def test_evaluate_command(run_dir, tmp_path, capsys):
    """The entry point in a real process once (--json); the table and the refusal in-process (the same main)."""
    proc = subprocess.run([sys.executable, "-m", "core", "evaluate", "--run", str(run_dir), "--refine", "--baselines",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("median_m", "rmse_m", "p67_m", "p90_m", "success_5m", "success_10m", "success_20m", "beyond_20m",
                "worst2_share", "train_s_per_epoch", "inference_ms_per_sample"):
        assert np.isfinite(result[key]), key
    assert tuple(result["groups"]) == GROUPS  # the one definition (core.learning.groups), every method alike
    r = result["refinement"]
    assert r["method"] == "map" and r["num_refined"] == result["count"] and r["threshold"] is None
    assert {"before", "after", "refined_before", "refined_after", "groups_after", "sources", "search"} <= set(r)
    assert sum(r["sources"].values()) == result["count"] and r["search"]["window_m"] > 0
    assert r["before"]["median_m"] == pytest.approx(result["median_m"])
    assert set(result["baselines"]) == {"knn", "ml", "multilateration", "exhaustive", "whole-walk"}
    for name, b in result["baselines"].items():
        assert tuple(b["groups"]) == GROUPS and b["ms_per_sample"] > 0, name
    # the Cramér–Rao bounds, ordered as information grows, and every method's ratio to the pooled-window one
    b = result["bound"]
    assert b["noise"]["source"] == "calibration"  # the analytic dataset records no measurement model
    assert 0 < b["walk"]["median_m"] <= b["window"]["median_m"] <= b["latest"]["median_m"]
    assert b["walk"]["median_m"] <= b["walk_velocity"]["median_m"]
    assert set(b["ratio"]) == {"model", "model_refined", "model_walk", "knn", "ml", "multilateration", "exhaustive",
                               "whole-walk"}
    assert b["ratio"]["model_refined"] == pytest.approx(r["after"]["median_m"] / b["window"]["median_m"])
    assert b["corrected_map"] is False  # the twin as generated: no caveat
    w = result["walk_refinement"]
    assert w["method"] == "whole-walk" and w["ms_per_walk"] > 0 and np.isfinite(w["after"]["median_m"])
    assert result["baselines"]["whole-walk"]["median_m"] < result["baselines"]["knn"]["median_m"]
    assert json.loads((run_dir / "eval_test_refine.json").read_text())["count"] == result["count"]
    out = tmp_path / "val.json"
    capsys.readouterr()
    rc = main(["evaluate", "--run", str(run_dir), "--split", "val", "--refine", "--baselines", "--threshold", "0.5",
               "--top-k", "1", "--window", "0", "--out", str(out)])
    table = capsys.readouterr()
    assert rc == 0, table.err
    assert json.loads(out.read_text())["split"] == "val" and not (run_dir / "eval_val_refine.json").exists()
    lines = table.out.splitlines()
    for label in ("network", "network + MAP", "network + whole-walk", "kNN fingerprint", "ML map matching",
                  "multilateration", "map matching, exhaustive", "whole-walk (no network)"):
        rows = [line for line in lines if re.match(re.escape(label) + r"\s+(-?[\d.]|nan)", line)]
        assert len(rows) == 6, label  # the metrics, the method table, three group tables and the bound table
    assert "bound: last 1 s of reports" not in table.out and "bound: last 0 s of reports" in table.out
    assert "caveat:" not in table.out
    assert "median error [m] per group" in table.out and "nlos" in table.out and "sites_1" in table.out
    # --silence needs a recorded sensitivity: one line, before any work, nothing written
    rc = main(["evaluate", "--run", str(run_dir), "--refine", "--silence"])
    quiet = capsys.readouterr()
    assert rc == 2 and "records no sensitivity" in quiet.err and "Traceback" not in quiet.err
    assert not (run_dir / "eval_test_refine_silence.json").exists()


def test_a_training_scene_evaluated_on_another_dataset_of_it(run_dir, tmp_path):
    """``evaluate --scene S --dataset D`` on a TRAINING scene reads D (another world of the same walks'
    scene, made with the trained map), not the trained dataset; the run's stored calibration stays its own."""
    from core.learning.evaluation import evaluate_scene
    from core.physics.synthetic import synthetic_dataset
    from core.stores.radio_map import RadioMap

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    trained = load_run(copy)
    radio_map = RadioMap.load(trained.radio_map.source)
    other = synthetic_dataset(radio_map, 150, reports=6, k=3, seed=2, nlos_prob=0.6)  # the same walks, a harsher world
    other.save(tmp_path / "analytic_nlos")
    stamp = (copy / "calibration.json").read_bytes()
    base = evaluate_scene(copy, "analytic", "test", write=False)
    moved = evaluate_scene(copy, "analytic", "test", dataset_path=tmp_path / "analytic_nlos", write=True)
    assert moved["count"] == base["count"] and moved["median_m"] != base["median_m"]
    assert (copy / "calibration.json").read_bytes() == stamp  # calibrated in memory for the other dataset
    assert (copy / "eval_test_analytic-analytic_nlos.json").exists() and not (copy / "eval_test_analytic.json").exists()
    with pytest.raises(CoreError, match="elsewhere"):  # a dataset of another scene is refused
        other_scene = synthetic_dataset(radio_map, 20, reports=6, k=3, seed=3)
        other_scene.attrs["scene"] = "elsewhere"
        other_scene.save(tmp_path / "elsewhere")
        load_run(copy, scene="analytic", dataset_path=tmp_path / "elsewhere")


def test_prior_sigma_scale_auto_is_chosen_on_val_and_recorded(run_dir, tmp_path, capsys):
    """``evaluate --prior-sigma-scale auto``: the scale with the smallest val median at the run's sigma floor, then
    the floor with the smallest val median at that scale, recorded with their grid, and the searches run with
    them; the val split and a missing --refine are refused in one line before any work."""
    from core.learning.evaluation import evaluate_run
    from core.learning.prior_scale import MIN_SIGMAS_M, SIGMA_SCALES

    res = evaluate_run(run_dir, "test", refine=True, prior_sigma_scale="auto", write=False, keep_errors=True)
    choice = res["prior_sigma_scale"]
    scales, floors = choice["grid"][:len(SIGMA_SCALES)], choice["grid"][len(SIGMA_SCALES):]
    assert choice["split"] == "val" and [r["scale"] for r in scales] == list(SIGMA_SCALES)
    assert {r["min_sigma_m"] for r in scales} == {1.0}  # the run's floor (the config's default)
    first = min(scales, key=lambda r: r["median_m"])
    assert [(r["scale"], r["min_sigma_m"]) for r in floors] == [(first["scale"], m) for m in MIN_SIGMAS_M if m != 1.0]
    assert choice["scale"] == first["scale"]
    chosen = next(r for r in choice["grid"] if (r["scale"], r["min_sigma_m"]) == (choice["scale"], choice["min_sigma_m"]))
    assert chosen["median_m"] == min(r["median_m"] for r in choice["grid"])
    assert choice["count"] == len(load_run(run_dir).dataset.indices("val"))
    run = load_run(run_dir)  # the same searches from the numbers: the scale given, the floor in the run's config
    run.config.physics_loss.refinement.prior_min_sigma_m = choice["min_sigma_m"]
    fixed = evaluate_run(run_dir, "test", refine=True, prior_sigma_scale=choice["scale"], run=run, write=False,
                         keep_errors=True)
    assert fixed["prior_sigma_scale"] == {"scale": choice["scale"], "min_sigma_m": choice["min_sigma_m"], "split": None}
    np.testing.assert_allclose(res["_errors"]["model_refined"], fixed["_errors"]["model_refined"])
    run = load_run(run_dir)
    pred = predict(run, run.dataset.indices("test"))
    for s in (2.0, 1.0 / 16):  # the prior the search used (and the inspector draws) is the scaled one
        np.testing.assert_allclose(refine_prediction(run, pred, sigma_scale=s).prior_sigma, pred.sigma * np.float32(s))
    rc = main(["evaluate", "--run", str(run_dir), "--refine", "--prior-sigma-scale", "auto",
               "--out", str(tmp_path / "a.json")])
    assert rc == 0 and json.loads((tmp_path / "a.json").read_text())["prior_sigma_scale"]["split"] == "val"
    capsys.readouterr()
    for args, words in ((["--refine", "--split", "val", "--prior-sigma-scale", "auto"], "chooses the scale on the val"),
                        (["--prior-sigma-scale", "0.5"], "give --refine"),
                        (["--refine", "--prior-sigma-scale", "nan"], "auto or a")):
        try:
            rc = main(["evaluate", "--run", str(run_dir), *args])
        except SystemExit as stop:  # argparse refuses a bad value itself
            rc = stop.code
        err = capsys.readouterr().err
        assert rc == 2 and words in err and "Traceback" not in err, args
    assert not list(run_dir.glob("eval_*prior*.json"))


def test_scan_starts_reach_the_search_and_the_inspector(run_dir):
    """``evaluate --scan-starts N`` (``physics_loss.refinement.scan_starts``): the MAP search holds N starts from the
    exact scan, recorded in the result and labelled for the inspector; its own result file."""
    from core.learning.evaluation import evaluate_run
    from core.stores.run import evaluation_path

    res = evaluate_run(run_dir, "test", refine=True, scan_starts=3, write=False)
    r = res["refinement"]
    assert r["search"]["scan_top"] == 3 and set(r["sources"]) == {"window", "centre", "global", "scan"}
    assert sum(r["sources"].values()) == res["count"]
    run = load_run(run_dir)
    run.config.physics_loss.refinement.scan_starts = 3
    ref = refine_prediction(run, predict(run, run.dataset.indices("test")[:20]))
    assert ref.start_labels[-3:] == ("scan 1", "scan 2", "scan 3") and ref.starts.shape[1] == len(ref.start_labels)
    won = ref.source == 3  # the label of the winning column is its kind's
    assert all(ref.source_name(i).startswith("scan") for i in np.flatnonzero(won & ref.refined))
    assert evaluation_path(run_dir, "test", refine=True, scan_starts=3).name == "eval_test_refine_scan-3.json"


def test_walk_basins_reach_both_whole_walks_and_name_the_result(run_dir, capsys):
    """``evaluate --walk-basins N``: recorded, its own result file; refused without a whole walk to start."""
    from core.cli import main

    rc = main(["evaluate", "--run", str(run_dir), "--refine", "--walk-basins", "2", "--no-progress", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["walk_basins"] == 2 and "walk_refinement" in res
    assert (run_dir / "eval_test_refine_basins-2.json").is_file()
    rc = main(["evaluate", "--run", str(run_dir), "--walk-basins", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "give one of them" in err and "Traceback" not in err


def test_bound_on_a_corrected_map_carries_its_caveat(run_dir, tmp_path, capsys):
    """A map that correct-map made (attrs["twin_correction"]): evaluate still prints the bound, flagged in the JSON
    and with one caveat line under its table (the fitted correction's slope is no information; docs/world.md)."""
    from core.physics.twin_correction import BOUND_CAVEAT, correct_map, fit_corrections

    run = load_run(run_dir)
    fit = fit_corrections(run.dataset, run.radio_map)
    path = tmp_path / "corrected" / "synthetic.zarr"
    correct_map(run.radio_map, fit, fit.record(run.dataset.ref.to_dict(), run.radio_map.ref.to_dict())).save(path)
    out = tmp_path / "eval.json"
    capsys.readouterr()
    rc = main(["evaluate", "--run", str(run_dir), "--split", "val", "--refine", "--radio-map", str(path),
               "--no-progress", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    bound = json.loads(out.read_text())["bound"]
    assert bound["corrected_map"] is True and bound["window"]["median_m"] > 0
    assert printed.out.count(BOUND_CAVEAT) == 1
