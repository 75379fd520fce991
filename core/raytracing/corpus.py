"""A corpus of procedural cities and their radio maps (``python -m core make-corpus``), one task per city.

City ``k`` of a corpus is ``city_<seed>`` with ``seed = first_seed + k``. With ``--vary`` (the
default) its parameters are drawn from the seed (:func:`corpus_params`) over ranges that span
the shipped real scenes (``docs/cities.md``: footprint share, heights, street widths, lot
sizes); ``--fixed`` gives every city the command's own generator flags. Layout::

    <out>/scenes/city_<seed>/       the city (make-city's files, its sites beside it)
    <out>/radio_maps/city_<seed>.zarr  its radio map (generate-maps' store)
    <out>/datasets/city_<seed>      its dataset (make-dataset's store: --walks x --reports, the default
                                    measurement model, seed = the city's), unless --walks 0 or --no-map
    <out>/records/city_<seed>.json  what the task measured: parameters, statistics, coverage, digests,
                                    time per stage [s]
    <out>/records/city_<seed>.failed.json  why a check refused the city (with what it depended on)
    <out>/manifest.json             every record, the failures with their cause, the settings

Each city is one call of :func:`corpus_city` through :mod:`core.raytracing.scene_batch`: in turn, or
as one Ray task (``--ray [ADDRESS]``, :func:`~core.raytracing.distributed.run_on_ray`), so a city
that fails is reported with its cause and the others go on (exit 2 at the end). A task holds one
city in memory. **Resuming**: a city whose folder is valid (every digest of its manifest matches)
with the same parameters, whose map loads and whose record names that city's digest, is skipped;
anything else is rebuilt (its own files only), and so is whatever depends on it (a new city: its map
and dataset; a dataset whose recorded map digest is not the map's). Every file is written atomically.
**Known failures**: a city whose map covers too little of it (:class:`~core.errors.CoverageError`, a
property of its parameters and the settings) leaves ``<out>/records/city_<seed>.failed.json`` (its
parameters, map and dataset settings, the cause); a rerun with the same ones reports that cause again at
once instead of tracing the city again (``--retry-failed`` traces it again). Any other failure (a file in
the way, a killed worker) leaves no such record: the city is tried again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from core import cli_types
from core.device import RAY_LOCAL
from core.errors import CoreError, CoverageError

#: ranges of the varied parameters (uniform), chosen so the corpus spans etoile, munich, florence and
#: san_francisco (docs/cities.md)
VARY_RANGES = {"block_m": (40.0, 100.0), "street_width_m": (5.0, 28.0), "lot_m": (14.0, 32.0),
               "density": (0.7, 1.0), "setback_m": (0.4, 2.0), "height_mean_m": (10.0, 20.0), "plazas": (0.0, 0.12)}
LAYOUTS = ("grid", "perturbed", "irregular")
DEFAULT_CORPUS_RESOLUTION_M = 2.0
DEFAULT_WALKS = 1000
#: receivers per PathSolver call in a corpus (the default 1,024): half the calls, each with its fixed cost; measured on
#: the default city's 8,000 dataset positions at 10,000 rays per site, 0.13 % of the (position, site) paths differ
#: from 1,024 per call (the candidates per call stay under 5 % of the budget; docs/cities.md)
CORPUS_RECEIVERS_PER_CALL = 2_048


def corpus_propagation(samples_per_src: int | None = None, retry_samples_per_src: int | None = None):
    """The :class:`~core.raytracing.tracing.PropagationSettings` of a corpus city: the default physics of the
    real scenes' maps (10,000 rays per site, a 100,000-ray second pass, depth 2, diffraction), with
    :data:`CORPUS_RECEIVERS_PER_CALL` receivers per PathSolver call; ``samples_per_src`` /
    ``retry_samples_per_src`` replace the rays. Fewer rays are cheaper but not free: at 2,500 rays per
    site the default city's UEs hear 2.29 sites per report instead of 2.83 (10.5 % of the paths are not
    found; docs/cities.md), so the default keeps the real scenes' rays. Map and dataset share these
    settings (the dataset reads them from the map).
    """
    from dataclasses import replace

    from core.raytracing.tracing import PropagationSettings

    base = replace(PropagationSettings(), receivers_per_call=CORPUS_RECEIVERS_PER_CALL)
    if samples_per_src is not None:
        base = replace(base, samples_per_src=int(samples_per_src))
    if retry_samples_per_src is not None:
        base = replace(base, retry_samples_per_src=int(retry_samples_per_src))
    return base


def corpus_params(seed: int, base: dict[str, Any], vary: bool) -> dict[str, Any]:
    """City ``seed``'s generator parameters: ``base`` with, when ``vary``, the :data:`VARY_RANGES`
    and the layout drawn from a generator of its own (``PCG64([seed, 1])``, apart from the city's); blocks at
    most half the square, streets at most half a block."""
    values = {**base, "seed": int(seed)}
    if vary:
        rng = np.random.Generator(np.random.PCG64([int(seed), 1]))
        for key, (low, high) in VARY_RANGES.items():
            values[key] = round(float(rng.uniform(low, high)), 2)
        values["height_sd_m"] = round(0.4 * values["height_mean_m"], 2)
        values["layout"] = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
        values["block_m"] = min(values["block_m"], round(0.5 * float(values.get("size_m", 256.0)), 2))
        values["street_width_m"] = min(values["street_width_m"], round(0.5 * values["block_m"], 2))
    return values


def _map_ok(path: Path, settings=None) -> tuple[bool, dict[str, Any]]:
    """``(usable, info)``: the map at ``path`` loads and, with ``settings``, was traced with their
    propagation and cell size (a map made with other settings is rebuilt)."""
    from core.raytracing.tracing import PropagationSettings
    from core.stores.radio_map import RadioMap

    if not path.exists():
        return False, {}
    try:
        radio_map = RadioMap.load(path)
    except Exception:
        return False, {}
    info = {"outdoor_coverage": radio_map.outdoor_coverage, "coverage_heard": radio_map.attrs.get("coverage_heard"),
            "map_digest": radio_map.lineage.digest if radio_map.lineage else None}
    if settings is not None:
        same = (PropagationSettings.from_dict(radio_map.attrs["propagation"]) == settings.propagation
                and radio_map.attrs["generator"].get("resolution") == settings.resolution)
        return same, info
    return True, info


def _dataset_ok(path: Path, map_digest: str | None, size: tuple[int, int] | None = None) -> bool:
    """The dataset at ``path`` loads, records the map of digest ``map_digest`` and has ``size = (walks, reports)``."""
    from core.stores.dataset import MeasurementDataset

    if not path.exists():
        return False
    try:
        ds = MeasurementDataset.load(path)
    except Exception:
        return False
    ref = ds.radio_map_ref
    return (ref is not None and ref.digest == map_digest
            and (size is None or (ds.num_samples, ds.num_reports) == tuple(size)))


def corpus_dataset(name: str, root: Path, num_ues: int, reports: int, seed: int, force: bool) -> str:
    """Make city ``name``'s dataset (``num_ues`` walks x ``reports``, the default measurement model) with
    make-dataset's own per-scene function, at ``<root>/datasets/<name>``; returns its path."""
    from core.raytracing.measurements import DatasetOptions, dataset_of_scene
    from core.stores.measurement_model import MeasurementModel

    options = DatasetOptions(num_ues=num_ues, reports=reports, radio_maps=str(root / "radio_maps"), seed=seed,
                             split="random", scenes_dir=str(root / "scenes"), model=MeasurementModel())
    path = root / "datasets" / name
    dataset_of_scene(name, str(path), options, force)
    return str(path)


def _failure_key(values: dict[str, Any], settings, dataset, num_sites: int) -> dict[str, Any]:
    """What a failure depends on: the city's parameters, its sites, the map settings and the dataset size."""
    from core.raytracing.city import params_from

    return json.loads(json.dumps({
        "params": params_from(values).model_dump(), "sites": num_sites, "dataset": list(dataset) if dataset else None,
        "map": None if settings is None else {"resolution_m": settings.resolution, "map_size": settings.map_size,
                                              "min_coverage": settings.min_coverage,
                                              "propagation": settings.propagation.to_dict()}}))


def corpus_city(name: str, values: dict[str, Any], out: str, settings, num_sites: int,
                dataset: tuple[int, int] | None = None, threads: int | None = None,
                retry_failed: bool = False) -> tuple[str, str]:
    """:func:`build_city`, remembering a coverage failure (module doc, "Known failures"): with the same
    parameters and settings it is raised again at once unless ``retry_failed``."""
    from core.stores.atomic import atomic_write_text

    failed_file = Path(out) / "records" / f"{name}.failed.json"
    key = _failure_key(values, settings, dataset, num_sites)
    try:
        known = json.loads(failed_file.read_text())
    except (OSError, ValueError):
        known = None
    if known is not None and known.get("key") == key and not retry_failed:
        raise CoreError(f"failed before with the same parameters and settings (--retry-failed traces it again): "
                        f"{known.get('cause')}")
    try:
        result = build_city(name, values, out, settings, num_sites, dataset, threads)
    except CoverageError as exc:  # the same inputs fail again; anything else (a file in the way) may not
        atomic_write_text(failed_file, json.dumps({"name": name, "key": key, "cause": str(exc)}, indent=1) + "\n")
        raise
    failed_file.unlink(missing_ok=True)
    return result


def build_city(name: str, values: dict[str, Any], out: str, settings, num_sites: int,
               dataset: tuple[int, int] | None = None, threads: int | None = None) -> tuple[str, str]:
    """Build city ``name`` (parameters ``values``), its map (``settings``; None: no map) and, with a map
    and ``dataset = (walks, reports)``, its dataset, under ``out``.

    ``threads``: Dr.Jit's CPU threads in this process (a Ray task holding one CPU traces on one
    thread); None leaves them (every core). The record keeps the process' peak resident memory
    so far (``peak_rss_mb``; a Ray worker builds its cities in turn, one at a time).

    Returns ``(status, detail)``: ``ok`` (something was built) or ``skipped`` (module docstring).
    Raises on a bad parameter or a failed trace; the batch runner reports that as the city's failure.
    """
    import resource

    if threads is not None:
        import drjit as dr

        dr.set_thread_count(int(threads))
    from core.raytracing.city import is_valid_city, params_from, read_manifest, write_city
    from core.raytracing.generation import map_of_scene
    from core.stores.atomic import atomic_write_text
    from core.stores.lineage import map_path

    params = params_from(values)
    root = Path(out)
    scenes, maps, record_file = root / "scenes", root / "radio_maps", root / "records" / f"{name}.json"
    folder, map_file = scenes / name, map_path(maps, name)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds per stage, every thread of the process (robust to other load)
    t, c = time.perf_counter(), time.process_time()
    manifest = read_manifest(folder)
    city_ok = is_valid_city(folder) and manifest is not None and manifest["params"] == params.model_dump()
    if not city_ok:
        _, manifest = write_city(params, scenes, name, force=folder.exists(), num_sites=num_sites)
    times["city_s"], cpu["city_s"] = round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)
    try:
        old = json.loads(record_file.read_text())
    except (OSError, ValueError):
        old = {}
    built = not city_ok
    map_info: dict[str, Any] = {}
    if settings is not None:
        t, c = time.perf_counter(), time.process_time()
        ok, map_info = _map_ok(map_file, settings)
        if built or not ok or old.get("city_digest") != manifest["digest"]:
            map_of_scene(name, str(scenes), str(maps), settings, force=map_file.exists())
            ok, map_info = _map_ok(map_file)
            built = True
        times["map_s"], cpu["map_s"] = round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)
    if dataset is not None and settings is not None:
        t, c = time.perf_counter(), time.process_time()
        ds_path = root / "datasets" / name
        if built or not _dataset_ok(ds_path, map_info.get("map_digest"), dataset):
            corpus_dataset(name, root, dataset[0], dataset[1], params.seed, force=ds_path.exists())
            built = True
        map_info["dataset"] = {"path": f"datasets/{name}", "walks": dataset[0], "reports": dataset[1]}
        times["dataset_s"], cpu["dataset_s"] = round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)
    if not built and old.get("city_digest") == manifest["digest"]:
        return "skipped", f"{folder} and what was made from it exist and are valid"
    record = {"name": name, "seed": params.seed, "params": params.model_dump(),
              **{k: manifest[k] for k in ("buildings", "vehicles", "footprint_share", "height_m", "sites")},
              "city_digest": manifest["digest"], **map_info,
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "seconds": {**{k: v for k, v in (old.get("seconds") or {}).items() if not built}, **times},
              "cpu_seconds": {**{k: v for k, v in (old.get("cpu_seconds") or {}).items() if not built}, **cpu}}
    atomic_write_text(record_file, json.dumps(record, indent=1, sort_keys=True) + "\n")
    cover = f", outdoor coverage {map_info['outdoor_coverage']:.1%}" if map_info.get("outdoor_coverage") is not None else ""
    return "ok", f"{manifest['buildings']} buildings{cover}; " + ", ".join(f"{k} {v:.1f}" for k, v in times.items())


