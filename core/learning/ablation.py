"""``python -m core ablate --scene etoile --out runs/ablation [--set k=v ...]``.

Trains the three configs on the same data (``datasets/<scene>``, unless ``--set
data.dataset=...`` names another; the map is that dataset's) with the same seed:

===============  ===========================  ===========
variant          config                       lambda_phys
===============  ===========================  ===========
baseline         configs/baseline.yaml        0
physics_0.1      configs/model.yaml           0.1
physics_0.5      configs/strong_physics.yaml  0.5
===============  ===========================  ===========

then evaluates each on the val and test splits without and with test-time refinement,
next to the two classical baselines (kNN fingerprinting, ML map matching), and writes
into ``--out``:

* ``table.csv`` / ``table.md``: one row per (split, method), the metrics of
  :mod:`core.learning.metrics`, train s/epoch, inference ms/sample, and for refined rows the
  number refined and the median of the refined samples before -> after;
* ``groups.csv``: the same metrics per LOS/NLOS and sparse/dense group (test split);
* ``cdf.json``: error-CDF curves (test split) per method;
* ``<variant>/``: each training run (a variant already marked done is not retrained).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import resolve_path
from core.jobs import progress
from core.learning.config import load_config
from core.learning.metrics import METRIC_KEYS, error_cdf, grouped_metrics
from core.stores.atomic import atomic_write_text
from core.stores.run import read_status

VARIANTS = (("baseline", "configs/baseline.yaml"), ("physics_0.1", "configs/model.yaml"),
            ("physics_0.5", "configs/strong_physics.yaml"))


def _markdown(table: pd.DataFrame) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if np.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def ablate(scene: str, out: str | Path, overrides: list[str] = (), splits=("val", "test"), device="cpu",
           show_progress: bool = True) -> dict[str, Any]:
    from core.learning.baselines import run_baselines
    from core.learning.evaluation import evaluate_run
    from core.learning.inference import load_run
    from core.learning.metrics import position_errors
    from core.learning.training import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    group_rows: list[dict[str, Any]] = []
    cdf_errors: dict[str, np.ndarray] = {}
    n_steps = len(VARIANTS) + 1
    started = time.time()
    for v, (name, path) in enumerate(VARIANTS):
        config = load_config(resolve_path(path), [f"data.dataset=datasets/{scene}", *overrides])
        run_dir = out / name
        done = read_status(run_dir).get("state") == "done"
        if not done:
            progress.report(v / n_steps, f"training {name}")
            print(f"== training {name} (lambda_phys={config.physics_loss.lambda_phys})", flush=True)
            train(config, run_dir, resume=True, device=device, show_progress=show_progress)
        run = load_run(run_dir, device=device)
        for split in splits:
            res = evaluate_run(run_dir, split, refine=True, run=run, keep_errors=True)
            ref = res["refinement"]
            base = {"split": split, "lambda_phys": config.physics_loss.lambda_phys,
                    "train_s_per_epoch": res["train_s_per_epoch"], "inference_ms_per_sample": res["inference_ms_per_sample"],
                    "epochs": len(run.metrics)}
            rows.append({"method": name, "refinement": "no", **base, **{k: res[k] for k in METRIC_KEYS}})
            rows.append({"method": name, "refinement": "yes", **base, **{k: ref["after"][k] for k in METRIC_KEYS},
                         "num_refined": ref["num_refined"], "refined_median_before_m": ref["refined_before"]["median_m"],
                         "refined_median_after_m": ref["refined_after"]["median_m"]})
            if split == "test":
                cdf_errors[name] = res["_errors"]["model"]
                cdf_errors[f"{name}+refine"] = res["_errors"]["model_refined"]
                for g, m in res["groups"].items():
                    group_rows.append({"method": name, "refinement": "no", "group": g, **m})
                for g, m in ref["groups_after"].items():
                    group_rows.append({"method": name, "refinement": "yes", "group": g, **m})

    progress.report(len(VARIANTS) / n_steps, "classical baselines")
    print("== classical baselines", flush=True)
    run = load_run(out / VARIANTS[0][0], device=device)
    for split in splits:
        idx = run.dataset.indices(split)
        true_xy = run.dataset.labels[idx]
        los = run.dataset.los[idx, -1] & run.dataset.report_mask[idx, -1]
        nrep = run.dataset.report_mask[idx].sum(1)
        t0 = time.perf_counter()
        est = run_baselines(run.dataset, run.radio_map, idx, run.config)
        ms = (time.perf_counter() - t0) * 1000 / max(len(idx), 1) / max(len(est), 1)  # per method, on average
        for name, xy in est.items():
            label = {"knn": "knn_fingerprint", "ml": "ml_map_matching"}.get(name, name)
            e = position_errors(xy, true_xy)
            g = grouped_metrics(e, los, nrep)
            rows.append({"method": label, "refinement": "no", "split": split, "inference_ms_per_sample": ms,
                         **{k: g["all"][k] for k in METRIC_KEYS}})
            if split == "test":
                cdf_errors[label] = e
                for gname, m in g.items():
                    group_rows.append({"method": label, "refinement": "no", "group": gname, **m})

    table = pd.DataFrame(rows)
    groups = pd.DataFrame(group_rows)
    top = max(float(np.percentile(e, 99)) for e in cdf_errors.values())
    cdf = {name: error_cdf(e, points=200, max_m=top) for name, e in cdf_errors.items()}
    atomic_write_text(out / "table.csv", table.to_csv(index=False))
    atomic_write_text(out / "table.md", _markdown(table.drop(columns=[c for c in ("lambda_phys",) if c in table])))
    atomic_write_text(out / "groups.csv", groups.to_csv(index=False))
    atomic_write_text(out / "cdf.json", json.dumps(cdf))
    summary = {"wall_s": time.time() - started, "scene": scene, "overrides": list(overrides)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    progress.report(1.0, "ablation done")
    return {"table": table, "groups": groups, "cdf": cdf, **summary}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scene", default="etoile",
                        help="scene name: trains on datasets/<scene> and the radio map it was made with")
    parser.add_argument("--out", default="runs/ablation", help="output directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a key in all three configs (e.g. training.epochs=10); repeatable")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run(args: argparse.Namespace) -> int:
    import torch

    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device
    result = ablate(args.scene, args.out, args.overrides, device=device, show_progress=not args.no_progress)
    cols = ["split", "method", "refinement", "median_m", "p90_m", "success_5m", "num_refined",
            "refined_median_before_m", "refined_median_after_m"]
    table = result["table"]
    print(table[[c for c in cols if c in table]].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nwrote {args.out}/table.csv, table.md, groups.csv, cdf.json ({result['wall_s']:.0f} s)")
    return 0
