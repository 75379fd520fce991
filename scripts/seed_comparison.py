"""Network vs network + MAP vs the classical baselines over several seeds, with paired CIs.

    PYTHONPATH=. .venv/bin/python scripts/seed_comparison.py --runs assets/default_run runs/seed1 runs/seed2 --split test

Each run is evaluated on the same UEs (the dataset's split); the baselines need no training, so
each is one estimate repeated for every seed. Prints mean ± sd over seeds of median / P90 / RMSE
and the paired two-level bootstrap 95 % CI (core.learning.statistics) of the MAP median's change
and ratio against each other method, overall and for NLOS UEs.
"""

import argparse

import numpy as np

from core.learning.evaluation import evaluate_run
from core.learning.inference import load_run
from core.learning.statistics import paired_delta, seed_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--device", default="cpu", help="torch device of the network and the MAP refinement")
    args = parser.parse_args()
    per_method: dict[str, list[np.ndarray]] = {}
    nlos = None
    baselines: dict[str, np.ndarray] = {}
    for run_dir in args.runs:
        run = load_run(run_dir, device=args.device)
        res = evaluate_run(run_dir, args.split, refine=True, baselines=not baselines, device=args.device, run=run,
                           write=False, keep_errors=True)
        errors = res["_errors"]
        if not baselines:  # the baselines need no training: computed once, the same for every seed
            baselines = {k: v for k, v in errors.items() if k not in ("model", "model_refined")}
        for name, e in (errors | baselines).items():
            per_method.setdefault(name, []).append(e)
        idx = run.dataset.indices(args.split)
        los = run.dataset.los[idx, -1] & run.dataset.report_mask[idx, -1]
        nlos = ~los if nlos is None else nlos
    print(f"{args.split} split, {len(per_method['model'][0])} UEs, {len(args.runs)} seeds ({', '.join(args.runs)})")
    for name, errs in per_method.items():
        s = seed_summary(errs)
        print(f"  {name:16s} median {s['median_m']:.3f} ± {s['median_m_sd']:.3f}  P90 {s['p90_m']:.2f} ± "
              f"{s['p90_m_sd']:.2f}  RMSE {s['rmse_m']:.2f} ± {s['rmse_m_sd']:.2f}  NLOS median "
              f"{np.mean([np.median(e[nlos]) for e in errs]):.3f}")
    mapped = per_method["model_refined"]
    for other in [m for m in per_method if m != "model_refined"]:
        for group, mask in (("all", slice(None)), ("nlos", nlos)):
            d = paired_delta([e[mask] for e in mapped], [e[mask] for e in per_method[other]], "median_m",
                             n_boot=args.n_boot)
            print(f"  MAP vs {other:16s} [{group:4s}] Δ median {d['delta']:+.3f} m "
                  f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], ratio {d['ratio']:.3f}")


if __name__ == "__main__":
    main()
