"""Is the ablation's λ = 0 arm under-trained? Compare λ* runs against λ = 0 runs trained to convergence.

    PYTHONPATH=. .venv/bin/python scripts/converged_reference.py \
        --arm runs/ablation_full/runs/random-f0.05-s{0,1,2}-lam10 \
        --reference /tmp/conv_s0 /tmp/conv_s1 /tmp/conv_s2

The reference runs are the λ = 0 arm given as many epochs as early stopping on the val median
wants (e.g. ``python -m core train --set data.label_fraction=0.05 --set physics_loss.lambda_phys=0
--set training.epochs=120 --set training.early_stopping_patience=12 --set seed=S``). Pair them by
seed with the arm's runs (same labelled walks, same test UEs). Prints mean ± sd over seeds of the
test median / P90 / RMSE of both, and the paired two-level bootstrap 95 % CI (seeds, then UEs;
core.learning.statistics) of the change in each, and the ratio of medians.
"""

import argparse

import numpy as np

from core.learning.evaluation import evaluate_run
from core.learning.statistics import paired_delta, seed_summary


def test_errors(run_dirs: list[str], split: str) -> list[np.ndarray]:
    return [evaluate_run(d, split, refine=False, write=False, keep_errors=True)["_errors"]["model"] for d in run_dirs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", nargs="+", required=True, help="the λ* runs, one per seed")
    parser.add_argument("--reference", nargs="+", required=True, help="the converged λ = 0 runs, same seeds, same order")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    if len(args.arm) != len(args.reference):
        parser.error("--arm and --reference need one run per seed each, in the same order")
    arm, ref = test_errors(args.arm, args.split), test_errors(args.reference, args.split)
    for name, errs in (("λ* arm", arm), ("converged λ = 0", ref)):
        s = seed_summary(errs)
        print(f"{name:16s} median {s['median_m']:.2f} ± {s['median_m_sd']:.2f}  P90 {s['p90_m']:.1f} ± "
              f"{s['p90_m_sd']:.1f}  RMSE {s['rmse_m']:.1f} ± {s['rmse_m_sd']:.1f}")
    for metric in ("median_m", "p90_m", "rmse_m"):
        d = paired_delta(arm, ref, metric, n_boot=args.n_boot)
        print(f"Δ {metric:8s} {d['delta']:+.2f} m [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}], ratio {d['ratio']:.3f}")


if __name__ == "__main__":
    main()
