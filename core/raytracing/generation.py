"""Radio-map generation: ray-trace scenes with Sionna RT into :class:`~core.radio_map.RadioMap` stores.

``python -m core generate-maps --scenes etoile munich --output-dir radio_maps
--resolution 1.0 --map-size 512 512 [--parallel 2 --samples-per-tx N --max-depth N
--seed N --force --center X Y --scenes-dir DIR]``

Per scene, on an ``H x W`` grid of square cells (``--map-size H W``, rows along +y,
``--resolution`` metres), centred on the scene (or ``--center``), at the UE height:

1. ``RadioMapSolver`` gives the path gain of every site, ``G_s [S, H, W]`` (linear).
   The serving site is ``s* = argmax_s G_s``; with ``P`` the site power [dBm] and ``N``
   the thermal noise [dBm] (kTB + noise figure)::

       path_gain = 10 log10 G_s*                                   [dB]
       snr       = P + path_gain - N                               [dB]
       sinr      = P + path_gain - 10 log10(sum_{s != s*} 10^((P + 10 log10 G_s)/10) + 10^(N/10))

2. ``PathSolver`` traces paths from every site to the centres of a decimated grid
   (``--toa-decimation`` cells per coarse cell). Per site, the strongest path's delay
   and azimuth of arrival are split into an exact geometric part and a residual::

       toa = |p - q_s| / c + excess        aoa = azimuth(q_s - p) + residual

   The residuals are upsampled bilinearly (the angle one through cos/sin, so never
   across +-180 deg), each fine cell only from coarse points of its own class (line
   of sight to the site or not, by an exact ray test), and the geometric parts are
   recomputed exactly at each fine cell centre. The serving site's values are kept.

3. ``throughput`` and ``bler`` come from :mod:`core.raytracing.link_abstraction` at ``sinr``.

``valid`` is false under roofs (inside buildings: an upward ray hits geometry) and
where no ray reached the cell. The layer ``site_path_gain [S, H, W]`` holds every
site's path gain [dB] (NaN where no ray arrived). Output goes to
``<output-dir>/<scene>.zarr``, atomically; existing stores are skipped unless ``--force``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import CoreError
from core.features import DEFAULT_FEATURE_ORDER, wrap_degrees
from core.jobs.progress import report

DEFAULT_SAMPLES_PER_TX = 2_000_000
DEFAULT_MAX_DEPTH = 3
DEFAULT_TOA_DECIMATION = 4


@dataclass(frozen=True)
class MapSettings:
    """Generator settings (stored in ``attrs["generator"]``).

    Attributes:
        resolution: cell edge [m].
        map_size: ``(H, W)`` cells.
        center: ``(x, y)`` map centre [m]; None = scene centre.
        samples_per_tx: RadioMapSolver rays per site.
        max_depth: RadioMapSolver maximum number of interactions.
        toa_decimation: coarse-grid factor for the PathSolver ToA/AoA grid.
        path_max_depth: PathSolver maximum number of interactions.
        path_samples_per_src: PathSolver rays per site.
        seed: ray-sampling seed.
    """

    resolution: float = 1.0
    map_size: tuple[int, int] = (512, 512)
    center: tuple[float, float] | None = None
    samples_per_tx: int = DEFAULT_SAMPLES_PER_TX
    max_depth: int = DEFAULT_MAX_DEPTH
    toa_decimation: int = DEFAULT_TOA_DECIMATION
    path_max_depth: int = 2
    path_samples_per_src: int = 3_000
    seed: int = 42

    def validate(self) -> None:
        if not (isinstance(self.resolution, (int, float)) and math.isfinite(self.resolution) and self.resolution > 0):
            raise CoreError(f"--resolution must be a positive number of metres, got {self.resolution}")
        h, w = self.map_size
        if h < 1 or w < 1:
            raise CoreError(f"--map-size must be two positive cell counts (H W), got {h} {w}")
        if h * w > 4096 * 4096:
            raise CoreError(f"--map-size {h} {w} is too large (at most 4096 x 4096 cells)")
        if self.samples_per_tx < 1:
            raise CoreError(f"--samples-per-tx must be >= 1, got {self.samples_per_tx}")
        if self.max_depth < 0 or self.path_max_depth < 0:
            raise CoreError(f"--max-depth must be >= 0, got {self.max_depth}")
        if self.toa_decimation < 1:
            raise CoreError(f"--toa-decimation must be >= 1, got {self.toa_decimation}")
        if self.seed < 0:
            raise CoreError(f"--seed must be >= 0, got {self.seed}")


def map_bounds(center: tuple[float, float], settings: MapSettings) -> tuple[float, float, float, float]:
    """Outer edges ``(x_min, y_min, x_max, y_max)`` of the ``H x W`` grid centred at ``center``."""
    h, w = settings.map_size
    r = settings.resolution
    return (center[0] - 0.5 * w * r, center[1] - 0.5 * h * r, center[0] + 0.5 * w * r, center[1] + 0.5 * h * r)


def cell_centres(bounds, shape) -> tuple[np.ndarray, np.ndarray]:
    """``(X [H, W], Y [H, W])`` cell centres of a grid with outer edges ``bounds``."""
    h, w = shape
    x_min, y_min, x_max, _ = bounds
    cell = (x_max - x_min) / w
    x = x_min + (np.arange(w) + 0.5) * cell
    y = y_min + (np.arange(h) + 0.5) * cell
    return np.meshgrid(x, y)  # row i = y


def geometric_toa_aoa(xyz: np.ndarray, site: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Line-of-sight ``toa = |q - p| / c`` [ns] and ``aoa = atan2(q_y - p_y, q_x - p_x)`` [deg]."""
    from core.raytracing.tracing import SPEED_OF_LIGHT

    d = np.linalg.norm(site - xyz, axis=-1)
    az = np.degrees(np.arctan2(site[..., 1] - xyz[..., 1], site[..., 0] - xyz[..., 0]))
    return d / SPEED_OF_LIGHT * 1e9, wrap_degrees(az)


