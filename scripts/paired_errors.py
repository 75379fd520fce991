"""The paired change between two methods of ``seed_comparison.py --errors`` files: same runs, same UEs.

    PYTHONPATH=. .venv/bin/python scripts/paired_errors.py basins.npz:model_walk one_start.npz:model_walk \
        --groups all sites_1 --json F

Each argument is ``FILE.npz:METHOD`` (``METHOD`` as the file names it, e.g. ``model_walk@/path/to/map.zarr``); both
must hold the same seeds and UEs. Prints, per group, each side's median / P90 / share beyond 20 m (mean over seeds)
and the paired two-level bootstrap 95 % CI (:func:`core.learning.statistics.paired_delta`) of the change of the
median, the P90 and the share beyond 20 m of the first against the second, and of their ratio (first / second,
mean over seeds).
"""

import argparse
import json

import numpy as np

from core.learning.statistics import paired_delta

METRICS = ("median_m", "p90_m", "beyond_20m")


def load(spec: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(errors [seeds, N], {group: mask [N]})`` of ``FILE.npz:METHOD``."""
    path, sep, method = spec.partition(".npz:")
    if not sep:
        raise SystemExit(f"{spec}: expected FILE.npz:METHOD")
    with np.load(path + ".npz") as data:
        if method not in data.files:
            known = ", ".join(k for k in data.files if not k.startswith("group:"))
            raise SystemExit(f"{spec}: no method {method!r} in {path}.npz; it holds {known}")
        groups = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("group:")}
        return data[method], groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arm", help="FILE.npz:METHOD, the side whose change is reported")
    parser.add_argument("reference", help="FILE.npz:METHOD, what it is compared with")
    parser.add_argument("--groups", nargs="+", default=["all", "sites_1"])
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    (a, groups), (r, _) = load(args.arm), load(args.reference)
    if a.shape != r.shape:
        raise SystemExit(f"the two sides differ in seeds or UEs: {a.shape} vs {r.shape}")
    out = {"arm": args.arm, "reference": args.reference, "seeds": a.shape[0], "ues": a.shape[1], "groups": {}}
    for g in args.groups:
        if g not in groups:
            raise SystemExit(f"unknown group {g!r}; known: {', '.join(groups)}")
        m = groups[g].astype(bool)
        row = {"count": int(m.sum())}
        for metric in METRICS:
            d = paired_delta(list(a[:, m]), list(r[:, m]), metric, n_boot=args.n_boot)
            row[metric] = d
            scale, unit = (100.0, " %") if metric == "beyond_20m" else (1.0, " m")
            print(f"[{g} {m.sum()}] {metric:10s} Δ {scale * d['delta']:+.3f}{unit} "
                  f"[{scale * d['ci_low']:+.3f}, {scale * d['ci_high']:+.3f}]; ratio {d['ratio']:.3f}× "
                  f"[{d['ratio_ci_low']:.3f}, {d['ratio_ci_high']:.3f}]")
        out["groups"][g] = row
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
