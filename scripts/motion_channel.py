"""What the device-motion channel buys the whole-walk estimator (issue 21, item 5).

    PYTHONPATH=. .venv/bin/python scripts/motion_channel.py --run assets/default_run --dataset datasets/etoile_motion

The dataset must record a motion channel (``make-dataset --motion-step-sigma S --motion-heading-deg H``).
On its test split, the whole-walk estimator without a network and network + whole-walk run twice on
the same reports, with the channel ignored (``WalkConfig(device_motion=False)``) and used (the
velocity measurement of :func:`core.stores.motion_model.velocity_measurement` as a prior on the walk's
velocity). Prints median, P90, share beyond 20 m, the ratio to the pooled-window Cramér–Rao bound
and the paired bootstrap CI of each change (over UEs; no network seeds are involved in the
no-network rows). ``--json FILE`` writes it.
"""

import argparse
import json

import numpy as np

from core.learning.inference import bounds, calibrate_run, load_run, predict, refine_prediction, walk_prediction
from core.learning.metrics import error_metrics
from core.learning.statistics import paired_delta
from core.physics.trajectory import WalkConfig
from core.stores.lineage import store_ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="assets/default_run")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    scene = store_ref(args.dataset, "dataset").scene
    run = load_run(args.run, scene=scene, dataset_path=args.dataset)
    if run.dataset.motion is None:
        raise SystemExit(f"error: {args.dataset} records no device motion (make-dataset --motion-step-sigma ...)")
    calibrate_run(run)
    idx = run.dataset.indices(args.split)
    truth = run.dataset.labels[idx]
    covs = bounds(run, idx)[0]["window"]
    bound_median = float(np.median(np.sqrt(np.trace(covs, axis1=1, axis2=2))))
    pred = predict(run, idx)
    ref = refine_prediction(run, pred)
    errors = {}
    for motion in (False, True):
        config = WalkConfig(device_motion=motion)
        alone = walk_prediction(run, indices=idx, config=config)
        after = walk_prediction(run, pred, start=ref.xy, config=config)
        tag = "with device motion" if motion else "no device motion"
        errors[f"whole-walk, no network, {tag}"] = np.linalg.norm(alone.xy.cpu().numpy() - truth, axis=1)
        errors[f"network + whole-walk, {tag}"] = np.linalg.norm(after.xy.cpu().numpy() - truth, axis=1)
    out = {"dataset": args.dataset, "run": args.run, "split": args.split, "count": int(len(idx)),
           "motion": run.dataset.measurement_model.motion.to_attrs(), "bound_median_m": bound_median, "methods": {},
           "deltas": {}}
    print(f"{args.dataset} ({run.dataset.measurement_model.motion.summary()}), {args.split} split, {len(idx)} UEs; "
          f"pooled-window bound median {bound_median:.3f} m")
    for name, e in errors.items():
        m = error_metrics(e)
        row = {"median_m": m["median_m"], "p90_m": m["p90_m"], "beyond_20m": m["beyond_20m"],
               "x_bound": m["median_m"] / bound_median}
        out["methods"][name] = row
        print(f"  {name:45s} median {row['median_m']:.3f} m  P90 {row['p90_m']:.2f} m  >20 m "
              f"{100 * row['beyond_20m']:.2f} %  × bound {row['x_bound']:.2f}")
    for base in ("whole-walk, no network", "network + whole-walk"):
        d = paired_delta([errors[f"{base}, with device motion"]], [errors[f"{base}, no device motion"]],
                         n_boot=args.n_boot)
        out["deltas"][base] = d
        print(f"  {base}: with − without device motion, Δ median {d['delta']:+.3f} m [{d['ci_low']:+.3f}, "
              f"{d['ci_high']:+.3f}], ratio {d['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
