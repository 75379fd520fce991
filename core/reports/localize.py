"""``python -m core localize --run RUN --reports FILE --method network|map|exhaustive --out FILE``.

Localizes a report file (:mod:`core.reports.format`) with a trained run: a position per walk and report
time with its σ ellipse (:mod:`core.reports.positions`), by

* ``network``: the network alone (:func:`core.learning.inference.predict`);
* ``map`` (default): network + MAP refinement (:func:`core.learning.inference.refine_prediction`, every
  sample, the run's search and report window: what ``evaluate --refine`` scores);
* ``exhaustive``: map matching over the whole map with no network (:mod:`core.physics.exhaustive`).

Pipeline: check ``--out`` and ``--reports`` names, load the run, read and check the WHOLE file
(:func:`core.reports.reading.validate`: nothing is written on bad input), calibrate the run (stored with it
when missing), then per chunk of whole walks (:func:`core.reports.reading.walk_chunks`) build the samples
(:func:`core.reports.windows.report_windows`: the same tensors a dataset split gives), localize them and
append the rows to a temporary beside ``--out`` that replaces it at the end, under the output's lock.
Memory is set by ``--chunk-rows``, not by the file.

With ground truth (``x_m``, ``y_m``) the error table is :func:`core.learning.evaluation.format_table`'s,
scored where ``evaluate`` scores a dataset sample: at each walk's LAST report time (an exported split thus
gives ``evaluate``'s numbers), and below it the median and P90 over every report time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from core import cli_types, progress
from core.errors import CoreError
from core.reports.format import file_kind, site_names
from core.reports.reading import CHUNK_ROWS

#: --method -> the method's name in the result file and the tables
METHODS: dict[str, str] = {"network": "network", "map": "network + MAP", "exhaustive": "map matching, exhaustive"}


@dataclasses.dataclass
class _Scores:
    """Errors and groups at the walks' last report times (``end``) and at every report time (``every``)."""

    end: dict[str, list] = dataclasses.field(default_factory=dict)
    every: dict[str, list] = dataclasses.field(default_factory=dict)
    groups: list = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    samples: int = 0
    sources: Any = None

    def add(self, name: str, errors: np.ndarray, truth: np.ndarray, end: np.ndarray) -> None:
        self.end.setdefault(name, []).append(errors[truth & end])
        self.every.setdefault(name, []).append(errors[truth])

    def cat(self, which: dict, name: str) -> np.ndarray:
        return np.concatenate(which[name]) if which.get(name) else np.zeros(0)


def _localize_chunk(run, win, method: str, scores: _Scores, members: tuple = ()) -> dict[str, np.ndarray]:
    """The result columns of one chunk's windows (:class:`~core.reports.windows.Windows`); scores added.
    ``members``: the other runs of an ensemble whose networks are pooled with ``run``'s."""
    from core.learning.groups import ue_groups
    from core.learning.inference import predict, refine_prediction
    from core.learning.metrics import position_errors
    from core.physics.observation import site_observation
    from core.reports.ellipse import diagonal_covariance, ellipse_axes, laplace_covariance

    ds = win.dataset
    n = ds.num_samples
    r = dataclasses.replace(run, dataset=ds)  # shares the calibrated likelihood and refiners
    window_s = run.config.physics_loss.report_window_s
    nan2 = np.full((n, 2), np.nan)
    conf, net_xy = np.full(n, np.nan), nan2
    t0 = time.perf_counter()
    if method in ("network", "map"):
        pred = predict(r, np.arange(n))
        if members:
            from core.learning.ensemble import pool

            pred = pool([pred, *(predict(dataclasses.replace(m, dataset=ds), np.arange(n)) for m in members)])
        scores.seconds["network"] = scores.seconds.get("network", 0.0) + time.perf_counter() - t0
        conf, net_xy, xy, cov = pred.confidence, pred.xy, pred.xy, diagonal_covariance(pred.sigma)
    if method == "map":
        t1 = time.perf_counter()
        ref = refine_prediction(r, pred)
        scores.seconds["map"] = scores.seconds.get("map", 0.0) + time.perf_counter() - t1
        won = np.bincount(ref.source[ref.refined].astype(np.int64), minlength=3)
        scores.sources = won if scores.sources is None else scores.sources + won
        xy = ref.xy
        obs = site_observation(ds, None, window_s=ref.window_s)
        cov = laplace_covariance(run.likelihood, obs, xy, pred.sigma if ref.use_prior else None)
    if method == "exhaustive":
        from core.physics.exhaustive import ExhaustiveMatcher

        t1 = time.perf_counter()
        obs = site_observation(ds, None, window_s=window_s)
        xy = ExhaustiveMatcher(run.likelihood)(obs).xy.detach().cpu().numpy().astype(np.float64)
        scores.seconds["exhaustive"] = scores.seconds.get("exhaustive", 0.0) + time.perf_counter() - t1
        cov = laplace_covariance(run.likelihood, obs, xy)
    scores.samples += n
    major, minor, angle = ellipse_axes(cov)
    cols = {"walk_id": win.walk_id, "time_s": win.time_s, "method": np.full(n, METHODS[method], dtype=object),
            "x_m": xy[:, 0], "y_m": xy[:, 1], "sigma_major_m": major, "sigma_minor_m": minor,
            "sigma_angle_deg": angle, "confidence": conf, "network_x_m": net_xy[:, 0], "network_y_m": net_xy[:, 1]}
    truth = np.where(win.truth[:, None], ds.labels, np.nan)
    cols.update(true_x_m=truth[:, 0], true_y_m=truth[:, 1], error_m=position_errors(xy, truth))
    if win.truth.any():
        if method == "map":
            scores.add("network", position_errors(net_xy, truth), win.truth, win.walk_end)
        scores.add(method, cols["error_m"], win.truth, win.walk_end)
        keep = win.truth & win.walk_end
        groups = ue_groups(ds, np.flatnonzero(keep), window_s)
        if not win.has_los:
            groups.pop("los"), groups.pop("nlos")
        scores.groups.append(groups)
    return cols


