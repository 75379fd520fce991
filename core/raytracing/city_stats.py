"""Realism statistics of a scene (``python -m core city-stats SCENE ...``): generated cities beside real ones.

Over the scene's map area (the area ``generate-maps`` gives a map of 1 m cells by default, as the
shipped maps: the scene's box, at most 512 m a side, centred), on a grid of about ``resolution``
metres, UE points at
``ground + 1.5 m`` (:func:`~core.raytracing.terrain.measurement_points`):

* ``footprint_share``: share of the points under a roof (:func:`~core.raytracing.tracing.indoor_mask`);
  ``outdoor_share = 1 - footprint_share``.
* ``buildings_per_km2``: buildings (:func:`~core.raytracing.scenes.buildings_of`, vehicles left out)
  whose footprint centre lies in the area, per km².
* ``height_m``: mean, sd and p90 of those buildings' heights ``top - bottom`` [m].
* ``street_width_m``: median and p90 over the outdoor points of the local width of the open
  space: with ``D`` the Euclidean distance transform of the outdoor mask (distance to the
  nearest indoor point), the ridge points are the outdoor points where ``D`` is the maximum of
  its 3 × 3 neighbourhood; each paints the disk of radius ``D`` around it with the width ``2 D``
  and a point's width is the largest paint it gets (the street's width; a plaza gives its
  diameter). Ridge disks that would cross the area's edge are left out (their width is not
  known), and so are the points only they cover.
* ``los_share``: share of the outdoor points that see at least one site of the scene's layout
  (:func:`~core.raytracing.scenes.site_layout`; exact ray tests), and ``los_sites_mean``: the
  mean number of sites an outdoor point sees.
* ``sites_heard_mean`` and ``heard_share`` (only with ``--radio-maps`` holding the scene's map): the
  mean number of sites an outdoor cell of the map hears (per-site path gain at or above the default
  measurement model's sensitivity: -143 dB at 43 dBm), and the share of outdoor cells that hear one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from core import cli_types

DEFAULT_RESOLUTION_M = 2.0
VEHICLE_PREFIXES = ("vehicle_", "car")


def street_widths(outdoor: np.ndarray, resolution: float) -> np.ndarray:
    """float64 ``[K]``: the local width [m] at every outdoor point of ``outdoor [H, W]`` (module docstring).

    The local width of a point is the diameter of the largest disk that holds it and stays in the
    open space ("local thickness"): every ridge point of the distance transform paints its disk
    of radius ``D`` with ``2 D``, the largest paint wins. Area-weighted: a 2 m gap between two
    houses holds few points, a boulevard many.
    """
    from scipy import ndimage

    if outdoor.all() or not outdoor.any():
        return np.zeros(0)
    dist = ndimage.distance_transform_edt(outdoor)  # [cells] to the nearest indoor cell centre
    ridge = outdoor & (dist >= ndimage.maximum_filter(dist, size=3))
    h, w = outdoor.shape
    rows, cols = np.mgrid[0:h, 0:w]
    edge = np.minimum(np.minimum(rows, h - 1 - rows), np.minimum(cols, w - 1 - cols)) + 0.5
    ridge &= dist <= edge  # a disk that would leave the area: its width is not known
    width = np.zeros(outdoor.shape)
    rr, cc = np.nonzero(ridge)
    for r, c in zip(rr, cc, strict=True):
        rad = dist[r, c]
        k = int(rad)
        r0, r1, c0, c1 = max(r - k, 0), min(r + k + 1, h), max(c - k, 0), min(c + k + 1, w)
        disk = (rows[r0:r1, c0:c1] - r) ** 2 + (cols[r0:r1, c0:c1] - c) ** 2 < rad ** 2
        np.maximum(width[r0:r1, c0:c1], np.where(disk, 2.0 * rad - 1.0, 0.0), out=width[r0:r1, c0:c1])
    painted = outdoor & (width > 0)  # a wall lies half a cell beyond its cell centre: 2D - 1 cells
    return width[painted] * resolution


def scene_statistics(name: str, scenes_dir: str | None = None, resolution: float = DEFAULT_RESOLUTION_M) -> dict[str, Any]:
    """The statistics of scene ``name`` (module docstring) as one flat record."""
    from core.raytracing.generation import MapSettings, cell_centres, map_area
    from core.raytracing.scenes import buildings_of, load_scene, resolve_scene, scene_bbox, site_layout
    from core.raytracing.site_placement import line_of_sight
    from core.raytracing.terrain import measurement_points
    from core.raytracing.tracing import indoor_mask

    t0 = time.perf_counter()
    info = resolve_scene(name, scenes_dir)
    scene = load_scene(info)
    settings, _, area = map_area(MapSettings(resolution=1.0), scene_bbox(scene))  # the shipped maps' area
    x0, y0, x1, y1 = area
    shape = (max(1, round((y1 - y0) / resolution)), max(1, round((x1 - x0) / resolution)))
    inside = []
    for b in buildings_of(scene):
        c = b.footprint.mean(axis=0) if len(b.footprint) else np.array([np.inf, np.inf])
        if not b.name.startswith(VEHICLE_PREFIXES) and x0 <= c[0] <= x1 and y0 <= c[1] <= y1:
            inside.append(b.height - b.base)
    heights = np.asarray(inside) if inside else np.zeros(1)
    gx, gy = cell_centres(area, shape)
    xyz = measurement_points(scene, np.stack([gx, gy], -1).reshape(-1, 2), settings.propagation.radio.rx_height_m)
    indoor = indoor_mask(scene, xyz).reshape(shape)
    widths = street_widths(~indoor, (x1 - x0) / shape[1])
    sites = site_layout(info.name, scenes_dir, area=area)
    outdoor_xyz = xyz[~indoor.reshape(-1)]
    step = max(1, len(outdoor_xyz) // 20_000)  # at most ~20,000 points for the ray tests
    seen = line_of_sight(scene, np.asarray([s["position"] for s in sites], np.float64), outdoor_xyz[::step])
    del scene
    km2 = (x1 - x0) * (y1 - y0) / 1e6
    return {"scene": info.name, "source": info.source, "area_m": [round(x1 - x0, 1), round(y1 - y0, 1)],
            "resolution_m": resolution, "buildings": len(inside),
            "buildings_per_km2": round(len(inside) / km2, 1),
            "footprint_share": round(float(indoor.mean()), 4), "outdoor_share": round(float(1 - indoor.mean()), 4),
            "height_mean_m": round(float(heights.mean()), 1), "height_sd_m": round(float(heights.std()), 1),
            "height_p90_m": round(float(np.percentile(heights, 90)), 1),
            "street_width_median_m": round(float(np.median(widths)), 1) if len(widths) else None,
            "street_width_p90_m": round(float(np.percentile(widths, 90)), 1) if len(widths) else None,
            "sites": len(sites), "los_share": round(float(seen.any(0).mean()), 4) if seen.size else None,
            "los_sites_mean": round(float(seen.sum(0).mean()), 2) if seen.size else None,
            "seconds": round(time.perf_counter() - t0, 1)}


def sites_heard(radio_map) -> dict[str, float]:
    """``{sites_heard_mean, heard_share}`` of a radio map's outdoor cells (module docstring)."""
    from core.raytracing.coverage import heard_threshold_db, map_tx_power_dbm
    from core.stores.measurement_model import MeasurementModel

    threshold = heard_threshold_db(map_tx_power_dbm(radio_map), MeasurementModel().sensitivity_dbm)
    pg = np.asarray(radio_map.layers["site_path_gain"], dtype=np.float64)  # [S, H, W] dB
    heard = (np.where(np.isfinite(pg), pg, -np.inf) >= threshold).sum(axis=0)  # [H, W]
    outdoor = radio_map.outdoor if radio_map.outdoor is not None else np.ones(heard.shape, bool)
    return {"sites_heard_mean": round(float(heard[outdoor].mean()), 2),
            "heard_share": round(float((heard[outdoor] > 0).mean()), 4)}