def _fill_nearest(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill ``values [h, w]`` where not ``known`` with the nearest known value (0 if none)."""
    from scipy import ndimage

    if known.all():
        return values
    if not known.any():
        return np.zeros_like(values)
    _, (ii, jj) = ndimage.distance_transform_edt(~known, return_indices=True)
    return values[ii, jj]


def upsample_bilinear(coarse: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of ``coarse [h, w]`` (values at coarse-cell centres) to ``shape``.

    Fine cell ``i`` sits at coarse coordinate ``(i + 0.5) / factor - 0.5``; edges clamp.
    """
    from scipy import ndimage

    h, w = shape
    ci = (np.arange(h) + 0.5) / factor - 0.5
    cj = (np.arange(w) + 0.5) / factor - 0.5
    gi, gj = np.meshgrid(ci, cj, indexing="ij")
    return ndimage.map_coordinates(coarse, [gi, gj], order=1, mode="nearest")


def upsample_by_class(coarse: np.ndarray, known: np.ndarray, coarse_class: np.ndarray, fine_class: np.ndarray,
                      factor: int) -> np.ndarray:
    """Upsample ``coarse [h, w]`` to ``fine_class.shape``, each fine cell from coarse points of its class.

    Normalised bilinear interpolation: ``up(v * m_c) / up(m_c)`` with ``m_c`` the known
    coarse points of class ``c`` (line of sight to the site or not) and ``c`` the fine
    cell's class, so LOS cells never blend in the residuals of shadowed neighbours.
    Where no coarse point of the class is near, the nearest-filled plain bilinear value.
    """
    shape = fine_class.shape
    out = upsample_bilinear(_fill_nearest(np.where(known, coarse, 0.0), known), factor, shape)
    for cls in (True, False):
        m = (known & (coarse_class == cls)).astype(np.float64)
        if not m.any():
            continue
        num = upsample_bilinear(np.where(m > 0, coarse, 0.0), factor, shape)
        den = upsample_bilinear(m, factor, shape)
        use = (fine_class == cls) & (den > 1e-6)
        out[use] = num[use] / den[use]
    return out


def _progress_bar(total, desc, position=0):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=False, dynamic_ncols=True)


