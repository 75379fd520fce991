"""``python -m core evaluate --run runs/NAME [--scene SCENE] [--refine] [--split test] [--baselines] [--json]``.

Evaluates a run on one split. The result (also written to ``<run>/eval_<split>[_refine].json``; for a
shipped run, which is read-only, to ``runs/evaluations/<run name>/``: :func:`~core.stores.run.evaluation_path`)
holds at top level the run's ``lambda_phys`` (as applied), ``label_fraction`` and ``data_split``, ``median_m, rmse_m, p67_m, p90_m, success_5m, success_10m,
success_20m, beyond_20m, worst2_share`` (see :mod:`core.learning.metrics`), ``count``, ``train_s_per_epoch`` (mean epoch
time in metrics.jsonl) and ``inference_ms_per_sample`` (batched forward over the split,
after a warm-up), plus:

* ``groups``: the same metrics per group of :func:`core.learning.groups.ue_groups` (``los`` /
  ``nlos`` at the latest PRESENT report, ``last_missing``, ``sites_1`` .. ``sites_4+`` heard over
  the run's report window, ``sparse`` (< 5 valid reports) / ``dense``), every method alike;
* with ``--refine``: ``refinement`` = the network + MAP refinement
  (:func:`core.learning.inference.refine_prediction`: every sample, or with
  ``--threshold`` only those less confident): {method "map", num_refined,
  fraction_refined, threshold, top_k, window_s, use_prior, search (the MapSearchConfig),
  ms_per_sample, sources (how many samples each kind of start won: window, centre,
  global), ``before`` / ``after`` (all samples), ``refined_before`` / ``refined_after``
  (only the refined ones), ``groups_after``}; and ``prior_sigma_scale`` = {scale, split}: the prior's
  sigma over the network's in every search with the network's prior (``--prior-sigma-scale S``, or
  ``auto``: chosen on the val split, with its ``count`` and per-scale ``grid``,
  :mod:`core.learning.prior_scale`; ``split`` None when given);
* with ``--baselines``: ``baselines`` = {"knn", "ml", "multilateration", "exhaustive": metrics}
  on the same split and the same reports (the run's window; each with its ``groups`` and
  ``ms_per_sample``); ``exhaustive`` is the run's calibrated likelihood searched over the whole
  map with no network (:mod:`core.physics.exhaustive`), the strongest map-only baseline.
* with ``--refine`` also ``walk_refinement``: the whole-walk MAP after the network
  (:func:`core.learning.inference.walk_prediction`: the network's prior, started at network +
  MAP) = {method "whole-walk", ms_per_walk, after, groups_after}; with ``--baselines`` also
  ``baselines["whole-walk"]`` (:mod:`core.physics.trajectory` without a network) and
  ``walk_ms_per_walk``; both also start from ``walk_basins`` runner-up basins of their snapshot search
  (``--walk-basins N``, :func:`core.physics.trajectory.runner_up_basins`; recorded at top level);
* with ``--ensemble RUN,RUN``: ``ensemble`` = every member, ``--run`` first: their networks pooled
  (:mod:`core.learning.ensemble`, the members' mean and mixture sigma) are "the network" of every row and the
  searches' prior (an "auto" scale is chosen for the pooled val prediction); with ``--radio-map`` every member
  reads that map; ``inference_ms_per_sample`` is the members' sum; the result file ``..._ens-<members>-<id>.json``;
* ``bound`` (where the map has per-site layers): the Cramér–Rao bounds of the position
  (:mod:`core.physics.bound`, at the true positions, the noise of the dataset's measurement
  model) for the latest report, the reports of the pooled window (``window_s``), the whole
  walk with displacements known and with the velocity unknown, each ``{median_m, p90_m}`` of
  the per-UE RMS bound; ``noise`` {source, sigma, clock_ns}; ``ratio`` = {method: its median
  error / the pooled-window bound's median} (methods as in the errors: model, model_refined,
  model_walk, the baselines).

With ``--scene SCENE`` the run is evaluated on that scene (its dataset and map; a held-out scene
never seen in training: its dataset is ``<folder of the run's first dataset>/<SCENE>`` unless
``--dataset`` says; its map is the one that dataset records, wherever it lies; MAP refinement on that
map with a calibration transferred from the training scenes). The result, written to ``<run>/eval_<split>_<SCENE>[_refine].json``, is that scene's, with
``scene``, ``held_out`` and ``scenes``: the in-scene vs held-out table, one row per training scene
and one for SCENE, each ``{scene, role ("trained" | "held-out"), count, median_m, p90_m,
rmse_m}`` and, with ``--refine``, ``refined_median_m`` and ``refined_p90_m`` (same split everywhere).

The table printed without ``--json`` has one row per method (network, network + MAP,
network + whole-walk, the baselines; :func:`method_table`: median, P90, RMSE, share beyond 20 m, the worst 2 %'s share
of the squared error, cost per sample), the median, P90 and share beyond 20 m per group
(:func:`group_table`), and the bounds beside every method (median, P90, × the pooled-window
bound). ``--out FILE`` writes the JSON there instead of into the run directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from core import cli_types, progress
from core.errors import CoreError
from core.learning.ensemble import load_members
from core.learning.metrics import METRIC_KEYS, error_metrics, grouped_metrics, position_errors
from core.learning.prior_scale import apply_sigma_scale, sigma_scale_arg
from core.stores.atomic import atomic_write_text
from core.stores.lock import output_lock
from core.stores.output import check_writable
from core.stores.run import evaluation_path


def _timed_predict(run, indices) -> tuple[Any, float]:
    from core.learning.inference import predict

    predict(run, indices[: min(64, len(indices))])  # warm-up
    t0 = time.perf_counter()
    pred = predict(run, indices)
    return pred, (time.perf_counter() - t0) * 1000.0 / max(len(indices), 1)


def evaluate_run(run_dir, split: str = "test", refine: bool = False, baselines: bool = False, device="cpu",
                 threshold: float | None = None, top_k: int | None = None, window_s: float | None = None,
                 run=None, write: bool = True, keep_errors: bool = False, silence: bool = False,
                 prior_sigma_scale: float | str | None = None, scan_starts: int | None = None,
                 walk_basins: int | None = None, ensemble: list[str] | None = None) -> dict[str, Any]:
    """Evaluate ``run_dir`` on ``split`` (see the module doc); ``run`` may be an already loaded run.

    ``ensemble``: other runs of the same dataset and map whose networks are pooled with this run's
    (:mod:`core.learning.ensemble`) as "the network": its estimate, MAP's and the whole walk's prior, the choice
    of an "auto" scale; recorded as ``result["ensemble"]`` (every member, this run first).

    ``silence``: the likelihood of every search (MAP, exhaustive, whole walk) also charges the sites
    a report with a free slot did not hear (:mod:`core.physics.silence`; ``physics_loss.silence``).
    ``prior_sigma_scale``: the prior's sigma over the network's in every search with the network's prior
    (``physics_loss.refinement.prior_sigma_scale``; None: the run's), or "auto": chosen on the val split
    (:mod:`core.learning.prior_scale`); recorded as ``result["prior_sigma_scale"]``. ``scan_starts``: the MAP
    search's starts from the exact scan of the likelihood (``physics_loss.refinement.scan_starts``; None: the
    run's), recorded in ``result["refinement"]["search"]["scan_top"]``. ``walk_basins``: the runner-up basins the
    whole walks (after the network, and without one) also start from (``physics_loss.refinement.walk_basins``;
    None: the run's), recorded as ``result["walk_basins"]``.

    ``threshold``, ``top_k``, ``window_s``: the MAP refinement's options
    (:func:`~core.learning.inference.refine_prediction`; None: its defaults).
    ``keep_errors`` adds ``_errors`` = {method: errors [N] in metres}.
    """
    from core.learning.inference import load_run

    run = run or load_run(run_dir, device=device)
    _search_options(run, split, refine, silence, scan_starts, prior_sigma_scale, walk_basins)
    indices = run.dataset.indices(split)
    if len(indices) == 0:
        raise CoreError(f"--split {split}: no samples in {run.config.data.dataset}")
    if write:  # before the work: a result that cannot be written is refused now
        check_writable(evaluation_path(run.run_dir, split, refine=refine, silence=silence,
                                       prior_sigma_scale=prior_sigma_scale, scan_starts=scan_starts,
                                       walk_basins=walk_basins, ensemble=ensemble), "--run")
    members = load_members(run, ensemble or [], device)
    progress.report(0.05, f"predicting {len(indices)} {split} samples")
    pred, ms = _timed_predict(run, indices)
    if members:
        from core.learning.ensemble import pool

        timed = [_timed_predict(m, indices) for m in members]
        pred, ms = pool([pred, *(p for p, _ in timed)]), ms + sum(t for _, t in timed)
    result: dict[str, Any] = {"run": str(run.run_dir), "split": split, "checkpoint": run.checkpoint.name,
                              "lambda_phys": run.config.physics_loss.lambda_phys,
                              "label_fraction": run.config.data.label_fraction, "data_split": run.config.data.split,
                              "scene": run.scene, "held_out": run.held_out,
                              "paths_per_site": run.radio_map.paths_per_site}
    if run.map_override is not None:
        result["radio_map_override"] = run.map_override
    if members:
        result["ensemble"] = [str(r.run_dir) for r in (run, *members)]
    result["walk_basins"] = int(run.config.physics_loss.refinement.walk_basins)
    result.update(error_metrics(pred.error_m))
    epoch_s = run.metrics["epoch_s"].mean() if "epoch_s" in run.metrics else float("nan")
    result["train_s_per_epoch"] = float(epoch_s)
    result["inference_ms_per_sample"] = ms
    result["groups"] = grouped_metrics(pred.error_m, pred.groups)
    errors = {"model": pred.error_m}
    bound_rms = _bound(run, indices, window_s, result)
    if refine:
        result["prior_sigma_scale"] = apply_sigma_scale(run, split, prior_sigma_scale, members)
        progress.report(0.4, "MAP refinement")
        result["refinement"], errors["model_refined"], refined = _refinement(run, pred, threshold, top_k, window_s)
        if bound_rms is not None:
            progress.report(0.5, "whole-walk refinement")
            result["walk_refinement"], errors["model_walk"] = _walk(run, pred, refined)
    if baselines:
        _baselines(run, indices, pred, bound_rms is not None, result, errors)
    _ratios(result, errors, bound_rms)
    if run.config.physics_loss.silence and run._likelihood is not None:
        result["silence"] = run.likelihood.silence.to_dict()
    if write:
        atomic_write_text(evaluation_path(run.run_dir, split, refine=refine, silence=silence,
                                          prior_sigma_scale=prior_sigma_scale, scan_starts=scan_starts,
                                          walk_basins=walk_basins, ensemble=ensemble),
                          json.dumps(result, indent=2, default=float))
    progress.report(1.0, "evaluation done")
    if keep_errors:
        result["_errors"] = errors
    return result


def _baselines(run, indices, pred, with_walk: bool, result: dict[str, Any], errors: dict[str, Any]) -> None:
    """The classical baselines (and, where the map has per-site layers, the whole walk with no network) on
    ``indices``: ``result["baselines"][name]`` = metrics, groups and ms per sample; ``errors[name]`` = errors [N] m."""
    from core.learning.baselines import run_baselines
    from core.learning.inference import calibrate_run, cpu_threads, walk_prediction

    progress.report(0.6, "classical baselines")
    calibrate_run(run)  # the likelihood exhaustive map matching searches
    cost: dict[str, float] = {}
    with cpu_threads(run):
        est = run_baselines(run.dataset, run.radio_map, indices, run.config, likelihood=run.likelihood, timings=cost)
    result["baselines"] = {}
    if with_walk:
        walk = walk_prediction(run, indices=indices)  # without a network
        est["whole-walk"] = walk.xy.cpu().numpy()
        cost["whole-walk"] = walk.seconds / max(len(indices), 1)
        result["walk_ms_per_walk"] = 1000.0 * cost["whole-walk"]
    for name, xy in est.items():
        e = position_errors(xy, pred.true_xy)
        result["baselines"][name] = {**error_metrics(e), "groups": grouped_metrics(e, pred.groups),
                                     "ms_per_sample": 1000.0 * cost.get(name, float("nan"))}
        errors[name] = e


def evaluate_scene(run_dir, scene: str, split: str = "test", refine: bool = False, device="cpu",
                   dataset_path=None, write: bool = True, baselines: bool = False, **options) -> dict[str, Any]:
    """Evaluate ``run_dir`` on ``scene`` (a training scene or a held-out one; ``baselines`` there too) and add
    the in-scene vs held-out table ``scenes`` (every training scene and ``scene``, the same ``split``; see the
    module doc). ``options``: ``threshold``, ``top_k``, ``window_s`` of :func:`evaluate_run`."""
    from core.learning.inference import load_run

    run = load_run(run_dir, device=device, scene=scene, dataset_path=dataset_path)
    path = evaluation_path(run.run_dir, split, scene, refine, dataset=dataset_path, silence=options.get("silence", False),
                           prior_sigma_scale=options.get("prior_sigma_scale"), scan_starts=options.get("scan_starts"),
                           walk_basins=options.get("walk_basins"))
    if write:
        check_writable(path, "--run")
    result = evaluate_run(run_dir, split, refine, baselines, run=run, write=False, **options)
    rows = []
    for name in run.trained_scenes:
        if name == scene:
            other = result
        else:
            other = evaluate_run(run_dir, split, refine, run=load_run(run_dir, device=device, scene=name),
                                 write=False, **options)
        rows.append(_scene_row(name, "trained", other))
    if run.held_out:
        rows.append(_scene_row(scene, "held-out", result))
    result["scenes"] = rows
    if write:
        atomic_write_text(path, json.dumps(result, indent=2, default=float))
    return result


def _scene_row(scene: str, role: str, result: dict[str, Any]) -> dict[str, Any]:
    """One row of the in-scene vs held-out table."""
    row = {"scene": scene, "role": role, "count": result["count"], "median_m": result["median_m"],
           "p90_m": result["p90_m"], "rmse_m": result["rmse_m"]}
    if "refinement" in result:
        row.update(refined_median_m=result["refinement"]["after"]["median_m"],
                   refined_p90_m=result["refinement"]["after"]["p90_m"])
    return row


def _search_options(run, split: str, refine: bool, silence: bool, scan_starts: int | None, prior_sigma_scale,
                    walk_basins: int | None = None) -> None:
    """The searches' options set in ``run``'s config, each checked before any work: the silence term (refused
    without a recorded sensitivity), the scan starts, the whole walks' basins and a scale "auto" (refused on the
    split it is chosen on)."""
    if silence:
        run.silence_threshold()  # refused before any work when there is none
        run.config.physics_loss.silence = True
    if scan_starts is not None:
        run.config.physics_loss.refinement.scan_starts = int(scan_starts)
    if walk_basins is not None:
        run.config.physics_loss.refinement.walk_basins = int(walk_basins)
    if prior_sigma_scale == "auto" and refine:
        from core.learning.prior_scale import check_scored_split

        check_scored_split(split)


def _refinement(run, pred, threshold, top_k, window_s) -> tuple[dict[str, Any], Any, Any]:
    """``(result["refinement"], errors after [N], the RefinedPrediction)`` of the MAP refinement of ``pred``."""
    from dataclasses import asdict

    import numpy as np

    from core.learning.inference import SOURCES, calibrate_run, refine_prediction

    calibrate_run(run)  # calibrated (and stored) before the timing
    run.refiner()
    ref = refine_prediction(run, pred, threshold=threshold, top_k=top_k, window_s=window_s)
    m = ref.refined
    won = np.bincount(ref.source[m].astype(np.int64), minlength=len(SOURCES))
    return {
        "method": "map", "num_refined": int(m.sum()), "fraction_refined": float(m.mean()) if m.size else 0.0,
        "threshold": ref.threshold, "top_k": ref.top_k, "window_s": ref.window_s, "use_prior": ref.use_prior,
        "search": asdict(ref.search), "ms_per_sample": 1000.0 * ref.seconds / max(int(m.sum()), 1),
        "sources": {name: int(c) for name, c in zip(SOURCES, won)},
        "before": error_metrics(ref.error_before_m), "after": error_metrics(ref.error_after_m),
        "refined_before": error_metrics(ref.error_before_m[m]), "refined_after": error_metrics(ref.error_after_m[m]),
        "groups_after": grouped_metrics(ref.error_after_m, pred.groups),
    }, ref.error_after_m, ref


def _bound(run, indices, window_s, result):
    """Adds ``result["bound"]`` (the Cramér–Rao bounds, :func:`core.learning.inference.bounds`): per
    kind ``{median_m, p90_m}`` of the RMS bound sqrt(trace cov), and ``noise`` / ``window_s``; returns
    the pooled-window bound per UE [m] (None where the map has no per-site layers)."""
    import numpy as np

    from core.learning.inference import bounds
    from core.physics.twin_correction import is_corrected

    w = run.config.physics_loss.report_window_s if window_s is None else float(window_s)
    out = bounds(run, indices, w)
    if out is None:
        return None
    covs, noise = out
    rms = {k: np.sqrt(np.trace(c, axis1=1, axis2=2)) for k, c in covs.items()}
    result["bound"] = {"noise": {"source": noise.source, "sigma": list(noise.sigma), "clock_ns": noise.clock_ns},
                       "window_s": w, "corrected_map": is_corrected(run.radio_map),
                       **{k: {"median_m": float(np.median(v)), "p90_m": float(np.percentile(v, 90))}
                          for k, v in rms.items()}}
    return rms["window"]


def _ratios(result, errors, bound_rms) -> None:
    """``result["bound"]["ratio"]``: every method's median error over the pooled-window bound's median."""
    import numpy as np

    if bound_rms is None:
        return
    med = float(np.median(bound_rms))
    result["bound"]["ratio"] = {name: float(np.median(e)) / med for name, e in errors.items()}


def _walk(run, pred, refined):
    """``(result["walk_refinement"], errors [N])``: the whole walk after the network (prior) + MAP (``refined``:
    the start, and its runner-up basins with ``walk_basins``)."""
    from core.learning.inference import walk_prediction

    walk = walk_prediction(run, pred, refined=refined)
    e = position_errors(walk.xy.cpu().numpy(), pred.true_xy)
    return {"method": "whole-walk", "ms_per_walk": 1000.0 * walk.seconds / max(len(e), 1), "after": error_metrics(e),
            "groups_after": grouped_metrics(e, pred.groups)}, e


#: row labels of the printed tables
LABELS = {"knn": "kNN fingerprint", "ml": "ML map matching", "multilateration": "multilateration",
          "exhaustive": "map matching, exhaustive", "whole-walk": "whole-walk (no network)"}
#: the columns of :func:`method_table`: (result key, header)
TABLE_COLUMNS = (("median_m", "median m"), ("p90_m", "P90 m"), ("rmse_m", "RMSE m"), ("beyond_20m", "> 20 m"),
                 ("worst2_share", "worst 2 % share of e²"), ("ms_per_sample", "ms / sample"))


def _method_rows(result: dict[str, Any]) -> dict[str, tuple[dict, dict]]:
    """{label: (metrics, groups)} of every method in ``result``, in report order."""
    rows = {"network": ({k: result.get(k, float("nan")) for k in METRIC_KEYS}
                        | {"ms_per_sample": result.get("inference_ms_per_sample", float("nan"))}, result["groups"])}
    if "refinement" in result:
        r = result["refinement"]
        rows["network + MAP"] = (r["after"] | {"ms_per_sample": r.get("ms_per_sample", float("nan"))},
                                 r["groups_after"])
    if "walk_refinement" in result:
        r = result["walk_refinement"]
        rows["network + whole-walk"] = (r["after"] | {"ms_per_sample": r.get("ms_per_walk", float("nan"))},
                                        r["groups_after"])
    for name, m in result.get("baselines", {}).items():
        rows[LABELS.get(name, name)] = (m, m.get("groups", {}))
    return rows


def method_table(result: dict[str, Any]):
    """DataFrame, one row per method of ``result`` (an evaluation's JSON): :data:`TABLE_COLUMNS`
    (shares as fractions; a column an older result lacks is NaN)."""
    import pandas as pd

    return pd.DataFrame({label: {head: m.get(key, float("nan")) for key, head in TABLE_COLUMNS}
                         for label, (m, _) in _method_rows(result).items()}).T


def held_out_summary(result: dict[str, Any]) -> dict[str, Any] | None:
    """One row of a held-out evaluation (``evaluate --run R --scene S`` on a scene the run never trained on),
    None for an in-scene result: scene, split, UEs, and per method of the result (network, network + MAP,
    network + whole-walk when there) the median and P90 error [m]."""
    if not result.get("held_out"):
        return None
    row: dict[str, Any] = {"scene": result.get("scene"), "split": result.get("split"), "UEs": result.get("count")}
    for label, (m, _) in _method_rows(result).items():
        if label in ("network", "network + MAP", "network + whole-walk"):
            row[f"{label} median [m]"] = m.get("median_m", float("nan"))
            row[f"{label} P90 [m]"] = m.get("p90_m", float("nan"))
    return row


def group_table(result: dict[str, Any], metric: str = "median_m"):
    """DataFrame of ``metric`` per method (rows) and UE group (columns, :data:`core.learning.groups.GROUPS`
    order, with the group's count in the header)."""
    import pandas as pd

    from core.learning.groups import GROUPS

    rows = _method_rows(result)
    groups = next(iter(rows.values()))[1]
    names = [g for g in GROUPS if g in groups] + [g for g in groups if g not in GROUPS]
    head = {g: f"{g} ({int(groups[g].get('count', 0))})" for g in names}
    return pd.DataFrame({label: {head[g]: gm.get(g, {}).get(metric, float("nan")) for g in names}
                         for label, (_, gm) in rows.items()}).T[list(head.values())]


def format_table(result: dict[str, Any]) -> str:
    """Human-readable tables of ``result``: the metrics per method, then the median, P90 and share beyond
    20 m per group."""
    import pandas as pd

    rows = _method_rows(result)
    table = pd.DataFrame({label: {k: m.get(k, float("nan")) for k in METRIC_KEYS} for label, (m, _) in rows.items()}).T
    fmt = lambda v: f"{v:.3f}"  # noqa: E731
    lines = [f"{result['split']} split, {result['count']} samples", table.to_string(float_format=fmt), "",
             method_table(result).to_string(float_format=fmt)]
    for metric, what in (("median_m", "median error [m]"), ("p90_m", "P90 [m]"), ("beyond_20m", "share > 20 m")):
        lines += ["", f"{what} per group (UEs)", group_table(result, metric).to_string(float_format=fmt)]
    if "bound" in result:
        lines += ["", _bound_table(result, rows)]
    if "lambda_phys" in result:
        lines.append(f"lambda_phys {result['lambda_phys']:g} (applied)  label_fraction {result['label_fraction']:g}  "
                     f"split {result['data_split']}")
    if "ensemble" in result:
        lines.append(f"network: the ensemble of {len(result['ensemble'])} runs ({', '.join(result['ensemble'])}; "
                     "their mean and mixture sigma)")
    if "radio_map_override" in result:
        o = result["radio_map_override"]
        lines.append(f"radio map {o['used']['path']} (--radio-map; {result.get('paths_per_site', 1)} path(s) per site) "
                     f"instead of {o['recorded']['path']}, the dataset's")
    if "scenes" in result:
        lines += ["", "in-scene vs held-out", pd.DataFrame(result["scenes"]).to_string(index=False, float_format=fmt)]
    lines.append(f"train_s_per_epoch {result['train_s_per_epoch']:.2f}  "
                 f"inference_ms_per_sample {result['inference_ms_per_sample']:.4f}")
    if "walk_ms_per_walk" in result:
        lines.append(f"whole-walk (no network): {result['walk_ms_per_walk']:.2f} ms per walk")
    if "walk_refinement" in result:
        lines.append(f"network + whole-walk: {result['walk_refinement']['ms_per_walk']:.2f} ms per walk")
    if "refinement" in result:
        r = result["refinement"]
        won = ", ".join(f"{k} {v}" for k, v in r["sources"].items())
        of = f"{r['positions']} positions" if "positions" in r else f"{result['count']} samples"  # localize: every time
        lines.append(f"MAP refined {r['num_refined']} of {of} ({r['ms_per_sample']:.2f} ms each; "
                     f"winning start: {won}); reports pooled over {r['window_s']:g} s, {r['top_k']} coarse centres")
    return "\n".join(lines)


def _bound_table(result: dict[str, Any], rows) -> str:
    """The Cramér–Rao bounds and every method's median over the pooled-window bound's."""
    import pandas as pd

    from core.physics.twin_correction import BOUND_CAVEAT

    b = result["bound"]
    noise = b["noise"]
    names = {"latest": "bound: latest report", "window": f"bound: last {b['window_s']:g} s of reports",
             "walk": "bound: whole walk, displacements known", "walk_velocity": "bound: whole walk, velocity unknown"}
    table = {names[k]: {"median_m": b[k]["median_m"], "p90_m": b[k]["p90_m"]} for k in names if k in b}
    med = b["window"]["median_m"]
    for label, (m, _) in rows.items():
        table[label] = {"median_m": m["median_m"], "p90_m": m["p90_m"], "× bound": m["median_m"] / med}
    sigma = ", ".join(f"{v:g}" for v in noise["sigma"])
    caveat = BOUND_CAVEAT + "\n" if b.get("corrected_map") else ""
    return (f"Cramér–Rao bound (noise σ {sigma} dB/ns/deg from the {noise['source']}); × bound: median over the "
            f"pooled-window bound's median\n{caveat}" + pd.DataFrame(table).T.to_string(
                float_format=lambda v: f"{v:.3f}", na_rep=""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory (e.g. runs/NAME or assets/default_run)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--scene", default=None,
                        help="evaluate on this scene: a training scene, or a held-out one never trained on "
                             "(adds the in-scene vs held-out table)")
    parser.add_argument("--dataset", default=None,
                        help="with --scene: its dataset (default: datasets/SCENE beside the run's first dataset); "
                             "its map is the one it records")
    parser.add_argument("--refine", action="store_true",
                        help="also report the network + MAP refinement (every sample unless --threshold)")
    parser.add_argument("--baselines", action="store_true",
                        help="also evaluate kNN, ML map matching, multilateration and exhaustive map matching")
    parser.add_argument("--threshold", type=cli_types.fraction, default=None,
                        help="refine only samples whose confidence is below this (default: all)")
    parser.add_argument("--top-k", type=cli_types.non_negative_int, default=None,
                        help="coarse cells searched besides the chosen one (default: 3)")
    parser.add_argument("--window", type=cli_types.non_negative, default=None,
                        help="pool the reports of the last WINDOW seconds per site (default: 1.0; 0: one report)")
    parser.add_argument("--radio-map", default=None, metavar="PATH",
                        help="read the scene against this map store instead of the one its dataset records: a map of "
                             "the same scene, sites, propagation and grid (e.g. a k-path map, generate-maps "
                             "--paths-per-site); its calibration is made in memory; recorded as radio_map_override "
                             "and in the result file's name (eval_<split>_map-<folder>...)")
    parser.add_argument("--silence", action="store_true",
                        help="searches also charge the sites a report with a free slot did not hear where the map "
                             "predicts them loud (core.physics.silence); result file ..._silence.json")
    parser.add_argument("--scan-starts", type=cli_types.integer(0, 64), default=None, metavar="N",
                        help="with --refine: the MAP search also starts from the N best points of the exact scan of "
                             "the likelihood alone (as exhaustive map matching ranks them; default: the run's "
                             "physics_loss.refinement.scan_starts, 0); result file ..._scan-<N>.json")
    parser.add_argument("--prior-sigma-scale", type=sigma_scale_arg, default=None, metavar="S|auto",
                        help="with --refine: the prior's sigma = S x the network's in every search with the network's "
                             "prior (default: the run's physics_loss.refinement.prior_sigma_scale, 1); auto: chosen on "
                             "the val split by network + MAP's median (core.learning.prior_scale); result file "
                             "..._prior-<S>.json")
    parser.add_argument("--walk-basins", type=cli_types.integer(0, 16), default=None, metavar="N",
                        help="with --refine or --baselines: every whole walk (after the network, and without one) also "
                             "starts from up to N runner-up basins of its snapshot search and keeps the one whose walk "
                             "posterior ends lowest (default: the run's physics_loss.refinement.walk_basins, 0); result "
                             "file ..._basins-<N>.json")
    parser.add_argument("--ensemble", default=None, metavar="RUN,RUN",
                        help="other runs of the same dataset, map and split whose networks are pooled with --run's "
                             "(the members' mean and mixture sigma, core.learning.ensemble) as the network: its "
                             "estimate and the searches' prior; with --radio-map every member reads that map; "
                             "result file ..._ens-<members>-<id>.json")
    parser.add_argument("--out", default=None,
                        help="write the result JSON to this file instead of into the run directory")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # one thread: much faster than 2 on a shared 2-core CPU
    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device
    if args.prior_sigma_scale is not None and not args.refine:
        raise CoreError("--prior-sigma-scale scales the network's prior in the searches of --refine: give --refine")
    if args.scan_starts is not None and not args.refine:
        raise CoreError("--scan-starts adds starts to the MAP search of --refine: give --refine")
    if args.walk_basins is not None and not (args.refine or args.baselines):
        raise CoreError("--walk-basins adds starts to the whole walks of --refine and --baselines: give one of them")
    ensemble = [p for p in (args.ensemble or "").split(",") if p]
    if ensemble and args.scene is not None:
        raise CoreError("--ensemble pools runs on --run's own scene: give it without --scene")
    options = dict(threshold=args.threshold, top_k=args.top_k, window_s=args.window, silence=args.silence,
                   prior_sigma_scale=args.prior_sigma_scale, scan_starts=args.scan_starts, walk_basins=args.walk_basins)
    out = None
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir() or not out.parent.is_dir():
            raise CoreError(f"--out {args.out}: must be a file in an existing folder")
        check_writable(out, "--out")
    label, dataset = args.scene, args.dataset
    if args.radio_map is not None:
        if args.scene is not None:
            raise CoreError("--radio-map and --scene: give one (--radio-map reads the run's own scene against another map)")
        if not Path(args.radio_map).exists():
            raise CoreError(f"--radio-map {args.radio_map}: no such map store")
        label, dataset = None, None
    target = out or evaluation_path(args.run, args.split, label, args.refine, dataset=dataset, silence=args.silence,
                                    radio_map=args.radio_map, prior_sigma_scale=args.prior_sigma_scale,
                                    scan_starts=args.scan_starts, walk_basins=args.walk_basins, ensemble=ensemble)
    if out is None:  # before the lock file beside it: an unwritable run folder is one line
        check_writable(target, "--run")
    with output_lock(target, "evaluation"):  # one writer per result file
        if args.scene is not None:
            result = evaluate_scene(args.run, args.scene, args.split, args.refine, device=device,
                                    dataset_path=args.dataset, baselines=args.baselines, write=out is None, **options)
        elif args.radio_map is not None:
            from core.learning.inference import load_run

            run = load_run(args.run, device=device, radio_map_override=args.radio_map)
            result = evaluate_run(args.run, args.split, args.refine, args.baselines, run=run, write=False,
                                  ensemble=ensemble, **options)
            if out is None:
                atomic_write_text(target, json.dumps(result, indent=2, default=float))
        else:
            result = evaluate_run(args.run, args.split, args.refine, args.baselines, device=device,
                                  write=out is None, ensemble=ensemble, **options)
        if out is not None:
            atomic_write_text(out, json.dumps(result, indent=2, default=float))
    print(json.dumps(result, indent=2, default=float) if args.json else format_table(result))
    return 0
