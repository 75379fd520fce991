"""Site placement for coverage: pick rooftop sites that see the most outdoor ground.

The automatic layout (:func:`~core.raytracing.scenes.automatic_layout`) spreads sites by
distance alone, so in a scene of narrow streets most of them look at roofs. Here the
sites are chosen for what they see. Candidates are every roof corner of every building
in the area, pushed :data:`~core.raytracing.scenes.FACADE_OFFSET_M` out from the facade,
at ``roof + mast_height``. Targets are the outdoor measurement points of a grid of
``spacing`` metres over the area, at ``ground + rx_height`` (terrain-following, like the
map). With ``V [M, N]`` the exact line-of-sight test between candidate ``m`` and target
``n`` (one Mitsuba ``ray_test`` per pair), the layout is the greedy maximum-coverage set::

    s_k = argmax_m  sum_n V[m, n] * (1 - seen_n),    seen_n = max_{j < k} V[s_j, n]

ties going to the higher candidate, and skipping candidates closer than ``min_separation``
to a chosen site (two sites on one roof see the same streets and give the localization
no geometry). Greedy max-coverage is within ``1 - 1/e`` of the
best set of the same size (Nemhauser et al., 1978). Line of sight is the proxy: the
radio map then also covers, by reflection and diffraction, much of what no site sees.

``python -m core place-sites --scene NAME`` writes the layout to
``configs/sites/<scene>.yaml`` (temporary file, then rename), where map generation and
the app read it (:func:`~core.raytracing.scenes.sites_override`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core import cli_types
from core.errors import CoreError

DEFAULT_SPACING_M = 4.0


@dataclass(frozen=True)
class Placement:
    """A coverage-driven layout and what it sees.

    Attributes:
        sites: ``[{"name", "position": [x, y, z]}, ...]``, in the greedy order.
        los_coverage: fraction of the outdoor targets seen by at least one site, after
            each added site (``[num_sites]``, non-decreasing).
        num_candidates: rooftop candidates considered.
        num_targets: outdoor targets.
        seconds: wall time of the visibility tests and the greedy choice.
    """

    sites: list[dict[str, Any]]
    los_coverage: list[float]
    num_candidates: int
    num_targets: int
    seconds: float


def rooftop_candidates(buildings, area: tuple[float, float, float, float], mast_height: float) -> np.ndarray:
    """float64 ``[M, 3]``: every footprint corner of the buildings over ``area``, 1 m out, at roof + mast [m]."""
    from core.raytracing.scenes import FACADE_OFFSET_M

    x0, y0, x1, y1 = area
    out = []
    for b in buildings:
        if len(b.footprint) < 3:
            continue
        centre = b.footprint.mean(axis=0)
        if not (x0 <= centre[0] <= x1 and y0 <= centre[1] <= y1):
            continue
        away = b.footprint - centre
        away /= np.maximum(np.linalg.norm(away, axis=1, keepdims=True), 1e-9)
        xy = b.footprint + FACADE_OFFSET_M * away
        out.append(np.c_[xy, np.full(len(xy), b.height + mast_height)])
    return np.concatenate(out) if out else np.zeros((0, 3))


def line_of_sight(scene, sources: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """bool ``[M, N]``: no geometry between ``sources [M, 3]`` and ``targets [N, 3]`` (exact ray tests)."""
    from core.raytracing.tracing import line_of_sight as visible_from

    targets = np.asarray(targets, np.float64)
    return np.stack([visible_from(scene, targets, src) for src in np.asarray(sources, np.float64)]) \
        if len(sources) else np.zeros((0, len(targets)), bool)


def greedy_max_coverage(visible: np.ndarray, positions: np.ndarray, num_sites: int, min_separation: float = 0.0
                        ) -> tuple[list[int], list[float]]:
    """Indices of ``num_sites`` rows of ``visible [M, N]`` covering the most columns, and the coverage after each.

    ``positions [M, 3]`` [m]: a candidate closer than ``min_separation`` (horizontally) to a
    chosen one is skipped while others remain; ties go to the higher candidate.
    """
    seen = np.zeros(visible.shape[1], bool)
    chosen, coverage = [], []
    order = np.argsort(-positions[:, 2], kind="stable")
    near = np.zeros(len(positions), bool)
    for _ in range(num_sites):
        gain = (visible[order] & ~seen).sum(axis=1)
        free = ~np.isin(order, chosen)
        if (free & ~near[order]).any():  # keep the separation while a candidate far enough remains
            free &= ~near[order]
        pick = int(order[int(np.argmax(np.where(free, gain, -1)))])
        near |= np.hypot(*(positions[:, :2] - positions[pick, :2]).T) < min_separation
        chosen.append(pick)
        seen |= visible[pick]
        coverage.append(float(seen.mean()) if seen.size else 0.0)
    return chosen, coverage


def place_sites(scene, buildings, area: tuple[float, float, float, float], num_sites: int,
                spacing: float = DEFAULT_SPACING_M, rx_height: float = 1.5, mast_height: float | None = None,
                min_separation: float | None = None) -> Placement:
    """Greedy line-of-sight max-coverage layout of ``num_sites`` rooftop sites over ``area`` (module docstring).

    Args:
        scene: a loaded Sionna scene (:func:`~core.raytracing.scenes.load_scene`).
        buildings: its :class:`~core.raytracing.scenes.Building` list.
        area: ``(x0, y0, x1, y1)`` [m], the map's bounds.
        num_sites: sites to place (>= 1).
        spacing: target grid spacing [m].
        rx_height: UE height above the ground [m].
        mast_height: antenna above its roof [m]; default the automatic layout's.
        min_separation: smallest horizontal distance between two sites [m] (sites far
            apart give the localization its geometry); default ``side / (2 sqrt(num_sites))``
            (114 m for 5 sites over 512 m).
    """
    from core.raytracing.scenes import DEFAULT_MAST_HEIGHT_M
    from core.raytracing.terrain import measurement_points
    from core.raytracing.tracing import indoor_mask

    if num_sites < 1:
        raise CoreError(f"--num-sites must be >= 1, got {num_sites}")
    if not spacing > 0:
        raise CoreError(f"--spacing must be a positive number of metres, got {spacing}")
    t0 = time.perf_counter()
    cand = rooftop_candidates(buildings, area, DEFAULT_MAST_HEIGHT_M if mast_height is None else mast_height)
    if len(cand) < num_sites:
        raise CoreError(f"only {len(cand)} rooftop candidates in the area {area}, fewer than --num-sites {num_sites}")
    x0, y0, x1, y1 = area
    gx, gy = np.meshgrid(np.arange(x0 + spacing / 2, x1, spacing), np.arange(y0 + spacing / 2, y1, spacing))
    xyz = measurement_points(scene, np.c_[gx.ravel(), gy.ravel()], rx_height)
    targets = xyz[~indoor_mask(scene, xyz)]
    if len(targets) == 0:
        raise CoreError(f"no outdoor point in the area {area}: nothing to cover")
    visible = line_of_sight(scene, cand, targets)
    if min_separation is None:
        min_separation = 0.5 * min(x1 - x0, y1 - y0) / np.sqrt(num_sites)
    chosen, coverage = greedy_max_coverage(visible, cand, num_sites, float(min_separation))
    sites = [{"name": f"site{k}", "position": [round(float(v), 3) for v in cand[i]]} for k, i in enumerate(chosen)]
    return Placement(sites, coverage, len(cand), len(targets), time.perf_counter() - t0)


def write_sites_yaml(path: Path, scene: str, placement: Placement, description: str) -> Path:
    """Write ``{description, sites}`` to ``path`` atomically (temporary file, then rename)."""
    import yaml

    from core.stores.atomic import atomic_write_text

    text = yaml.safe_dump({"description": description, "sites": placement.sites}, sort_keys=False)
    atomic_write_text(path, f"# {scene}: written by python -m core place-sites\n" + text)
    return path


# -- command line ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scene", required=True, help="scene name")
    parser.add_argument("--num-sites", type=cli_types.count, default=None, help="sites to place (default: the automatic layout's)")
    parser.add_argument("--resolution", type=cli_types.positive, default=1.0, help="map cell edge [m] (the area is the map's)")
    parser.add_argument("--map-size", type=cli_types.count, nargs=2, default=None, metavar=("H", "W"),
                        help="map cells (default: fit the scene, as generate-maps)")
    parser.add_argument("--center", type=cli_types.coordinate, nargs=2, default=None, metavar=("X", "Y"))
    parser.add_argument("--spacing", type=cli_types.positive, default=DEFAULT_SPACING_M, help="target grid spacing [m]")
    parser.add_argument("--scenes-dir", default=None)
    parser.add_argument("--out", default=None, help="YAML to write (default configs/sites/<scene>.yaml)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing YAML")


def run(args: argparse.Namespace) -> int:
    from core.raytracing.generation import MapSettings, map_area
    from core.raytracing.scenes import (
        DEFAULT_NUM_SITES,
        SITES_CONFIG_DIR,
        buildings_of,
        load_scene,
        resolve_scene,
        scene_bbox,
    )
    from core.stores.lock import output_lock
    from core.stores.output import check_new, check_writable

    num_sites = DEFAULT_NUM_SITES if args.num_sites is None else int(args.num_sites)
    out = Path(args.out) if args.out else SITES_CONFIG_DIR / f"{args.scene}.yaml"
    check_writable(out, "--out")  # a shipped scene's sites (configs/sites/etoile.yaml) are read-only
    with output_lock(out, "--out"):  # one writer
        check_new(out, args.force)
        settings = MapSettings(resolution=float(args.resolution), map_size=tuple(args.map_size) if args.map_size else None,
                               center=tuple(args.center) if args.center else None)
        settings.validate()
        info = resolve_scene(args.scene, args.scenes_dir)
        scene = load_scene(info)
        settings, _, area = map_area(settings, scene_bbox(scene))
        placement = place_sites(scene, buildings_of(scene), area, num_sites, float(args.spacing),
                                settings.propagation.radio.rx_height_m)
        steps = ", ".join(f"{c:.1%}" for c in placement.los_coverage)
        description = (f"greedy line-of-sight max-coverage layout (python -m core place-sites): {num_sites} of "
                       f"{placement.num_candidates} rooftop candidates over the map area {[round(v, 2) for v in area]}; "
                       f"outdoor points seen by a site ({args.spacing:g} m grid, {placement.num_targets} points) "
                       f"after each site: {steps}")
        write_sites_yaml(out, info.name, placement, description)
    print(f"{info.name}: {num_sites} sites see {placement.los_coverage[-1]:.1%} of {placement.num_targets} outdoor "
          f"points (after each site: {steps}); {placement.seconds:.1f} s; wrote {out}")
    return 0
