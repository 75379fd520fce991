"""``python -m core evaluate --run runs/NAME [--refine] [--split test] [--baselines] [--json]``.

Evaluates a run on one split. The result (also written to ``<run>/eval_<split>[_refine].json``)
holds at top level the run's ``lambda_phys`` (as applied), ``label_fraction`` and ``data_split``, ``median_m, rmse_m, p67_m, p90_m, success_5m, success_10m,
success_20m`` (see :mod:`core.learning.metrics`), ``count``, ``train_s_per_epoch`` (mean epoch
time in metrics.jsonl) and ``inference_ms_per_sample`` (batched forward over the split,
after a warm-up), plus:

* ``groups``: the same metrics for ``los`` / ``nlos`` (serving site at the last report)
  and ``sparse`` (< 5 valid reports) / ``dense``;
* with ``--refine``: ``refinement`` = {num_refined, steps, lr, threshold,
  ``before`` / ``after`` (all samples), ``refined_before`` / ``refined_after`` (only the
  refined ones), ``groups_after``};
* with ``--baselines``: ``baselines`` = {"knn": metrics, "ml": metrics} on the same split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from core.errors import CoreError
from core.jobs import progress
from core.learning.metrics import METRIC_KEYS, error_metrics, grouped_metrics, position_errors
from core.stores.atomic import atomic_write_text


def _timed_predict(run, indices) -> tuple[Any, float]:
    from core.learning.inference import predict

    predict(run, indices[: min(64, len(indices))])  # warm-up
    t0 = time.perf_counter()
    pred = predict(run, indices)
    return pred, (time.perf_counter() - t0) * 1000.0 / max(len(indices), 1)


def evaluate_run(run_dir, split: str = "test", refine: bool = False, baselines: bool = False, device="cpu",
                 steps: int | None = None, lr: float | None = None, threshold: float | None = None,
                 run=None, write: bool = True, keep_errors: bool = False) -> dict[str, Any]:
    """Evaluate ``run_dir`` on ``split`` (see the module doc); ``run`` may be an already loaded run."""
    from core.learning.inference import load_run, refine_prediction

    run = run or load_run(run_dir, device=device)
    indices = run.dataset.indices(split)
    if len(indices) == 0:
        raise CoreError(f"--split {split}: no samples in {run.config.data.dataset}")
    progress.report(0.05, f"predicting {len(indices)} {split} samples")
    pred, ms = _timed_predict(run, indices)
    result: dict[str, Any] = {"run": str(run.run_dir), "split": split, "checkpoint": run.checkpoint.name,
                              "lambda_phys": run.config.physics_loss.lambda_phys,
                              "label_fraction": run.config.data.label_fraction, "data_split": run.config.data.split}
    result.update(error_metrics(pred.error_m))
    epoch_s = run.metrics["epoch_s"].mean() if "epoch_s" in run.metrics else float("nan")
    result["train_s_per_epoch"] = float(epoch_s)
    result["inference_ms_per_sample"] = ms
    result["groups"] = grouped_metrics(pred.error_m, pred.los, pred.num_reports)
    errors = {"model": pred.error_m}
    if refine:
        progress.report(0.4, "refining")
        ref = refine_prediction(run, pred, steps=steps, lr=lr, threshold=threshold)
        m = ref.refined
        result["refinement"] = {
            "num_refined": int(m.sum()), "fraction_refined": float(m.mean()), "steps": ref.steps, "lr": ref.lr,
            "threshold": ref.threshold,
            "before": error_metrics(ref.error_before_m), "after": error_metrics(ref.error_after_m),
            "refined_before": error_metrics(ref.error_before_m[m]), "refined_after": error_metrics(ref.error_after_m[m]),
            "groups_after": grouped_metrics(ref.error_after_m, pred.los, pred.num_reports),
        }
        errors["model_refined"] = ref.error_after_m
    if baselines:
        from core.learning.baselines import run_baselines

        progress.report(0.6, "classical baselines")
        est = run_baselines(run.dataset, run.radio_map, indices, run.config)
        result["baselines"] = {}
        for name, xy in est.items():
            e = position_errors(xy, pred.true_xy)
            result["baselines"][name] = {**error_metrics(e), "groups": grouped_metrics(e, pred.los, pred.num_reports)}
            errors[name] = e
    if write:
        name = f"eval_{split}{'_refine' if refine else ''}.json"
        atomic_write_text(Path(run.run_dir) / name, json.dumps(result, indent=2, default=float))
    progress.report(1.0, "evaluation done")
    if keep_errors:
        result["_errors"] = errors
    return result


def format_table(result: dict[str, Any]) -> str:
    """A short human-readable table of ``result``."""
    import pandas as pd

    rows = {"model": {k: result[k] for k in METRIC_KEYS}}
    for g, m in result["groups"].items():
        if g != "all":
            rows[f"model [{g}]"] = {k: m[k] for k in METRIC_KEYS}
    if "refinement" in result:
        r = result["refinement"]
        rows["model + refinement"] = {k: r["after"][k] for k in METRIC_KEYS}
        rows["refined samples, before"] = {k: r["refined_before"][k] for k in METRIC_KEYS}
        rows["refined samples, after"] = {k: r["refined_after"][k] for k in METRIC_KEYS}
    for name, m in result.get("baselines", {}).items():
        rows[f"baseline {name}"] = {k: m[k] for k in METRIC_KEYS}
    table = pd.DataFrame(rows).T
    lines = [table.to_string(float_format=lambda v: f"{v:.3f}")]
    if "lambda_phys" in result:
        lines.append(f"lambda_phys {result['lambda_phys']:g} (applied)  label_fraction {result['label_fraction']:g}  "
                     f"split {result['data_split']}")
    lines.append(f"train_s_per_epoch {result['train_s_per_epoch']:.2f}  "
                 f"inference_ms_per_sample {result['inference_ms_per_sample']:.4f}")
    if "refinement" in result:
        lines.append(f"refined {result['refinement']['num_refined']} of {result['count']} samples")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory (e.g. runs/NAME or assets/default_run)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--refine", action="store_true", help="also report test-time refinement before/after")
    parser.add_argument("--baselines", action="store_true", help="also evaluate kNN and ML map matching")
    parser.add_argument("--steps", type=int, default=None, help="refinement steps (default: the run's config)")
    parser.add_argument("--lr", type=float, default=None, help="refinement step size [m]")
    parser.add_argument("--threshold", type=float, default=None, help="refine when confidence < this")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # one thread: much faster than 2 on a shared 2-core CPU
    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device
    result = evaluate_run(args.run, args.split, args.refine, args.baselines, device=device,
                          steps=args.steps, lr=args.lr, threshold=args.threshold)
    print(json.dumps(result, indent=2, default=float) if args.json else format_table(result))
    return 0
