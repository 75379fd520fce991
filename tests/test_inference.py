"""The app's API (load_run, predict, refine_prediction, the run lister) and `python -m core evaluate`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import StoreError
from core.learning.config import load_config
from core.learning.inference import load_run, predict, refine_prediction
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


def test_refine_prediction(run_dir):
    run = load_run(run_dir)
    pred = predict(run, run.dataset.indices("test"))
    ref = refine_prediction(run, pred, steps=4, lr=0.5)
    n = len(pred.indices)
    assert ref.path.shape == (5, n, 2) and ref.loss.shape == (5, n) and ref.refined.shape == (n,)
    assert ref.refined.all()  # threshold 1.0 in this run's config
    assert np.allclose(ref.path[0], pred.xy) and np.allclose(ref.path[-1], ref.xy)
    assert ref.residual_before.shape == ref.residual_after.shape == (n, len(run.radio_map.features))
    none = refine_prediction(run, pred, steps=3, threshold=0.0)
    assert not none.refined.any() and np.array_equal(none.xy, pred.xy)


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


def test_evaluate_command(run_dir):
    proc = subprocess.run([sys.executable, "-m", "core", "evaluate", "--run", str(run_dir), "--refine", "--baselines",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for key in ("median_m", "rmse_m", "p67_m", "p90_m", "success_5m", "success_10m", "success_20m",
                "train_s_per_epoch", "inference_ms_per_sample"):
        assert np.isfinite(result[key]), key
    assert set(result["groups"]) == {"all", "los", "nlos", "sparse", "dense"}
    r = result["refinement"]
    assert r["num_refined"] == result["count"] and {"before", "after", "refined_before", "refined_after"} <= set(r)
    assert r["before"]["median_m"] == pytest.approx(result["median_m"])
    assert set(result["baselines"]) == {"knn", "ml", "multilateration"}
    assert json.loads((run_dir / "eval_test_refine.json").read_text())["count"] == result["count"]
