"""The likelihood with and without the silence term, on the same UEs and seeds, with paired CIs.

    PYTHONPATH=. .venv/bin/python scripts/silence_comparison.py --runs R0 R1 R2 [--split test] \\
        [--dataset datasets/etoile_realistic] [--json out.json]

Every run is evaluated twice (:func:`core.learning.evaluation.evaluate_run` with refinement and the
baselines): the searches of network + MAP, network + whole walk, exhaustive map matching and the
whole walk without a network use the run's calibrated likelihood, then the same plus the silence
term (:mod:`core.physics.silence`). Per method: median, P90 and share beyond 20 m, overall and for the
UEs that hear one site; the change (silence minus none) with a two-level paired bootstrap CI
(:func:`core.learning.statistics.paired_delta`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from core.learning.evaluation import evaluate_run
from core.learning.groups import ue_groups
from core.learning.inference import load_run
from core.learning.statistics import METRICS, paired_delta

METHODS = ("model_refined", "model_walk", "exhaustive", "whole-walk")
NAMES = {"model_refined": "network + MAP", "model_walk": "network + whole walk", "exhaustive": "exhaustive",
         "whole-walk": "whole walk, no network"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--dataset", default=None, help="another dataset of the runs' scene (e.g. the realistic world)")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    scene = None
    if args.dataset:
        from core.stores.lineage import store_ref

        scene = store_ref(args.dataset, "dataset").scene
    errors = {arm: {m: [] for m in METHODS} for arm in ("none", "silence")}
    fitted, groups = [], None
    for run_dir in args.runs:
        for arm in ("none", "silence"):
            run = load_run(run_dir, scene=scene, dataset_path=args.dataset)
            res = evaluate_run(run_dir, args.split, refine=True, baselines=True, run=run, write=False,
                               keep_errors=True, silence=arm == "silence")
            for m in METHODS:
                errors[arm][m].append(res["_errors"][m])
            if arm == "silence":
                fitted.append(res["silence"])
            if groups is None:
                groups = ue_groups(run.dataset, run.dataset.indices(args.split), run.config.physics_loss.report_window_s)
    out = {"split": args.split, "runs": args.runs, "dataset": args.dataset or "the runs' own", "silence": fitted,
           "ues": int(len(errors["none"]["exhaustive"][0])), "sites_1": int(groups["sites_1"].sum()), "methods": {}}
    print(f"{args.split} split, {out['ues']} UEs ({out['sites_1']} hear one site), {len(args.runs)} seeds; "
          f"silence fitted: " + ", ".join(f"eps {f['outlier']:.3f}" for f in fitted))
    for m in METHODS:
        row = {}
        for group, mask in (("all", np.ones(out["ues"], bool)), ("sites_1", groups["sites_1"])):
            for metric in ("median_m", "p90_m", "beyond_20m"):
                a = [e[mask] for e in errors["silence"][m]]
                r = [e[mask] for e in errors["none"][m]]
                d = paired_delta(a, r, metric, n_boot=args.n_boot)
                base = float(np.mean([METRICS[metric](e) for e in r]))
                row[f"{group}/{metric}"] = {"none": base, "silence": base + d["delta"], **d}
        out["methods"][m] = row
        print(f"  {NAMES[m]:24s} " + "; ".join(
            f"{k} {v['none']:.3f} -> {v['silence']:.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
            for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)


if __name__ == "__main__":
    main()