def generate_map(info, settings: MapSettings, sites: list[dict[str, Any]] | None = None,
                 radio=None, link=None, label: str = "", position: int = 0):
    """Ray-trace one scene into a :class:`~core.radio_map.RadioMap` (see the module docstring)."""
    import mitsuba as mi

    from core.raytracing.link_abstraction import LinkConfig, link_abstraction
    from core.raytracing.scenes import buildings_of, layout_for, scene_bbox
    from core.raytracing.tracing import (
        RadioConfig,
        TraceSettings,
        build_scene,
        import_sionna_rt,
        indoor_mask,
        line_of_sight,
        trace_points,
    )
    from core.stores.radio_map import RadioMap

    settings.validate()
    rt = import_sionna_rt()
    radio = radio or RadioConfig()
    timings: dict[str, float] = {}
    stages = ["load", "radio map", "paths", "link", "assemble"]
    bar = _progress_bar(len(stages), f"{info.name}", position)

    def stage(name, k):
        bar.set_description(f"{info.name}: {name}")
        report(k / len(stages), f"{label}{info.name}: {name}")

    t0 = time.perf_counter()
    stage("load", 0)
    from core.raytracing.scenes import load_scene

    base_scene = load_scene(info)
    bbox = scene_bbox(base_scene)
    center = settings.center or (0.5 * (bbox[0] + bbox[3]), 0.5 * (bbox[1] + bbox[4]))
    bounds = map_bounds(center, settings)
    if sites is None:
        sites = layout_for(info.name, buildings_of(base_scene), bbox, area=bounds)
    del base_scene
    scene = build_scene(info, sites, radio)
    h, w = settings.map_size
    res = settings.resolution
    timings["load_s"] = time.perf_counter() - t0
    bar.update(1)

    # 1. path gain of every site on the full grid
    t = time.perf_counter()
    stage("radio map", 1)
    solver = rt.RadioMapSolver()
    # ask for slightly less than H*res so ceil(size / cell) is exactly H, never H + 1
    rm = solver(scene, center=mi.Point3f(center[0], center[1], radio.rx_height_m), orientation=mi.Point3f(0, 0, 0),
                size=mi.Point2f((w - 0.5) * res, (h - 0.5) * res), cell_size=mi.Point2f(res, res),
                samples_per_tx=int(settings.samples_per_tx), max_depth=int(settings.max_depth), los=True,
                specular_reflection=True, diffuse_reflection=False, refraction=False, diffraction=False,
                seed=int(settings.seed))
    gain = np.asarray(rm.path_gain, dtype=np.float64)  # [S, H, W] linear
    centres = np.asarray(rm.cell_centers)  # [H, W, 3], rows along +y
    if gain.shape[1:] != (h, w):
        raise RuntimeError(f"RadioMapSolver returned a {gain.shape[1:]} grid, expected {(h, w)}")
    gx, gy = cell_centres(bounds, (h, w))
    if not (np.allclose(centres[..., 0], gx, atol=1e-3 * res + 1e-3) and np.allclose(centres[..., 1], gy, atol=1e-3 * res + 1e-3)):
        raise RuntimeError("RadioMapSolver cell centres do not match the map bounds")
    timings["radio_map_s"] = time.perf_counter() - t
    bar.update(1)

    xyz = np.stack([gx, gy, np.full_like(gx, radio.rx_height_m)], axis=-1)  # [H, W, 3]
    indoor = indoor_mask(scene, xyz.reshape(-1, 3)).reshape(h, w)
    serving = gain.argmax(axis=0)  # [H, W]
    g_serv = np.take_along_axis(gain, serving[None], 0)[0]
    valid = (~indoor) & (g_serv > 0)
    with np.errstate(divide="ignore"):
        pg_db = 10 * np.log10(np.where(valid, g_serv, 1.0))
        site_db = np.where(gain > 0, 10 * np.log10(np.where(gain > 0, gain, 1.0)), np.nan)
    rx_mw = 10 ** (radio.tx_power_dbm / 10) * gain  # [S, H, W] mW
    noise_mw = 10 ** (radio.noise_dbm / 10)
    interference = rx_mw.sum(0) - np.take_along_axis(rx_mw, serving[None], 0)[0]
    snr = radio.tx_power_dbm + pg_db - radio.noise_dbm
    sinr = radio.tx_power_dbm + pg_db - 10 * np.log10(np.maximum(interference, 0.0) + noise_mw)

    # 2. ToA / AoA of the strongest path on the decimated grid
    t = time.perf_counter()
    stage("paths", 2)
    f = max(1, min(settings.toa_decimation, h, w))
    hc, wc = math.ceil(h / f), math.ceil(w / f)
    cell_c = res * f
    cx = bounds[0] + (np.arange(wc) + 0.5) * cell_c
    cy = bounds[1] + (np.arange(hc) + 0.5) * cell_c
    cgx, cgy = np.meshgrid(cx, cy)
    cxyz = np.stack([cgx, cgy, np.full_like(cgx, radio.rx_height_m)], axis=-1).reshape(-1, 3)
    c_out = ~indoor_mask(scene, cxyz)
    trace = TraceSettings(max_depth=settings.path_max_depth, samples_per_src=settings.path_samples_per_src,
                          seed=settings.seed)
    pbar = _progress_bar(int(c_out.sum()), f"{info.name}: paths", position + 1)
    traced = trace_points(scene, cxyz[c_out], trace, progress=lambda d, n: (pbar.update(d - pbar.n),
                                                                               report(0.4 + 0.4 * d / max(n, 1))))
    pbar.close()
    site_pos = np.array([s["position"] for s in sites], dtype=np.float64)
    n_sites = len(sites)
    toa = np.full((h, w), np.nan)
    aoa = np.full((h, w), np.nan)
    for s in range(n_sites):
        here = (serving == s) & valid
        if not here.any():
            continue
        ctoa = np.full(len(cxyz), np.nan)
        caoa = np.full(len(cxyz), np.nan)
        ctoa[c_out], caoa[c_out] = traced["toa"][:, s], traced["aoa"][:, s]
        g_toa, g_aoa = geometric_toa_aoa(cxyz, site_pos[s])
        known = np.isfinite(ctoa)
        # residuals: excess delay and azimuth offset of the strongest path (0 when LOS)
        excess = np.where(known, ctoa - g_toa, 0.0)
        resid = np.radians(np.where(known, caoa - g_aoa, 0.0))
        c_los = line_of_sight(scene, cxyz, site_pos[s])
        f_los = np.zeros((h, w), bool)
        f_los[here] = line_of_sight(scene, xyz[here], site_pos[s])
        up = {}
        for name, vals in (("excess", excess), ("cos", np.cos(resid)), ("sin", np.sin(resid))):
            up[name] = upsample_by_class(vals.reshape(hc, wc), known.reshape(hc, wc), c_los.reshape(hc, wc),
                                         f_los, f)
        fine_excess = np.maximum(up["excess"], 0.0)
        fine_resid = np.degrees(np.arctan2(up["sin"], up["cos"]))
        f_toa, f_aoa = geometric_toa_aoa(xyz, site_pos[s])
        toa[here] = (f_toa + fine_excess)[here]
        aoa[here] = wrap_degrees(f_aoa + fine_resid)[here]
    timings["paths_s"] = time.perf_counter() - t
    bar.update(1)

    # 3. link abstraction
    t = time.perf_counter()
    stage("link", 3)
    link = link or link_abstraction(LinkConfig())
    thr, bler, _ = link(np.where(valid, sinr, np.nan))
    timings["link_s"] = time.perf_counter() - t
    bar.update(1)

    stage("assemble", 4)
    planes = {"path_gain": pg_db, "toa": toa, "aoa": aoa, "snr": snr, "sinr": sinr, "throughput": thr, "bler": bler}
    values = np.stack([np.where(valid, planes[name], np.nan) for name in DEFAULT_FEATURE_ORDER]).astype(np.float32)
    valid &= np.isfinite(values).all(axis=0)
    values[:, ~valid] = np.nan
    timings["total_s"] = time.perf_counter() - t0
    gen = asdict(settings)
    gen.update(center=list(center), toa_aoa_resolution_m=cell_c, toa_aoa_grid=[hc, wc],
               toa_aoa_method="PathSolver strongest path on the decimated grid; exact geometric delay/azimuth "
                              "plus excess delay and cos/sin azimuth residual, bilinearly upsampled within "
                              "the LOS / NLOS class of each cell",
               path_solver={"max_depth": trace.max_depth, "samples_per_src": trace.samples_per_src},
               sionna_rt=rt.__version__, timings=timings)
    attrs = {
        "scene": info.name,
        "scene_source": info.source,
        "sites": [{"name": s["name"], "position": [float(v) for v in s["position"]]} for s in sites],
        "serving": "strongest site by RadioMapSolver path gain",
        "radio": radio.to_dict(),
        "link_abstraction": link.config.to_dict(),
        "generator": gen,
        "coverage": float(valid.mean()),
    }
    bar.update(1)
    bar.close()
    report(1.0, f"{label}{info.name}: done")
    return RadioMap(values, DEFAULT_FEATURE_ORDER, bounds, valid=valid, attrs=attrs,
                    layers={"site_path_gain": site_db.astype(np.float32)})


