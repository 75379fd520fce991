"""The world the UEs measure in: a perturbed COPY of the map's scene (the record: :mod:`core.stores.world_model`).

The radio map is never regenerated: it stays the digital twin, and the dataset's reports
are traced in a world that differs from it as :class:`~core.stores.world_model.WorldModel`
says. Every perturbation draws from its own stream ``SeedSequence([world.seed, k])``, so
turning one on or off leaves the others' draws as they were, and none touches the
dataset's own ``--seed`` stream (walks, noise, split): the oracle world is bit-identical
to a dataset made before worlds existed.

Scene (:func:`world_scene`), in this order:

* sites: site ``s`` of the map at ``(x_s, y_s, z_s)`` stands in the world at
  ``(x_s + e_x, y_s + e_y, z_s)``, ``e ~ N(0, sigma_pos^2)`` per axis, with its antenna
  rotated by a mechanical azimuth and tilt error each ``~ N(0, sigma_ori^2)``
  (Sionna's orientation ``(alpha, beta, 0)``: yaw about z, then tilt about y);
* antenna: the world's electrical down-tilt is the map's + ``downtilt_error_deg`` (one
  value for all sites: the configured tilt differs from the planning tool's);
* building heights: building ``b`` (the objects sharing a name up to ``-itu_<material>``,
  as :func:`core.raytracing.scenes.buildings_of`) with base ``z0`` and top ``z1`` is
  scaled vertically about its base, ``z' = z0 + f (z - z0)``, ``f = max(0.3, (z1 - z0 +
  e_h) / (z1 - z0))``, ``e_h ~ N(0, sigma_h^2)`` (the scaling of Sionna's
  ``SceneObject.scaling`` about the base instead of the centre, done on the vertex
  buffers of all buildings at once: one acceleration-structure update);
* removed buildings: ``round(fraction * B)`` buildings drawn without replacement are
  left out (``Scene.edit(remove=...)``);
* vehicles: ``round(density * area)`` copies (``SceneObject.clone``) of Sionna's
  low-poly car (4.4 x 1.8 x 1.5 m, ITU metal) at uniform random outdoor ground points
  of the map's area with uniform random heading (a spot under a roof or with a corner in
  a wall is drawn again), added in the same ``Scene.edit`` call;
* materials: each radio material's relative permittivity and conductivity times
  independent factors ``U[1 - a, 1 + a]`` (permittivity kept >= 1), sorted by name;
* diffuse scattering: every material gets scattering coefficient ``S`` and the world's
  PathSolver traces diffuse reflections (:func:`world_propagation`); the map has none.

Buildings that carry a site (a site's xy inside the footprint's convex hull or within 2 m of it) are neither
resized nor removed: a site's building is surveyed with the site.

Shadow fading (:class:`ShadowField`), per site ``s`` a stationary Gaussian field over the
plane with the exponential (Gudmundson) correlation ``rho(d) = exp(-d / d_cor)``, added to
the traced path gain ``G_s(p) += sigma(p, s) X_s(p)``, ``sigma = sigma_LOS`` on a
line-of-sight link and ``sigma_NLOS`` otherwise. ``X_s`` is a sum of ``F`` random Fourier
features, ``X(p) = sqrt(2 / F) sum_f cos(k_f . p + phi_f)``, ``phi_f ~ U[0, 2 pi)``, ``k_f``
drawn from the exponential covariance's 2-D spectral density: uniform direction and
``|k| = sqrt((1 - u)^-2 - 1) / d_cor``, ``u ~ U[0, 1)`` (the inverse of its radial CDF
``1 - (1 + d_cor^2 |k|^2)^-1/2``), so ``E[X(p) X(p')] = exp(-|p - p'| / d_cor)`` exactly and
``X`` tends to a Gaussian field as ``F`` grows. It is a function of position: every report
of every walk sees the same field.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from core.errors import CoreError
from core.stores.world_model import WorldModel

#: the perturbations' streams: SeedSequence([world.seed, STREAMS[name]])
STREAMS = {"sites": 1, "heights": 2, "remove": 3, "vehicles": 4, "materials": 5, "shadowing": 6}
SHADOW_FEATURES = 512
MIN_HEIGHT_FACTOR = 0.3
SITE_MARGIN_M = 2.0  # a building within this of a site's xy carries it
VEHICLE_MATERIAL = "metal"


def stream(world: WorldModel, name: str) -> np.random.Generator:
    """The perturbation ``name``'s own random generator."""
    return np.random.default_rng(np.random.SeedSequence([int(world.seed), STREAMS[name]]))


