"""``python -m core bench maps``: radio-map generation time, map fidelity and dataset time.

1. Generation: the full seven-feature map of ``--scene`` (default etoile, 512 x 512 at
   1 m) with the default generator settings, timed end to end (scene load included),
   and its coverage of the OUTDOOR cells (target :data:`COVERAGE_TARGETS`).
2. Fidelity: ``--points`` random off-grid outdoor points of covered cells whose four
   neighbouring cell centres are covered too; the map is read with
   :func:`core.raytracing.consistency.bilinear` (bilinear between cell centres, AoA on
   the circle) and compared with ``PathSolver`` at the exact point, with the map's
   propagation settings: the serving features against PathSolver's strongest site, and
   the per-site layers against every site with a path, separately where PathSolver
   finds a line-of-sight path (LOS) and where not (NLOS; and its part where the
   strongest path is diffracted, "NLOS diffracted"). Points sit on the terrain like the
   map's cell centres. Median and 90th-percentile
   absolute error and the fraction of gross errors (10 dB, 30 ns, 30 deg); AoA errors
   are wrapped. Targets (serving medians): path gain <= 3 dB, ToA <= 15 ns, AoA <= 10 deg.
3. Dataset: ``make-dataset`` of ``--dataset-ues`` x ``--reports`` (default the real
   20,000 x 8), timed without saving. A smaller run is extrapolated linearly and
   marked ``extrapolated``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from core import cli_types

TARGETS = {"path_gain": 3.0, "toa": 15.0, "aoa": 10.0}
COVERAGE_TARGETS = {"etoile": 0.95, "florence": 0.95}  # fraction of outdoor cells; other street scenes 0.90
DEFAULT_COVERAGE_TARGET = 0.90
DIFFRACTED_OFFSET_M = 0.5  # a strongest path with this much length before its anchor is diffracted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scene", default="etoile")
    parser.add_argument("--map-size", type=cli_types.count, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--resolution", type=cli_types.positive, default=1.0)
    parser.add_argument("--points", type=cli_types.count, default=2000, help="fidelity check points (default: 2000)")
    parser.add_argument("--dataset-ues", type=cli_types.non_negative_int, default=20_000, help="UEs of the timed dataset run (0: skip)")
    parser.add_argument("--reports", type=cli_types.count, default=8)
    parser.add_argument("--seed", type=cli_types.seed, default=0)


def _sample_points(radio_map, scene, points: int, rng, rx_height: float) -> np.ndarray:
    """``[P, 3]`` random off-grid outdoor points whose four surrounding cell centres are covered.

    At ``rx_height`` above the terrain (:func:`~core.raytracing.terrain.measurement_points`).
    """
    from core.raytracing.terrain import measurement_points
    from core.raytracing.tracing import indoor_mask

    h, w = radio_map.shape
    x_min, y_min, _, _ = radio_map.bounds
    cell = radio_map.cell_size
    v = radio_map.valid
    xy = np.empty((0, 2))
    for _ in range(50):
        if len(xy) >= points:
            break
        m = 4 * points
        p = np.stack([rng.uniform(x_min + cell, x_min + (w - 1) * cell, m),
                      rng.uniform(y_min + cell, y_min + (h - 1) * cell, m)], 1)
        j0 = np.floor((p[:, 0] - x_min) / cell - 0.5).astype(int)
        i0 = np.floor((p[:, 1] - y_min) / cell - 0.5).astype(int)
        p = p[v[i0, j0] & v[i0 + 1, j0] & v[i0, j0 + 1] & v[i0 + 1, j0 + 1]]
        p = p[~indoor_mask(scene, measurement_points(scene, p, rx_height))]
        xy = np.concatenate([xy, p])[:points]
    return measurement_points(scene, xy, rx_height)


def _errors(est: np.ndarray, ref: np.ndarray, angular: bool, gross: float) -> dict[str, float]:
    from core.features import wrap_degrees

    err = est - ref
    err = np.abs(wrap_degrees(err) if angular else err)
    err = err[np.isfinite(err)]
    if err.size == 0:
        return {"median": float("nan"), "p90": float("nan"), "gross": float("nan"), "n": 0}
    return {"median": float(np.median(err)), "p90": float(np.quantile(err, 0.9)),
            "gross": float(np.mean(err > gross)), "n": int(err.size)}


def fidelity(radio_map, scene, points: int, seed: int) -> dict[str, dict[str, float]]:
    """Absolute error of the map read at off-grid points vs ``PathSolver`` there (map's propagation settings).

    Keys ``"<feature> serving"`` (``values`` vs PathSolver's strongest site) and
    ``"<feature> site LOS"`` / ``"<feature> site NLOS"`` (per-site layers, every site with
    a path, split by whether PathSolver finds a line-of-sight path); each holds
    ``median``, ``p90`` and ``gross`` (the fraction beyond :data:`core.raytracing.consistency.GROSS`).
    """
    from core.raytracing.consistency import FEATURE_LAYERS, GROSS, bilinear
    from core.raytracing.tracing import PropagationSettings, trace_points

    propagation = PropagationSettings.from_dict(radio_map.attrs["propagation"])
    xyz = _sample_points(radio_map, scene, points, np.random.default_rng(seed), propagation.radio.rx_height_m)
    traced = trace_points(scene, xyz, propagation)
    pg = traced["path_gain"]
    best = pg.argmax(1)
    rows = np.arange(len(xyz))
    has = np.isfinite(pg[rows, best])
    p, s = np.nonzero(np.isfinite(pg))
    los = traced["los"][p, s]
    diffracted = ~los & (traced["offset"][p, s] > DIFFRACTED_OFFSET_M)
    out = {}
    for name, layer in FEATURE_LAYERS.items():
        angular = name == "aoa"
        ref = np.where(np.isfinite(pg), traced[name], np.nan) if name == "path_gain" else traced[name]
        est = bilinear(radio_map.feature(name), radio_map.bounds, xyz[has, :2], angular=angular)
        out[f"{name} serving"] = _errors(est, ref[rows, best][has], angular, GROSS[name])
        site_est = bilinear(radio_map.layers[layer], radio_map.bounds, xyz[p, :2], s, angular)
        for group, sel in (("LOS", los), ("NLOS", ~los), ("NLOS diffracted", diffracted)):
            out[f"{name} site {group}"] = _errors(site_est[sel], ref[p, s][sel], angular, GROSS[name])
    return out


def run(args: argparse.Namespace) -> int:
    from core.benchmarks.report import write_report
    from core.raytracing.coverage import coverage_figures
    from core.raytracing.generation import MapSettings, generate_map
    from core.raytracing.scenes import resolve_scene
    from core.raytracing.tracing import PropagationSettings, build_scene

    info = resolve_scene(args.scene)
    settings = MapSettings(resolution=args.resolution, map_size=tuple(args.map_size), min_coverage=0.0)
    t = time.perf_counter()
    radio_map = generate_map(info, settings)
    gen_s = time.perf_counter() - t
    h, w = radio_map.shape
    rows = [{"metric": f"generate {info.name} {h}x{w} ({len(radio_map.features)} features)", "value": gen_s,
             "unit": "s", "target": 180.0, "ok": gen_s <= 180.0}]
    for stage, sec in radio_map.attrs["generator"]["timings"].items():
        rows.append({"metric": f"  stage {stage}", "value": sec, "unit": "s", "target": None, "ok": None})
    cov_target = COVERAGE_TARGETS.get(info.name, DEFAULT_COVERAGE_TARGET)
    rows.append({"metric": f"coverage of outdoor cells ({int(radio_map.outdoor.sum())} of {h * w} cells outdoor)",
                 "value": radio_map.outdoor_coverage, "unit": "1", "target": cov_target,
                 "ok": radio_map.outdoor_coverage >= cov_target})
    heard = coverage_figures(radio_map)
    rows.append({"metric": f"heard coverage of outdoor cells (serving path gain >= {heard['threshold_db']:g} dB: "
                           f"{heard['sensitivity_dbm']:g} dBm sensitivity at {heard['tx_power_dbm']:g} dBm)",
                 "value": heard["heard"], "unit": "1", "target": None, "ok": None})

    radio = PropagationSettings.from_dict(radio_map.attrs["propagation"]).radio
    scene = build_scene(info, radio_map.attrs["sites"], radio)
    for key, e in fidelity(radio_map, scene, args.points, args.seed).items():
        name = key.split()[0]
        unit = radio_map.units[name]
        target = TARGETS[name] if key.endswith("serving") else None
        rows.append({"metric": f"fidelity {key} median |error| ({e['n']} pts)", "value": e["median"], "unit": unit,
                     "target": target, "ok": None if target is None else e["median"] <= target})
        rows.append({"metric": f"fidelity {key} p90 |error|", "value": e["p90"], "unit": unit, "target": None,
                     "ok": None})
        rows.append({"metric": f"fidelity {key} gross errors", "value": e["gross"], "unit": "1", "target": None,
                     "ok": None})

    summary = {"coverage_of_outdoor_cells": radio_map.outdoor_coverage, "coverage_of_all_cells": radio_map.coverage,
               "heard_coverage_of_outdoor_cells": heard["heard"], "heard_threshold_db": heard["threshold_db"],
               "sites": len(radio_map.attrs["sites"]), "propagation": radio_map.attrs["propagation"]}
    if args.dataset_ues > 0:
        t = time.perf_counter()
        ds = _dataset_with_map(info.name, radio_map, args)
        ds_s = time.perf_counter() - t
        full = 20_000 * 8
        n = args.dataset_ues * args.reports
        label = f"make-dataset {args.dataset_ues}x{args.reports}"
        value = ds_s
        if n != full:
            value = ds_s * full / n
            label = f"make-dataset 20000x8 EXTRAPOLATED from {args.dataset_ues}x{args.reports} ({ds_s:.1f} s)"
        rows.append({"metric": label, "value": value, "unit": "s", "target": 600.0, "ok": value <= 600.0})
        summary["dataset_reports_present"] = float(ds.report_mask.mean())
    write_report("maps", rows, args.out, summary)
    return 0


def _dataset_with_map(scene_name, radio_map, args):
    """Time ``make_dataset`` against the freshly generated map (saved to a temp folder)."""
    import tempfile

    from core.raytracing.measurements import make_dataset
    from core.stores.lineage import map_path

    with tempfile.TemporaryDirectory() as tmp:
        radio_map.save(map_path(tmp, scene_name))
        return make_dataset(scene_name, args.dataset_ues, args.reports, radio_maps=tmp, seed=args.seed)
