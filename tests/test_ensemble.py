"""An ensemble of networks as one prediction (core/learning/ensemble.py) and its cost (``bench inference``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_world import city, tiny_run

from core.errors import CoreError
from core.learning.ensemble import check_members, pool


@dataclass
class _Pred:  # the fields pool() reads and keeps
    indices: np.ndarray
    xy: np.ndarray
    sigma: np.ndarray
    true_xy: np.ndarray
    error_m: np.ndarray
    coarse_xy: np.ndarray


def test_pool_is_the_mixture_mean_and_std_and_keeps_the_first_members_starts():
    rng = np.random.default_rng(0)
    truth = rng.normal(0, 5, (4, 2))
    members = [_Pred(np.arange(4), rng.normal(0, 5, (4, 2)), rng.uniform(0.5, 3, (4, 2)), truth, np.zeros(4),
                     np.full((4, 3, 2), float(m))) for m in range(3)]
    out = pool(members)
    # reference: draw from the equal-weight mixture of the members' Gaussians, per UE and axis
    draws = np.concatenate([m.xy[None] + m.sigma[None] * rng.standard_normal((200_000, 4, 2)) for m in members])
    assert np.allclose(out.xy, draws.mean(0), atol=0.05)
    assert np.allclose(out.sigma, draws.std(0), rtol=0.01)
    assert np.allclose(out.error_m, np.linalg.norm(out.xy - truth, axis=1))
    assert np.array_equal(out.coarse_xy, members[0].coarse_xy)  # the search starts: the first member's
    with pytest.raises(CoreError, match="different samples"):
        pool([members[0], _Pred(np.arange(1, 5), *[getattr(members[1], f) for f in ("xy", "sigma", "true_xy",
                                                                                   "error_m", "coarse_xy")])])


def test_members_of_another_dataset_or_map_are_one_line():
    def run(name, dataset, radio_map):
        ref = lambda i: SimpleNamespace(id=i, describe=lambda: f"<{i}>")  # noqa: E731
        return SimpleNamespace(run_dir=Path(name), dataset=SimpleNamespace(ref=ref(dataset)),
                               radio_map=SimpleNamespace(ref=ref(radio_map)))

    check_members([run("a", "d1", "m1"), run("b", "d1", "m1")])
    with pytest.raises(CoreError) as e:
        check_members([run("a", "d1", "m1"), run("b", "d2", "m1")])
    assert str(e.value) == ("ensemble: b reads dataset <d2>, a reads <d1>: an ensemble's members must read the "
                            "same dataset")
    with pytest.raises(CoreError, match="same radio map"):
        check_members([run("a", "d1", "m1"), run("b", "d1", "m2")])
    with pytest.raises(CoreError, match="at least one run"):
        check_members([])


def test_bench_inference_times_every_member_the_network_and_the_map_search(tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "inference.json"
    assert main(["bench", "--out", str(out), "inference", "--runs", "assets/default_run,assets/default_run",
                 "--samples", "64", "--repeats", "1", "--batch-sizes", "32"]) == 0
    report = json.loads(out.read_text())
    rows, summary = report["rows"], report["summary"]
    assert {r["batch_size"] for r in rows} == {32, 256, None}  # the default batch size is always timed
    at = {r["stage"]: r for r in rows if r["batch_size"] == 256}
    members = [r for s, r in at.items() if s.startswith("member")]
    assert len(members) == 2 and all(r["cpu_ms"] > 0 and r["wall_ms"] > 0 for r in rows)
    assert at["network (2 members)"]["cpu_ms"] == pytest.approx(sum(r["cpu_ms"] for r in members))
    map_ms = next(r["cpu_ms"] for r in rows if r["stage"] == "MAP search (the network's prior)")
    assert at["network + MAP"]["cpu_ms"] == pytest.approx(at["network (2 members)"]["cpu_ms"] + map_ms)
    assert summary["samples"] == 64 and summary["network_ok"] == (summary["network_cpu_ms_per_sample"] <= 1.0)
    assert "network_map_ok" in capsys.readouterr().out
    assert main(["bench", "--out", str(out), "inference", "--runs", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("no such run directory")
    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(out), "inference", "--batch-sizes", "256,0"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--batch-sizes: must be positive integers" in err


@pytest.fixture(scope="module")
def cities(tmp_path_factory):
    """Two analytic cities; two tiny agnostic runs on ``alpha`` (seeds 0, 1) and one on ``gamma``."""
    root = tmp_path_factory.mktemp("ensemble")
    city(root, "alpha", seed=0)
    city(root, "gamma", seed=2, num_ues=60, cells=22)
    for name, scene, seed in (("a0", "alpha", 0), ("a1", "alpha", 1), ("g0", "gamma", 0)):
        tiny_run(root, name, scene, seed)
    return root


def test_evaluate_pools_the_ensemble_as_the_network_and_the_prior(cities, capsys):
    from core.cli import main
    from core.learning.inference import load_run, predict
    from core.stores.run import evaluation_path

    a0, a1 = str(cities / "a0"), str(cities / "a1")
    assert main(["evaluate", "--run", a0, "--ensemble", a1, "--refine", "--no-progress"]) == 0
    assert "network: the ensemble of 2 runs" in capsys.readouterr().out
    path = evaluation_path(a0, "test", refine=True, ensemble=[a1])
    assert path.name.startswith("eval_test_refine_ens-2-") and path.exists()
    assert not evaluation_path(a0, "test", refine=True).exists()  # the single network's result is another file
    result = json.loads(path.read_text())
    assert result["ensemble"] == [a0, a1]
    runs = [load_run(p) for p in (a0, a1)]
    idx = runs[0].dataset.indices("test")
    expect = pool([predict(r, idx) for r in runs])
    assert result["median_m"] == pytest.approx(float(np.median(expect.error_m)), rel=1e-6)
    assert result["refinement"]["before"]["median_m"] == pytest.approx(result["median_m"])


def test_a_bad_ensemble_is_one_line_before_any_work(cities, tmp_path, capsys):
    from core.cli import main

    a0 = str(cities / "a0")

    def refused(*args):
        assert main(["evaluate", "--run", a0, "--refine", "--out", str(tmp_path / "e.json"), "--no-progress",
                     *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not (tmp_path / "e.json").exists()
        return err

    assert f"--ensemble: {cities / 'g0'} was trained on dataset" in refused("--ensemble", str(cities / "g0"))
    assert refused("--ensemble", str(tmp_path / "none")).endswith("no such run directory")
    assert "given twice" in refused("--ensemble", a0)
    assert "without --scene" in refused("--ensemble", str(cities / "a1"), "--scene", "alpha")


def test_an_ensemble_reads_the_map_given_with_radio_map(cities, tmp_path, capsys):
    """``evaluate --radio-map M --ensemble``: every member reads M (a k-path or corrected map of the scene), not
    only --run; the pooled network is their mean on M."""
    from core.cli import main
    from core.learning.inference import load_run, predict
    from core.physics.twin_correction import correct_map, fit_corrections

    a0, a1 = str(cities / "a0"), str(cities / "a1")
    first = load_run(a0)
    fit = fit_corrections(first.dataset, first.radio_map)
    other = tmp_path / "corrected" / "alpha.zarr"
    correct_map(first.radio_map, fit, fit.record(first.dataset.ref.to_dict(), first.radio_map.ref.to_dict())).save(other)
    out = tmp_path / "e.json"
    assert main(["evaluate", "--run", a0, "--ensemble", a1, "--radio-map", str(other), "--out", str(out),
                 "--no-progress"]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["ensemble"] == [a0, a1] and result["radio_map_override"]["used"]["path"].endswith("alpha.zarr")
    runs = [load_run(p, radio_map_override=other) for p in (a0, a1)]
    idx = runs[0].dataset.indices("test")
    on_other, on_own = (pool([predict(r, idx) for r in rs]) for rs in (runs, [first, load_run(a1)]))
    assert result["median_m"] == pytest.approx(float(np.median(on_other.error_m)), rel=1e-6)
    assert not np.allclose(on_other.xy, on_own.xy)  # the map given is what the members read


def test_localize_pools_the_ensemble_on_a_report_file(cities, tmp_path, capsys):
    """``localize --ensemble``: the network's positions are the members' mean, at every report time; MAP takes
    the pooled prior with a given scale; bad combinations are one line before any work."""
    import pandas as pd

    from core.cli import main
    from core.reports.export import export_reports

    a0, a1 = str(cities / "a0"), str(cities / "a1")
    reports = tmp_path / "reports.csv"
    export_reports(cities / "datasets" / "alpha", "test", reports, show_progress=False, limit=8)

    def localize(out, *args):
        assert main(["localize", "--reports", str(reports), "--out", str(tmp_path / out), "--no-progress",
                     *args]) == 0, capsys.readouterr().err
        return pd.read_csv(tmp_path / out)

    one, two = localize("0.csv", "--run", a0, "--method", "network"), localize("1.csv", "--run", a1, "--method", "network")
    both = localize("e.csv", "--run", a0, "--ensemble", a1, "--method", "network")
    for c in ("network_x_m", "network_y_m"):
        assert np.allclose(both[c], (one[c] + two[c]) / 2, atol=1e-4)
    mapped = localize("m.csv", "--run", a0, "--ensemble", a1, "--method", "map", "--prior-sigma-scale", "auto")
    assert np.allclose(mapped["network_x_m"], both["network_x_m"]) and np.isfinite(mapped["x_m"]).all()
    from core.learning.inference import load_run
    from core.reports.localize import localize_reports

    run = load_run(a0)  # the search's options apply to a copy: the run given (the app's cached one) keeps its own
    r = run.config.physics_loss.refinement
    before = (r.prior_sigma_scale, r.scan_starts)
    info = localize_reports(run, reports, tmp_path / "k.csv", "map", show_progress=False, sigma_scale=0.5,
                            scan_starts=2)
    assert (info["result"]["prior_sigma_scale"]["scale"], info["result"]["scan_starts"]) == (0.5, 2)
    assert (r.prior_sigma_scale, r.scan_starts) == before and before != (0.5, 2)
    capsys.readouterr()
    for args, why in ((["--ensemble", a1, "--method", "exhaustive"], "--ensemble pools networks"),
                      (["--prior-sigma-scale", "0.5", "--method", "network"], "--prior-sigma-scale scales"),
                      (["--scan-starts", "2", "--method", "exhaustive"], "--scan-starts adds starts"),
                      (["--ensemble", str(cities / "g0")], "--ensemble: ")):
        assert main(["localize", "--run", a0, "--reports", str(reports), "--out", str(tmp_path / "x.csv"),
                     "--no-progress", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and why in err and not (tmp_path / "x.csv").exists()