# -- sites and antennas ----------------------------------------------------------------------
def world_sites(sites: list[dict[str, Any]], world: WorldModel) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The world's sites ``[{"name", "position"}]`` and their antenna orientations ``[S, 3]`` [rad]."""
    rng = stream(world, "sites")
    n = len(sites)
    offset = rng.normal(0.0, 1.0, (n, 2)) * world.site_position_sigma_m
    orientation = np.zeros((n, 3))
    orientation[:, :2] = np.radians(rng.normal(0.0, 1.0, (n, 2)) * world.site_orientation_sigma_deg)
    out = []
    for s, site in enumerate(sites):
        x, y, z = (float(v) for v in site["position"])
        out.append({"name": site["name"], "position": [x + offset[s, 0], y + offset[s, 1], z]})
    return out, orientation


def world_propagation(propagation, world: WorldModel):
    """The PathSolver settings of the world: the map's, with diffuse reflection when ``S > 0``."""
    return replace(propagation, diffuse_reflection=True) if world.scattering_coefficient > 0 else propagation


# -- the scene -------------------------------------------------------------------------------
def world_scene(info, sites: list[dict[str, Any]], radio, world: WorldModel, bounds) -> tuple[Any, dict[str, Any]]:
    """The scene the UEs measure in and what was drawn for it (``realisation``, JSON).

    ``sites``: the MAP's sites; ``radio``: the map's radio; ``bounds``: the map's area
    ``(x_min, y_min, x_max, y_max)`` (vehicles go there). The oracle world is exactly
    :func:`~core.raytracing.tracing.build_scene` of the map's sites.
    """
    import mitsuba as mi

    from core.raytracing.tracing import build_scene

    if world.is_oracle:
        return build_scene(info, sites, radio), {}
    placed, orientation = world_sites(sites, world)
    scene = build_scene(info, placed, replace(radio, downtilt_deg=radio.downtilt_deg + world.downtilt_error_deg))
    for s, site in enumerate(placed):
        scene.transmitters[site["name"]].orientation = mi.Point3f(*(float(v) for v in orientation[s]))
    realisation: dict[str, Any] = {
        "site_offsets_m": [[round(float(p["position"][i]) - float(q["position"][i]), 4) for i in (0, 1)]
                           for p, q in zip(placed, sites, strict=True)],
        "site_orientation_deg": np.degrees(orientation).round(4).tolist(),
        "downtilt_deg": float(radio.downtilt_deg + world.downtilt_error_deg)}
    groups = _building_groups(scene, [s["position"] for s in sites])
    if world.height_sigma_m > 0:
        realisation["height_change_m"] = _perturb_heights(scene, groups, world)
    removed = _removed(groups, world)
    cars = _vehicles(scene, world, bounds) if world.vehicle_density_per_km2 > 0 else []
    if removed or cars:
        scene.edit(add=cars or None, remove=[name for b in removed for name in groups[b]["objects"]] or None)
    realisation["removed_buildings"] = removed
    realisation["vehicles"] = len(cars)
    if world.material_spread > 0:
        realisation["materials"] = _perturb_materials(scene, world)
    if world.scattering_coefficient > 0:
        for mat in scene.radio_materials.values():
            mat.scattering_coefficient = float(world.scattering_coefficient)
    return scene, realisation


def _building_groups(scene, site_positions) -> dict[str, dict[str, Any]]:
    """``{building: {"objects": [names], "base", "top", "carries_site"}}`` of the buildings of
    :func:`~core.raytracing.scenes.buildings_of` (flat objects left out), sorted by name."""
    from core.raytracing.scenes import building_name, buildings_of

    objects: dict[str, list[str]] = {}
    for name in sorted(scene.objects):
        objects.setdefault(building_name(name), []).append(name)
    sites_xy = np.asarray([[float(p[0]), float(p[1])] for p in site_positions]).reshape(-1, 2)
    groups = {}
    for b in sorted(buildings_of(scene), key=lambda b: b.name):
        groups[b.name] = {"objects": objects[b.name], "base": float(b.base), "top": float(b.height),
                          "carries_site": bool(_inside_hull(np.asarray(b.footprint), sites_xy).any())}
    return groups