def _result(scores: _Scores, method: str, run) -> dict[str, Any]:
    """The evaluate-style result (:func:`core.learning.evaluation.format_table` prints it)."""
    from core.learning.inference import DEFAULT_TOP_K, SOURCES
    from core.learning.metrics import error_metrics, grouped_metrics

    groups = {k: np.concatenate([g[k] for g in scores.groups]) for k in scores.groups[0]} if scores.groups else {}
    ms = lambda name: 1000.0 * scores.seconds.get(name, float("nan")) / max(scores.samples, 1)  # noqa: E731
    first = "network" if method in ("network", "map") else method
    end = scores.cat(scores.end, first)
    result: dict[str, Any] = {"split": "reports (each walk's last report)", "count": int(end.size),
                              "train_s_per_epoch": float("nan"), "inference_ms_per_sample": ms("network")}
    if first == "network":
        result.update(error_metrics(end))
        result["groups"] = grouped_metrics(end, groups)
    else:  # no network: its row stays empty, the groups' sizes stay in the header
        result["groups"] = {k: {"count": int(v.sum())} for k, v in groups.items()}
    if method == "map":
        e = scores.cat(scores.end, "map")
        won = scores.sources if scores.sources is not None else np.zeros(3, int)
        result["refinement"] = {"method": "map", "after": error_metrics(e), "groups_after": grouped_metrics(e, groups),
                                "ms_per_sample": ms("map"), "num_refined": int(scores.samples), "positions": int(scores.samples),
                                "sources": {s: int(c) for s, c in zip(SOURCES, won)},
                                "window_s": run.config.physics_loss.report_window_s, "top_k": DEFAULT_TOP_K}
        r = run.config.physics_loss.refinement
        result["prior_sigma_scale"] = {"scale": float(r.prior_sigma_scale), "min_sigma_m": float(r.prior_min_sigma_m)}
        result["scan_starts"] = int(r.scan_starts)
    if method == "exhaustive":
        e = scores.cat(scores.end, method)
        result["baselines"] = {"exhaustive": {**error_metrics(e), "groups": grouped_metrics(e, groups),
                                              "ms_per_sample": ms("exhaustive")}}
    result["every_report"] = {METHODS[name]: error_metrics(scores.cat(scores.every, name))
                              for name in scores.every}
    return result


def format_result(result: dict[str, Any]) -> str:
    """``evaluate``'s tables of ``result``, then the median and P90 at every report time."""
    from core.learning.evaluation import format_table

    lines = [format_table(result), "", "every report time (all positions with truth)"]
    for label, m in result["every_report"].items():
        lines.append(f"  {label}: {m['count']} positions, median {m['median_m']:.3f} m, P90 {m['p90_m']:.3f} m")
    return "\n".join(lines)