COLUMNS = [("scene", "scene", "{}"), ("buildings/km²", "buildings_per_km2", "{:.0f}"),
           ("footprint share", "footprint_share", "{:.0%}"), ("outdoor share", "outdoor_share", "{:.0%}"),
           ("height mean m", "height_mean_m", "{:.1f}"), ("height sd m", "height_sd_m", "{:.1f}"),
           ("height p90 m", "height_p90_m", "{:.1f}"), ("street width median m", "street_width_median_m", "{:.1f}"),
           ("street width p90 m", "street_width_p90_m", "{:.1f}"), ("LOS share (≥ 1 site)", "los_share", "{:.0%}"),
           ("sites in LOS per point", "los_sites_mean", "{:.2f}"),
           ("sites heard per outdoor cell", "sites_heard_mean", "{:.2f}")]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The statistics as a Markdown table, one row per scene."""
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k == "scene" else "---:" for _, k, _ in COLUMNS) + "|"
    body = ["| " + " | ".join("–" if r.get(k) is None else f.format(r[k]) for _, k, f in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenes", nargs="+", help="scene names (built-in or in --scenes-dir)")
    parser.add_argument("--scenes-dir", default=None)
    parser.add_argument("--resolution", type=cli_types.positive, default=DEFAULT_RESOLUTION_M, help="grid step [m]")
    parser.add_argument("--out", default=None, help="also write the records as JSON here")
    parser.add_argument("--radio-maps", default=None,
                        help="a maps folder: where <scene>.zarr is there, add the sites heard per outdoor cell")


def run(args: argparse.Namespace) -> int:
    from core.raytracing.scenes import resolve_scene

    for name in args.scenes:  # every name checked before any scene is loaded
        resolve_scene(name, args.scenes_dir)
    if args.out:
        from core.stores.output import check_writable

        check_writable(args.out, "--out")
    rows = [scene_statistics(name, args.scenes_dir, float(args.resolution)) for name in args.scenes]
    if args.radio_maps:
        from core.stores.lineage import map_path
        from core.stores.radio_map import RadioMap

        for row in rows:
            path = map_path(args.radio_maps, row["scene"])
            if path.exists():
                row.update(sites_heard(RadioMap.load(path)))
    print(markdown_table(rows))
    if args.out:
        from core.stores.atomic import atomic_write_text
        from core.stores.lock import output_lock

        with output_lock(args.out, "--out"):
            atomic_write_text(Path(args.out), json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0
