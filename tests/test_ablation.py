"""`python -m core ablate --quick` on a tiny analytic scene: outputs, statistics, caching, resume."""

import contextlib
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from core.cli import main
from core.learning.ablation import GROUPS
from core.learning.config import load_config
from core.physics.synthetic import synthetic_scene


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    overrides = synthetic_scene(root, num_ues=200, height=24, width=24, cell=4.0, reports=6, k=3, seed=1)
    args = ["ablate", "--quick", "--scene", "analytic", "--out", str(root / "out"), "--no-progress", "--n-boot", "30",
            "--seeds", "0", "1"]  # two paired seeds of the quick plan's three: 27 runs, not 39
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0
    return root / "out", args


def _run(args):
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0


def test_quick_ablation_writes_paired_comparisons(ablation):
    out, _ = ablation
    summary = json.loads((out / "summary.json").read_text())
    lam = {float(f): v for f, v in summary["lambda_star"].items()}  # λ* per label fraction
    assert set(lam) == {0.05, 0.2, 1.0} and set(lam.values()) <= {0.1, 0.5} and summary["plan"]["seeds"] == [0, 1]
    table = pd.read_csv(out / "table.csv")
    for (split, fraction, refine), part in table.groupby(["split", "label_fraction", "refinement"]):
        assert split in ("random", "spatial") and fraction in (0.05, 0.2, 1.0)
        arms = set(part["arm"])
        expected = {"kNN fingerprinting", "ML map matching", "multilateration", "map matching, exhaustive"} \
            if refine == "-" else {"transformer λ=0", "transformer λ*"}
        assert arms == expected, (split, fraction, refine, arms)
    assert len(table.groupby(["split", "label_fraction"])) == 6
    model = table[table["arm"].str.startswith("transformer")]
    assert (model["seeds"] == 2).all()
    for fraction, part in model.groupby("label_fraction"):  # every row shows the λ actually applied
        assert set(part["lambda_phys"]) == {0.0, lam[fraction]}
    ref = model[model["lambda_phys"] == 0]
    assert ref["d_median_m"].isna().all()
    other = table[table["arm"] != "transformer λ=0"]
    for m in ("median_m", "p90_m", "rmse_m"):
        assert (other[f"d_{m}_lo"] <= other[f"d_{m}_hi"]).all()
    # Δ is the mean over seeds of the paired difference: check one against the means
    blk = table[(table["split"] == "random") & (table["label_fraction"] == 1.0) & (table["refinement"] == "off")
                & (table["group"] == "all")].set_index("arm")
    assert blk.loc["transformer λ*", "d_median_m"] == pytest.approx(
        blk.loc["transformer λ*", "median_m"] - blk.loc["transformer λ=0", "median_m"], abs=1e-9)
    assert set(table["group"]) <= set(GROUPS) and {"all", "los"} <= set(table["group"])
    curve = pd.read_csv(out / "curve.csv")
    assert sorted(curve["label_fraction"].unique()) == [0.05, 0.2, 1.0]
    assert (curve["median_m_lo"] <= curve["median_m"] + 1e-9).all() and (curve["median_m"] <= curve["median_m_hi"] + 1e-9).all()
    cdf = json.loads((out / "cdf.json").read_text())
    assert len(cdf) == 6 and "random split, 5 % labels" in cdf
    md = (out / "table.md").read_text()
    assert all(f"λ* = {v:g}" in md for v in lam.values()) and "95 % CI" in md and "spatial split" in md
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2 * 3 * 2 * 2 + 3  # splits x fractions x seeds x (λ = 0, λ*), plus per label fraction the λ that lost the tuning
    for name in runs:
        assert json.loads((out / "runs" / name / "status.json").read_text())["state"] == "done"


def test_finished_runs_are_cached_and_killed_runs_resume(ablation, monkeypatch):
    import core.learning.training as training

    out, args = ablation
    before = pd.read_csv(out / "table.csv")
    calls = []
    real_train = training.train

    def spy(config, out_dir, resume=False, **kw):
        calls.append((out_dir.name, resume))
        return real_train(config, out_dir, resume=resume, **kw)

    monkeypatch.setattr(training, "train", spy)
    _run(args)
    assert calls == []  # every arm and seed was done: nothing retrained
    pd.testing.assert_frame_equal(pd.read_csv(out / "table.csv"), before)

    # kill one run after its first epoch: the next ablation resumes it, and gets the same numbers
    run_dir = out / "runs" / "spatial-f0.2-s1-lam0"
    config = load_config(run_dir / "config.yaml")
    shutil.rmtree(run_dir)
    real_train(config, run_dir, show_progress=False, max_epochs=1)
    assert json.loads((run_dir / "status.json").read_text())["state"] == "stopped"
    _run(args)
    assert calls == [("spatial-f0.2-s1-lam0", True)]
    assert [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    after = pd.read_csv(out / "table.csv")
    pd.testing.assert_frame_equal(after, before)
    assert np.isfinite(after["median_m"]).all()
