"""What the twin gets wrong, learned from labelled walks: per-site residual fields added to the map.

``python -m core correct-map --dataset D [--out PATH] [--radio-map MAP] [--split train] [--walks N] [--force]``

writes ``<radio-maps>/corrected/<scene>.zarr`` unless ``--out`` says otherwise: a maps folder of its own,
so the twin keeps its place and ``--radio-maps radio_maps/corrected`` reads the corrected maps.

A radio map is a digital twin. In the world, a report's per-site features differ from the map's at the
UE's true position by the measurement noise AND by the twin's error (a wall of another material, a
building a storey lower, a site a metre off, the world's shadow fading: docs/world.md). Part of that error
is systematic in space, so labelled walks (reports with their true positions) sample it. Per site ``s``
and feature ``f`` (path gain dB, ToA ns, AoA deg), every labelled slot gives a residual at the truth
(:func:`~core.physics.calibration.truth_residuals`)::

    r_n = z_n - L_s(x_n)                                  (AoA wrapped to (-180, 180])

and the correction on the map's cell-centred grid ``g`` is a kernel mean shrunk to zero::

    w_n(g) = exp(-|g - x_n|^2 / (2 h^2))                                 Gaussian kernel, bandwidth h [m]
    c(g)   = sum_n w_n(g) clip(r_n, +-R_f) / (lambda + sum_n w_n(g))     path gain, ToA
    c(g)   = atan2(sum_n w_n(g) sin r_n, lambda + sum_n w_n(g) cos r_n)   AoA (a circular mean)
    L'_s(g) = L_s(g) + c(g)                                              (AoA wrapped)

``lambda`` counts pseudo-reports of zero residual at ``g``: where few labelled reports fall, ``c`` shrinks
to 0 and the map stays the twin's. ``R_f`` (:data:`CLIP`) keeps a report whose strongest path is another
path than the map's (ToA hundreds of ns off) from dragging its neighbours' correction. The sums are taken
on the grid: each report is binned to the cell that contains it (its position rounded to that cell's
centre, at most ``cell / sqrt 2`` off) and the bins are convolved with the sampled Gaussian
(``scipy.ndimage.gaussian_filter``, truncated at 4 h); ``lambda`` is scaled by the kernel's centre weight so
that it stays a count of reports.

``h`` and ``lambda`` are chosen per feature on the VAL split from :data:`BANDWIDTHS_M` x :data:`SHRINKS`
(fitted on the fit split, scored on val), or no correction at all when none beats the twin there (in the
oracle world, where the map is the truth, ToA and AoA stay uncorrected): the mean Cauchy loss ``log(1 + (r' / s)^2)`` of the corrected
val residuals ``r'``, at ``s`` = the twin's own robust scale of the val residuals (a fixed yardstick, the
likelihood's penalty). The choice and the val losses and robust scales before and after are recorded in
the corrected map's ``attrs["twin_correction"]`` (:class:`TwinCorrection`).

What changes: the per-site layers ``site_path_gain``, ``site_toa``, ``site_aoa`` only (what the
likelihood, the calibration and every search read). Cells no site covers stay uncovered (NaN stays NaN).
The serving-cell channels (``values``: the serving site's path gain, ToA, AoA, SNR, SINR, throughput,
BLER) stay the twin's. The sites, propagation settings, grid and scene are the twin's, so
``evaluate --radio-map`` and ``consistency --radio-map`` accept the corrected map for the dataset.

Where labelled walks sample the area densely (a random split of the same walks: the test UEs walk where
the fit split's did) this is the twin fitted to the world; in an area with no labelled walk it is the twin.
A map of k paths per site is refused (its path anchors would need their own correction).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core import cli_types
from core.errors import CoreError
from core.features import wrap_degrees
from core.stores.lineage import CORRECTED_FOLDER, corrected_map_path

__all__ = ["TwinCorrection", "FeatureChoice", "fit_corrections", "correct_map", "BANDWIDTHS_M", "SHRINKS", "CLIP",
           "CORRECTED_FOLDER", "VIEWS", "site_layer", "record_rows", "check_lines", "localization_check"]

#: the per-site layers corrected, in the residuals' feature order (path gain, ToA, AoA)
LAYERS: tuple[str, ...] = ("site_path_gain", "site_toa", "site_aoa")
FEATURES: tuple[str, ...] = ("path_gain", "toa", "aoa")
#: residual clip R_f per feature (path gain dB, ToA ns; AoA is averaged on the circle and needs none)
CLIP: dict[str, float] = {"path_gain": 20.0, "toa": 300.0}
#: bandwidths h [m] and shrinkages lambda [reports] tried on the val split
BANDWIDTHS_M: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 8.0)
SHRINKS: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
#: reach: the share of the map's outdoor covered cells within REACH_M (Chebyshev) of a fitted labelled report;
#: below SPARSE_REACH the command warns: a partly corrected map draws searches toward its corrected areas
#: (etoile's realistic world: reach 17 % made the median worse, 52 % left it at par, 93 % cut it 24 %; munich 70 %:
#: 26 %; docs/world.md)
REACH_M = 2.0
SPARSE_REACH = 0.6


@dataclass(frozen=True)
class FeatureChoice:
    """One feature's chosen kernel and what it did on the val split (losses: mean Cauchy loss at the
    twin's val scale; robust std: 1.4826 MAD, feature units)."""

    bandwidth_m: float | None  # None: no kernel beat the twin on val, so this feature is not corrected
    shrink: float | None
    val_loss_twin: float
    val_loss_corrected: float
    val_robust_std_twin: float
    val_robust_std_corrected: float