def _inside_hull(hull: np.ndarray, xy: np.ndarray, margin_m: float = SITE_MARGIN_M) -> np.ndarray:
    """bool ``[N]``: points ``xy [N, 2]`` inside the counter-clockwise convex ring ``hull [P, 2]`` or
    within ``margin_m`` of it (a site on a facade mount stands just outside its footprint)."""
    if len(hull) < 3 or len(xy) == 0:
        return np.zeros(len(xy), bool)
    a, b = hull, np.roll(hull, -1, axis=0)
    e = b - a  # [P, 2]
    rel = xy[:, None, :] - a[None]  # [N, P, 2]
    cross = e[None, :, 0] * rel[..., 1] - e[None, :, 1] * rel[..., 0]
    t = np.clip((rel * e[None]).sum(-1) / np.maximum((e * e).sum(-1), 1e-12)[None], 0.0, 1.0)
    dist = np.linalg.norm(rel - t[..., None] * e[None], axis=-1).min(1)
    return (cross >= 0).all(1) | (dist <= margin_m)


def _perturb_heights(scene, groups, world: WorldModel) -> dict[str, float]:
    """Scale every building without a site vertically about its base (module docstring); ``{building: e_h}``."""
    import drjit as dr
    import mitsuba as mi

    rng = stream(world, "heights")
    names = list(groups)
    draws = rng.normal(0.0, world.height_sigma_m, len(names))  # one per building, sites or not: stable draws
    params = scene.mi_scene_params
    changed = {}
    for building, dh in zip(names, draws, strict=True):
        g = groups[building]
        if g["carries_site"]:
            continue
        span = g["top"] - g["base"]
        f = max(MIN_HEIGHT_FACTOR, (span + dh) / span)
        for obj_name in g["objects"]:
            key = scene.objects[obj_name].mi_mesh.id() + ".vertex_positions"
            v = np.asarray(params[key], dtype=np.float64).reshape(-1, 3)
            v[:, 2] = g["base"] + f * (v[:, 2] - g["base"])
            params[key] = dr.ravel(mi.Point3f(mi.Float(v[:, 0]), mi.Float(v[:, 1]), mi.Float(v[:, 2])))
        changed[building] = round(float(span * (f - 1.0)), 4)
    params.update()
    scene.scene_geometry_updated()
    return changed


def _removed(groups, world: WorldModel) -> list[str]:
    """The buildings left out of the world: ``round(fraction * B)`` of those without a site."""
    if world.remove_fraction <= 0:
        return []
    rng = stream(world, "remove")
    free = [b for b, g in groups.items() if not g["carries_site"]]
    count = min(len(free), int(round(world.remove_fraction * len(groups))))
    return sorted(free[i] for i in rng.choice(len(free), count, replace=False)) if count else []


def _vehicles(scene, world: WorldModel, bounds) -> list:
    """Cars on outdoor ground points of ``bounds`` (module docstring), not yet in the scene."""
    import mitsuba as mi

    from core.raytracing.sionna_rt import import_sionna_rt
    from core.raytracing.terrain import ground_height
    from core.raytracing.tracing import indoor_mask

    rt = import_sionna_rt()
    rng = stream(world, "vehicles")
    x_min, y_min, x_max, y_max = (float(b) for b in bounds)
    count = int(round(world.vehicle_density_per_km2 * (x_max - x_min) * (y_max - y_min) / 1e6))
    if count == 0:
        return []
    half = np.array([2.2, 0.9])  # the car's half length and width [m]
    spots = np.empty((0, 4))  # x, y, ground z, heading
    for _ in range(50):
        m = 2 * (count - len(spots)) + 16
        xy = np.stack([rng.uniform(x_min, x_max, m), rng.uniform(y_min, y_max, m)], 1)
        heading = rng.uniform(-np.pi, np.pi, m)
        ground = ground_height(scene, xy)
        c, s = np.cos(heading), np.sin(heading)
        corners = [xy]
        for sx, sy in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            dx, dy = sx * half[0], sy * half[1]
            corners.append(xy + np.stack([c * dx - s * dy, s * dx + c * dy], 1))
        pts = np.concatenate([np.concatenate([p, (ground + 0.3)[:, None]], 1) for p in corners])
        ok = ~indoor_mask(scene, pts).reshape(5, m).any(0)
        spots = np.concatenate([spots, np.stack([xy[:, 0], xy[:, 1], ground, heading], 1)[ok]])[:count]
        if len(spots) >= count:
            break
    if len(spots) < count:
        raise CoreError(f"world: could only place {len(spots)} of {count} vehicles on outdoor ground")
    material = rt.ITURadioMaterial("world-vehicle-metal", VEHICLE_MATERIAL, thickness=0.01)
    template = rt.SceneObject(fname=rt.scene.low_poly_car, name="world-vehicle-0", radio_material=material)
    z_half = float(template.lcs_half_extents[2][0]) if np.ndim(template.lcs_half_extents[2]) else 0.75
    cars = []
    for i, (x, y, z, heading) in enumerate(spots):
        car = template if i == 0 else template.clone(name=f"world-vehicle-{i}")
        car.orientation = mi.Point3f(float(heading), 0.0, 0.0)
        car.position = mi.Point3f(float(x), float(y), float(z) + z_half)
        cars.append(car)
    return cars


