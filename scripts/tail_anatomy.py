"""Anatomy of the tail: is an error beyond 20 m the likelihood's fault or the search's?

For every test UE that a method puts more than ``--far`` metres off, compares the calibrated
likelihood of the UE's pooled reports (the same observation the MAP search scores, the last
``report_window_s`` before the latest present report) at the estimate and at the truth::

    dNLL = NLL(truth) - NLL(estimate)      [nats]

* ``dNLL > 0``: the map's physics prefers the wrong place: an ambiguity (or a map error at the
  truth) that no search of this likelihood can fix; only other information can (the walk, the
  network's prior, more sites).
* ``dNLL <= 0``: the truth is at least as likely: the search (or the prior) lost it.

Also per tail UE: sites heard, whether the map covers each heard site at the truth (a heard site
without a path there is a map/world disagreement).

    PYTHONPATH=. .venv/bin/python scripts/tail_anatomy.py --run runs/R [--split test] [--far 20] [--silence] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--far", type=float, default=20.0, help="tail threshold [m]")
    ap.add_argument("--silence", action="store_true", help="the likelihood with the silence term (core.physics.silence)")
    ap.add_argument("--json", help="write the per-method summary here")
    args = ap.parse_args()

    from core.learning.inference import (
        calibrate_run,
        cpu_threads,
        load_run,
        predict,
        refine_prediction,
        walk_prediction,
    )
    from core.learning.metrics import position_errors
    from core.physics.observation import site_observation

    run = load_run(args.run)
    run.config.physics_loss.silence = args.silence
    idx = run.dataset.indices(args.split)
    pred = predict(run, idx)
    calibrate_run(run)
    ref = refine_prediction(run, pred)
    flat = refine_prediction(run, pred, use_prior=False)
    walk = walk_prediction(run, indices=idx)
    est = {"network + MAP": ref.xy, "MAP, flat prior (exhaustive)": flat.xy,
           "whole walk, no network": walk.xy.cpu().numpy()}
    obs = site_observation(run.dataset, idx, window_s=run.config.physics_loss.report_window_s)
    lik = run.likelihood
    dt = lik.maps.dtype

    def nll(xy: np.ndarray) -> np.ndarray:
        out = []
        with cpu_threads(run), torch.no_grad():
            for s in range(0, len(idx), 512):
                prep = lik.prepare(obs.take(slice(s, min(s + 512, len(idx)))))
                out.append(lik.evaluate(torch.as_tensor(xy[s:s + 512], dtype=dt), prep).cpu().numpy())
        return np.concatenate(out)

    truth = pred.true_xy.astype(np.float64)
    nll_truth = nll(truth)
    ids = obs.site_ids.numpy()  # [N, K]
    heard = (ids >= 0).sum(axis=1)
    cover = lik.maps.coverage(torch.as_tensor(truth, dtype=dt))  # [S + 1, N]
    cov_truth = cover[:-1].cpu().numpy().T > 0.5  # [N, S]
    uncovered = np.array([sum(not cov_truth[n, s] for s in row if s >= 0) for n, row in enumerate(ids)])
    summary = {"run": str(args.run), "split": args.split, "far_m": args.far, "ues": int(len(idx)), "methods": {}}
    for name, xy in est.items():
        e = position_errors(xy, pred.true_xy)
        far = e > args.far
        d = nll_truth[far] - nll(np.asarray(xy, np.float64))[far]
        row = {
            "beyond": int(far.sum()), "share": float(far.mean()),
            "likelihood_prefers_estimate": int((d > 0).sum()), "truth_as_likely": int((d <= 0).sum()),
            "dnll_median": float(np.median(d)) if d.size else None,
            "heard": {str(h): int(((heard == h) & far).sum()) for h in range(1, 5)},
            "heard_site_uncovered_at_truth": int((uncovered[far] > 0).sum()),
            "share_of_squared_error": float((e[far] ** 2).sum() / max((e ** 2).sum(), 1e-12)),
        }
        summary["methods"][name] = row
        print(f"{name:32s} >{args.far:g} m: {row['beyond']:3d} ({100 * row['share']:.2f} %), "
              f"likelihood prefers the estimate {row['likelihood_prefers_estimate']}, truth as likely "
              f"{row['truth_as_likely']} (median dNLL {row['dnll_median']}), heard {row['heard']}, "
              f"a heard site uncovered at the truth {row['heard_site_uncovered_at_truth']}, "
              f"{row['share_of_squared_error']:.0%} of the squared error")
    print(f"heard sites over the test UEs: {np.bincount(heard, minlength=5)[1:].tolist()} (1..4)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