@dataclass(frozen=True)
class TwinCorrection:
    """The fitted fields and their record.

    fields: float32 ``[3, S, H, W]`` the correction ``c`` per feature (path gain dB, ToA ns, AoA deg), site
    and cell; counts: ``[S, H, W]`` labelled slots binned per site and cell (any feature); choices: per
    feature; fit_reports / val_reports: the labelled reports used.
    """

    fields: np.ndarray
    counts: np.ndarray
    choices: dict[str, FeatureChoice]
    fit_split: str
    fit_reports: int
    val_reports: int
    fit_walks: int
    walks_seed: int | None = None  #: the draw of a subset of the split's walks (``walks``), None: all of them
    reach: float = float("nan")  #: share of the outdoor covered cells within REACH_M of a fitted report

    def record(self, dataset_ref: dict, twin_ref: dict) -> dict[str, Any]:
        """The ``attrs["twin_correction"]`` of the corrected map (JSON-safe)."""
        return {"dataset": dataset_ref, "twin": twin_ref, "fit_split": self.fit_split, "val_split": "val",
                "fit_walks": self.fit_walks, "walks_seed": self.walks_seed, "reach": self.reach,
                "reach_m": REACH_M, "fit_reports": self.fit_reports,
                "val_reports": self.val_reports, "clip": dict(CLIP),
                "features": {f: asdict(c) for f, c in self.choices.items()}}


def _binned(cells: tuple[np.ndarray, np.ndarray], ids: np.ndarray, r: np.ndarray, ok: np.ndarray, shape, f: int,
            num_sites: int) -> tuple[np.ndarray, ...]:
    """Per site and cell ``[S, H, W]``: the count of feature ``f``'s residuals and their sums (path gain /
    ToA: the clipped residual; AoA: its sine and cosine); ``cells``: each report's ``(row [M], col [M])``."""
    m, k = np.nonzero(ok[..., f])
    where = (ids[m, k], cells[0][m], cells[1][m])
    val = r[m, k, f]
    count = np.zeros((num_sites, *shape))
    np.add.at(count, where, 1.0)
    sums = []
    if FEATURES[f] == "aoa":
        for part in (np.sin(np.radians(val)), np.cos(np.radians(val))):
            acc = np.zeros_like(count)
            np.add.at(acc, where, part)
            sums.append(acc)
    else:
        acc = np.zeros_like(count)
        np.add.at(acc, where, np.clip(val, -CLIP[FEATURES[f]], CLIP[FEATURES[f]]))
        sums.append(acc)
    return (count, *sums)


def _field(binned: tuple[np.ndarray, ...], angular: bool, bandwidth_cells: float, shrink: float) -> np.ndarray:
    """``c [S, H, W]`` of the module doc from the binned sums."""
    from scipy.ndimage import gaussian_filter

    def smooth(a: np.ndarray) -> np.ndarray:
        return np.stack([gaussian_filter(plane, bandwidth_cells, mode="constant") for plane in a])

    delta = np.zeros((9, 9))
    delta[4, 4] = 1.0
    lam = shrink * float(gaussian_filter(delta, bandwidth_cells, mode="constant")[4, 4])  # lambda, in reports
    count = smooth(binned[0])
    if angular:
        return np.degrees(np.arctan2(smooth(binned[1]), lam + smooth(binned[2])))
    return smooth(binned[1]) / (lam + count)


