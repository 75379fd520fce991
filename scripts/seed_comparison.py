"""Network vs network + MAP vs the baselines over several seeds, with paired CIs, overall and per UE group.

    PYTHONPATH=. .venv/bin/python scripts/seed_comparison.py --runs assets/default_run runs/seed1 runs/seed2 --split test

Each run is evaluated on the same UEs (the dataset's split); the baselines (kNN, ML map matching,
multilateration, exhaustive map matching) need no training, so each is one estimate repeated for
every seed. Groups: :func:`core.learning.groups.ue_groups` (LOS / NLOS at the latest present report,
last report missing, sites heard 1 / 2 / 3 / >= 4), the one definition every table uses. Prints,
per method, mean ± sd over seeds of the median / P90 / RMSE, the share beyond 20 m and the worst
2 %'s share of the squared error; the median, P90 and share beyond 20 m per group; and the paired
two-level bootstrap 95 % CI (core.learning.statistics) of the median's change and ratio of network +
MAP and network + whole-walk (``--references``) against each other method, overall, for NLOS and for one site heard
(and of the P90 overall; those entries carry ``"metric": "p90_m"``). ``--json FILE`` writes it all.

``--prior-sigma-scale S|auto``: the prior's sigma over the network's in every search with the network's prior
(``evaluate --prior-sigma-scale``; auto: chosen per run on its val split, then the sigma floor at that scale; the
chosen scales in the JSON's ``prior_sigma_scales``, the floors [m] in ``prior_min_sigmas``).

``--walk-basins N``: every whole walk also starts from up to N runner-up basins of its snapshot search
(``evaluate --walk-basins``).

``--runs A,B,C ...``: a comma-separated item is an ENSEMBLE (``evaluate --ensemble``: the networks of its runs
pooled as the network and every search's prior, read on the same map); give one disjoint ensemble per seed.

``--errors FILE.npz``: every method's per-UE errors ``[seeds, N]`` and the groups' masks, so that two
invocations with different options (e.g. ``--walk-basins``) pair on the same UEs: ``scripts/paired_errors.py``.

``--beside-map PATH ...``: every method is ALSO evaluated against each of these maps of the scene (e.g. the
twin corrected by ``correct-map``, docs/world.md), its errors named ``METHOD@PATH``; name them in
``--references`` to pair them with the methods on the dataset's own map (the same UEs, the same seeds).

Arms of runs instead of one set of seeds (docs/model.md, "Adapting to a new city")::

    PYTHONPATH=. .venv/bin/python scripts/seed_comparison.py --scene munich --split test \
        --arms zero_shot=R0,R1,R2 physics_only=P0,P1,P2 labels_5=F0,F1,F2 labels_100=H0,H1,H2 \
        --pairs physics_only-zero_shot labels_5/labels_100 zero_shot/labels_100

``--arms NAME=RUN,RUN,...``: each arm's runs, one per seed, in the same seed order in every arm, all
evaluated on ``--scene``'s split (a training scene of the run or one it never saw: the same UEs). Prints,
per arm, network and network + MAP (mean ± sd over seeds of median / P90 / share beyond 20 m) and the
exhaustive map matching of the first arm's first run (no network); then for each ``--pairs`` entry
(``A-B``: the paired change of A against B; ``A/B``: their ratio; default every ``A-B``) the paired
two-level bootstrap 95 % CI of the median's change and of its ratio, for the network and for network + MAP.
"""

import argparse
import json

import numpy as np

from core.learning.evaluation import LABELS, evaluate_run, sigma_scale_arg
from core.learning.groups import GROUPS, worst_share
from core.learning.inference import load_run
from core.learning.statistics import paired_delta, seed_summary

NAMES = {"model": "network", "model_refined": "network + MAP", "model_walk": "network + whole-walk", **LABELS}


def label(name: str) -> str:
    """A method's printed name; ``METHOD@map`` (--beside-map) keeps its map."""
    method, at, where = name.partition("@")
    return NAMES.get(method, method) + (f" @{where}" if at else "")