def localize_reports(run, reports, out, method: str = "map", chunk_rows: int = CHUNK_ROWS,
                     show_progress: bool = True, members: tuple = (),
                     sigma_scale: float | str | None = None, scan_starts: int | None = None) -> dict[str, Any]:
    """Localize the report file ``reports`` with the loaded ``run`` into ``out`` (see the module doc).
    ``members``: other loaded runs of ``run``'s dataset and map (:func:`core.learning.ensemble.load_members`)
    whose networks are pooled with ``run``'s as the network and MAP's prior. ``sigma_scale``: the prior's
    scale, a number or "auto" (:func:`core.learning.prior_scale.apply_sigma_scale`, after the file is checked);
    ``scan_starts``: MAP's starts from the exact scan (None: the run's). Neither changes ``run`` itself (the
    app's cached run): they apply to a copy of its configuration.

    Returns ``{"rows", "walks", "positions", "seconds", "method", "out", "result"}``; ``result`` is the
    evaluate-style scoring (None without truth)."""
    from tqdm import tqdm

    from core.learning.inference import calibrate_run, cpu_threads
    from core.reports.positions import PositionWriter
    from core.reports.reading import validate, walk_chunks
    from core.reports.windows import report_windows
    from core.stores.atomic import atomic_path
    from core.stores.lock import output_lock
    from core.stores.output import check_writable

    if method not in METHODS:
        raise CoreError(f"--method {method}: unknown (use {', '.join(METHODS)})")
    out, reports = Path(out), Path(reports)
    kind = file_kind(out, "--out", ("csv", "parquet", "geojson"))
    file_kind(reports, "--reports")
    if out.resolve() == reports.resolve():
        raise CoreError(f"--out {out}: is the --reports file; write the positions elsewhere")
    check_writable(out, "--out")
    names = site_names(run.dataset)
    t0 = time.perf_counter()
    progress.report(0.0, "checking the report file")
    summary = validate(reports, names, run.scene, run.radio_map.bounds, chunk_rows, show_progress=show_progress)
    calibrate_run(run)
    if sigma_scale is not None or scan_starts is not None:
        run = _searching_with(run, sigma_scale, scan_starts, members)
    index = {s: i for i, s in enumerate(names)}
    attrs = {"scene": run.scene, "sites": run.dataset.attrs.get("sites")}
    scores = _Scores()
    done = 0
    with output_lock(out, "--out"), atomic_path(out) as tmp, \
            PositionWriter(tmp, kind, summary.has_truth, run.scene) as writer, cpu_threads(run):
        bar = tqdm(total=summary.rows, desc=f"localize ({METHODS[method]})", unit="row", disable=not show_progress)
        for df in walk_chunks(reports, chunk_rows):
            win = report_windows(df, index, run.dataset.num_reports, run.dataset.num_sites_per_report, attrs,
                                 str(reports))
            if win.dataset.num_samples:
                cols = _localize_chunk(run, win, method, scores, tuple(members))
                writer.write(cols)
            done += len(df)
            bar.update(len(df))
            cols = df = win = None  # the chunk's arrays go before the next chunk's come
            progress.report(done / summary.rows, f"localized {done} of {summary.rows} report rows")
        bar.close()
        positions = writer.rows
    result = _result(scores, method, run) if summary.has_truth and scores.groups else None
    return {"rows": summary.rows, "walks": summary.walks, "positions": positions,
            "seconds": time.perf_counter() - t0, "method": METHODS[method], "out": str(out), "result": result}


def _searching_with(run, sigma_scale: float | str | None, scan_starts: int | None, members: tuple):
    """A copy of the calibrated ``run`` (its likelihood shared) whose MAP search starts from ``scan_starts``
    points of the scan and whose prior has ``sigma_scale`` (see :func:`localize_reports`)."""
    from core.learning.prior_scale import apply_sigma_scale

    _ = run.likelihood  # built once, on the run given: the copy shares it
    run = dataclasses.replace(run, config=copy.deepcopy(run.config))
    if scan_starts is not None:  # before an "auto" scale: it is chosen with the search it will serve
        run.config.physics_loss.refinement.scan_starts = int(scan_starts)
    if sigma_scale is not None:
        apply_sigma_scale(run, "reports", sigma_scale, list(members))
    return run


