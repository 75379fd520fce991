"""The whole walk's no-network start: the bounded scan against scoring every lattice point (issue 21).

    PYTHONPATH=. .venv/bin/python scripts/walk_start_compare.py --run assets/default_run --split test

On the run's dataset and split, the whole-walk estimator without a network (what ``evaluate
--baselines`` reports as ``whole-walk``) runs on the same UEs with the start's full scan
(``WalkConfig(scan_block=0)``) and with the bounded scan (the default,
:class:`core.physics.bounded_scan.BoundedScan`), in alternation (``--repeats`` each, timings
interleaved so background load hits both alike). Prints median, P90, share beyond 20 m, ms per walk,
the share of walks whose six scan picks are identical, and the paired bootstrap CI (over UEs) of the
median's change. ``--json FILE`` writes it.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

from core.learning.inference import calibrate_run, cpu_threads, load_run, walk_prediction
from core.learning.metrics import error_metrics
from core.learning.statistics import paired_delta
from core.physics.observation import site_observation
from core.physics.trajectory import WalkConfig, scan_starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="assets/default_run")
    parser.add_argument("--split", default="test")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    run = load_run(args.run)
    calibrate_run(run)
    idx = run.dataset.indices(args.split)
    truth = run.dataset.labels[idx]
    arms = {"full scan": WalkConfig(scan_block=0), "bounded scan": WalkConfig()}
    walk_prediction(run, indices=idx[:16], config=arms["full scan"])  # warm-up
    xy, ms = {}, {name: [] for name in arms}
    for _ in range(max(1, args.repeats)):
        for name, config in arms.items():
            t0 = time.perf_counter()
            res = walk_prediction(run, indices=idx, config=config)
            ms[name].append(1000.0 * (time.perf_counter() - t0) / len(idx))
            xy[name] = res.xy.cpu().numpy()
    obs = site_observation(run.dataset, idx, window_s=run.config.physics_loss.report_window_s)
    with cpu_threads(run):
        picks = {name: scan_starts(run.likelihood, obs, bound_block=c.scan_block) for name, c in arms.items()}
    same = torch.equal(picks["full scan"], picks["bounded scan"])
    same_share = float((picks["full scan"] == picks["bounded scan"]).all(-1).all(-1).float().mean())
    errors = {name: np.linalg.norm(v - truth, axis=1) for name, v in xy.items()}
    out = {"run": args.run, "split": args.split, "count": int(len(idx)), "load_average": os.getloadavg(),
           "identical_picks_share": same_share, "methods": {}}
    print(f"{args.run}, {args.split} split, {len(idx)} UEs; load average {os.getloadavg()[0]:.2f}; "
          f"scan picks identical for {100 * same_share:.2f} % of walks ({'all' if same else 'not all'})")
    for name, e in errors.items():
        m = error_metrics(e)
        row = {"median_m": m["median_m"], "p90_m": m["p90_m"],
               "beyond_20m": m["beyond_20m"], "ms_per_walk": float(np.median(ms[name])),
               "ms_per_walk_runs": ms[name]}
        out["methods"][name] = row
        print(f"  {name:14s} median {row['median_m']:.3f} m  P90 {row['p90_m']:.2f} m  >20 m "
              f"{100 * row['beyond_20m']:.2f} %  {row['ms_per_walk']:.2f} ms/walk")
    d = paired_delta([errors["bounded scan"]], [errors["full scan"]], n_boot=args.n_boot)
    out["delta_median"] = d
    out["changed_walks"] = int(np.sum(np.abs(errors["bounded scan"] - errors["full scan"]) > 1e-3))
    print(f"  bounded − full: Δ median {d['delta']:+.4f} m [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], "
          f"{out['changed_walks']} walks moved by > 1 mm")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