def write_manifest(out: Path, names: list[str], results, settings_record: dict[str, Any],
                   last_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """``<out>/manifest.json``: the records of ``names`` that exist, the failed cities with their cause,
    and ``last_run`` (the command's wall time [s], engine and how many cities were built, skipped, failed)."""
    from core.stores.atomic import atomic_write_text

    records = []
    for name in names:
        try:
            records.append(json.loads((out / "records" / f"{name}.json").read_text()))
        except (OSError, ValueError):
            continue
    failed = [{"name": r.name, "cause": r.detail} for r in results if r.status == "failed"]
    coverage = [r["outdoor_coverage"] for r in records if r.get("outdoor_coverage") is not None]
    manifest = {"kind": "city_corpus", "count": len(names), "complete": len(records), "failed": failed,
                "settings": settings_record, "last_run": last_run,
                "outdoor_coverage_min": round(min(coverage), 4) if coverage else None,
                "outdoor_coverage_mean": round(float(np.mean(coverage)), 4) if coverage else None,
                "cities": records}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def run_in_turn_with_progress(calls) -> list:
    """The calls one after the other (:func:`~core.raytracing.scene_batch.run_guarded`), a line and the
    job's ``k of n cities`` after each; the cities' own map and dataset progress stays out of the job's
    record (it would make the corpus bar jump back), their bars show on the terminal."""
    from core.progress import PROGRESS_ENV, report
    from core.raytracing.scene_batch import result_line, run_guarded

    path, results = os.environ.pop(PROGRESS_ENV, None), []
    try:
        for k, call in enumerate(calls):
            results.append(run_guarded(call.function, call.name, *call.args))
            print(result_line(results[-1]), flush=True)
            if path is not None:
                os.environ[PROGRESS_ENV] = path
                report((k + 1) / len(calls), f"{call.name}: {results[-1].status} ({k + 1} of {len(calls)} cities)",
                       force=True)
                del os.environ[PROGRESS_ENV]
    finally:
        if path is not None:
            os.environ[PROGRESS_ENV] = path
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from core.raytracing.city import add_city_arguments
    from core.raytracing.distributed import add_ray_argument

    parser.add_argument("--count", type=cli_types.count, required=True, help="cities in the corpus")
    parser.add_argument("--first-seed", type=cli_types.seed, default=0, help="city k has seed first-seed + k")
    parser.add_argument("--out", required=True, help="the corpus folder (scenes/, radio_maps/, records/, manifest.json)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--vary", dest="vary", action="store_true", default=True,
                       help="draw each city's parameters from its seed over ranges spanning the real scenes (default)")
    group.add_argument("--fixed", dest="vary", action="store_false", help="every city with the generator flags below")
    parser.add_argument("--no-map", action="store_true", help="cities only, no radio maps")
    parser.add_argument("--walks", type=cli_types.non_negative_int, default=DEFAULT_WALKS,
                        help=f"UE walks of each city's dataset (0: no dataset; default {DEFAULT_WALKS})")
    parser.add_argument("--reports", type=cli_types.count, default=8, help="reports per walk (default 8)")
    parser.add_argument("--resolution", type=cli_types.positive, default=DEFAULT_CORPUS_RESOLUTION_M,
                        help="map cell edge [m] (default 2)")
    parser.add_argument("--map-size", type=cli_types.count, nargs=2, default=None, metavar=("H", "W"),
                        help="map cells (default: fit the city: 128 128 for the default 256 m square at 2 m)")
    parser.add_argument("--samples-per-tx", type=cli_types.count, default=None,
                        help="PathSolver rays per site (default: 10,000, as the real scenes' maps; fewer are "
                             "faster and find fewer paths: docs/cities.md)")
    parser.add_argument("--retry-samples-per-tx", type=cli_types.non_negative_int, default=None,
                        help="rays per site of the second pass over points with no path (default: 100,000)")
    parser.add_argument("--max-depth", type=cli_types.non_negative_int, default=None)
    parser.add_argument("--min-coverage", type=cli_types.fraction, default=None)
    add_ray_argument(parser)
    parser.add_argument("--retry-failed", action="store_true",
                        help="trace again the cities whose map covered too little before, with the same parameters and "
                             "settings (default: report their recorded cause at once)")
    parser.add_argument("--num-cpus", type=cli_types.count, default=None,
                        help="with a local --ray: give it this many CPUs (default: every core), so at most this many "
                             "cities trace at once, each on one thread; leaves the other cores free")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    add_city_arguments(parser)


def _map_settings(args):
    from dataclasses import replace

    from core.raytracing.generation import MapSettings

    if args.no_map:
        return None
    base = MapSettings()
    propagation = corpus_propagation(args.samples_per_tx, args.retry_samples_per_tx)
    if args.max_depth is not None:
        propagation = replace(propagation, max_depth=int(args.max_depth))
    settings = replace(base, resolution=float(args.resolution), map_size=tuple(int(v) for v in args.map_size) if args.map_size else None,
                       propagation=propagation,
                       min_coverage=base.min_coverage if args.min_coverage is None else float(args.min_coverage))
    settings.validate()
    return settings


def run(args: argparse.Namespace) -> int:
    from core.raytracing.city import params_from, params_from_args
    from core.raytracing.scene_batch import SceneCall, print_summary
    from core.stores.lock import output_lock
    from core.stores.output import check_writable

    base = params_from_args(args, 0).model_dump()
    seeds = [int(args.first_seed) + k for k in range(int(args.count))]
    if seeds[-1] > 2**32 - 1:
        raise CoreError(f"--first-seed {args.first_seed} + --count {args.count} passes the largest seed 2**32 - 1")
    values = {f"city_{s}": corpus_params(s, base, args.vary) for s in seeds}
    for v in values.values():  # every city's parameters checked before any work
        params_from(v)
    settings = _map_settings(args)
    if args.num_cpus is not None and args.ray != RAY_LOCAL:
        raise CoreError("--num-cpus sizes a local Ray: give it with --ray (no address)")
    out = Path(os.path.abspath(args.out))
    check_writable(out, "--out")
    if out.exists() and not out.is_dir():
        raise CoreError(f"--out {out}: not a folder")
    with output_lock(out, "--out"):
        dataset = (int(args.walks), int(args.reports)) if args.walks > 0 and settings is not None else None
        threads = 1 if args.ray is not None else None  # a Ray task holds one CPU: one Dr.Jit thread
        calls = [SceneCall(name, corpus_city, (v, str(out), settings, int(args.sites), dataset, threads,
                                               bool(args.retry_failed)))
                 for name, v in values.items()]
        t0 = time.perf_counter()
        if args.ray is not None:
            from core.raytracing.distributed import run_on_ray

            results = run_on_ray(calls, args.ray, "make-corpus", args.num_cpus)
        else:
            results = run_in_turn_with_progress(calls)
        wall = time.perf_counter() - t0
        settings_record = {"first_seed": int(args.first_seed), "vary": bool(args.vary), "base": base,
                           "vary_ranges": VARY_RANGES if args.vary else None, "sites": int(args.sites),
                           "dataset": None if dataset is None else {"walks": dataset[0], "reports": dataset[1]},
                           "map": None if settings is None else {"resolution_m": settings.resolution,
                                                                  "map_size": settings.map_size,
                                                                  "propagation": settings.propagation.to_dict()},
                           "engine": "serial" if args.ray is None else f"ray {args.ray}"}
        last_run = {"wall_s": round(wall, 1), "engine": settings_record["engine"], "num_cpus": args.num_cpus,
                    **{status: sum(r.status == status for r in results) for status in ("ok", "skipped", "failed")}}
        manifest = write_manifest(out, list(values), results, settings_record, last_run)
    status = print_summary(results)
    print(f"{manifest['complete']} of {manifest['count']} cities complete in {wall:.1f} s "
          f"({len(manifest['failed'])} failed); wrote {out / 'manifest.json'}")
    return status