def _lookup(field: np.ndarray, cells: tuple[np.ndarray, np.ndarray], ids: np.ndarray, ok_f: np.ndarray) -> np.ndarray:
    """``field[s]`` at the cell of each ok slot (the flat ``[M_ok]`` in ``np.nonzero`` order)."""
    m, k = np.nonzero(ok_f)
    return field[ids[m, k], cells[0][m], cells[1][m]]


def fit_corrections(dataset, radio_map, split: str = "train", walks: int | None = None,
                    walks_seed: int = 0) -> TwinCorrection:
    """Fit the correction of ``radio_map`` (a RadioMap with per-site layers, one path per site) to the
    labelled reports of ``dataset``'s ``split``, with h and lambda chosen on its val split (module doc).
    ``walks``: fit only this many of the split's walks, drawn without replacement with ``walks_seed`` (how
    many labelled walks does the correction need; the val split is used whole)."""
    from core.physics.calibration import robust_location_scale, truth_residuals
    from core.physics.site_lookup import prepare_site_maps

    def robust_std(r: np.ndarray) -> float:  # 1.4826 MAD (AoA residuals already wrapped about 0)
        return robust_location_scale(r)[1]

    if radio_map.paths_per_site > 1:
        raise CoreError(f"radio map {radio_map.source}: {radio_map.paths_per_site} paths per site; the twin correction "
                        "corrects maps of one path per site (generate one without --paths-per-site)")
    missing = [name for name in LAYERS if name not in radio_map.layers]
    if missing:
        raise CoreError(f"radio map {radio_map.source}: no per-site layers {missing} to correct")
    if split == "val":
        raise CoreError("correct-map: --split val is where the kernel is chosen; fit on train (or test)")
    maps = prepare_site_maps(radio_map)
    fit_idx = dataset.indices(split)
    if walks is not None:
        if isinstance(walks, bool) or int(walks) != walks or walks < 1:
            raise CoreError(f"correct-map: walks must be an integer >= 1, got {walks!r}")
        fit_idx = np.sort(np.random.default_rng(walks_seed).permutation(fit_idx)[:int(walks)])
    fit = truth_residuals(dataset, maps, fit_idx)
    val = truth_residuals(dataset, maps, dataset.indices("val"))
    for name, (_, _, _, ok) in ((split, fit), ("val", val)):
        if not ok.any():
            raise CoreError(f"dataset {dataset.source}: split {name!r} has no labelled report a site layer covers")
    cell, shape, num_sites = radio_map.cell_size, radio_map.shape, maps.num_sites
    fit_cells, val_cells = radio_map.cell_of(fit[0]), radio_map.cell_of(val[0])  # the cell holding each report
    fields, choices, counts = [], {}, np.zeros((num_sites, *shape))
    for f, name in enumerate(FEATURES):
        angular = name == "aoa"
        binned = _binned(fit_cells, *fit[1:], shape, f, num_sites)
        counts = np.maximum(counts, binned[0])
        _, ids_v, r_v, ok_v = val
        r_val = r_v[..., f][ok_v[..., f]]
        scale = max(robust_std(r_val), 1e-6)

        def loss(res: np.ndarray, scale=scale) -> float:
            return float(np.mean(np.log1p((res / scale) ** 2)))

        best = (loss(r_val), None, None, np.zeros((num_sites, *shape)), r_val)  # the twin kept, if nothing beats it
        for h in BANDWIDTHS_M:
            for lam in SHRINKS:
                c = _field(binned, angular, h / cell, lam)
                res = r_val - _lookup(c, val_cells, ids_v, ok_v[..., f])
                res = wrap_degrees(res) if angular else res
                score = loss(res)
                if score < best[0]:
                    best = (score, h, lam, c, res)
        score, h, lam, c, res = best
        choices[name] = FeatureChoice(h, lam, loss(r_val), score, robust_std(r_val), robust_std(res))
        fields.append(c.astype(np.float32))
    return TwinCorrection(np.stack(fields), counts.astype(np.float32), choices, split,
                          int(fit[3].any((1, 2)).sum()), int(val[3].any((1, 2)).sum()), int(len(fit_idx)),
                          None if walks is None else int(walks_seed), _reach(radio_map, counts))