# -- command line ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenes", nargs="+", default=None, help="scene names (or XML paths inside --scenes-dir)")
    parser.add_argument("--scenes-dir", default=None, help="folder of user scenes; without --scenes, all of them")
    parser.add_argument("--output-dir", default="radio_maps", help="where <scene>.zarr stores go (default: radio_maps)")
    parser.add_argument("--resolution", type=float, default=1.0, help="cell edge in metres (default: 1.0)")
    parser.add_argument("--map-size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"),
                        help="cells along y (rows) and x (columns) (default: 512 512)")
    parser.add_argument("--center", type=float, nargs=2, default=None, metavar=("X", "Y"),
                        help="map centre in scene metres (default: the scene's centre)")
    parser.add_argument("--samples-per-tx", type=int, default=DEFAULT_SAMPLES_PER_TX,
                        help=f"RadioMapSolver rays per site (default: {DEFAULT_SAMPLES_PER_TX})")
    parser.add_argument("--max-depth", type=int, default=DEFAULT_MAX_DEPTH,
                        help=f"RadioMapSolver interactions per path (default: {DEFAULT_MAX_DEPTH})")
    parser.add_argument("--toa-decimation", type=int, default=DEFAULT_TOA_DECIMATION,
                        help=f"ToA/AoA are ray-traced every N cells and upsampled (default: {DEFAULT_TOA_DECIMATION})")
    parser.add_argument("--seed", type=int, default=42, help="ray-sampling seed (default: 42)")
    parser.add_argument("--parallel", type=int, default=1, help="scenes generated at once, in separate processes")
    parser.add_argument("--force", action="store_true", help="regenerate maps that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _settings_from(args) -> MapSettings:
    if args.resolution is None or not math.isfinite(args.resolution) or args.resolution <= 0:
        raise CoreError(f"--resolution must be a positive number of metres, got {args.resolution}")
    s = MapSettings(resolution=float(args.resolution), map_size=(int(args.map_size[0]), int(args.map_size[1])),
                    center=tuple(args.center) if args.center else None, samples_per_tx=args.samples_per_tx,
                    max_depth=args.max_depth, toa_decimation=args.toa_decimation, seed=args.seed)
    s.validate()
    return s


def _one_scene(name: str, scenes_dir: str | None, output_dir: str, settings: MapSettings, force: bool,
               position: int = 0) -> tuple[str, str, str]:
    """Generate one scene; returns ``(name, status, detail)``, never raises (worker-safe)."""
    from core.raytracing.scenes import resolve_scene

    try:
        info = resolve_scene(name, scenes_dir)
        out = Path(output_dir) / f"{info.name}.zarr"
        if out.exists() and not force:
            return name, "skipped", f"{out} exists (use --force to regenerate)"
        t = time.perf_counter()
        radio_map = generate_map(info, settings, position=position)
        radio_map.save(out)
        return name, "ok", f"{out} ({time.perf_counter() - t:.1f} s, coverage {radio_map.valid.mean():.1%})"
    except CoreError as exc:
        return name, "failed", str(exc)
    except Exception as exc:  # a scene that breaks the ray tracer must not stop the others
        if os.environ.get("CORE_DEBUG"):
            traceback.print_exc()
        return name, "failed", f"{type(exc).__name__}: {exc}"


def run(args: argparse.Namespace) -> int:
    from core.raytracing.scenes import user_scenes

    settings = _settings_from(args)
    names = list(args.scenes or [])
    if not names:
        if not args.scenes_dir:
            raise CoreError("give --scenes NAME ... or --scenes-dir DIR")
        names = list(user_scenes(args.scenes_dir))
        if not names:
            raise CoreError(f"--scenes-dir {args.scenes_dir}: no scene XML files found")
    if args.parallel < 1:
        raise CoreError(f"--parallel must be >= 1, got {args.parallel}")
    results = []
    if args.parallel == 1 or len(names) == 1:
        for name in names:
            results.append(_one_scene(name, args.scenes_dir, args.output_dir, settings, args.force))
            print(f"{results[-1][0]}: {results[-1][1]}: {results[-1][2]}", flush=True)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")  # Dr.Jit state must not be forked
        with ProcessPoolExecutor(max_workers=args.parallel, mp_context=ctx) as pool:
            futures = [pool.submit(_one_scene, name, args.scenes_dir, args.output_dir, settings, args.force, 2 * (k % args.parallel))
                       for k, name in enumerate(names)]
            for fut in futures:
                results.append(fut.result())
                print(f"{results[-1][0]}: {results[-1][1]}: {results[-1][2]}", flush=True)
    failed = [r for r in results if r[1] == "failed"]
    print("\nsummary:")
    for name, status, detail in results:
        print(f"  {name:<24} {status:<8} {detail}")
    if failed:
        print(f"{len(failed)} of {len(results)} scene(s) failed")
        return 1
    return 0
