"""Every map method with a k-path map against the run's own map (issue 21, item 3).

    PYTHONPATH=. .venv/bin/python scripts/kpath_compare.py --run assets/default_run \
        --kpath-map /work/kpath_maps/etoile.zarr [--split test] [--limit 500] [--out kpath.json] \
        [--scene etoile --dataset datasets/etoile_realistic]   # another world of the scene
        [--save-errors ERRORS.npz] [--pair-with OTHER.npz --pair-label old]  # arms of another run (other code)

Three arms on the SAME UEs (the first ``--limit`` of the split, or all):

* ``recorded``: the map the dataset records (k = 1), as ``evaluate`` reads it;
* ``k-path, path 0``: the k-path map read as k = 1 (``path_mixture="off"``): the regenerated map's
  own strongest path, to separate what regeneration changes from what the mixture does;
* ``k-path, mixture``: the k-path map with the likelihood's mixture over its paths (the default).

Per arm: exhaustive map matching and the whole walk (no network), network + MAP; median, P90, share
beyond 20 m, and the median over the pooled-window Cramér–Rao bound's median (the arm's own bound:
path 0's gradients, or the nearest path's with the mixture); the calibrated path weights; seconds.
The k-path arms read the map through ``load_run(radio_map_override=...)`` (checked: same scene,
sites, propagation and grid; the calibration is made in memory). Every arm's likelihood has no
serving features, as the shipped run's evaluation (its stored calibration marks none independent;
a fresh one would let BLER in, which would be another likelihood, not the map). Paired bootstrap CIs of the
median difference (mixture - recorded, mixture - path 0) over the UEs.

``--save-errors`` writes every arm's per-UE errors (``<arm>/<method>`` arrays, the UEs' indices as
``indices``); ``--pair-with`` reads such a file from another run on the same UEs -- e.g. the first
k-path layout's mixture run with the code of its time (``PYTHONPATH=<old tree>``, which this script
only imports from) -- and adds paired CIs ``mixture - <pair-label> <arm>``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch


def _metrics(e: np.ndarray, bound_med: float) -> dict[str, float]:
    return {"median_m": float(np.median(e)), "p90_m": float(np.percentile(e, 90)),
            "beyond_20m": float(np.mean(e > 20.0)), "x_bound": float(np.median(e)) / bound_med}


def _arm(run, indices, label: str) -> tuple[dict, dict[str, np.ndarray]]:
    from core.learning.baselines import exhaustive_map_matching
    from core.learning.evaluation import _refinement
    from core.learning.inference import bounds, calibrate_run, cpu_threads, predict, walk_prediction
    from core.learning.metrics import position_errors

    out: dict = {"arm": label, "paths": run.likelihood.paths, "path_weights": run.calibration.path_weights}
    t0 = time.perf_counter()
    covs, _ = bounds(run, indices)
    window = np.sqrt(np.trace(covs["window"], axis1=1, axis2=2))
    out["bound"] = {"window_median_m": float(np.median(window)), "window_p90_m": float(np.percentile(window, 90)),
                    "latest_median_m": float(np.median(np.sqrt(np.trace(covs["latest"], axis1=1, axis2=2))))}
    calibrate_run(run)
    pred = predict(run, indices)
    errors = {}
    times = {"bound": time.perf_counter() - t0}
    t = time.perf_counter()
    _, errors["network + MAP"], _ = _refinement(run, pred, None, None, None)
    times["network + MAP"] = time.perf_counter() - t
    t = time.perf_counter()
    with cpu_threads(run):
        xy = exhaustive_map_matching(run.dataset, run.likelihood, indices, run.config.physics_loss.report_window_s)
    errors["exhaustive"] = position_errors(xy, pred.true_xy)
    times["exhaustive"] = time.perf_counter() - t
    t = time.perf_counter()
    errors["whole-walk"] = position_errors(walk_prediction(run, indices=indices).xy.cpu().numpy(), pred.true_xy)
    times["whole-walk"] = time.perf_counter() - t
    med = out["bound"]["window_median_m"]
    out["methods"] = {name: _metrics(e, med) for name, e in errors.items()}
    out["seconds"] = times
    return out, errors


def _paired_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """Median(a) - median(b) and its 95 % bootstrap CI over paired UEs."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (n_boot, len(a)))
    d = np.median(a[idx], 1) - np.median(b[idx], 1)
    return [float(np.median(a) - np.median(b)), float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]


def main() -> None:
    from core.learning.inference import calibrate_run, load_run
    from core.learning.physics_terms import likelihood_config
    from core.physics.likelihood import RobustLikelihood

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="assets/default_run")
    ap.add_argument("--kpath-map", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--scene", default=None, help="with --dataset: the run's scene it is of (e.g. etoile)")
    ap.add_argument("--dataset", default=None, help="another dataset of the scene (e.g. datasets/etoile_realistic)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--arms", nargs="+", default=["recorded", "path0", "mixture"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--save-errors", default=None, help="write every arm's per-UE errors here (.npz)")
    ap.add_argument("--pair-with", default=None, help="per-UE errors of another run (.npz of --save-errors)")
    ap.add_argument("--pair-label", default="other", help="what --pair-with's arms are called in the CIs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"run": args.run, "kpath_map": args.kpath_map, "split": args.split, "dataset": args.dataset, "arms": []}
    errors: dict = {}
    for arm in args.arms:
        where = {"scene": args.scene, "dataset_path": args.dataset} if args.dataset else {}
        run = load_run(args.run, **where, radio_map_override=None if arm == "recorded" else args.kpath_map)
        indices = run.dataset.indices(args.split)
        indices = indices[: args.limit] if args.limit else indices
        result["ues"] = int(len(indices))
        calibrate_run(run)
        # every arm: the likelihood of the run's EFFECTIVE settings, no serving features (its stored calibration
        # predates "independent" and so uses none; a fresh calibration would take BLER in: another likelihood)
        cfg = replace(likelihood_config(run.config.physics_loss), cell_features=(),
                      path_mixture="off" if arm == "path0" else "auto")  # path0: the k-path map read as k = 1
        run._likelihood = RobustLikelihood(run.radio_map, run.calibration, cfg, device=run.device)
        out, errors[arm] = _arm(run, indices, arm)
        result["arms"].append(out)
        print(json.dumps(out, indent=1), flush=True)
    if args.save_errors:
        np.savez(args.save_errors, indices=indices, **{f"{arm}/{m}": e for arm, errs in errors.items()
                                                       for m, e in errs.items()})
    if args.pair_with:
        other = np.load(args.pair_with)
        if not np.array_equal(other["indices"], indices):
            raise SystemExit(f"--pair-with {args.pair_with}: other UEs than this run's")
        for key in other.files:
            if key != "indices":
                arm, method = key.split("/", 1)
                errors.setdefault(f"{args.pair_label} {arm}", {})[method] = other[key]
    if "mixture" in errors:
        result["paired_median_difference"] = {
            f"mixture - {other}": {m: _paired_ci(errors["mixture"][m], errors[other][m]) for m in errors[other]}
            for other in errors if other != "mixture"}
        print(json.dumps(result["paired_median_difference"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
