"""Network + MAP with an ENSEMBLE of networks as the prior: does averaging independently trained networks buy
what one network does not?

    PYTHONPATH=. .venv/bin/python scripts/ensemble_prior.py --ensembles A0,B1,C2 A1,B2,C0 A2,B0,C1 \
        --errors F.npz --json F.json

Each ``--ensembles`` item is one ensemble (comma-separated run directories of the same scene and dataset); give
one per replicate, no run in two of them. Per ensemble, on the ``--split`` walks, the members' Gaussian
estimates pooled as one mixture's first two moments (:mod:`core.learning.ensemble`); the MAP search then runs as
``evaluate --refine`` does, with the FIRST member's likelihood and search starts (coarse cells) and the prior
``N(mu, max(s sigma, m)^2)``, ``s`` and the floor ``m`` chosen on val as ``--prior-sigma-scale auto`` chooses them
(:func:`core.learning.prior_scale.choose_sigma_scale`, given the pooled val prediction). The MAP search's scan starts: ``--scan-starts``.

``--errors``: per-UE errors ``[ensembles, N]`` as ``ensemble`` (the pooled network alone) and ``ensemble_map``
(network + MAP), with the group masks of ``--groups-from`` (a ``seed_comparison.py --errors`` file of the same
split), to pair with :mod:`scripts.paired_errors`. Cost: one network pass per member; the summary records, per
ensemble, each member's and the whole network's CPU time per sample and the MAP search's (process CPU time over
all threads, so a loaded machine slows them alike and their ratios hold).
"""

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from core.errors import CoreError
from core.learning.ensemble import load_members, pool
from core.learning.inference import load_run, map_search_config, predict, refine_prediction
from core.learning.metrics import position_errors
from core.learning.prior_scale import CHOICE_SPLIT, check_scored_split, choose_sigma_scale


def ensemble_errors(runs, split: str, scan_starts: int) -> dict:
    """``{"network": errors [N], "map": errors [N], "scale": s, "min_sigma_m": m, "grid": [...]}`` of one ensemble
    (``runs``: the first and :func:`~core.learning.ensemble.load_members` of the others) on ``split``."""
    first = runs[0]
    search = replace(map_search_config(first.config), scan_top=scan_starts)
    val = pool([predict(r, r.dataset.indices(CHOICE_SPLIT)) for r in runs])
    choice = choose_sigma_scale(first, split, prediction=val, search=search)
    members, member_ms = [], []
    for r in runs:
        t0 = time.process_time()
        members.append(predict(r, r.dataset.indices(split)))
        member_ms.append(1000 * (time.process_time() - t0) / len(members[-1].xy))
    pred = pool(members)
    t0 = time.process_time()
    ref = refine_prediction(first, pred, use_prior=True, sigma_scale=choice["scale"], search=choice["search"])
    map_ms = 1000 * (time.process_time() - t0) / len(pred.xy)
    return {"network": position_errors(pred.xy, pred.true_xy), "map": position_errors(ref.xy, pred.true_xy),
            "scale": choice["scale"], "min_sigma_m": choice["min_sigma_m"], "grid": choice["grid"],
            "cost_ms": {"members": member_ms, "network": sum(member_ms), "map_search": map_ms}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ensembles", nargs="+", required=True, help="RUN,RUN,... per ensemble")
    parser.add_argument("--split", default="test")
    parser.add_argument("--scan-starts", type=int, default=6)
    parser.add_argument("--errors", help="write the per-UE errors here (.npz)")
    parser.add_argument("--groups-from", help="a seed_comparison.py --errors file whose group masks to copy")
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args()
    try:
        check_scored_split(args.split)
    except CoreError as e:
        raise SystemExit(str(e)) from None
    out = {"network": [], "map": [], "scales": [], "grids": [], "cost_ms": []}
    for spec in args.ensembles:
        first, *others = spec.split(",")
        run = load_run(first)
        try:  # the others on the first's stores (loaded once), refused in one line if they do not belong
            runs = [run, *load_members(run, others, option="--ensembles")]
        except CoreError as e:
            raise SystemExit(str(e)) from None
        res = ensemble_errors(runs, args.split, args.scan_starts)
        for key in ("network", "map"):
            out[key].append(res[key])
        out["scales"].append({"scale": res["scale"], "min_sigma_m": res["min_sigma_m"]})
        out["grids"].append(res["grid"])
        out["cost_ms"].append(res["cost_ms"])
        print(f"{spec}: s = {res['scale']:g}, floor {res['min_sigma_m']:g} m; network {np.median(res['network']):.3f} m, "
              f"network + MAP {np.median(res['map']):.3f} m (P90 {np.percentile(res['map'], 90):.2f} m, "
              f"{100 * np.mean(res['map'] > 20):.2f} % beyond 20 m); CPU ms per sample: members "
              f"{', '.join(f'{v:.2f}' for v in res['cost_ms']['members'])}, MAP search {res['cost_ms']['map_search']:.2f}")
    summary = {"ensembles": args.ensembles, "scales": out["scales"], "val_grids": out["grids"], "split": args.split,
               "cost_ms_per_sample": out["cost_ms"]}
    for key in ("network", "map"):
        e = np.stack(out[key])
        summary[key] = {"median_m": float(np.mean(np.median(e, axis=1))), "median_m_sd": float(np.std(np.median(e, axis=1))),
                        "p90_m": float(np.mean(np.percentile(e, 90, axis=1))), "beyond_20m": float(np.mean(e > 20))}
        print(f"{key}: median {summary[key]['median_m']:.3f} ± {summary[key]['median_m_sd']:.3f} m, "
              f"P90 {summary[key]['p90_m']:.2f} m, {100 * summary[key]['beyond_20m']:.2f} % beyond 20 m")
    if args.errors:
        groups = {}
        if args.groups_from:
            with np.load(args.groups_from) as g:
                groups = {k: g[k] for k in g.files if k.startswith("group:")}
        np.savez(args.errors, ensemble=np.stack(out["network"]), ensemble_map=np.stack(out["map"]), **groups)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