def _reach(radio_map, counts: np.ndarray) -> float:
    """The share of the map's outdoor covered cells within :data:`REACH_M` (Chebyshev) of a cell holding a
    fitted report (``counts [S, H, W]``); NaN on a map with no covered outdoor cell."""
    from scipy.ndimage import binary_dilation

    area = radio_map.valid & (radio_map.outdoor if radio_map.outdoor is not None else True)
    k = max(0, int(round(REACH_M / radio_map.cell_size)))
    near = binary_dilation((counts > 0).any(0), structure=np.ones((2 * k + 1, 2 * k + 1), bool)) if k else \
        (counts > 0).any(0)
    return float(near[area].mean()) if area.any() else float("nan")


def correct_map(radio_map, correction: TwinCorrection, record: dict[str, Any]):
    """A new :class:`~core.stores.radio_map.RadioMap`: ``radio_map`` with ``correction`` added to its per-site
    layers (AoA wrapped; NaN stays NaN) and ``attrs["twin_correction"] = record``; everything else as is."""
    from core.stores.radio_map import RadioMap

    layers = dict(radio_map.layers)
    for f, name in enumerate(LAYERS):
        twin = layers[name]
        out = twin.astype(np.float64) + correction.fields[f]
        out = wrap_degrees(out) if FEATURES[f] == "aoa" else out
        layers[name] = np.where(np.isfinite(twin), out, np.nan).astype(np.float32)
    return RadioMap(radio_map.values, radio_map.features, radio_map.bounds, valid=radio_map.valid,
                    attrs={**radio_map.attrs, "twin_correction": record}, layers=layers,
                    outdoor=radio_map.outdoor, ground=radio_map.ground)


#: val walks the command localizes against the twin and the corrected map (``--check-walks``; 0: no check)
CHECK_WALKS = 300


def localization_check(dataset, twin, corrected, walks: int = CHECK_WALKS, seed: int = 0) -> dict[str, dict[str, float]]:
    """Does the corrected map localize better? Exhaustive map matching (:mod:`core.physics.exhaustive`, no
    network) of ``walks`` val walks (drawn with ``seed``) against each map, each with its likelihood calibrated
    on the train split (the runs' default likelihood: per-site path gain, ToA and AoA, Cauchy, no serving
    features; the reports of :data:`~core.features.REPORT_WINDOW_S`). The kernel was chosen on the same val
    split by its residuals, not by localization: this checks the search on the corrected map, it is no test
    score. Returns ``{"twin" | "corrected": {"median_m", "p90_m", "beyond_20m"}}`` (the error of the label, the
    last report's position) and ``"walks"``."""
    from core.features import REPORT_WINDOW_S
    from core.physics.calibration import calibrate
    from core.physics.exhaustive import ExhaustiveMatcher
    from core.physics.likelihood import LikelihoodConfig, RobustLikelihood
    from core.physics.observation import site_observation

    idx = np.sort(np.random.default_rng(seed).permutation(dataset.indices("val"))[:int(walks)])
    obs = site_observation(dataset, idx, window_s=REPORT_WINDOW_S)
    truth = dataset.labels[idx].astype(np.float64)
    out: dict[str, Any] = {"walks": int(len(idx))}
    for name, rmap in (("twin", twin), ("corrected", corrected)):
        lik = RobustLikelihood(rmap, calibrate(dataset, rmap, split="train"), LikelihoodConfig(cell_features=()))
        err = np.linalg.norm(ExhaustiveMatcher(lik)(obs).xy.detach().cpu().numpy().astype(np.float64) - truth, axis=1)
        out[name] = {"median_m": float(np.median(err)), "p90_m": float(np.percentile(err, 90)),
                     "beyond_20m": float(np.mean(err > 20.0))}
    return out


def check_lines(record: dict[str, Any]) -> list[str]:
    """The record's :func:`localization_check` in words (the command prints them, the app shows them): the
    figures, and a line starting ``warning:`` when the corrected map is worse in median; [] without a check."""
    check = record.get("localization_check")
    if not isinstance(check, dict) or not all(isinstance(check.get(k), dict) for k in ("twin", "corrected")):
        return []
    t, c = check["twin"], check["corrected"]
    lines = [f"exhaustive map matching of {check.get('walks', '?')} val walks (no network): twin median "
             f"{t['median_m']:.2f} m, P90 {t['p90_m']:.1f} m, {100 * t['beyond_20m']:.1f} % beyond 20 m -> corrected "
             f"{c['median_m']:.2f} m, {c['p90_m']:.1f} m, {100 * c['beyond_20m']:.1f} %"]
    if c["median_m"] > t["median_m"]:
        lines.append("warning: the corrected map localizes these val walks worse in median than the twin: fit more "
                     "walks, or keep the twin")
    return lines


