"""A seeded procedural city, written as a scene Sionna RT loads (``python -m core make-city``).

The city is a square of ``size_m`` metres centred on the origin, built in five steps, every
random draw from one ``numpy.random.Generator(PCG64(seed))`` in a fixed order, so the same
parameters give the same files byte for byte:

1. **Street network.** ``grid``: straight streets every ``block_m`` metres (the square is cut
   into ``n = round(size / block_m)`` equal blocks per side). ``perturbed``: the same grid with
   every inner node moved by up to 15 % of a block and every street its own width.
   ``irregular``: the Voronoi cells of ``n²`` random seeds (two Lloyd steps), each cell edge a
   street. Each street has a width ``w`` (``grid``: ``street_width_m``; otherwise
   ``street_width_m * U(0.6, 1.4)``); the edge of the square is a half street.
2. **Blocks.** Every cell is a convex polygon; its block is the cell with each edge moved
   inwards by ``w / 2`` (half-plane clipping, so every block stays convex). A fraction
   ``plazas`` of the blocks is left open (a plaza, a park).
3. **Lots and footprints.** A block is cut in two, across its longest extent near its
   centroid, until each lot is at most ``lot_m²``; each lot is built with probability
   ``density``; its footprint is the lot moved inwards by ``setback_m`` (so two neighbours
   stand ``2 * setback_m`` apart and never share a wall).
4. **Heights and materials.** A building's height is log-normal with mean ``height_mean_m``
   and standard deviation ``height_sd_m`` (``sigma² = ln(1 + sd²/mean²)``,
   ``mu = ln(mean) - sigma²/2``), clipped to [3, 150] m; its radio material is drawn from the
   ``materials`` mix (Sionna's ITU materials, 10 cm thick).
5. **Vehicles** (``vehicles > 0``): 4.5 × 1.8 × 1.5 m metal boxes at random street points at
   least 1 m from every block, along the nearest block edge, at least 6 m apart.
6. **Terrain** (``terrain_m > 0``): gentle hills, three plane waves of random direction, wavelength
   ``U(0.6, 1.6) * size_m`` and phase (:meth:`City.ground`), the ground a height field of 4 m
   cells; buildings stand on it (walls from below the lowest ground under them).

Written (``<out>/<name>/``, the layout of Sionna's own scenes, which ``--scenes-dir`` reads)::

    <name>.xml              Mitsuba scene: one itu-radio-material per material, one PLY shape per object
    meshes/ground.ply       the ground: a flat square at z = 0, or the terrain (medium dry ground)
    meshes/building_NNN.ply a building: its footprint prism (walls and roof), float32 [m]
    meshes/vehicle_NNN.ply  a vehicle box
    city.json               the manifest: parameters, building count, footprint share, height
                            statistics, file digests (sha256) and one digest over them
    <name>.sites.yaml       the site layout of ``place-sites`` (greedy line-of-sight rooftop sites;
                            read by map generation as a scene's own layout), unless ``--sites 0``

The whole folder is written under a temporary name and swapped into place
(:func:`~core.stores.atomic.atomic_path`), under the one-writer lock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core import cli_types
from core.errors import CoreError

MANIFEST = "city.json"
MANIFEST_KIND = "procedural_city"
MANIFEST_VERSION = 1
GROUND_MATERIAL = "medium_dry_ground"
VEHICLE_MATERIAL = "metal"
VEHICLE_SIZE_M = (4.5, 1.8, 1.5)
MIN_HEIGHT_M, MAX_HEIGHT_M = 3.0, 150.0
THICKNESS_M = 0.1
TERRAIN_STEP_M = 4.0
#: the ITU materials a building may be made of (Sionna RT's ITU-R P.2040 table)
BUILDING_MATERIALS = ("concrete", "brick", "glass", "metal", "marble", "wood", "plasterboard")
DEFAULT_MATERIALS = {"concrete": 0.45, "brick": 0.25, "glass": 0.2, "metal": 0.1}


class CityParams(BaseModel):
    """The generator's parameters (module docstring). Lengths in metres, shares in [0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, le=2**32 - 1)
    size_m: float = Field(256.0, ge=32.0, le=512.0)
    layout: Literal["grid", "perturbed", "irregular"] = "perturbed"
    block_m: float = Field(64.0, ge=10.0, le=256.0)
    street_width_m: float = Field(16.0, ge=2.0, le=60.0)
    lot_m: float = Field(24.0, ge=5.0, le=200.0)
    density: float = Field(0.85, ge=0.0, le=1.0)
    height_mean_m: float = Field(15.0, ge=MIN_HEIGHT_M, le=100.0)
    height_sd_m: float = Field(6.0, ge=0.0, le=60.0)
    setback_m: float = Field(1.0, ge=0.25, le=20.0)
    plazas: float = Field(0.08, ge=0.0, le=0.9)
    vehicles: int = Field(0, ge=0, le=500)
    terrain_m: float = Field(0.0, ge=0.0, le=50.0)
    materials: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_MATERIALS))

    @field_validator("materials")
    @classmethod
    def _mix(cls, mix: dict[str, float]) -> dict[str, float]:
        if not mix:
            raise ValueError("at least one material")
        unknown = sorted(set(mix) - set(BUILDING_MATERIALS))
        if unknown:
            raise ValueError(f"unknown material(s) {unknown} (known: {', '.join(BUILDING_MATERIALS)})")
        if any(not (math.isfinite(w) and w >= 0) for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError("weights must be finite, >= 0 and not all 0")
        total = sum(mix.values())
        return {k: round(mix[k] / total, 6) for k in sorted(mix)}

    def check(self) -> None:
        """Relations between fields: the blocks must fit the square and leave room for buildings."""
        if self.block_m > self.size_m:
            raise CoreError(f"--block-m {self.block_m:g} is larger than --size-m {self.size_m:g}")
        if self.street_width_m >= 0.8 * self.block_m:
            raise CoreError(f"--street-width-m {self.street_width_m:g} leaves no room for blocks of "
                            f"--block-m {self.block_m:g} (must be < 0.8 x block)")
        if 2 * self.setback_m >= self.lot_m:
            raise CoreError(f"--setback-m {self.setback_m:g} leaves no room in lots of --lot-m {self.lot_m:g}")


def params_from(values: dict[str, Any]) -> CityParams:
    """:class:`CityParams` from plain values; a bad value is one :class:`CoreError` line naming the field."""
    try:
        params = CityParams(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "--" + "-".join(str(p) for p in err["loc"][:1]).replace("_", "-") if err["loc"] else "city"
        raise CoreError(f"{where}: {err['msg']}") from None
    params.check()
    return params


def parse_materials(text: str) -> dict[str, float]:
    """``concrete=0.5,brick=0.3,glass`` → ``{concrete: 0.5, brick: 0.3, glass: 1.0}`` (a bare name weighs 1)."""
    mix: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, weight = part.partition("=")
        try:
            mix[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise CoreError(f"--materials: weight of {name!r} must be a number, got {weight!r}") from None
    return mix


# -- convex polygons ([P, 2] float64, counter-clockwise, not closed) ---------------------
def polygon_area(poly: np.ndarray) -> float:
    """Area [m²] of a counter-clockwise ring (shoelace)."""
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def clip_halfplane(poly: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """The part of convex ``poly`` where ``normal · p <= offset`` (Sutherland–Hodgman, one plane)."""
    if len(poly) == 0:
        return poly
    s = poly @ normal - offset
    out = []
    for k in range(len(poly)):
        a, b, sa, sb = poly[k], poly[(k + 1) % len(poly)], s[k], s[(k + 1) % len(poly)]
        if sa <= 0:
            out.append(a)
        if (sa < 0 < sb) or (sb < 0 < sa):
            out.append(a + (b - a) * (sa / (sa - sb)))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def inset(poly: np.ndarray, distances) -> np.ndarray:
    """Convex ``poly`` with edge ``k`` (from vertex ``k`` to ``k + 1``) moved inwards by ``distances[k]`` [m]."""
    d = np.broadcast_to(np.asarray(distances, dtype=np.float64), (len(poly),))
    out = poly
    for k in range(len(poly)):
        a, b = poly[k], poly[(k + 1) % len(poly)]
        edge = b - a
        length = float(np.hypot(*edge))
        if length < 1e-9:
            continue
        outward = np.array([edge[1], -edge[0]]) / length  # right of a CCW edge is outside
        out = clip_halfplane(out, outward, float(outward @ a) - d[k])
        if len(out) < 3:
            return np.zeros((0, 2))
    return out


def _extent(poly: np.ndarray) -> tuple[np.ndarray, float]:
    """The unit direction of the polygon's longest edge and its extent along it [m]."""
    edges = np.roll(poly, -1, axis=0) - poly
    k = int(np.argmax(np.hypot(edges[:, 0], edges[:, 1])))
    u = edges[k] / np.hypot(*edges[k])
    proj = poly @ u
    return u, float(proj.max() - proj.min())


def subdivide(poly: np.ndarray, max_area: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut convex ``poly`` across its longest extent, near its centroid, until each part is <= ``max_area``."""
    if polygon_area(poly) <= max_area:
        return [poly]
    u, extent = _extent(poly)
    cut = float(poly.mean(axis=0) @ u) + extent * rng.uniform(-0.15, 0.15)
    parts = [clip_halfplane(poly, u, cut), clip_halfplane(poly, -u, -cut)]
    out = []
    for part in parts:
        if len(part) >= 3 and polygon_area(part) > 1.0:
            out.extend(subdivide(part, max_area, rng))
    return out


def _inside(poly: np.ndarray, xy: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """bool ``[N]``: points ``xy [N, 2]`` within ``margin`` of the convex ``poly`` (or inside it)."""
    inside = np.ones(len(xy), bool)
    for k in range(len(poly)):
        a, b = poly[k], poly[(k + 1) % len(poly)]
        edge = b - a
        outward = np.array([edge[1], -edge[0]]) / np.hypot(*edge)
        inside &= (xy - a) @ outward <= margin
    return inside


# -- the city ----------------------------------------------------------------------------
@dataclass
class City:
    """A generated city, before it is written.

    Attributes:
        params: its parameters.
        blocks: the blocks, convex rings ``[P, 2]`` [m] (plazas included).
        plazas: indices of the open blocks.
        footprints: one convex ring ``[P, 2]`` per building [m].
        heights: float64 ``[B]`` building heights [m].
        materials: ``[B]`` ITU material names.
        vehicles: float64 ``[V, 3]``: x, y [m] and heading [rad].
    """

    params: CityParams
    blocks: list[np.ndarray]
    plazas: list[int]
    footprints: list[np.ndarray]
    heights: np.ndarray
    materials: list[str]
    vehicles: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    terrain: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    def ground(self, xy: np.ndarray) -> np.ndarray:
        """float64 ``[N]``: the terrain height [m] at points ``xy [N, 2]`` (0 for a flat city).

        ``z = A / 3 * sum_k cos(2 pi <d_k, p> / lambda_k + phi_k)`` over the rows ``(dx, dy, lambda,
        phi)`` of :attr:`terrain` (``[3, 4]``), ``A`` = ``terrain_m``: gentle hills within ``± A``.
        """
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        z = np.zeros(len(xy))
        for dx, dy, wavelength, phase in self.terrain:
            z += np.cos(2 * np.pi * (xy[:, 0] * dx + xy[:, 1] * dy) / wavelength + phase)
        return self.params.terrain_m / 3 * z if len(self.terrain) else z

    def statistics(self) -> dict[str, Any]:
        """Building count, footprint share of the square, height mean / sd / p90 / min / max [m]."""
        area = sum(polygon_area(f) for f in self.footprints)
        h = self.heights if len(self.heights) else np.zeros(1)
        return {"buildings": len(self.footprints), "vehicles": len(self.vehicles), "blocks": len(self.blocks),
                "plazas": len(self.plazas), "footprint_share": round(area / self.params.size_m ** 2, 4),
                "height_m": {"mean": round(float(h.mean()), 2), "sd": round(float(h.std()), 2),
                             "p90": round(float(np.percentile(h, 90)), 2), "min": round(float(h.min()), 2),
                             "max": round(float(h.max()), 2)},
                "materials": {m: self.materials.count(m) for m in sorted(set(self.materials))}}


def _grid_cells(p: CityParams, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(cell ring [4, 2], street width per edge [4])`` of the (perturbed) grid."""
    half = p.size_m / 2
    n = max(1, round(p.size_m / p.block_m))
    lines = np.linspace(-half, half, n + 1)
    gx, gy = np.meshgrid(lines, lines, indexing="ij")  # node (i, j) at (lines[i], lines[j])
    if p.layout == "perturbed" and n > 1:
        jitter = rng.uniform(-0.15, 0.15, size=(2, n - 1, n - 1)) * (p.size_m / n)
        gx[1:-1, 1:-1] += jitter[0]
        gy[1:-1, 1:-1] += jitter[1]
        wx, wy = (p.street_width_m * rng.uniform(0.6, 1.4, size=(2, n + 1)))
    else:
        wx = wy = np.full(n + 1, p.street_width_m)
    cells = []
    for i in range(n):
        for j in range(n):
            ring = np.array([[gx[i, j], gy[i, j]], [gx[i + 1, j], gy[i + 1, j]],
                             [gx[i + 1, j + 1], gy[i + 1, j + 1]], [gx[i, j + 1], gy[i, j + 1]]])
            width = np.array([wy[j], wx[i + 1], wy[j + 1], wx[i]])
            cells.append((ring, width))
    return cells


def _voronoi_cells(p: CityParams, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(block ring, None)`` of the irregular layout: Voronoi cells of random seeds, already inset."""
    half = p.size_m / 2
    n = max(2, round((p.size_m / p.block_m) ** 2))
    seeds = rng.uniform(-half, half, size=(n, 2))
    square = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])

    def cell(i: int, widths: np.ndarray | None) -> np.ndarray:
        poly = square if widths is None else inset(square, p.street_width_m / 2)
        for j in range(n):
            if j == i:
                continue
            d = seeds[j] - seeds[i]
            dist = float(np.hypot(*d))
            offset = 0.5 * (seeds[j] @ seeds[j] - seeds[i] @ seeds[i]) / dist
            shift = 0.0 if widths is None else widths[min(i, j), max(i, j)] / 2
            poly = clip_halfplane(poly, d / dist, offset - shift)
            if len(poly) < 3:
                return np.zeros((0, 2))
        return poly

    for _ in range(2):  # Lloyd steps: blocks of more even size
        seeds = np.array([cell(i, None).mean(axis=0) for i in range(n)])
    widths = p.street_width_m * rng.uniform(0.6, 1.4, size=(n, n))
    return [(cell(i, widths), None) for i in range(n)]


def generate_city(params: CityParams) -> City:
    """The city of ``params`` (module docstring); deterministic in ``params``."""
    p = params
    rng = np.random.Generator(np.random.PCG64(p.seed))
    cells = _voronoi_cells(p, rng) if p.layout == "irregular" else _grid_cells(p, rng)
    blocks = []
    for ring, widths in cells:
        block = ring if widths is None else inset(ring, widths / 2)
        if len(block) >= 3 and polygon_area(block) > 4.0:
            blocks.append(block)
    plazas = [k for k in range(len(blocks)) if rng.random() < p.plazas]
    sigma2 = math.log(1.0 + (p.height_sd_m / p.height_mean_m) ** 2)
    mu = math.log(p.height_mean_m) - sigma2 / 2
    names, weights = list(p.materials), np.array(list(p.materials.values()))
    footprints, heights, materials = [], [], []
    for k, block in enumerate(blocks):
        lots = subdivide(block, p.lot_m ** 2, rng)
        if k in plazas:
            continue
        for lot in lots:
            built = rng.random() < p.density
            height = float(np.clip(rng.lognormal(mu, math.sqrt(sigma2)), MIN_HEIGHT_M, MAX_HEIGHT_M))
            material = names[int(rng.choice(len(names), p=weights / weights.sum()))]
            foot = inset(lot, p.setback_m)
            if built and len(foot) >= 3 and polygon_area(foot) >= 9.0:
                footprints.append(np.round(foot, 3))
                heights.append(round(height, 1))
                materials.append(material)
    vehicles = _place_vehicles(p, blocks, rng)
    terrain = np.zeros((0, 4))
    if p.terrain_m > 0:  # drawn last: a flat city's files do not depend on it
        angle = rng.uniform(0, 2 * np.pi, 3)
        terrain = np.c_[np.cos(angle), np.sin(angle), p.size_m * rng.uniform(0.6, 1.6, 3), rng.uniform(0, 2 * np.pi, 3)]
    return City(p, blocks, plazas, footprints, np.asarray(heights, dtype=np.float64), materials, vehicles,
                np.round(terrain, 6))


def _place_vehicles(p: CityParams, blocks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """``[V, 3]`` (x, y, heading): street points >= 1 m from every block and >= 6 m apart."""
    placed: list[tuple[float, float, float]] = []
    half = p.size_m / 2 - 3.0
    for _ in range(50 * p.vehicles):
        if len(placed) >= p.vehicles:
            break
        xy = rng.uniform(-half, half, size=(1, 2))
        if any(_inside(b, xy, margin=1.0 + VEHICLE_SIZE_M[0] / 2)[0] for b in blocks):
            continue
        if placed and min(math.hypot(xy[0, 0] - v[0], xy[0, 1] - v[1]) for v in placed) < 6.0:
            continue
        best, heading = math.inf, 0.0  # along the nearest block edge
        for b in blocks:
            for k in range(len(b)):
                a, e = b[k], b[(k + 1) % len(b)] - b[k]
                t = float(np.clip((xy[0] - a) @ e / (e @ e), 0, 1))
                d = float(np.hypot(*(a + t * e - xy[0])))
                if d < best:
                    best, heading = d, math.atan2(e[1], e[0])
        placed.append((float(xy[0, 0]), float(xy[0, 1]), heading))
    return np.round(np.asarray(placed, dtype=np.float64).reshape(-1, 3), 3)


# -- meshes and files -----------------------------------------------------------------------
def prism(footprint: np.ndarray, height: float, base: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices float32 [2P, 3], faces int32 [3P - 2, 3])``: walls and roof of a convex footprint prism.

    The bottom is left open (the ground closes it). Faces are counter-clockwise seen from outside.
    """
    n = len(footprint)
    bottom = np.c_[footprint, np.full(n, base)]
    top = np.c_[footprint, np.full(n, height)]
    vertices = np.concatenate([bottom, top]).astype(np.float32)
    faces = []
    for k in range(n):
        m = (k + 1) % n
        faces += [(k, m, n + m), (k, n + m, n + k)]
    faces += [(n, n + k, n + k + 1) for k in range(1, n - 1)]
    return vertices, np.asarray(faces, dtype=np.int32)


def ply_bytes(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """A binary little-endian PLY of float32 ``vertices [N, 3]`` and triangles ``faces [M, 3]``."""
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(vertices)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n").encode()
    tri = np.zeros(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    tri["n"], tri["v"] = 3, faces
    return header + np.ascontiguousarray(vertices, dtype="<f4").tobytes() + tri.tobytes()


def _box(x: float, y: float, heading: float, z: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    length, width, height = VEHICLE_SIZE_M
    c, s = math.cos(heading), math.sin(heading)
    local = np.array([[-length, -width], [length, -width], [length, width], [-length, width]]) / 2
    ring = local @ np.array([[c, s], [-s, c]]) + [x, y]
    v, f = prism(ring, z + height, z + 0.3)  # on its wheels: 30 cm above the road
    bottom = [(0, 2, 1), (0, 3, 2)]
    return v, np.concatenate([f, np.asarray(bottom, dtype=np.int32)])


def ground_mesh(city: City) -> tuple[np.ndarray, np.ndarray]:
    """The ground: the square at z = 0 (two triangles), or with terrain a height field of about
    :data:`TERRAIN_STEP_M` cells, ``z = city.ground(x, y)``."""
    half = city.params.size_m / 2
    n = 1 if not len(city.terrain) else max(2, round(city.params.size_m / TERRAIN_STEP_M))
    ticks = np.linspace(-half, half, n + 1)
    gx, gy = np.meshgrid(ticks, ticks, indexing="xy")  # vertex (i, j) at (ticks[j], ticks[i]) is i * (n + 1) + j
    xy = np.c_[gx.ravel(), gy.ravel()]
    vertices = np.c_[xy, city.ground(xy)].astype(np.float32)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    a = (i * (n + 1) + j).ravel()
    faces = np.concatenate([np.c_[a, a + 1, a + n + 2], np.c_[a, a + n + 2, a + n + 1]]).astype(np.int32)
    return vertices, faces


def city_files(city: City, name: str) -> dict[str, bytes]:
    """Every file of the scene folder but the manifest and the sites: ``{relative path: bytes}``.

    On terrain a building stands from 0.5 m below the lowest ground under its footprint to its
    height above the highest (its walls reach into the hill); a vehicle sits on the ground at its centre.
    """
    files = {"meshes/ground.ply": ply_bytes(*ground_mesh(city))}
    shapes = [("ground", GROUND_MATERIAL)]
    for k, (foot, h, mat) in enumerate(zip(city.footprints, city.heights, city.materials, strict=True)):
        if len(city.terrain):
            under = city.ground(np.concatenate([foot, foot.mean(axis=0, keepdims=True)]))
            base, top = float(under.min()) - 0.5, float(under.max()) + float(h)
        else:
            base, top = 0.0, float(h)
        files[f"meshes/building_{k:03d}.ply"] = ply_bytes(*prism(foot, top, base))
        shapes.append((f"building_{k:03d}", mat))
    for k, (x, y, heading) in enumerate(city.vehicles):
        files[f"meshes/vehicle_{k:03d}.ply"] = ply_bytes(*_box(x, y, heading, float(city.ground([[x, y]])[0])))
        shapes.append((f"vehicle_{k:03d}", VEHICLE_MATERIAL))
    used = sorted({m for _, m in shapes})
    lines = ['<scene version="2.1.0">', f"<!-- procedural city {name}: python -m core make-city -->", ""]
    for m in used:
        lines += [f'\t<bsdf type="itu-radio-material" id="itu_{m}">', f'\t\t<string name="type" value="{m}"/>',
                  f'\t\t<float name="thickness" value="{THICKNESS_M}"/>', "\t</bsdf>"]
    lines.append("")
    for shape, m in shapes:
        lines += [f'\t<shape type="ply" id="mesh-{shape}">',
                  f'\t\t<string name="filename" value="meshes/{shape}.ply"/>',
                  '\t\t<boolean name="face_normals" value="true"/>', f'\t\t<ref id="itu_{m}" name="bsdf"/>',
                  "\t</shape>"]
    lines.append("</scene>\n")
    files[f"{name}.xml"] = "\n".join(lines).encode()
    return dict(sorted(files.items()))


def digest_of(files: dict[str, bytes]) -> tuple[dict[str, str], str]:
    """``({path: sha256}, sha256 over the sorted "path sha256" lines)``."""
    each = {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())}
    whole = hashlib.sha256("".join(f"{p} {d}\n" for p, d in each.items()).encode()).hexdigest()
    return each, whole


def manifest(city: City, name: str, files: dict[str, bytes], sites: dict[str, Any] | None) -> dict[str, Any]:
    """The ``city.json`` record: no time, no host, so it too is the same for the same parameters."""
    each, whole = digest_of(files)
    return {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "name": name,
            "params": city.params.model_dump(), **city.statistics(), "sites": sites,
            "files": each, "digest": whole}


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a city folder, or None when there is none or it is not one."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == MANIFEST_KIND else None


def is_valid_city(folder: str | Path) -> bool:
    """Whether ``folder`` holds a complete city: a manifest whose every file digest matches."""
    data = read_manifest(folder)
    if data is None:
        return False
    for path, want in (data.get("files") or {}).items():
        try:
            if hashlib.sha256((Path(folder) / path).read_bytes()).hexdigest() != want:
                return False
        except OSError:
            return False
    return bool(data.get("files"))


def _own(name: str):
    allowed = {f"{name}.xml", "meshes", MANIFEST, f"{name}.sites.yaml"}
    return lambda entry: entry in allowed


def place_city_sites(folder: Path, name: str, num_sites: int, spacing: float) -> dict[str, Any]:
    """Run ``place-sites`` (greedy line-of-sight rooftop sites over the whole square) on the city in
    ``folder`` and write ``<name>.sites.yaml`` there; returns ``{num_sites, los_coverage}``."""
    from core.raytracing.generation import MapSettings, map_area
    from core.raytracing.scenes import SceneInfo, buildings_of, load_scene, scene_bbox
    from core.raytracing.site_placement import place_sites, write_sites_yaml

    info = SceneInfo(name, "user", folder / f"{name}.xml")
    scene = load_scene(info)
    settings, _, area = map_area(MapSettings(), scene_bbox(scene))
    roofs = [b for b in buildings_of(scene) if not b.name.startswith("vehicle_")]  # no mast on a car
    placement = place_sites(scene, roofs, area, num_sites, spacing,
                            settings.propagation.radio.rx_height_m)
    del scene
    description = (f"greedy line-of-sight max-coverage layout (place-sites, called by make-city): {num_sites} of "
                   f"{placement.num_candidates} rooftop candidates; outdoor points seen ({spacing:g} m grid, "
                   f"{placement.num_targets} points): {placement.los_coverage[-1]:.1%}")
    write_sites_yaml(folder / f"{name}.sites.yaml", name, placement, description)
    return {"num_sites": num_sites, "spacing_m": spacing, "los_coverage": round(placement.los_coverage[-1], 4)}


def write_city(params: CityParams, scenes_dir: str | Path, name: str, force: bool = False,
               num_sites: int = 5, site_spacing: float = 4.0) -> tuple[Path, dict[str, Any]]:
    """Generate the city of ``params`` and write it to ``<scenes_dir>/<name>/`` (module docstring).

    Returns ``(folder, manifest)``. Refuses a shipped or unwritable path, an existing folder
    without ``force``, and with ``force`` a folder holding anything else than a city's files.
    """
    from core.stores.atomic import atomic_path
    from core.stores.lock import output_lock
    from core.stores.output import check_new, check_replaceable, check_writable

    folder = Path(scenes_dir) / name
    check_writable(folder, "--out")
    with output_lock(folder, "--out"):
        check_new(folder, force)
        if force:
            check_replaceable(folder, _own(name), "a city's files", "--out")
        city = generate_city(params)
        files = city_files(city, name)
        with atomic_path(folder) as tmp:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
            sites = place_city_sites(tmp, name, num_sites, site_spacing) if num_sites > 0 else None
            record = manifest(city, name, files, sites)
            (tmp / MANIFEST).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return folder, record


# -- command line ------------------------------------------------------------------------
_NAME_HELP = "scene name (default city_<seed>): the city goes to <out>/<name>/<name>.xml"


def add_city_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator's parameters as flags (shared with ``make-corpus``)."""
    d = CityParams()
    parser.add_argument("--size-m", type=cli_types.positive, default=d.size_m, help="side of the square [m] (32 to 512)")
    parser.add_argument("--layout", choices=["grid", "perturbed", "irregular"], default=d.layout)
    parser.add_argument("--block-m", type=cli_types.positive, default=d.block_m, help="block size, street to street [m]")
    parser.add_argument("--street-width-m", type=cli_types.positive, default=d.street_width_m, help="mean street width [m]")
    parser.add_argument("--lot-m", type=cli_types.positive, default=d.lot_m, help="largest lot edge [m]")
    parser.add_argument("--density", type=cli_types.fraction, default=d.density, help="probability a lot is built")
    parser.add_argument("--height-mean-m", type=cli_types.positive, default=d.height_mean_m)
    parser.add_argument("--height-sd-m", type=cli_types.non_negative, default=d.height_sd_m)
    parser.add_argument("--setback-m", type=cli_types.positive, default=d.setback_m, help="footprint inset from its lot [m]")
    parser.add_argument("--plazas", type=cli_types.fraction, default=d.plazas, help="share of blocks left open")
    parser.add_argument("--vehicles", type=cli_types.non_negative_int, default=d.vehicles, help="box vehicles in the streets")
    parser.add_argument("--terrain-m", type=cli_types.number(0.0, 50.0), default=d.terrain_m,
                        help="hills: ground height within ± this [m] (0: flat)")
    parser.add_argument("--materials", default=",".join(f"{k}={v:g}" for k, v in d.materials.items()),
                        help=f"material mix, e.g. concrete=0.5,brick=0.3,glass (known: {', '.join(BUILDING_MATERIALS)})")
    parser.add_argument("--sites", type=cli_types.non_negative_int, default=5,
                        help="rooftop sites placed by place-sites (0: none, the automatic layout)")
    parser.add_argument("--site-spacing", type=cli_types.positive, default=4.0, help="place-sites target grid [m]")


def params_from_args(args: argparse.Namespace, seed: int) -> CityParams:
    keys = ("size_m", "layout", "block_m", "street_width_m", "lot_m", "density", "height_mean_m", "height_sd_m",
            "setback_m", "plazas", "vehicles", "terrain_m")
    values = {k: getattr(args, k) for k in keys}
    return params_from({"seed": seed, **values, "materials": parse_materials(args.materials)})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=cli_types.seed, required=True)
    parser.add_argument("--out", required=True, help="the scenes folder (what --scenes-dir reads)")
    parser.add_argument("--name", default=None, help=_NAME_HELP)
    parser.add_argument("--force", action="store_true", help="replace an existing city of that name")
    add_city_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from core.raytracing.scenes import valid_name

    params = params_from_args(args, int(args.seed))
    name = args.name or f"city_{args.seed}"
    if not valid_name(name):
        raise CoreError(f"--name {name!r}: use letters, digits, '_', '.', '-'")
    t0 = time.perf_counter()
    folder, record = write_city(params, args.out, name, args.force, int(args.sites), float(args.site_spacing))
    h = record["height_m"]
    sites = record["sites"]
    seen = f"; {sites['num_sites']} sites see {sites['los_coverage']:.1%} of the outdoor points" if sites else ""
    print(f"{name}: {record['buildings']} buildings, footprint share {record['footprint_share']:.1%}, height "
          f"{h['mean']:.1f} ± {h['sd']:.1f} m (p90 {h['p90']:.1f}){seen}; {time.perf_counter() - t0:.1f} s; "
          f"wrote {folder} (--scenes-dir {args.out})")
    return 0