#: the methods that hold a network (one estimate per seed); every other method is seed-free
NETWORK_METHODS = ("model", "model_refined", "model_walk")
DELTA_GROUPS = ("all", "nlos", "sites_1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+")
    parser.add_argument("--arms", nargs="+", metavar="NAME=RUN,RUN,...",
                        help="compare arms of runs (one run per seed, same seed order) instead of methods of --runs")
    parser.add_argument("--pairs", nargs="+", metavar="A-B|A/B", help="with --arms: the pairs to compare")
    parser.add_argument("--scene", default=None, help="with --arms: the scene every run is evaluated on")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--device", default="cpu", help="torch device of the network and the MAP refinement")
    parser.add_argument("--references", nargs="+", default=["model_refined", "model_walk"],
                        help="the methods whose paired Δ median against every other method is printed")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--errors", default=None, metavar="FILE.npz",
                        help="also write every method's per-UE errors [seeds, N] and the group masks (group:NAME), to "
                             "pair two invocations on the same UEs (scripts/paired_errors.py)")
    parser.add_argument("--dataset", default=None,
                        help="another dataset of the runs' scene to evaluate on (e.g. datasets/etoile_realistic: the "
                             "same walks traced in a perturbed twin); calibrated on its train split, in memory")
    parser.add_argument("--silence", action="store_true",
                        help="every search also charges the sites a report with a free slot did not hear (evaluate --silence)")
    parser.add_argument("--scan-starts", type=int, default=None, metavar="N",
                        help="the MAP search also starts from the N best points of the exact scan (evaluate --scan-starts)")
    parser.add_argument("--prior-sigma-scale", type=sigma_scale_arg, default=None, metavar="S|auto",
                        help="the prior's sigma over the network's in every search with the network's prior (evaluate "
                             "--prior-sigma-scale); auto: chosen per run on its val split, recorded as prior_sigma_scales")
    parser.add_argument("--walk-basins", type=int, default=None, metavar="N",
                        help="every whole walk (after the network, and without one) also starts from up to N runner-up "
                             "basins of its snapshot search (evaluate --walk-basins)")
    parser.add_argument("--beside-map", nargs="+", metavar="PATH",
                        help="also evaluate every method against these maps of the scene (e.g. correct-map's), "
                             "named METHOD@PATH; pass them to --references to pair them")
    args = parser.parse_args()
    if args.arms:
        compare_arm_runs(args)
        return
    if not args.runs:
        parser.error("--runs (or --arms) is required")
    scene = None
    if args.dataset:
        from core.stores.lineage import store_ref

        scene = store_ref(args.dataset, "dataset").scene
    per_method: dict[str, list[np.ndarray]] = {}
    groups = None
    cost: dict[str, float] = {}
    scales: dict[str, float] = {}  # the prior sigma scale each run (@ map) searched with
    floors: dict[str, float] = {}  # and the prior sigma's floor [m]
    maps = [(None, "")] + [(path, f"@{path}") for path in args.beside_map or []]
    for map_path, suffix in maps:
        baselines: dict[str, np.ndarray] = {}
        for run_dir in args.runs:
            first, *others = run_dir.split(",")
            run = load_run(first, device=args.device, scene=scene, dataset_path=args.dataset,
                           radio_map_override=map_path)
            res = evaluate_run(first, args.split, refine=True, baselines=not baselines, device=args.device, run=run,
                               write=False, keep_errors=True, prior_sigma_scale=args.prior_sigma_scale,
                               scan_starts=args.scan_starts, silence=args.silence, walk_basins=args.walk_basins,
                               ensemble=others)
            scales.setdefault(run_dir + suffix, res["prior_sigma_scale"]["scale"])
            floors.setdefault(run_dir + suffix, res["prior_sigma_scale"]["min_sigma_m"])
            errors = res["_errors"]
            if not baselines:  # the baselines need no training: computed once, the same for every seed
                baselines = {k: v for k, v in errors.items() if k not in NETWORK_METHODS}
                cost |= {k + suffix: v["ms_per_sample"] for k, v in res["baselines"].items()}
            cost["model_refined" + suffix] = res["refinement"]["ms_per_sample"]
            if "walk_refinement" in res:
                cost["model_walk" + suffix] = res["walk_refinement"]["ms_per_walk"]
            for name, e in (errors | baselines).items():
                per_method.setdefault(name + suffix, []).append(e)
            if groups is None:
                from core.learning.groups import ue_groups

                groups = ue_groups(run.dataset, run.dataset.indices(args.split),
                                   run.config.physics_loss.report_window_s)
    out = {"split": args.split, "runs": args.runs, "dataset": args.dataset or "the runs' own",
           "beside_maps": args.beside_map or [], "prior_sigma_scale": args.prior_sigma_scale, "scan_starts": args.scan_starts, "silence": args.silence,
           "walk_basins": args.walk_basins,
           "prior_sigma_scales": scales, "prior_min_sigmas": floors,
           "groups": {g: int(m.sum()) for g, m in groups.items()},
           "methods": {}, "deltas": []}
    n = len(per_method["model"][0])
    print(f"{args.split} split, {n} UEs, {len(args.runs)} seeds ({', '.join(args.runs)})"
          + (f", dataset {args.dataset}" if args.dataset else ""))
    print("groups: " + ", ".join(f"{g} {int(groups[g].sum())}" for g in GROUPS if g in groups))
    for name, errs in per_method.items():
        s = seed_summary(errs)
        beyond = float(np.mean([np.mean(e > 20.0) for e in errs]))
        worst = float(np.mean([worst_share(e) for e in errs]))
        per_group = {g: {"median_m": float(np.mean([np.median(e[m]) for e in errs])) if m.any() else float("nan"),
                         "p90_m": float(np.mean([np.percentile(e[m], 90) for e in errs])) if m.any() else float("nan"),
                         "beyond_20m": float(np.mean([np.mean(e[m] > 20.0) for e in errs])) if m.any() else float("nan")}
                     for g, m in groups.items()}
        out["methods"][name] = {**s, "beyond_20m": beyond, "worst2_share": worst, "ms_per_sample": cost.get(name),
                                "groups": per_group}
        print(f"  {label(name):26s} median {s['median_m']:.3f} ± {s['median_m_sd']:.3f}  P90 {s['p90_m']:.2f} ± "
              f"{s['p90_m_sd']:.2f}  RMSE {s['rmse_m']:.2f} ± {s['rmse_m_sd']:.2f}  >20 m {100 * beyond:.2f} %  "
              f"worst 2 % carry {100 * worst:.1f} % of e²")
        print("      median / P90 / >20 m by group: " + "; ".join(
            f"{g} {v['median_m']:.2f} / {v['p90_m']:.1f} / {100 * v['beyond_20m']:.1f} %"
            for g, v in per_group.items() if g in GROUPS[1:8]))
    for ref in [m for m in args.references if m in per_method]:
        for other in [m for m in per_method if m != ref]:
            for group in DELTA_GROUPS:
                mask = groups[group]
                if not mask.any():
                    continue
                for metric in ("median_m", "p90_m") if group == "all" else ("median_m",):
                    d = paired_delta([e[mask] for e in per_method[ref]], [e[mask] for e in per_method[other]], metric,
                                     n_boot=args.n_boot)
                    out["deltas"].append({"method": ref, "other": other, "group": group,
                                          **({} if metric == "median_m" else {"metric": metric}), **d})
                    print(f"  {label(ref)} vs {label(other):26s} [{group:7s}] Δ {metric[:-2]:6s} "
                          f"{d['delta']:+.3f} m [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], ratio {d['ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)
    if args.errors:
        np.savez_compressed(args.errors, **{name: np.stack(errs) for name, errs in per_method.items()},
                            **{f"group:{g}": m for g, m in groups.items()})


ARM_METHODS = ("model", "model_refined")


def compare_arm_runs(args) -> None:
    """``--arms``: each arm's runs evaluated on ``--scene``, and the paired CIs of ``--pairs`` (see the module doc)."""
    arms: dict[str, list[str]] = {}
    for spec in args.arms:
        name, _, runs = spec.partition("=")
        if not name or not runs:
            raise SystemExit(f"--arms {spec!r}: expected NAME=RUN,RUN,...")
        arms[name] = runs.split(",")
    if len({len(r) for r in arms.values()}) != 1:
        raise SystemExit("--arms: every arm needs the same number of runs (one per seed)")
    errors: dict[str, dict[str, list[np.ndarray]]] = {}
    reference: dict[str, np.ndarray] = {}
    for name, runs in arms.items():
        for run_dir in runs:
            run = load_run(run_dir, device=args.device, scene=args.scene)
            res = evaluate_run(run_dir, args.split, refine=True, baselines=not reference, device=args.device, run=run,
                               write=False, keep_errors=True, prior_sigma_scale=args.prior_sigma_scale,
                               scan_starts=args.scan_starts, walk_basins=args.walk_basins)
            if not reference:
                reference = {k: v for k, v in res["_errors"].items() if k == "exhaustive"}
            for method in ARM_METHODS:
                errors.setdefault(name, {}).setdefault(method, []).append(res["_errors"][method])
    n = len(next(iter(errors.values()))["model"][0])
    out = {"split": args.split, "scene": args.scene, "ues": n, "arms": arms, "summary": {}, "pairs": []}
    print(f"{args.split} split of {args.scene or 'each run'}, {n} UEs, {len(next(iter(arms.values())))} seeds")
    rows = [(name, method, errs) for name, per in errors.items() for method, errs in per.items()]
    rows += [("(no network)", name, [e]) for name, e in reference.items()]
    for name, method, errs in rows:
        s = seed_summary(errs)
        beyond = float(np.mean([np.mean(e > 20.0) for e in errs]))
        out["summary"].setdefault(name, {})[method] = {**s, "beyond_20m": beyond}
        print(f"  {name:16s} {NAMES.get(method, method):22s} median {s['median_m']:.3f} ± {s['median_m_sd']:.3f}  "
              f"P90 {s['p90_m']:.2f} ± {s['p90_m_sd']:.2f}  >20 m {100 * beyond:.2f} %")
    pairs = args.pairs or [f"{a}-{b}" for i, a in enumerate(arms) for b in list(arms)[i + 1:]]
    for pair in pairs:
        op = "/" if "/" in pair else "-"
        a, _, b = pair.partition(op)
        if a not in errors or b not in errors:
            raise SystemExit(f"--pairs {pair!r}: unknown arm (known: {', '.join(arms)})")
        for method in ARM_METHODS:
            d = paired_delta(errors[a][method], errors[b][method], "median_m", n_boot=args.n_boot)
            out["pairs"].append({"pair": pair, "a": a, "b": b, "method": method, **d})
            text = (f"ratio {d['ratio']:.3f} [{d['ratio_ci_low']:.3f}, {d['ratio_ci_high']:.3f}]" if op == "/" else
                    f"Δ median {d['delta']:+.3f} m [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
            print(f"  {pair:28s} {NAMES.get(method, method):14s} {text}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2, default=float)


if __name__ == "__main__":
    main()