def report_window(run, reports, walk_id: str, time_s: float, chunk_rows: int = CHUNK_ROWS):
    """The one sample of walk ``walk_id`` at report time ``time_s`` of the file ``reports``, as
    :class:`~core.reports.windows.Windows` (``dataset`` of one window), read chunk by chunk; ``run`` is
    a loaded run. For the Refinement inspector: ``dataclasses.replace(run, dataset=w.dataset)`` reads it
    like a dataset sample. A walk or time the file lacks is a one-line CoreError."""
    from core.reports.reading import walk_chunks
    from core.reports.windows import report_windows

    names = site_names(run.dataset)
    attrs = {"scene": run.scene, "sites": run.dataset.attrs.get("sites")}
    for df in walk_chunks(reports, chunk_rows):
        rows = df[df["walk_id"] == str(walk_id)]
        if not len(rows):
            continue
        win = report_windows(rows.reset_index(drop=True), {s: i for i, s in enumerate(names)},
                             run.dataset.num_reports, run.dataset.num_sites_per_report, attrs, str(reports))
        hit = np.flatnonzero(np.isclose(win.time_s, float(time_s), rtol=0, atol=1e-9))
        if hit.size:
            return dataclasses.replace(win, dataset=win.dataset.subset(hit[:1]), walk_id=win.walk_id[hit[:1]],
                                       time_s=win.time_s[hit[:1]], truth=win.truth[hit[:1]],
                                       walk_end=win.walk_end[hit[:1]])
        break
    raise CoreError(f"{reports}: no localizable report of walk {walk_id!r} at time {time_s:g} s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from core.learning.prior_scale import sigma_scale_arg

    parser.add_argument("--run", required=True, help="run directory (e.g. runs/NAME or assets/default_run)")
    parser.add_argument("--reports", required=True, help="report file: .csv or .parquet (docs/reports.md)")
    parser.add_argument("--method", default="map", choices=list(METHODS),
                        help="network; map: network + MAP refinement (default); exhaustive: map matching, no network")
    parser.add_argument("--out", required=True, help="positions file: .csv, .parquet or .geojson")
    parser.add_argument("--chunk-rows", type=cli_types.integer(1000), default=CHUNK_ROWS,
                        help=f"report rows read per chunk (memory; default {CHUNK_ROWS})")
    parser.add_argument("--ensemble", default=None, metavar="RUN,RUN",
                        help="other runs of --run's dataset and map whose networks are pooled with its own as the "
                             "network and MAP's prior (evaluate --ensemble)")
    parser.add_argument("--prior-sigma-scale", type=sigma_scale_arg, default=None, metavar="S|auto",
                        help="with --method map: the prior's sigma = S x the network's (default: the run's); auto: "
                             "chosen on the run's val split, then the sigma floor (evaluate --prior-sigma-scale)")
    parser.add_argument("--scan-starts", type=cli_types.integer(0, 64), default=None, metavar="N",
                        help="with --method map: MAP also starts from the N best points of the exact scan of the "
                             "likelihood (evaluate --scan-starts; default: the run's)")
    parser.add_argument("--json", action="store_true", help="print the summary and scores as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from core.learning.ensemble import load_members
    from core.learning.inference import load_run

    torch.set_num_threads(1)  # one thread: much faster than 2 on a shared 2-core CPU (as evaluate)
    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device
    file_kind(args.out, "--out", ("csv", "parquet", "geojson"))
    file_kind(args.reports, "--reports")
    ensemble = [p for p in (args.ensemble or "").split(",") if p]
    if ensemble and args.method == "exhaustive":
        raise CoreError("--ensemble pools networks: give --method network or map")
    if args.prior_sigma_scale is not None and args.method != "map":
        raise CoreError("--prior-sigma-scale scales the network's prior in MAP: give --method map")
    if args.scan_starts is not None and args.method != "map":
        raise CoreError("--scan-starts adds starts to the MAP search: give --method map")
    loaded = load_run(args.run, device=device)
    members = load_members(loaded, ensemble, device)
    info = localize_reports(loaded, args.reports, args.out, args.method, args.chunk_rows,
                            show_progress=not args.no_progress, members=tuple(members),
                            sigma_scale=args.prior_sigma_scale, scan_starts=args.scan_starts)
    if args.json:
        print(json.dumps(info, indent=2, default=float))
        return 0
    if info["result"] is not None:
        print(format_result(info["result"]))
    print(f"localized {info['positions']} report times of {info['walks']} walks ({info['rows']} rows) with "
          f"{info['method']} in {info['seconds']:.1f} s -> {info['out']}")
    return 0