# -- reading a corrected map back (the app's view) ----------------------------------------
#: what :func:`site_layer` shows of one site and feature
VIEWS: tuple[str, ...] = ("twin", "corrected", "correction")
UNITS: dict[str, str] = {"path_gain": "dB", "toa": "ns", "aoa": "deg"}


#: said under the Cramér–Rao bound of a corrected map (evaluate's table, the Refinement page): the fitted
#: correction's slope counts as information and the measurement model leaves out the twin's remaining error
#: (docs/world.md)
BOUND_CAVEAT = ("caveat: this map is a corrected twin (correct-map): the bound reads the fitted correction's "
                "slope as information and leaves out the twin's remaining error, so it is no limit here")


def is_corrected(radio_map) -> bool:
    """Whether ``radio_map`` is one that ``correct-map`` wrote (it carries ``attrs["twin_correction"]``)."""
    return "twin_correction" in radio_map.attrs


def correction_record(corrected) -> dict[str, Any]:
    """``attrs["twin_correction"]`` of the map ``corrected``; a one-line CoreError when it is not a corrected map."""
    record = corrected.attrs.get("twin_correction")
    if not isinstance(record, dict) or not isinstance(record.get("features"), dict):
        raise CoreError(f"radio map {corrected.source}: not a corrected map (no attrs twin_correction record; "
                        "python -m core correct-map writes one)")
    return record


def site_layer(twin, corrected, feature: str, site: int, view: str) -> np.ndarray:
    """``[H, W]`` one site's layer of ``feature`` (path_gain dB, toa ns, aoa deg): the twin's (``twin``), the
    corrected map's (``corrected``) or ``correction`` = corrected - twin (AoA wrapped to (-180, 180]); NaN where
    the site has no path. The two maps must share their grid and sites (a corrected map of another twin, or
    a store that is no corrected map, is a one-line CoreError)."""
    if view not in VIEWS:
        raise CoreError(f"view {view!r}: one of {', '.join(VIEWS)}")
    if feature not in FEATURES:
        raise CoreError(f"feature {feature!r}: one of {', '.join(FEATURES)}")
    correction_record(corrected)
    layer = LAYERS[FEATURES.index(feature)]
    planes = []
    for rm in (twin, corrected):
        if layer not in rm.layers:
            raise CoreError(f"radio map {rm.source}: no per-site layer {layer}")
        planes.append(rm.layers[layer])
    if twin.shape != corrected.shape or not np.allclose(twin.bounds, corrected.bounds) \
            or planes[0].shape != planes[1].shape:
        raise CoreError(f"radio map {corrected.source} is not on the grid and sites of the twin {twin.source}: "
                        "correct this twin again (python -m core correct-map)")
    if not 0 <= int(site) < planes[0].shape[0]:
        raise CoreError(f"site {site}: the maps have {planes[0].shape[0]} sites")
    before, after = (p[int(site)].astype(np.float64) for p in planes)
    if view == "twin":
        return before
    if view == "corrected":
        return after
    diff = after - before
    return wrap_degrees(diff) if feature == "aoa" else diff