def _perturb_materials(scene, world: WorldModel) -> dict[str, list[float]]:
    """Scale each material's permittivity and conductivity (module docstring); ``{name: [eps_r, sigma]}``."""
    rng = stream(world, "materials")
    a = world.material_spread
    out = {}
    for name, mat in sorted(scene.radio_materials.items()):
        f_eps, f_sigma = rng.uniform(1.0 - a, 1.0 + a, 2)
        if not hasattr(mat, "relative_permittivity"):
            continue
        eps, sigma = float(mat.relative_permittivity[0]), float(mat.conductivity[0])
        mat.frequency_update_callback = None  # keep the scaled values: no ITU recomputation at the carrier
        mat.relative_permittivity = max(1.0, eps * f_eps)
        mat.conductivity = sigma * f_sigma
        out[name] = [float(max(1.0, eps * f_eps)), float(sigma * f_sigma)]
    return out


# -- shadow fading ---------------------------------------------------------------------------
class ShadowField:
    """Per-site unit Gaussian fields with exponential correlation (module docstring).

    ``unit(xy [M, 2]) -> [M, S]`` (unit variance), ``db(xy, los [M, S]) -> [M, S]`` [dB].
    """

    def __init__(self, world: WorldModel, num_sites: int, features: int = SHADOW_FEATURES):
        rng = stream(world, "shadowing")
        d = world.shadowing_decorrelation_m
        u = rng.random((num_sites, features))
        radius = np.sqrt((1.0 - u) ** -2 - 1.0) / d
        angle = rng.uniform(0.0, 2 * np.pi, (num_sites, features))
        self.k = np.stack([radius * np.cos(angle), radius * np.sin(angle)], -1)  # [S, F, 2] rad/m
        self.phase = rng.uniform(0.0, 2 * np.pi, (num_sites, features))  # [S, F]
        self.world = world

    def unit(self, xy: np.ndarray, chunk: int = 4096) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        s_n, f_n = self.phase.shape
        out = np.empty((len(xy), s_n))
        for start in range(0, len(xy), chunk):
            p = xy[start:start + chunk]
            arg = np.einsum("mc,sfc->msf", p, self.k) + self.phase[None]
            out[start:start + chunk] = math.sqrt(2.0 / f_n) * np.cos(arg).sum(-1)
        return out

    def db(self, xy: np.ndarray, los: np.ndarray) -> np.ndarray:
        sigma = np.where(np.asarray(los, bool), self.world.shadowing_los_db, self.world.shadowing_nlos_db)
        return self.unit(xy) * sigma


def shadowed(traced: dict[str, np.ndarray], xyz: np.ndarray, field: ShadowField | None) -> dict[str, np.ndarray]:
    """``traced`` (:func:`~core.raytracing.tracing.trace_points`) with the shadow fading added to its
    finite path gains (in place); unchanged without a field."""
    if field is not None:
        pg = traced["path_gain"]
        add = field.db(np.asarray(xyz)[:, :2], traced["los"]).astype(pg.dtype)
        traced["path_gain"] = np.where(np.isfinite(pg), pg + add, pg)
    return traced
