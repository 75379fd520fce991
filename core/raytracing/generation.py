"""Radio-map generation: ray-trace scenes with Sionna RT into :class:`~core.stores.radio_map.RadioMap` stores.

``python -m core generate-maps --scenes etoile munich --radio-maps radio_maps
--resolution 1.0 --map-size 512 512 [--parallel 2 | --ray [ADDRESS]] [--samples-per-tx N
--max-depth N --toa-decimation N --seed N --min-coverage F --force --center X Y --scenes-dir DIR]``

Per scene, on an ``H x W`` grid of square cells (``--map-size H W``, rows along +y,
``--resolution`` metres), centred on the scene (or ``--center``), at the UE height above
the terrain (:mod:`core.raytracing.terrain`), with the :class:`~core.raytracing.tracing.PropagationSettings` that ``make-dataset``
then reuses (recorded in ``attrs["propagation"]``):

1. ``PathSolver`` traces every site to the NODES: the outdoor cell centres of every
   ``f``-th row and column (``f = --toa-decimation``, plus the last row and column), the
   very function the dataset evaluates at the UEs (:func:`~core.raytracing.tracing.trace_points`).
   Each node keeps, per site ``s``, the path gain ``G`` [dB] and the strongest path's
   anchor ``q`` with its length before it ``L0`` [m]: the virtual source (the site
   mirrored in the path's reflecting planes, ``L0 = 0``) or, for a diffracted path, the
   diffraction point (``L0`` = site to edge).

2. Per-site layers on every cell ``p`` (:func:`site_layers`), from the four nodes
   ``n`` of the bilinear stencil around ``p`` with weights ``w_n`` (nodes without a path
   to ``s`` get 0): the cell is covered by ``s`` if ``sum w_n >= 0.5`` (and outdoor), then::

       site_path_gain = sum_n w_n (G_n + spreading_db(|q_n - n|, |q_n - p|, L0_n)) / sum_n w_n  [dB]
       site_toa       = (L0 + |q - p|) / c                                                 [ns]
       site_aoa       = atan2(q_y - p_y, q_x - p_x), in (-180, 180]                         [deg]

   with ``q`` the site itself (``L0 = 0``) when ``p`` sees the site (an exact ray test),
   else the anchor of the stencil node with the largest weight whose strongest path is
   not the direct one (else of the largest weight). A specular path's delay and
   azimuth are thus exact at every cell where it is still the strongest path, a
   diffracted one's to second order (Keller's law: the path length is stationary along
   the edge); errors remain only within ``f`` cells of where the strongest path changes.

3. Serving features (``values``): the serving site is ``s* = argmax_s site_path_gain``,
   ``path_gain``, ``toa``, ``aoa`` are its layers, and SNR, SINR (every other site
   interferes), throughput and BLER come from
   :func:`~core.raytracing.measurements.cell_measurements` -- the code that makes the
   dataset's cell features -- and :mod:`core.raytracing.link_abstraction`.

``valid`` is false under roofs (an upward ray hits geometry; ``outdoor`` is false there)
and where no site covers the cell. A map covering less than ``--min-coverage`` of its
outdoor cells is an error naming the scene and the likely cause, and is not written
(:mod:`core.raytracing.coverage`). Output goes to ``<radio-maps>/<scene>.zarr``,
atomically; existing stores are skipped unless ``--force``. ``--samples-per-tx``, ``--max-depth`` and ``--seed`` set the
propagation's rays per site, depth and seed.

Scenes run in turn, in ``--parallel N`` local processes, or as one Ray task each
(``--ray [ADDRESS]``, :mod:`core.raytracing.distributed`); every engine runs
:func:`map_of_scene`. A scene that fails does not stop the others: the summary names it
and its cause, and the exit status is 2 (:mod:`core.raytracing.scene_batch`).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from core import cli_types
from core.errors import CoreError
from core.features import DEFAULT_FEATURE_ORDER, wrap_degrees
from core.progress import report
from core.raytracing.coverage import DEFAULT_MIN_COVERAGE
from core.raytracing.distributed import add_ray_argument
from core.raytracing.tracing import MAX_SAMPLES_PER_SRC, SPEED_OF_LIGHT, PropagationSettings
from core.stores.lineage import map_path
from core.stores.output import check_writable, writing_store

DEFAULT_TOA_DECIMATION = 3
MAX_PATHS_PER_SITE = 8
#: two candidate paths closer than this at a cell (delay [ns] AND azimuth [deg]) are one path
SAME_PATH_NS, SAME_PATH_DEG = 1.5, 3.0
#: a candidate path's spreading correction from its node to a cell is clipped to +-this [dB] (an anchor
#: next to the cell would otherwise blow it up; nodes are a few metres apart)
MAX_SPREADING_DB = 10.0
DIRECT_TOL_M = 0.5  # a virtual source this close to the site is the site: the direct path


@dataclass(frozen=True)
class MapSettings:
    """Generator settings (stored in ``attrs["generator"]``; propagation in ``attrs["propagation"]``).

    Attributes:
        resolution: cell edge [m].
        map_size: ``(H, W)`` cells; None = fit the scene (:func:`fitted_map_size`: its
            bounding box, at most :data:`MAX_DEFAULT_CELLS` cells a side).
        center: ``(x, y)`` map centre [m]; None = scene centre.
        toa_decimation: ``f``, PathSolver traces every ``f``-th row and column (the nodes).
        min_coverage: the smallest acceptable fraction of covered OUTDOOR cells; a map
            below it is an error (:mod:`core.raytracing.coverage`).
        propagation: the propagation physics, shared with ``make-dataset``.
        paths_per_site: ``k``, the paths kept per site and cell (``--paths-per-site``): 1 = the
            strongest only (the map as before, no ``site_anchor`` layer); ``k > 1`` adds the
            anchors of every site's ``k`` paths (path 0, then :func:`alt_paths`), recorded as
            ``attrs["paths_per_site"]`` (:mod:`core.stores.path_anchors`).
    """

    resolution: float = 1.0
    map_size: tuple[int, int] | None = None
    center: tuple[float, float] | None = None
    toa_decimation: int = DEFAULT_TOA_DECIMATION
    min_coverage: float = DEFAULT_MIN_COVERAGE
    propagation: PropagationSettings = field(default_factory=PropagationSettings)
    paths_per_site: int = 1

    def validate(self) -> None:
        if not (isinstance(self.resolution, (int, float)) and math.isfinite(self.resolution) and self.resolution > 0):
            raise CoreError(f"--resolution must be a positive number of metres, got {self.resolution}")
        if self.center is not None and not all(isinstance(c, (int, float)) and math.isfinite(c) for c in self.center):
            raise CoreError(f"--center must be two finite coordinates in metres (X Y), got {self.center}")
        h, w = self.map_size or (1, 1)
        if h < 1 or w < 1:
            raise CoreError(f"--map-size must be two positive cell counts (H W), got {h} {w}")
        if h * w > 4096 * 4096:
            raise CoreError(f"--map-size {h} {w} is too large (at most 4096 x 4096 cells)")
        if self.toa_decimation < 1:
            raise CoreError(f"--toa-decimation must be >= 1, got {self.toa_decimation}")
        if not 1 <= self.paths_per_site <= MAX_PATHS_PER_SITE:
            raise CoreError(f"--paths-per-site must be 1..{MAX_PATHS_PER_SITE}, got {self.paths_per_site}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise CoreError(f"--min-coverage must be a fraction in [0, 1], got {self.min_coverage}")
        p = self.propagation
        if not 1 <= p.samples_per_src <= MAX_SAMPLES_PER_SRC:
            raise CoreError(f"--samples-per-tx must be 1..{MAX_SAMPLES_PER_SRC} PathSolver rays per site "
                            f"(the cost grows as rays x cells), got {p.samples_per_src}")
        if not 0 <= p.retry_samples_per_src <= MAX_SAMPLES_PER_SRC:
            raise CoreError(f"--retry-samples-per-tx must be 0..{MAX_SAMPLES_PER_SRC} PathSolver rays per site, "
                            f"got {p.retry_samples_per_src}")
        if p.max_depth < 0:
            raise CoreError(f"--max-depth must be >= 0, got {p.max_depth}")
        if p.seed < 0:
            raise CoreError(f"--seed must be >= 0, got {p.seed}")
        p.validate()


MAX_DEFAULT_CELLS = 512


def fitted_map_size(bbox, resolution: float, center: tuple[float, float] | None = None) -> tuple[int, int]:
    """``(H, W)``: the cells that cover the scene's ``bbox`` (x0, y0, z0, x1, y1, z1) around ``center``
    (default its centre) at ``resolution`` [m], at most :data:`MAX_DEFAULT_CELLS` a side.

    etoile, munich, florence and san_francisco get 512 x 512 cells of 1 m; simple_street_canyon
    its own extent (122 x 187)."""
    x0, y0, _, x1, y1, _ = bbox
    cx, cy = center or (0.5 * (x0 + x1), 0.5 * (y0 + y1))
    half_w, half_h = max(cx - x0, x1 - cx), max(cy - y0, y1 - cy)
    return (min(MAX_DEFAULT_CELLS, max(1, math.ceil(2 * half_h / resolution - 1e-6))),
            min(MAX_DEFAULT_CELLS, max(1, math.ceil(2 * half_w / resolution - 1e-6))))


def map_area(settings: MapSettings, bbox) -> tuple[MapSettings, tuple[float, float], tuple[float, float, float, float]]:
    """``(settings, center, bounds)`` of the map over a scene of bounding box ``bbox``: the centre
    (``settings.center`` or the scene's), the map size (fitted when None) and the outer edges."""
    center = settings.center or (0.5 * (bbox[0] + bbox[3]), 0.5 * (bbox[1] + bbox[4]))
    if settings.map_size is None:
        settings = replace(settings, map_size=fitted_map_size(bbox, settings.resolution, center))
    return settings, center, map_bounds(center, settings)


def map_bounds(center: tuple[float, float], settings: MapSettings) -> tuple[float, float, float, float]:
    """Outer edges ``(x_min, y_min, x_max, y_max)`` of the ``H x W`` grid centred at ``center``."""
    if settings.map_size is None:
        raise CoreError("map_bounds: the map size is not resolved yet (see fitted_map_size)")
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


def geometric_toa_aoa(xyz: np.ndarray, source: np.ndarray, offset: np.ndarray | float = 0.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``toa = (L0 + |q - p|) / c`` [ns] and ``aoa = atan2(q_y - p_y, q_x - p_x)`` [deg].

    ``xyz [..., 3]`` receivers ``p``, ``source [..., 3]`` (broadcast) the path's anchor ``q``
    (virtual source or diffraction point), ``offset [...]`` the path length before it ``L0``
    [m] (0 for specular paths; see :func:`~core.raytracing.tracing.trace_points`).
    """
    d = np.linalg.norm(source - xyz, axis=-1) + offset
    az = np.degrees(np.arctan2(source[..., 1] - xyz[..., 1], source[..., 0] - xyz[..., 0]))
    return d / SPEED_OF_LIGHT * 1e9, wrap_degrees(az)


def node_indices(n: int, f: int) -> np.ndarray:
    """Node rows (or columns) of an axis of ``n`` cells: ``0, f, 2f, ...`` and ``n - 1``."""
    return np.unique(np.r_[np.arange(0, n, max(f, 1)), n - 1])


def stencil(n: int, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each cell ``0..n-1``: the lower node's position ``k [n]`` in ``nodes`` and the fraction ``t [n]``.

    Cell ``i`` lies between nodes ``nodes[k]`` and ``nodes[k + 1]`` at ``t = (i - nodes[k]) /
    (nodes[k + 1] - nodes[k])`` (one node only: ``k = 0``, ``t = 0``).
    """
    i = np.arange(n)
    if len(nodes) == 1:
        return np.zeros(n, np.int64), np.zeros(n)
    k = np.clip(np.searchsorted(nodes, i, side="right") - 1, 0, len(nodes) - 2)
    return k, (i - nodes[k]) / (nodes[k + 1] - nodes[k])


def _progress_bar(total, desc, position=0):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, position=position, leave=False, dynamic_ncols=True)


def trace_nodes(scene, xyz: np.ndarray, indoor: np.ndarray, settings: MapSettings, progress=None,
                starved: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``PathSolver`` at the outdoor nodes of the grid (cell centres ``xyz [H, W, 3]``).

    Returns ``rows [hn]`` and ``cols [wn]`` (node cell indices, :func:`node_indices`),
    ``xyz [hn, wn, 3]``, ``path_gain [hn, wn, S]`` [dB], ``image [hn, wn, S, 3]`` [m] and
    ``offset [hn, wn, S]`` [m] (the strongest path's anchor and its length before it,
    :func:`~core.raytracing.tracing.trace_points`), NaN where the site has no path or
    the node is indoor. With ``settings.paths_per_site = k > 1`` also ``power [hn, wn, S]``
    (the strongest path's own power [dB]) and the next ``k - 1`` paths' ``alt_power
    [hn, wn, S, k-1]`` [dB], ``alt_image [hn, wn, S, k-1, 3]``, ``alt_offset [hn, wn, S, k-1]`` [m].

    ``starved [H, W]`` (:func:`starved_cells`, which needs only the node rows and columns): these
    cells are traced in the same :func:`~core.raytracing.tracing.trace_points` pass as the nodes
    (one pass, one second pass: every PathSolver call has a fixed cost of its own), their
    ``[n, S]`` traces returned as ``starved_traced`` (:func:`write_starved_cells`).
    """
    from core.raytracing.tracing import trace_points

    h, w = indoor.shape
    rows, cols = node_indices(h, settings.toa_decimation), node_indices(w, settings.toa_decimation)
    nxyz = xyz[np.ix_(rows, cols)]
    outdoor = ~indoor[np.ix_(rows, cols)]
    points = nxyz[outdoor].reshape(-1, 3)
    n_nodes = len(points)
    if starved is not None and starved.any():
        points = np.concatenate([points, xyz[starved].reshape(-1, 3)])
    traced = trace_points(scene, points, settings.propagation, progress,
                          paths=settings.paths_per_site)
    cells = {key: arr[n_nodes:] for key, arr in traced.items()}
    traced = {key: arr[:n_nodes] for key, arr in traced.items()}
    n_sites = traced["path_gain"].shape[1]
    pg = np.full(outdoor.shape + (n_sites,), np.nan)
    pg[outdoor] = np.where(np.isfinite(traced["path_gain"]), traced["path_gain"], np.nan)
    image = np.full(outdoor.shape + (n_sites, 3), np.nan)
    image[outdoor] = traced["image"]
    offset = np.full(outdoor.shape + (n_sites,), np.nan)
    offset[outdoor] = traced["offset"]
    nodes = {"rows": rows, "cols": cols, "xyz": nxyz, "path_gain": pg, "image": image, "offset": offset}
    for key in ("power", "alt_power", "alt_image", "alt_offset"):  # paths_per_site > 1 only
        if key in traced:
            arr = np.full(outdoor.shape + traced[key].shape[1:], np.nan)
            arr[outdoor] = traced[key]
            nodes[key] = arr
    if starved is not None:
        nodes["starved_traced"] = cells
    return nodes


def _stencil_nodes(nodes: dict[str, np.ndarray], shape: tuple[int, int]):
    """The four stencil corners of every cell: ``[(a [H, 1], b [1, W], weight [H, W]), ...]``.

    ``nodes[key][a, b]`` is the corner's node; weights are bilinear in the cell's
    position between the nodes and sum to 1.
    """
    (ki, ti), (kj, tj) = stencil(shape[0], nodes["rows"]), stencil(shape[1], nodes["cols"])
    tI, tJ = np.meshgrid(ti, tj, indexing="ij")
    hn, wn = len(nodes["rows"]), len(nodes["cols"])
    out = []
    for di, dj, wt in ((0, 0, (1 - tI) * (1 - tJ)), (1, 0, tI * (1 - tJ)), (0, 1, (1 - tI) * tJ), (1, 1, tI * tJ)):
        out.append((np.minimum(ki + di, hn - 1)[:, None], np.minimum(kj + dj, wn - 1)[None, :], wt))
    return out


def site_layer(xyz: np.ndarray, indoor: np.ndarray, nodes: dict[str, np.ndarray], s: int, site: np.ndarray,
               sees_site: np.ndarray, anchors: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Site ``s``'s ``(path_gain [dB], toa [ns], aoa [deg])`` on every cell, each ``[H, W]``, NaN where uncovered.

    ``xyz [H, W, 3]`` cell centres, ``site [3]`` the site's position, ``sees_site [H, W]``
    an exact line-of-sight test from each cell to the site. Formulas: module docstring;
    the path gain averages only the stencil nodes of the cell's own class (seeing the
    site or not) when there are any, so a lit cell never blends in a shadowed node.
    ``anchors``, if given, receives the chosen path's ``q [H, W, 3]``, ``l0 [H, W]`` [m], the
    stencil's ``weights [4, H, W]`` (for :func:`alt_paths`) and ``covered [H, W]``.
    """
    node_sees = sees_site[np.ix_(nodes["rows"], nodes["cols"])]
    weights, same, gains, images, offsets, direct = [], [], [], [], [], []
    for a, b, wt in _stencil_nodes(nodes, indoor.shape):
        g, q, l0 = nodes["path_gain"][a, b, s], nodes["image"][a, b, s], nodes["offset"][a, b, s]
        gains.append(g + spreading_db(np.linalg.norm(q - nodes["xyz"][a, b], axis=-1),
                                      np.linalg.norm(q - xyz, axis=-1), l0))
        weights.append(np.where(np.isfinite(g), wt, 0.0))
        same.append(node_sees[a, b] == sees_site)
        images.append(q)
        offsets.append(l0)
        direct.append((np.linalg.norm(q - site, axis=-1) < DIRECT_TOL_M) & (l0 < DIRECT_TOL_M))
    w = np.stack(weights)  # [4, H, W]
    covered = (w.sum(0) >= 0.5 - 1e-9) & ~indoor
    w_class = w * np.stack(same)
    w_pg = np.where(w_class.sum(0) > 0, w_class, w)
    total = w_pg.sum(0)
    pg = (np.where(w_pg > 0, np.stack(gains), 0.0) * w_pg).sum(0) / np.where(total > 0, total, 1.0)
    w_indirect = w * ~np.stack(direct)
    pick = np.where(w_indirect.sum(0) > 0, w_indirect.argmax(0), w.argmax(0))[None]
    q = np.take_along_axis(np.stack(images), pick[..., None], 0)[0]
    l0 = np.take_along_axis(np.stack(offsets), pick, 0)[0]
    q = np.where(sees_site[..., None], site, q)
    toa, aoa = geometric_toa_aoa(xyz, q, np.where(sees_site, 0.0, l0))
    if anchors is not None:
        anchors.update(weights=w, covered=covered, q=q, l0=np.where(sees_site, 0.0, l0))
    return tuple(np.where(covered, v, np.nan) for v in (pg, toa, aoa))


def alt_paths(xyz: np.ndarray, nodes: dict[str, np.ndarray], s: int, site: np.ndarray, sees_site: np.ndarray,
              toa0: np.ndarray, aoa0: np.ndarray, gain: np.ndarray, weights: np.ndarray, k: int
              ) -> tuple[np.ndarray, ...]:
    """Site ``s``'s next ``k - 1`` paths on every cell: ``(toa [k-1, H, W] ns, aoa [k-1, H, W] deg,
    power [k-1, H, W] dB relative to the cell's path gain, anchor q [k-1, H, W, 3] m, L0 [k-1, H, W] m)``,
    NaN where the cell has fewer. The map stores the anchors (:mod:`core.stores.path_anchors`); the
    delay and azimuth at the cell centre are what they give there.

    The candidates are the ``k`` strongest paths of each stencil node with weight > 0
    (``weights [4, H, W]`` of :func:`site_layer`): path ``r`` of node ``n``, anchor ``q``,
    length before it ``L0``, power ``P`` [dB], carried to the cell ``p`` like path 0::

        toa_c = (L0 + |q - p|) / c       aoa_c = azimuth(q - p)
        P_c   = P + spreading_db(|q - n|, |q - p|, L0)

    A direct-path candidate is dropped where the cell does not see the site. Candidates are
    taken in order of ``P_c``; one within :data:`SAME_PATH_NS` AND :data:`SAME_PATH_DEG` of
    the cell's path 0 (``toa0``, ``aoa0 [H, W]``, :func:`site_layer`) or of a path already
    kept is the same path (the same reflection seen from two nodes, or a diffracted path
    whose edge point slid) and skipped. ``power`` is ``min(P_c - gain, 0)`` (``gain [H, W]``,
    the site's path gain there): the share of the site's power in that path (the spreading
    term is clipped to +-:data:`MAX_SPREADING_DB`, and a path never carries more than the
    site's whole power). Paths are ordered by ``P_c``, strongest first.
    """
    h, w = toa0.shape
    extra = k - 1
    toa_c, aoa_c, pow_c, q_c, l_c = [], [], [], [], []
    for (a, b, _), wn in zip(_stencil_nodes(nodes, (h, w)), weights):
        node_xyz = nodes["xyz"][a, b]
        ranks = [(nodes["image"][a, b, s], nodes["offset"][a, b, s], nodes["power"][a, b, s])]
        ranks += [(nodes["alt_image"][a, b, s, j], nodes["alt_offset"][a, b, s, j], nodes["alt_power"][a, b, s, j])
                  for j in range(extra)]
        for q, l0, pw in ranks:
            direct = (np.linalg.norm(q - site, axis=-1) < DIRECT_TOL_M) & (l0 < DIRECT_TOL_M)
            ok = (wn > 0) & np.isfinite(pw) & np.isfinite(l0) & (~direct | sees_site)
            t, az = geometric_toa_aoa(xyz, q, np.where(np.isfinite(l0), l0, 0.0))
            spread = spreading_db(np.linalg.norm(q - node_xyz, axis=-1), np.linalg.norm(q - xyz, axis=-1), l0)
            pc = pw + np.clip(spread, -MAX_SPREADING_DB, MAX_SPREADING_DB)
            toa_c.append(t)
            aoa_c.append(az)
            pow_c.append(np.where(ok & np.isfinite(pc), pc, -np.inf))
            q_c.append(np.broadcast_to(q, (h, w, 3)))
            l_c.append(np.broadcast_to(np.where(np.isfinite(l0), l0, 0.0), (h, w)))
    toa_c, aoa_c, pow_c, l_c = np.stack(toa_c), np.stack(aoa_c), np.stack(pow_c), np.stack(l_c)  # [C, H, W]
    q_c = np.stack(q_c)  # [C, H, W, 3]
    order = np.argsort(-pow_c, axis=0, kind="stable")
    out_t, out_a, out_p, out_l = (np.full((extra, h, w), np.nan) for _ in range(4))
    out_q = np.full((extra, h, w, 3), np.nan)
    count = np.zeros((h, w), np.int64)

    def same(t, az, t_ref, a_ref):
        return (np.abs(t - t_ref) < SAME_PATH_NS) & (np.abs(wrap_degrees(az - a_ref)) < SAME_PATH_DEG)

    for c in range(order.shape[0]):
        pick = order[c:c + 1]
        t, az, pc, l0 = (np.take_along_axis(v, pick, 0)[0] for v in (toa_c, aoa_c, pow_c, l_c))
        q = np.take_along_axis(q_c, pick[..., None], 0)[0]
        take = np.isfinite(pc) & (count < extra) & ~same(t, az, toa0, aoa0)
        for j in range(extra):
            take &= ~((j < count) & same(t, az, out_t[j], out_a[j]))
        for j in range(extra):
            slot = take & (count == j)
            out_t[j] = np.where(slot, t, out_t[j])
            out_a[j] = np.where(slot, az, out_a[j])
            out_p[j] = np.where(slot, np.minimum(pc - gain, 0.0), out_p[j])
            out_q[j] = np.where(slot[..., None], q, out_q[j])
            out_l[j] = np.where(slot, l0, out_l[j])
        count += take
    return out_t, out_a, out_p, out_q, out_l


def spreading_db(d_node: np.ndarray, d_cell: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Path-gain change [dB] of one path from a node to a cell: ``10 log10(d_n (d_n + L0) / (d_p (d_p + L0)))``.

    ``d_node``, ``d_cell``: distances [m] from the path's anchor to the node and the cell;
    ``offset`` ``L0`` [m]: the path length before the anchor. Specular paths (``L0 = 0``)
    spread spherically from their virtual source (``20 log10(d_n / d_p)``); a diffracted
    path's power falls as ``L0 / (d (d + L0))`` behind its edge (the edge-diffracted
    ray tube's spreading factor); the diffraction coefficient's angular change is left
    to the interpolation between nodes.
    """
    d_n, d_p = np.maximum(d_node, 1e-3), np.maximum(d_cell, 1e-3)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 10 * np.log10(d_n * (d_n + offset) / (d_p * (d_p + offset)))


def site_layers(scene, xyz: np.ndarray, indoor: np.ndarray, nodes: dict[str, np.ndarray],
                sites: list[dict[str, Any]], paths_per_site: int = 1) -> dict[str, np.ndarray]:
    """The per-site layers ``site_path_gain``, ``site_toa``, ``site_aoa``, each float32 ``[S, H, W]``;
    with ``paths_per_site = k > 1`` also the anchors of every site's ``k`` paths (path 0: the one of
    ``site_toa``; then :func:`alt_paths`) as float64 ``site_anchor [S, k, 4, H, W]`` ``(q_x, q_y, q_z, L0)``
    [m], NaN where absent or uncovered (:func:`generate_map` encodes it, :mod:`core.stores.path_anchors`)."""
    from core.raytracing.tracing import line_of_sight
    from core.stores.path_anchors import ANCHOR_LAYER
    from core.stores.radio_map import SITE_LAYERS

    outdoor = ~indoor
    planes = {name: [] for name in SITE_LAYERS}
    anchor_planes = []
    for s, site in enumerate(sites):
        pos = np.asarray(site["position"], dtype=np.float64)
        sees = np.zeros(indoor.shape, bool)
        sees[outdoor] = line_of_sight(scene, xyz[outdoor], pos)
        anchors: dict = {}
        layer = site_layer(xyz, indoor, nodes, s, pos, sees, anchors)
        for name, plane in zip(SITE_LAYERS, layer):
            planes[name].append(plane)
        if paths_per_site > 1:
            _, _, _, q, l0 = alt_paths(xyz, nodes, s, pos, sees, layer[1], layer[2], layer[0], anchors["weights"],
                                       paths_per_site)
            q = np.concatenate([anchors["q"][None], q])  # [k, H, W, 3]
            l0 = np.concatenate([anchors["l0"][None], l0])  # [k, H, W]
            a = np.concatenate([np.moveaxis(q, -1, 1), l0[:, None]], 1)  # [k, 4, H, W]
            anchor_planes.append(np.where((anchors["covered"] & np.isfinite(layer[1]))[None, None], a, np.nan))
    out = {name: np.concatenate([np.asarray(q).reshape(-1, *indoor.shape) for q in p]).astype(np.float32)
           for name, p in planes.items()}
    if anchor_planes:
        out[ANCHOR_LAYER] = np.stack(anchor_planes)
    return out


def starved_cells(indoor: np.ndarray, nodes: dict[str, np.ndarray]) -> np.ndarray:
    """bool ``[H, W]``: outdoor cells whose bilinear stencil puts less than half its weight on OUTDOOR nodes.

    Interpolation cannot cover them (a cell needs ``sum w_n >= 0.5`` of nodes with a path):
    in a street narrower than the node spacing both neighbouring nodes may fall inside the
    buildings. :func:`trace_nodes` traces them directly, with the nodes.
    """
    node_outdoor = ~indoor[np.ix_(nodes["rows"], nodes["cols"])]
    weight = sum(np.where(node_outdoor[a, b], wt, 0.0) for a, b, wt in _stencil_nodes(nodes, indoor.shape))
    return ~indoor & (weight < 0.5 - 1e-9)


def write_starved_cells(starved: np.ndarray, traced: dict[str, np.ndarray], layers: dict[str, np.ndarray]) -> None:
    """Write the ``starved`` cells' own traces (``[H, W]``, :func:`starved_cells`; ``traced``: their
    :func:`~core.raytracing.tracing.trace_points` arrays ``[n, S]``, from :func:`trace_nodes`) into
    ``layers`` ``[S, H, W]``: each site's path gain, strongest-path ToA and AoA (NaN: no path).
    """
    if not starved.any():
        return
    has = np.isfinite(traced["path_gain"]).T  # [S, n]
    for layer, key in (("site_path_gain", "path_gain"), ("site_toa", "toa"), ("site_aoa", "aoa")):
        layers[layer][:, starved] = np.where(has, traced[key].T, np.nan)
    if "site_anchor" in layers:  # [S, k, 4, H, W] <- path 0's and the next paths' own anchors there
        q = np.concatenate([traced["image"][:, :, None], traced["alt_image"]], 2)  # [n, S, k, 3]
        l0 = np.concatenate([traced["offset"][:, :, None], traced["alt_offset"]], 2)  # [n, S, k]
        a = np.concatenate([q, l0[..., None]], -1)  # [n, S, k, 4]
        ok = np.isfinite(a).all(-1, keepdims=True) & has.T[:, :, None, None]
        layers["site_anchor"][:, :, :, starved] = np.where(ok, a, np.nan).transpose(1, 2, 3, 0)


def serving_values(layers: dict[str, np.ndarray], indoor: np.ndarray, radio, link) -> tuple[np.ndarray, np.ndarray]:
    """Serving-site features ``values [F, H, W]`` (float32, ``DEFAULT_FEATURE_ORDER``) and ``valid [H, W]``.

    Serving site = largest ``site_path_gain``; SNR/SINR/throughput/BLER from
    :func:`~core.raytracing.measurements.cell_measurements`, the dataset's own code.
    """
    from core.raytracing.measurements import cell_measurements

    pg = layers["site_path_gain"].astype(np.float64)
    n_sites, h, w = pg.shape
    flat = np.where(np.isfinite(pg), pg, -np.inf).reshape(n_sites, -1).T  # [H*W, S]
    valid = (~indoor.reshape(-1)) & np.isfinite(flat).any(1)
    serving = flat.argmax(1)
    cells = np.flatnonzero(valid)
    planes = {name: np.full(h * w, np.nan) for name in DEFAULT_FEATURE_ORDER}
    planes["path_gain"][cells] = flat[cells, serving[cells]]
    for name in ("toa", "aoa"):
        planes[name][cells] = layers[f"site_{name}"].reshape(n_sites, -1)[serving[cells], cells]
    cell = cell_measurements(flat[cells], radio, link)
    for f, name in enumerate(("snr", "sinr", "throughput", "bler")):
        planes[name][cells] = cell[:, f]
    values = np.stack([planes[name].reshape(h, w) for name in DEFAULT_FEATURE_ORDER]).astype(np.float32)
    valid = valid.reshape(h, w) & np.isfinite(values).all(axis=0)
    values[:, ~valid] = np.nan
    return values, valid


def _scene_grid(info, settings: MapSettings, sites):
    """``(settings, scene, sites, center, bounds, xyz [H, W, 3], indoor [H, W], ground [H, W])`` of the map
    to make (``settings`` with its map size resolved when it was None).

    Cell centres sit at the terrain height plus the UE height
    (:func:`~core.raytracing.terrain.measurement_points`); ``indoor``: under a roof there.
    """
    from core.raytracing.scenes import buildings_of, layout_for, load_scene, scene_bbox
    from core.raytracing.terrain import measurement_points
    from core.raytracing.tracing import build_scene, indoor_mask

    base_scene = load_scene(info)
    bbox = scene_bbox(base_scene)
    settings, center, bounds = map_area(settings, bbox)
    if sites is None:
        sites = layout_for(info, buildings_of(base_scene), bbox, area=bounds)
    del base_scene
    radio = settings.propagation.radio
    scene = build_scene(info, sites, radio)
    gx, gy = cell_centres(bounds, settings.map_size)
    xyz = measurement_points(scene, np.stack([gx, gy], -1).reshape(-1, 2), radio.rx_height_m)
    xyz = xyz.reshape(settings.map_size + (3,))
    indoor = indoor_mask(scene, xyz.reshape(-1, 3)).reshape(settings.map_size)
    return settings, scene, sites, center, bounds, xyz, indoor, xyz[..., 2] - radio.rx_height_m


def generate_map(info, settings: MapSettings, sites: list[dict[str, Any]] | None = None, link=None,
                 label: str = "", position: int = 0):
    """Ray-trace one scene into a :class:`~core.stores.radio_map.RadioMap` (see the module docstring)."""
    from core.raytracing.coverage import check_coverage
    from core.raytracing.link_abstraction import LinkConfig, link_abstraction
    from core.stores.radio_map import RadioMap

    settings.validate()
    timings: dict[str, float] = {}
    stages = ["load", "paths", "site layers", "link"]
    bar = _progress_bar(len(stages), f"{info.name}", position)

    def stage(k: int, t_prev: float) -> float:
        now = time.perf_counter()
        if k > 0:
            timings[f"{stages[k - 1].replace(' ', '_')}_s"] = now - t_prev
            bar.update(1)
        if k < len(stages):
            bar.set_description(f"{info.name}: {stages[k]}")
            report(k / len(stages), f"{label}{info.name}: {stages[k]}")
        return now

    t0 = t = stage(0, 0.0)
    settings, scene, sites, center, bounds, xyz, indoor, ground = _scene_grid(info, settings, sites)
    t = stage(1, t)

    def traced(what: str, start: float):
        """A PathSolver progress callback: a tqdm bar for ``what`` and the job's fraction from ``start``."""
        pbar = _progress_bar(0, f"{info.name}: {what}", position + 1)

        def progress(done, total):
            pbar.total = total
            pbar.update(done - pbar.n)
            report(start + 0.25 * done / max(total, 1))
        return pbar, progress

    pbar, progress = traced("paths", 0.25)
    h, w = settings.map_size
    grid = {"rows": node_indices(h, settings.toa_decimation), "cols": node_indices(w, settings.toa_decimation)}
    starved = starved_cells(indoor, grid)  # narrow streets, traced at their cells in the nodes' pass
    nodes = trace_nodes(scene, xyz, indoor, settings, progress, starved=starved)
    pbar.close()
    t = stage(2, t)
    layers = site_layers(scene, xyz, indoor, nodes, sites, settings.paths_per_site)
    write_starved_cells(starved, nodes.pop("starved_traced"), layers)
    path_anchors = None
    if "site_anchor" in layers:  # int16 multiples of 2^n / 64 m about the map centre (core.stores.path_anchors)
        from core.stores.path_anchors import encode_anchors

        layers["site_anchor"], path_anchors = encode_anchors(layers["site_anchor"], center)
    t = stage(3, t)
    link = link or link_abstraction(LinkConfig())
    values, valid = serving_values(layers, indoor, settings.propagation.radio, link)
    stage(4, t)
    timings["total_s"] = time.perf_counter() - t0
    bar.close()
    coverage = check_coverage(info.name, valid, ~indoor, np.isfinite(layers["site_path_gain"]), settings.min_coverage)
    report(1.0, f"{label}{info.name}: done")
    attrs = _map_attrs(info, settings, sites, center, nodes, link, timings, valid, indoor, coverage,
                       int(starved.sum()))
    attrs.update(_heard_attrs(values[DEFAULT_FEATURE_ORDER.index("path_gain")], valid, indoor,
                              settings.propagation.radio.tx_power_dbm))
    if settings.paths_per_site > 1:
        attrs["paths_per_site"] = settings.paths_per_site
        attrs["path_anchors"] = path_anchors
    return RadioMap(values, DEFAULT_FEATURE_ORDER, bounds, valid=valid, attrs=attrs, layers=layers,
                    outdoor=~indoor, ground=ground.astype(np.float32))


def _map_attrs(info, settings: MapSettings, sites, center, nodes, link, timings, valid, indoor,
               coverage: float, starved_cells_traced: int) -> dict[str, Any]:
    """The store's ``attrs``: scene, sites, radio, propagation, link abstraction, generator, coverage.

    ``coverage`` is the fraction of OUTDOOR cells covered; ``coverage_of_all_cells`` and
    ``outdoor_fraction`` give the same map's figures over the whole grid.
    """
    from core.raytracing.tracing import import_sionna_rt

    p = settings.propagation
    gen = {k: v for k, v in asdict(settings).items()
           if k != "propagation" and not (k == "paths_per_site" and v == 1)}  # k = 1: the attrs as before
    gen.update(center=[float(c) for c in center], node_grid=[len(nodes["rows"]), len(nodes["cols"])],
               starved_cells_traced=starved_cells_traced,
               node_spacing_m=settings.toa_decimation * settings.resolution,
               # the command-line values that made it (the app's form starts from these)
               samples_per_tx=p.samples_per_src, retry_samples_per_tx=p.retry_samples_per_src,
               max_depth=p.max_depth, seed=p.seed,
               method="PathSolver (attrs.propagation) at every toa_decimation-th cell centre; per site the "
                      "strongest path's virtual source gives exact ToA/AoA between nodes, path gain "
                      "interpolated after spherical spreading; outdoor cells whose stencil is mostly indoor "
                      "nodes traced at their centre; serving = strongest site",
               sionna_rt=import_sionna_rt().__version__, timings=timings)
    return {
        "scene": info.name,
        "scene_source": info.source,
        "sites": [{"name": s["name"], "position": [float(v) for v in s["position"]]} for s in sites],
        "serving": "strongest site by site_path_gain (PathSolver)",
        "radio": p.radio.to_dict(),
        "propagation": p.to_dict(),
        "link_abstraction": link.config.to_dict(),
        "generator": gen,
        "coverage": coverage,
        "coverage_of": "outdoor cells",
        "coverage_of_all_cells": float(valid.mean()),
        "outdoor_fraction": float((~indoor).mean()),
    }


def _heard_attrs(serving_pg, valid, indoor, tx_power_dbm: float) -> dict[str, Any]:
    """``coverage_heard`` (the share of outdoor cells where the strongest site is heard at the default
    measurement model's sensitivity, :func:`core.raytracing.coverage.heard_coverage`) and what it assumed."""
    from core.raytracing.coverage import heard_coverage, heard_threshold_db
    from core.stores.measurement_model import MeasurementModel

    sens = MeasurementModel().sensitivity_dbm
    threshold = heard_threshold_db(tx_power_dbm, sens)
    return {"coverage_heard": heard_coverage(serving_pg, valid, ~indoor, threshold),
            "coverage_heard_sensitivity_dbm": sens, "coverage_heard_threshold_db": threshold}


# -- command line ------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenes", nargs="+", default=None, help="scene names (or XML paths inside --scenes-dir)")
    parser.add_argument("--scenes-dir", default=None, help="folder of user scenes; without --scenes, all of them")
    parser.add_argument("--radio-maps", default="radio_maps", help="where <scene>.zarr stores go (default: radio_maps)")
    parser.add_argument("--output-dir", dest="radio_maps", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # old name
    parser.add_argument("--resolution", type=cli_types.positive, default=1.0, help="cell edge in metres (default: 1.0)")
    parser.add_argument("--map-size", type=cli_types.count, nargs=2, default=None, metavar=("H", "W"),
                        help=f"cells along y (rows) and x (columns) (default: fit the scene, at most "
                             f"{MAX_DEFAULT_CELLS} a side: 512 512 for the cities at 1 m)")
    parser.add_argument("--center", type=cli_types.coordinate, nargs=2, default=None, metavar=("X", "Y"),
                        help="map centre in scene metres (default: the scene's centre)")
    defaults = PropagationSettings()
    parser.add_argument("--samples-per-tx", type=cli_types.integer(1, MAX_SAMPLES_PER_SRC), default=defaults.samples_per_src,
                        help=f"PathSolver rays per site (default: {defaults.samples_per_src}; make-dataset reuses it)")
    parser.add_argument("--retry-samples-per-tx", type=cli_types.integer(0, MAX_SAMPLES_PER_SRC), default=defaults.retry_samples_per_src,
                        help=f"rays per site of a second pass over the points the first found no path to "
                             f"(0 = none; default: {defaults.retry_samples_per_src}; make-dataset reuses it)")
    parser.add_argument("--max-depth", type=cli_types.non_negative_int, default=defaults.max_depth,
                        help=f"PathSolver interactions per path (default: {defaults.max_depth}; make-dataset reuses it)")
    parser.add_argument("--toa-decimation", type=cli_types.count, default=DEFAULT_TOA_DECIMATION,
                        help=f"PathSolver traces every N-th row and column (default: {DEFAULT_TOA_DECIMATION})")
    parser.add_argument("--seed", type=cli_types.seed, default=defaults.seed, help=f"PathSolver seed (default: {defaults.seed})")
    parser.add_argument("--paths-per-site", type=cli_types.integer(1, MAX_PATHS_PER_SITE), default=1,
                        help="paths kept per site and cell: 1 = the strongest (default); k > 1 adds the site_anchor "
                             "layer: every site's k strongest paths as anchors, which the likelihood reads as a mixture")
    parser.add_argument("--min-coverage", type=cli_types.fraction, default=DEFAULT_MIN_COVERAGE,
                        help=f"smallest acceptable fraction of covered outdoor cells; below it the scene fails "
                             f"and nothing is written (default: {DEFAULT_MIN_COVERAGE})")
    parser.add_argument("--parallel", type=cli_types.count, default=1, help="scenes generated at once, in separate processes")
    add_ray_argument(parser)
    parser.add_argument("--force", action="store_true", help="regenerate maps that already exist")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _settings_from(args) -> MapSettings:
    if args.resolution is None or not math.isfinite(args.resolution) or args.resolution <= 0:
        raise CoreError(f"--resolution must be a positive number of metres, got {args.resolution}")
    propagation = replace(PropagationSettings(), samples_per_src=args.samples_per_tx, max_depth=args.max_depth,
                          seed=args.seed, retry_samples_per_src=args.retry_samples_per_tx)
    s = MapSettings(resolution=float(args.resolution),
                    map_size=(int(args.map_size[0]), int(args.map_size[1])) if args.map_size else None,
                    center=tuple(args.center) if args.center else None, toa_decimation=args.toa_decimation,
                    min_coverage=float(args.min_coverage), propagation=propagation,
                    paths_per_site=int(getattr(args, "paths_per_site", 1)))
    s.validate()
    return s


def map_of_scene(name: str, scenes_dir: str | None, radio_maps: str, settings: MapSettings, force: bool,
                 position: int = 0) -> tuple[str, str]:
    """Generate scene ``name``'s map into ``<radio_maps>/<scene>.zarr`` (atomically): ``(status, detail)``.

    Skipped when the store exists and not ``force``. Raises on a bad scene or a failed trace:
    :func:`~core.raytracing.scene_batch.run_guarded` turns that into the scene's failure.
    """
    from core.raytracing.scenes import resolve_scene

    info = resolve_scene(name, scenes_dir)
    out = map_path(radio_maps, info.name)
    if out.exists() and not force:
        return "skipped", f"{out} exists (use --force to regenerate)"
    t = time.perf_counter()
    with writing_store(out, "radio_map", force, "radio map"):  # not shipped, one writer, --force only on a map
        radio_map = generate_map(info, settings, position=position)
        radio_map.save(out)
    return "ok", f"{out} ({time.perf_counter() - t:.1f} s, coverage {radio_map.coverage_text()})"


def _scene_names(args) -> list[str]:
    """The scenes to generate: ``--scenes``, else every scene of ``--scenes-dir``."""
    from core.raytracing.scenes import user_scenes

    names = list(args.scenes or [])
    if not names:
        if not args.scenes_dir:
            raise CoreError("give --scenes NAME ... or --scenes-dir DIR")
        names = list(user_scenes(args.scenes_dir))
        if not names:
            raise CoreError(f"--scenes-dir {args.scenes_dir}: no scene XML files found")
    return names


def run(args: argparse.Namespace) -> int:
    from core.raytracing.scene_batch import SceneCall, print_summary, run_in_pool, run_in_turn

    settings = _settings_from(args)
    names = _scene_names(args)
    if args.parallel < 1:
        raise CoreError(f"--parallel must be >= 1, got {args.parallel}")
    check_writable(map_path(args.radio_maps, names[0]), "--radio-maps")  # before any trace, not after it
    if args.ray is not None:
        from core.raytracing.distributed import run_on_ray

        if args.parallel != 1:
            raise CoreError("--parallel and --ray: give one (Ray runs one task per scene on every CPU or GPU it has)")
        scenes_dir = os.path.abspath(args.scenes_dir) if args.scenes_dir else None
        common = (scenes_dir, os.path.abspath(args.radio_maps), settings, args.force)
        results = run_on_ray([SceneCall(name, map_of_scene, common) for name in names], args.ray, "generate-maps")
    elif args.parallel == 1 or len(names) == 1:
        common = (args.scenes_dir, args.radio_maps, settings, args.force)
        results = run_in_turn([SceneCall(name, map_of_scene, common) for name in names])
    else:
        common = (args.scenes_dir, args.radio_maps, settings, args.force)
        results = run_in_pool([SceneCall(name, map_of_scene, common + (2 * (k % args.parallel),))
                               for k, name in enumerate(names)], args.parallel)
    return print_summary(results)