def record_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per feature of a ``twin_correction`` record: its kernel (h m, lambda; None = the twin kept) and
    its val robust std and Cauchy loss, twin -> corrected."""
    rows = []
    for name, c in (record.get("features") or {}).items():
        if not isinstance(c, dict):
            raise CoreError(f"twin_correction record: feature {name!r} is not a record")
        rows.append({"feature": f"{name} [{UNITS.get(name, '?')}]", "h m": c.get("bandwidth_m"),
                     "lambda": c.get("shrink"), "kept": "twin kept" if c.get("bandwidth_m") is None else "corrected",
                     "val robust std twin": c.get("val_robust_std_twin"),
                     "val robust std corrected": c.get("val_robust_std_corrected"),
                     "val Cauchy loss twin": c.get("val_loss_twin"),
                     "val Cauchy loss corrected": c.get("val_loss_corrected")})
    return rows


# -- command -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="a labelled dataset traced in the world, e.g. "
                                                         "datasets/etoile_realistic")
    parser.add_argument("--out", default=None,
                        help="the corrected map store to write (default: <radio-maps>/corrected/<scene>.zarr, a maps "
                             "folder of its own, so the twin keeps its place)")
    parser.add_argument("--radio-map", default=None, metavar="PATH",
                        help="the twin to correct (default: the map the dataset records, in --radio-maps)")
    parser.add_argument("--radio-maps", default="radio_maps", help="folder of <scene>.zarr (default: radio_maps)")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="the labelled walks fitted (default: train; the kernel is chosen on val)")
    parser.add_argument("--walks", type=cli_types.count, default=None,
                        help="fit only this many labelled walks of --split, drawn at random (default: all)")
    parser.add_argument("--walks-seed", type=cli_types.seed, default=0, help="the draw of --walks (default: 0)")
    parser.add_argument("--check-walks", type=cli_types.integer(0), default=CHECK_WALKS,
                        help=f"localize this many val walks by exhaustive map matching against the twin and the "
                             f"corrected map, and say which is better (default: {CHECK_WALKS}; 0: no check)")
    parser.add_argument("--force", action="store_true", help="replace --out if it is a corrected map (this command's own output; any other store is kept)")
    parser.add_argument("--json", default=None, help="also write the record (choices, val figures) here")


def _table(record: dict[str, Any]) -> str:
    lines = ["| feature | h m | lambda | val robust std: twin -> corrected | val Cauchy loss: twin -> corrected |",
             "|---|---:|---:|---|---|"]
    for r in record_rows(record):
        kernel = "twin kept | -" if r["h m"] is None else f"{r['h m']:g} | {r['lambda']:g}"
        lines.append(f"| {r['feature']} | {kernel} | {r['val robust std twin']:.3g} -> "
                     f"{r['val robust std corrected']:.3g} | {r['val Cauchy loss twin']:.3f} -> "
                     f"{r['val Cauchy loss corrected']:.3f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from core.stores.atomic import atomic_write_text
    from core.stores.dataset import MeasurementDataset
    from core.stores.lineage import StoreRef, check_map_of_dataset, check_map_override, corrected_twin_id, map_path
    from core.stores.lock import output_lock
    from core.stores.output import check_new, check_replaceable, check_writable, writing_store
    from core.stores.radio_map import RadioMap

    ds = MeasurementDataset.load(args.dataset)
    scene = ds.attrs.get("scene")
    if not scene:
        raise CoreError(f"dataset {args.dataset}: attrs name no scene")
    out = Path(args.out) if args.out else corrected_map_path(args.radio_maps, scene)
    check_writable(out, "--out")
    if args.json:
        check_writable(args.json, "--json")
    check_new(out, args.force)
    if args.radio_map:
        twin = RadioMap.load(args.radio_map)
        check_map_override(ds.ref, twin.ref)
    else:
        twin = RadioMap.load(map_path(args.radio_maps, scene))
        check_map_of_dataset(ds.ref, ds.radio_map_ref, twin.ref)
    if twin.source and out.resolve() == Path(twin.source).resolve():
        raise CoreError(f"--out {out} is the twin being corrected; write the corrected map to another path")
    if args.force:  # this command's own output only: a corrected map, not any radio map (generate-maps' twins)
        check_replaceable(out, corrected_twin_id(StoreRef(str(out))) is not None,
                          "a corrected map (correct-map's own output)", "--out")
    with writing_store(out, "radio_map", args.force, "--out"):  # one writer; --force replaces a map only; then work
        correction = fit_corrections(ds, twin, args.split, args.walks, args.walks_seed)
        record = correction.record(ds.ref.to_dict(), twin.ref.to_dict())
        corrected = correct_map(twin, correction, record)
        if args.check_walks:
            record["localization_check"] = localization_check(ds, twin, corrected, args.check_walks)
            corrected = correct_map(twin, correction, record)
        corrected.save(out)
    print(f"twin {twin.ref.describe()} corrected with {correction.fit_reports} labelled reports of "
          f"{correction.fit_walks} walks of {args.dataset} ({args.split}); kernel chosen on {correction.val_reports} val reports:")
    print(_table(record))
    print(f"the labelled walks come within {REACH_M:g} m of {100 * correction.reach:.1f} % of the map's outdoor "
          f"covered cells; wrote {out} (evaluate --radio-map {out}, consistency --radio-map {out})")
    if correction.reach < SPARSE_REACH:
        print(f"warning: below {100 * SPARSE_REACH:.0f} %, a partly corrected map draws searches toward its corrected "
              "areas (etoile's realistic world: 17 % made the median worse; docs/world.md): fit more walks")
    for line in check_lines(record):
        print(line)
    if args.json:
        with output_lock(args.json):
            atomic_write_text(Path(args.json), json.dumps(record, indent=2))
    return 0
