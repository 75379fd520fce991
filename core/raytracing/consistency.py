"""Consistency at the truth: measured features minus the radio map read at the TRUE position.

``python -m core consistency --dataset datasets/etoile [--radio-maps radio_maps]
[--split test|train|val|all] [--json OUT] [--markdown OUT]``

If the map and the dataset describe the same physics, a report's features minus the
map at the position where the report was taken are only measurement noise plus the
map's interpolation error. This command measures exactly that, for the report the
label belongs to (the LAST report of each sample, at ``ue_xyz[:, -1]``), for the
samples of ``--split`` whose last report is present (the dataset keeps no site ids of
dropped reports). Two variants, on the same reports: ``clean`` (``clean/*``, before
measurement noise) and ``noisy`` (what a model sees).

The map is read with :func:`bilinear` at the cell-centred grid: bilinear between the
four surrounding cell centres, clamped to the outermost centres, NaN neighbours left
out and the weights renormalised (NaN if all four are NaN), angles through cos/sin.

Per-site features, for every site slot ``k`` of the last report with site id ``s >= 0``::

    r = site_features[n, -1, k, f] - layer_f[s](x_n, y_n)      layer_f = site_path_gain | site_toa | site_aoa

Serving features: slot 0's path gain / ToA / AoA and the cell features (SNR, SINR,
throughput, BLER) minus the serving-site map ``values``. AoA residuals are wrapped to
(-180, 180]. Statistics per feature (all slots, slot 0 only, and per site)::

    n            residuals with both sides finite (``map_nan``: measured but map NaN)
    median       median(r)
    robust_std   1.4826 * median(|r - median(r)|)
    std          standard deviation of r
    p90_abs      90th percentile of |r|
    gross        fraction with |r| > GROSS[feature] (table below)

======================  =========  =====================================================
feature                 gross if   why
======================  =========  =====================================================
path_gain, snr, sinr    10 dB      5x the 2 dB measurement noise
toa                     30 ns      9 m of range: 10x the 3 ns noise, a wrong path
aoa                     30 deg     10x the 3 deg noise, a wrong path
throughput              20 Mbit/s  a quarter of the 80 Mbit/s saturation
bler                    0.3        three times the 0.1 BLER target
======================  =========  =====================================================

``serving_agreement``: fraction of reports whose slot-0 site is the site with the
largest ``site_path_gain`` at the true position.

A k-path map (``attrs["paths_per_site"] = k > 1``, the ``site_anchor`` layer) adds the group
``site layer, nearest of k paths`` for ToA and AoA: each slot's residuals against the nearest,
in ``(r_toa / 3 ns)^2 + (r_aoa / 3 deg)^2`` (one path explains both, as in the likelihood's
mixture), of the ``k`` paths of each of the four cells of the bilinear stencil around the point
that have weight there (:func:`~core.stores.path_anchors.stencil_paths`: each path evaluated AT the
point from its anchor, never interpolated; the likelihood's mixture components), and the group
``site layer, nearest of k paths, control 10 cells off``: the same against the paths of the cells
10 cells (rows and columns) away, the share of gross residuals a wrong position would reach by
chance with as many candidates. ``summary["paths_per_site"]`` is ``k``. A map of the first k-path
layout (``site_alt_*`` values) is refused with the command that regenerates it.
``--radio-map PATH`` reads another map of the dataset's scene than the one it records
(:func:`~core.stores.lineage.check_map_override`: same scene, sites and propagation), e.g. a
k-path map generated with the settings of the dataset's; ``summary["radio_map_override"]``
records both.

``--beside B``: the same statistics of a second dataset of the same scene and map (e.g.
the oracle world's beside a realistic one's, :mod:`core.stores.world_model`), printed as
one table with the two side by side (per variant, feature and group, all sites pooled:
median, robust std and gross share of each) after each dataset's world. In the oracle
world the clean residuals are the map's interpolation error alone; in another world
they are the twin's error: the mismatch is the point.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CoreError
from core.features import wrap_degrees
from core.stores.grid_stencil import bilinear_stencil

GROSS: dict[str, float] = {"path_gain": 10.0, "toa": 30.0, "aoa": 30.0, "snr": 10.0, "sinr": 10.0,
                           "throughput": 20.0, "bler": 0.3}
#: the joint distance that picks a k-path map's nearest path: ToA [ns] and AoA [deg] scales
NEAREST_SCALE = (3.0, 3.0)
#: per-site layer of each site feature (see :mod:`core.stores.radio_map`)
FEATURE_LAYERS: dict[str, str] = {"path_gain": "site_path_gain", "toa": "site_toa", "aoa": "site_aoa"}
SPLIT_CHOICES = ("train", "val", "test", "all")


def bilinear(planes: np.ndarray, bounds, xy: np.ndarray, index: np.ndarray | None = None,
             angular: bool = False) -> np.ndarray:
    """Bilinear lookup of ``planes [H, W]`` (or ``[K, H, W]`` with ``index [N]`` picking each point's plane) at ``xy [N, 2]``.

    Cell ``(i, j)`` is centred at ``(x_min + (j + .5) c, y_min + (i + .5) c)``; the
    fractional index ``u = (x - x_min) / c - 0.5`` is clamped to ``[0, W - 1]`` (and
    ``v`` likewise), so points beyond the outer centres take the border value. NaN
    neighbours get weight 0 and the others are renormalised; NaN if all four are NaN.
    ``angular``: degrees interpolated as ``atan2(sum w sin, sum w cos)``. Returns float64 ``[N]``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    acc = np.zeros((2 if angular else 1, len(xy)))
    weight = np.zeros(len(xy))
    for ii, jj, wt in bilinear_stencil(bounds, planes.shape[-2:], xy):
        val = (planes[ii, jj] if index is None else planes[index, ii, jj]).astype(np.float64)
        ok = np.isfinite(val) & (wt > 0)
        wt = np.where(ok, wt, 0.0)
        val = np.where(ok, val, 0.0)
        weight += wt
        if angular:
            acc[0] += wt * np.cos(np.radians(val))
            acc[1] += wt * np.sin(np.radians(val))
        else:
            acc[0] += wt * val
    with np.errstate(invalid="ignore", divide="ignore"):
        out = wrap_degrees(np.degrees(np.arctan2(acc[1], acc[0]))) if angular else acc[0] / weight
    return np.where(weight > 1e-12, out, np.nan)


def nearest_path_residuals(rmap, xy: np.ndarray, sites: np.ndarray, toa: np.ndarray, aoa: np.ndarray,
                           anchors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(r_toa [M] ns, r_aoa [M] deg)`` of measured ``toa``, ``aoa [M]`` at ``xy [M, 2]`` (site ``sites [M]``)
    against the nearest path of a k-path map's stencil cells (module docstring); NaN where no path is
    finite there. ``anchors``: ``rmap.path_anchors()``, if already decoded."""
    from core.stores.path_anchors import stencil_paths

    rel = rmap.path_anchors() if anchors is None else anchors
    t_paths, a_paths, weight = stencil_paths(rel, rmap.bounds, xy, sites)  # [M, k, 4] each, weight [M, 4]
    rt = (toa[:, None, None] - t_paths).reshape(len(xy), -1)  # [M, 4 k]
    ra = wrap_degrees(aoa[:, None, None] - a_paths).reshape(len(xy), -1)
    use = np.broadcast_to(weight[:, None, :] > 0, t_paths.shape).reshape(len(xy), -1)
    d = np.where(np.isfinite(rt) & np.isfinite(ra) & use,
                 (rt / NEAREST_SCALE[0]) ** 2 + (ra / NEAREST_SCALE[1]) ** 2, np.inf)
    best = d.argmin(1)[:, None]
    ok = np.isfinite(np.take_along_axis(d, best, 1)[:, 0])
    return (np.where(ok, np.take_along_axis(rt, best, 1)[:, 0], np.nan),
            np.where(ok, np.take_along_axis(ra, best, 1)[:, 0], np.nan))


#: the control's offset [cells] (module docstring)
CONTROL_OFFSET_CELLS = 10


def residual_stats(r: np.ndarray, gross: float) -> dict[str, float]:
    """Statistics of residuals ``r [M]`` (see the module docstring); NaN entries count as ``map_nan``."""
    r = np.asarray(r, dtype=np.float64)
    nan = float("nan")
    fin = r[np.isfinite(r)]
    out: dict[str, float] = {"n": int(fin.size), "map_nan": int(r.size - fin.size)}
    if fin.size == 0:
        return {**out, "median": nan, "robust_std": nan, "std": nan, "p90_abs": nan, "gross": nan}
    med = float(np.median(fin))
    return {**out, "median": med, "robust_std": float(1.4826 * np.median(np.abs(fin - med))),
            "std": float(fin.std()), "p90_abs": float(np.quantile(np.abs(fin), 0.9)),
            "gross": float(np.mean(np.abs(fin) > gross))}


def _residual(measured: np.ndarray, predicted: np.ndarray, angular: bool) -> np.ndarray:
    """``measured - predicted``, wrapped to (-180, 180] for angles; NaN where either is."""
    r = np.asarray(measured, dtype=np.float64) - predicted
    return wrap_degrees(r) if angular else r


def _rows(variant: str, feature: str, group: str, r: np.ndarray, sites: np.ndarray | None,
          names: list[str]) -> list[dict[str, Any]]:
    """A row of ``r [M]`` as a whole, then (when ``sites [M]`` is given) one per site."""
    head = {"variant": variant, "feature": feature}
    out = [{**head, "group": group, **residual_stats(r, GROSS[feature])}]
    for s, name in enumerate(names if sites is not None else []):
        sel = sites == s
        if sel.any():
            out.append({**head, "group": f"{group}: {name}", **residual_stats(r[sel], GROSS[feature])})
    return out


def _last_reports(ds, split: str) -> np.ndarray:
    """Samples of ``split`` (or all) whose last report is present."""
    idx = np.arange(ds.num_samples) if split == "all" else ds.indices(split)
    return idx[ds.report_mask[idx, -1]]


def consistency_rows(ds, rmap, split: str = "test") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Residual statistics of ``ds``'s last reports against ``rmap`` at the true positions.

    Returns ``(rows, summary)``: one row per (variant, feature, group); ``summary`` holds
    the report count and the serving-site agreement (see the module docstring).
    """
    from core.stores.dataset import CELL_FEATURES, SITE_FEATURES

    idx = _last_reports(ds, split)
    anchors = None
    if rmap.paths_per_site > 1:  # decoded once; the first k-path layout is refused here (StoreError, one line)
        anchors = rmap.path_anchors()
    if len(idx) == 0:
        raise CoreError(f"dataset {ds.source}: no sample of split {split!r} has its last report")
    xy = ds.ue_xyz[idx, -1, :2].astype(np.float64)
    ids = ds.site_ids[idx, -1].astype(np.int64)  # [M, K]
    names = [str(s["name"]) for s in ds.attrs["sites"]]
    rows: list[dict[str, Any]] = []
    variants = [("clean", ds.clean_site_features, ds.clean_cell_features), ("noisy", ds.site_features, ds.cell_features)]
    for variant, site_f, cell_f in variants:
        if site_f is None or cell_f is None:
            continue
        sf, cf = site_f[idx, -1].astype(np.float64), cell_f[idx, -1].astype(np.float64)
        for f, feat in enumerate(SITE_FEATURES):
            angular = feat == "aoa"
            layer = rmap.layers.get(FEATURE_LAYERS[feat])
            if layer is not None:
                m, k = np.nonzero((ids >= 0) & np.isfinite(sf[..., f]))
                r = _residual(sf[m, k, f], bilinear(layer, rmap.bounds, xy[m], ids[m, k], angular), angular)
                rows += _rows(variant, feat, "site layer, all slots", r, ids[m, k], names)
                rows += _rows(variant, feat, "site layer, slot 0", r[k == 0], None, names)
                if feat in ("toa", "aoa") and rmap.paths_per_site > 1:
                    m, k = np.nonzero((ids >= 0) & np.isfinite(sf[..., 1]) & np.isfinite(sf[..., 2]))
                    group = f"site layer, nearest of {rmap.paths_per_site} paths"
                    near = nearest_path_residuals(rmap, xy[m], ids[m, k], sf[m, k, 1], sf[m, k, 2], anchors)[f - 1]
                    rows += _rows(variant, feat, group, near, ids[m, k], names)
                    off = xy[m] + CONTROL_OFFSET_CELLS * rmap.cell_size
                    ctrl = nearest_path_residuals(rmap, off, ids[m, k], sf[m, k, 1], sf[m, k, 2], anchors)[f - 1]
                    rows += _rows(variant, feat, f"{group}, control {CONTROL_OFFSET_CELLS} cells off", ctrl, None,
                                  names)
            r = _residual(sf[:, 0, f], bilinear(rmap.feature(feat), rmap.bounds, xy, angular=angular), angular)
            rows += _rows(variant, feat, "serving map vs slot 0", r[np.isfinite(sf[:, 0, f])], None, names)
        for f, feat in enumerate(CELL_FEATURES):
            r = _residual(cf[:, f], bilinear(rmap.feature(feat), rmap.bounds, xy), False)
            rows += _rows(variant, feat, "serving map", r[np.isfinite(cf[:, f])], None, names)
    summary: dict[str, Any] = {"dataset": ds.source, "radio_map": rmap.source, "split": split, "reports": int(len(idx)),
                               "paths_per_site": rmap.paths_per_site}
    if "site_path_gain" in rmap.layers:
        pg = np.stack([bilinear(rmap.layers["site_path_gain"][s], rmap.bounds, xy) for s in range(len(names))], 1)
        best = np.nan_to_num(pg, nan=-np.inf).argmax(1)
        summary["serving_agreement"] = float(np.mean(best == ids[:, 0]))
    return rows, summary


# -- output ------------------------------------------------------------------------------
_COLUMNS = ("n", "map_nan", "median", "robust_std", "std", "p90_abs", "gross")


def _fmt(key: str, value) -> str:
    if key in ("n", "map_nan"):
        return str(int(value))
    if key == "gross":
        return f"{100 * value:.1f} %"
    return f"{value:.3g}" if np.isfinite(value) else "nan"


def markdown_table(rows: list[dict[str, Any]], units: dict[str, str]) -> str:
    """The rows as one Markdown table (``gross`` as a percentage)."""
    head = "| variant | feature | group | " + " | ".join(_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(_COLUMNS))]
    for row in rows:
        feat = f"{row['feature']} [{units.get(row['feature'], '')}]"
        cells = [row["variant"], feat, row["group"]] + [_fmt(k, row[k]) for k in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_BESIDE_COLUMNS = ("median", "robust_std", "gross")


def beside_table(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], units: dict[str, str],
                 label_a: str = "A", label_b: str = "B") -> str:
    """One Markdown table of two datasets' pooled rows (groups without a per-site suffix) side by side:
    ``median``, ``robust_std`` and ``gross`` of ``label_a`` then of ``label_b``; a row missing on one side is NaN."""
    def pooled(rows):
        return {(r["variant"], r["feature"], r["group"]): r for r in rows if ": " not in r["group"]}

    a, b = pooled(rows_a), pooled(rows_b)
    keys = list(a) + [k for k in b if k not in a]
    cols = [f"{label} {c}" for label in (label_a, label_b) for c in _BESIDE_COLUMNS]
    lines = ["| variant | feature | group | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    nan_row = dict.fromkeys(_BESIDE_COLUMNS, float("nan"))
    for key in keys:
        variant, feat, group = key
        cells = [variant, f"{feat} [{units.get(feat, '')}]", group]
        for side in (a, b):
            row = side.get(key, nan_row)
            cells += [_fmt(c, row[c]) for c in _BESIDE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def world_line(ds) -> str:
    """The world a dataset was traced in, one line (:meth:`~core.stores.world_model.WorldModel.summary`)."""
    model = ds.measurement_model
    return model.world.summary() if model is not None else "not recorded (oracle)"


# -- command line ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="measurement dataset store, e.g. datasets/etoile")
    parser.add_argument("--radio-maps", default="radio_maps",
                        help="folder with <scene>.zarr, the dataset's scene (default: radio_maps)")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="test", help="which samples (default: test)")
    parser.add_argument("--beside", default=None, metavar="DATASET",
                        help="a second dataset of the same scene and map (e.g. the oracle world's): both side by side")
    parser.add_argument("--radio-map", default=None, metavar="PATH",
                        help="read this map store instead of <radio-maps>/<scene>.zarr: another map of the dataset's "
                             "scene with its sites and propagation (e.g. a k-path map); recorded in the summary")
    parser.add_argument("--json", default=None, help="also write the rows and summary as JSON here")
    parser.add_argument("--markdown", default=None, help="also write the table as Markdown here")


def run(args: argparse.Namespace) -> int:
    from core.features import FEATURES
    from core.stores.atomic import atomic_write_text
    from core.stores.dataset import MeasurementDataset
    from core.stores.lineage import check_map_of_dataset, check_map_override, map_path
    from core.stores.lock import output_lock
    from core.stores.output import check_writable
    from core.stores.radio_map import RadioMap

    for out, flag in ((args.markdown, "--markdown"), (args.json, "--json")):
        if out:
            check_writable(out, flag)
    ds = MeasurementDataset.load(args.dataset)
    scene = ds.attrs.get("scene")
    if not scene:
        raise CoreError(f"dataset {args.dataset}: attrs name no scene")
    other = MeasurementDataset.load(args.beside) if args.beside else None
    if other is not None and other.attrs.get("scene") != scene:
        raise CoreError(f"--beside {args.beside} is of scene {other.attrs.get('scene')!r}, "
                        f"--dataset {args.dataset} of {scene!r}")
    override = None
    if args.radio_map:  # another map of the scene, explicitly: checked for sites and propagation, recorded
        rmap = RadioMap.load(args.radio_map)
        override = {"recorded": ds.radio_map_ref.to_dict() if ds.radio_map_ref else None, "used": rmap.ref.to_dict()}
        for d in (ds, other):
            if d is not None:
                check_map_override(d.ref, rmap.ref)
    else:
        rmap = RadioMap.load(map_path(args.radio_maps, scene))
        check_map_of_dataset(ds.ref, ds.radio_map_ref, rmap.ref)  # the map this dataset was made with, or refuse
        if other is not None:
            check_map_of_dataset(other.ref, other.radio_map_ref, rmap.ref)
    units = {name: spec.unit for name, spec in FEATURES.items()}
    rows, summary = consistency_rows(ds, rmap, args.split)
    summary["world"] = world_line(ds)
    if override is not None:
        summary["radio_map_override"] = override
    if other is None:
        table = markdown_table(rows, units)
        result: dict[str, Any] = {"rows": rows, "summary": summary}
    else:
        rows_b, summary_b = consistency_rows(other, rmap, args.split)
        summary_b["world"] = world_line(other)
        table = beside_table(rows, rows_b, units, "A", "B")
        print(f"A = {args.dataset}, world: {summary['world']}")
        print(f"B = {args.beside}, world: {summary_b['world']}")
        print()
        result = {"rows": rows, "summary": summary, "beside": {"rows": rows_b, "summary": summary_b}}
    print(table)
    print()
    for key, value in summary.items():
        print(f"{key}: {value}")
    if other is not None:
        for key, value in result["beside"]["summary"].items():
            print(f"beside {key}: {value}")
    if args.markdown:
        with output_lock(args.markdown):
            atomic_write_text(Path(args.markdown), table + "\n")
    if args.json:
        with output_lock(args.json):
            atomic_write_text(Path(args.json), json.dumps(result, indent=2))
    return 0
