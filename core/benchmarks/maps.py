"""``python -m core bench maps``: radio-map generation time, map fidelity and dataset time.

1. Generation: the full seven-feature map of ``--scene`` (default etoile, 512 x 512 at
   1 m) with the default generator settings, timed end to end (scene load included).
2. Fidelity: ``--points`` random off-grid outdoor points of covered cells whose four
   neighbouring cell centres are covered too; the map is read with
   :func:`core.lookup.lookup` (bilinear between cell centres, AoA on the circle) and
   compared with ``PathSolver`` at the exact point (serving = its strongest site).
   Median absolute error per feature; AoA errors are wrapped. Targets: path gain
   <= 3 dB, ToA <= 15 ns, AoA <= 10 deg.
3. Dataset: ``make-dataset`` of ``--dataset-ues`` x ``--reports`` (default the real
   20,000 x 8), timed without saving. A smaller run is extrapolated linearly and
   marked ``extrapolated``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

TARGETS = {"path_gain": 3.0, "toa": 15.0, "aoa": 10.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scene", default="etoile")
    parser.add_argument("--map-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--resolution", type=float, default=1.0)
    parser.add_argument("--points", type=int, default=2000, help="fidelity check points (default: 2000)")
    parser.add_argument("--dataset-ues", type=int, default=20_000, help="UEs of the timed dataset run (0: skip)")
    parser.add_argument("--reports", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)


def fidelity(radio_map, scene, points: int, seed: int) -> dict[str, dict[str, float]]:
    """Median/90th-percentile absolute error of map lookup vs PathSolver at exact points."""
    import torch

    from core.features import wrap_degrees
    from core.physics.lookup import lookup
    from core.raytracing.tracing import RadioConfig, indoor_mask, trace_points

    rng = np.random.default_rng(seed)
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
        # the four cell centres around p must all be covered
        j0 = np.floor((p[:, 0] - x_min) / cell - 0.5).astype(int)
        i0 = np.floor((p[:, 1] - y_min) / cell - 0.5).astype(int)
        ok = v[i0, j0] & v[i0 + 1, j0] & v[i0, j0 + 1] & v[i0 + 1, j0 + 1]
        p = p[ok]
        xyz = np.concatenate([p, np.full((len(p), 1), RadioConfig().rx_height_m)], 1)
        p = p[~indoor_mask(scene, xyz)]
        xy = np.concatenate([xy, p])[:points]
    xyz = np.concatenate([xy, np.full((len(xy), 1), RadioConfig().rx_height_m)], 1)
    traced = trace_points(scene, xyz)
    best = np.nan_to_num(traced["path_gain"], nan=-np.inf).argmax(1)
    rows = np.arange(len(xy))
    truth = {"path_gain": traced["path_gain"][rows, best], "toa": traced["toa"][rows, best],
             "aoa": traced["aoa"][rows, best]}
    got = lookup(radio_map, torch.tensor(xy, dtype=torch.float64)).double().numpy()
    out = {}
    for name, ref in truth.items():
        est = got[:, radio_map.index(name)]
        err = est - ref
        if name == "aoa":
            err = wrap_degrees(err)
        err = np.abs(err[np.isfinite(err)])
        out[name] = {"median": float(np.median(err)), "p90": float(np.quantile(err, 0.9)), "n": int(err.size)}
    return out


def run(args: argparse.Namespace) -> int:
    from core.benchmarks.report import write_report
    from core.raytracing.generation import MapSettings, generate_map
    from core.raytracing.scenes import resolve_scene
    from core.raytracing.tracing import RadioConfig, build_scene

    info = resolve_scene(args.scene)
    settings = MapSettings(resolution=args.resolution, map_size=tuple(args.map_size))
    t = time.perf_counter()
    radio_map = generate_map(info, settings)
    gen_s = time.perf_counter() - t
    h, w = radio_map.shape
    rows = [{"metric": f"generate {info.name} {h}x{w} ({len(radio_map.features)} features)", "value": gen_s,
             "unit": "s", "target": 180.0, "ok": gen_s <= 180.0}]
    for stage, sec in radio_map.attrs["generator"]["timings"].items():
        rows.append({"metric": f"  stage {stage}", "value": sec, "unit": "s", "target": None, "ok": None})

    scene = build_scene(info, radio_map.attrs["sites"], RadioConfig())
    fid = fidelity(radio_map, scene, args.points, args.seed)
    for name, e in fid.items():
        unit = radio_map.units[name]
        rows.append({"metric": f"fidelity {name} median |error| ({e['n']} pts)", "value": e["median"], "unit": unit,
                     "target": TARGETS[name], "ok": e["median"] <= TARGETS[name]})
        rows.append({"metric": f"fidelity {name} p90 |error|", "value": e["p90"], "unit": unit, "target": None,
                     "ok": None})

    summary = {"coverage": float(radio_map.valid.mean()), "sites": len(radio_map.attrs["sites"])}
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
    from pathlib import Path

    from core.raytracing.measurements import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        radio_map.save(Path(tmp) / f"{scene_name}.zarr")
        return make_dataset(scene_name, args.dataset_ues, args.reports, radio_maps=tmp, seed=args.seed)
