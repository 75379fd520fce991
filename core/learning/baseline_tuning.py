"""``python -m core tune-baselines [--config configs/model.yaml] [--split val] [--out FILE]``.

Tunes the map-free and map-only baselines on the VAL split, the way MAP's settings were tuned
(the report window: 0 -> 0.6 -> 1.0 s on val medians): every candidate is run on the val UEs of
the config's dataset, with the config's report window (``physics_loss.report_window_s``) and, for
exhaustive map matching, the likelihood calibrated on the train split; the lowest val median wins
(ties: the lower P90).

* **multilateration** (:class:`~core.physics.multilateration.MultilaterationConfig`): coordinate
  descent (up to two passes) from the current defaults over the starts (single-site fixes; + pairwise
  crossings; + the coarse grid), ``sigma_range_m``, ``sigma_aoa_deg``, ``robust_scale`` and
  ``iterations`` (:data:`MULTILATERATION_GRID`), each axis swept with the others at their best;
* **exhaustive map matching** (:class:`~core.physics.exhaustive.ExhaustiveMatcher`): the scan's grid
  step, then how many of its best points are searched finely (:data:`EXHAUSTIVE_GRID`).

Prints the sweep (one row per candidate: median, P90, RMSE, share beyond 20 m, ms per sample) and
the winners; ``--out`` writes them as JSON. The winners are the code's defaults (copied by hand:
a default is a reviewed decision, not a side effect); the sweep is recorded in docs/physics.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np

from core import progress
from core.errors import CoreError
from core.learning.metrics import error_metrics, position_errors
from core.stores.atomic import atomic_write_text

#: multilateration's axes, swept in this order (``starts``: fixes / pairs / grid, see the module doc)
MULTILATERATION_GRID: dict[str, tuple] = {
    "starts": ("fixes", "pairs", "pairs+grid"),
    "sigma_range_m": (1.0, 2.0, 4.0, 8.0),
    "sigma_aoa_deg": (1.5, 3.0, 6.0, 12.0),
    "robust_scale": (0.5, 1.0, 2.0, 4.0),
    "iterations": (12, 40),
}
#: exhaustive map matching's axes, swept in this order
EXHAUSTIVE_GRID: dict[str, tuple] = {"step_m": (8.0, 4.0, 2.0), "top": (1, 4, 8, 16)}
_STARTS = {"fixes": dict(pair_starts=False, grid_top=0), "pairs": dict(pair_starts=True, grid_top=0),
           "pairs+grid": dict(pair_starts=True)}


def _score(xy, truth, seconds: float) -> dict[str, float]:
    m = error_metrics(position_errors(xy, truth))
    return {k: m[k] for k in ("median_m", "p90_m", "rmse_m", "beyond_20m")} | {
        "ms_per_sample": 1000.0 * seconds / max(len(truth), 1)}


def _coordinate_descent(method: str, grid: dict[str, tuple], start: dict[str, Any], evaluate,
                        passes: int = 2) -> tuple[dict, list]:
    """Passes over ``grid``'s axes from ``start`` (each axis swept with the others at their best so far; a
    second pass only when the first moved): ``(best params, rows)``; ``evaluate(params) -> scores``."""
    best, rows, seen = dict(start), [], {}
    for k in range(passes):
        before = dict(best)
        for axis, values in grid.items():
            scored = []
            for v in values:
                params = {**best, axis: v}
                key = json.dumps(params, sort_keys=True)
                if key not in seen:
                    progress.report(0.0, f"{method}: {axis} = {v}")
                    seen[key] = evaluate(params)
                    rows.append({"method": method, "pass": k + 1, "axis": axis, **params, **seen[key]})
                scored.append((seen[key]["median_m"], seen[key]["p90_m"], v))
            best[axis] = min(scored, key=lambda s: (s[0], s[1]))[2]
        if best == before:
            break
    return best, rows


def tune(config, split: str = "val") -> dict[str, Any]:
    """The sweep of the module doc on ``split`` of ``config``'s dataset: ``{"rows", "best", "window_s", "count"}``."""
    from core.learning.baselines import calibrated_likelihood, has_site_layers
    from core.learning.scene_data import load_scene
    from core.physics.exhaustive import DEFAULT_STEP_M, DEFAULT_TOP, ExhaustiveMatcher
    from core.physics.multilateration import MultilaterationConfig, multilaterate_dataset
    from core.physics.observation import site_observation

    dataset, radio_map = load_scene(config)
    idx = dataset.indices(split)
    if len(idx) == 0:
        raise CoreError(f"--split {split}: no samples in {config.data.dataset}")
    truth = dataset.labels[idx]
    window = config.physics_loss.report_window_s
    sites = dataset.attrs.get("sites") or radio_map.attrs.get("sites") or []
    rows, best = [], {}
    if sites:
        xyz = np.array([s["position"] for s in sites], dtype=np.float64)
        base = MultilaterationConfig(window_s=window)

        def run_mlat(params):
            p = dict(params)
            cfg = dataclasses.replace(base, **_STARTS[p.pop("starts")], **p)
            t0 = time.perf_counter()
            xy = multilaterate_dataset(dataset, idx, xyz, cfg, radio_map.bounds)
            return _score(xy, truth, time.perf_counter() - t0)

        starts = next(k for k, v in _STARTS.items()
                      if all(getattr(base, f) == x for f, x in v.items()) and (k != "pairs+grid" or base.grid_top))
        start = {"starts": starts, **{k: getattr(base, k) for k in MULTILATERATION_GRID if k != "starts"}}
        best["multilateration"], part = _coordinate_descent("multilateration", MULTILATERATION_GRID, start, run_mlat)
        rows += part
    if has_site_layers(radio_map):
        lik = calibrated_likelihood(dataset, radio_map, config)
        obs = site_observation(dataset, idx, window_s=window)

        def run_exhaustive(params):
            res = ExhaustiveMatcher(lik, top=int(params["top"]), step_m=float(params["step_m"]))(obs)
            return _score(res.xy.detach().cpu().numpy(), truth, res.seconds)

        start = {"step_m": DEFAULT_STEP_M, "top": DEFAULT_TOP}
        best["exhaustive"], part = _coordinate_descent("exhaustive", EXHAUSTIVE_GRID, start, run_exhaustive)
        rows += part
    return {"split": split, "count": int(len(idx)), "window_s": window, "dataset": str(config.data.dataset),
            "rows": rows, "best": best}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/model.yaml", help="the config whose dataset and window are used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (e.g. data.dataset=datasets/munich); repeatable")
    parser.add_argument("--split", default="val", choices=["train", "val", "test"],
                        help="the split tuned on (default val; tuning on test would leak)")
    parser.add_argument("--out", default=None, help="also write the sweep as JSON to this file")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from core import resolve_path
    from core.learning.config import load_config

    torch.set_num_threads(1)  # one thread: much faster than 2 on a shared 2-core CPU
    if args.out is not None:
        from pathlib import Path

        if Path(args.out).is_dir() or not Path(args.out).parent.is_dir():
            raise CoreError(f"--out {args.out}: must be a file in an existing folder")
    config = load_config(resolve_path(args.config), args.overrides)
    result = tune(config, args.split)
    table = pd.DataFrame(result["rows"])
    print(f"{result['split']} split, {result['count']} UEs, reports pooled over {result['window_s']:g} s")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for method, params in result["best"].items():
        print(f"best {method}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(result, indent=2, default=float))
    return 0
