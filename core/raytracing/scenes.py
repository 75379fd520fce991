"""Scenes: the catalogue of ray-traceable scenes, their geometry and their site layouts.

A scene is a Mitsuba XML file that Sionna RT can load: either one of Sionna's
built-in scenes (``etoile``, ``munich``, ``simple_street_canyon`` ...) or a user
scene in the scenes folder (``scenes/`` by default, ``$CORE_SCENES_DIR`` or
``scenes_dir=``), laid out as ``<dir>/<name>.xml`` or ``<dir>/<name>/<name>.xml``.

Names are validated (letters, digits, ``_ . -``); a scene given as a path must
resolve inside the scenes folder, so a job can never read files elsewhere.

Geometry for drawing (:func:`scene_geometry`) needs no ray tracing: each building
is the union of the scene objects sharing a name up to its ``-itu_<material>``
suffix; its footprint is the convex hull of its vertices projected onto the xy
plane (``[P, 2]``, metres, scene frame, counter-clockwise ring, not closed), its
``height`` the top z and ``base`` the bottom z. Flat objects (z extent < 0.5 m,
i.e. the ground plane and road markings) are skipped, and so is an object named ``ground*`` or
``terrain*`` (a hilly ground).

Site layout (:func:`site_layout`): ``configs/sites/<scene>.yaml`` if it exists, else, for a
user scene, its own ``<name>.sites.yaml`` beside its XML (``make-city`` writes one), else
the automatic layout of :func:`automatic_layout` (documented in ``docs/maps.md``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core import REPO_ROOT
from core.errors import ConfigError, CoreError

DEFAULT_SCENES_DIR = REPO_ROOT / "scenes"
SITES_CONFIG_DIR = REPO_ROOT / "configs" / "sites"
SCENES_DIR_ENV = "CORE_SCENES_DIR"

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_MATERIAL_SUFFIX_RE = re.compile(r"-itu_[A-Za-z0-9_]+$")
_FLAT_EXTENT_M = 0.5  # objects thinner than this (ground, markings) are not buildings
_GROUND_RE = re.compile(r"^(ground|terrain)", re.IGNORECASE)  # nor is a hilly ground (make-city --terrain-m)

# Automatic layout defaults (see docs/maps.md)
DEFAULT_NUM_SITES = 5
DEFAULT_MAST_HEIGHT_M = 3.0  # antenna above the roof it stands on
FACADE_OFFSET_M = 1.0
DEFAULT_AREA_SIZE_M = 512.0  # layouts cover the scene-centred square of this size


@dataclass(frozen=True)
class SceneInfo:
    """One entry of the scene catalogue.

    Attributes:
        name: scene name, used on the command line and in store names.
        source: ``"builtin"`` (shipped with Sionna RT) or ``"user"`` (scenes folder).
        path: the scene's XML file.
    """

    name: str
    source: str
    path: Path


@dataclass
class Building:
    """A building for drawing: a prism ``footprint x [base, height]``.

    Attributes:
        name: object name without its material suffix.
        footprint: float64 ``[P, 2]`` convex-hull ring in the xy plane [m, scene frame].
        height: top z [m].
        base: bottom z [m].
    """

    name: str
    footprint: np.ndarray
    height: float
    base: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "footprint": self.footprint.tolist(), "height": self.height, "base": self.base}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Building:
        return cls(str(d["name"]), np.asarray(d["footprint"], dtype=np.float64).reshape(-1, 2),
                   float(d["height"]), float(d["base"]))


@dataclass
class SceneGeometry:
    """What the app needs to draw a scene without ray tracing.

    Attributes:
        name: scene name.
        buildings: one :class:`Building` per building.
        bbox: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` of the whole scene [m].
        sites: the site layout, ``[{"name", "position": [x, y, z]}, ...]``.
    """

    name: str
    buildings: list[Building]
    bbox: tuple[float, float, float, float, float, float]
    sites: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "buildings": [b.to_dict() for b in self.buildings],
                "bbox": list(self.bbox), "sites": self.sites}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneGeometry:
        return cls(str(d["name"]), [Building.from_dict(b) for b in d["buildings"]],
                   tuple(float(v) for v in d["bbox"]), list(d.get("sites") or []))


# -- catalogue -------------------------------------------------------------------------
def valid_name(name: str) -> bool:
    """Whether ``name`` is a valid scene name (letters, digits, ``_ . -``; not starting with ``.`` or ``-``)."""
    return bool(_NAME_RE.match(str(name)))


def builtin_scenes_dir() -> Path:
    """Folder of Sionna RT's built-in scenes (found without importing Sionna)."""
    spec = importlib.util.find_spec("sionna")
    if spec is None or not spec.submodule_search_locations:
        raise CoreError("sionna is not installed: run `make install`")
    return Path(list(spec.submodule_search_locations)[0]) / "rt" / "scenes"


def scenes_folder(scenes_dir: str | os.PathLike | None = None) -> Path:
    """The user scenes folder: ``scenes_dir``, else ``$CORE_SCENES_DIR``, else ``scenes/``."""
    return Path(scenes_dir or os.environ.get(SCENES_DIR_ENV) or DEFAULT_SCENES_DIR)


def _builtin() -> dict[str, SceneInfo]:
    root = builtin_scenes_dir()
    found = {}
    if root.is_dir():
        for sub in sorted(root.iterdir()):
            xml = sub / f"{sub.name}.xml"
            if sub.is_dir() and xml.is_file():
                found[sub.name] = SceneInfo(sub.name, "builtin", xml)
    return found


def user_scenes(scenes_dir: str | os.PathLike | None) -> dict[str, SceneInfo]:
    root = scenes_folder(scenes_dir)
    found: dict[str, SceneInfo] = {}
    if not root.is_dir():
        return found
    for entry in sorted(root.iterdir()):
        if entry.is_file() and entry.suffix == ".xml":
            xml = entry
        elif entry.is_dir() and (entry / f"{entry.name}.xml").is_file():
            xml = entry / f"{entry.name}.xml"
        else:
            continue
        name = xml.stem
        if _NAME_RE.match(name):
            found.setdefault(name, SceneInfo(name, "user", xml))
    return found


def list_scenes(scenes_dir: str | os.PathLike | None = None) -> list[SceneInfo]:
    """Every built-in scene, then every user scene in ``scenes_dir`` (built-in names win)."""
    scenes = _builtin()
    for name, info in user_scenes(scenes_dir).items():
        scenes.setdefault(name, info)
    return list(scenes.values())


def resolve_scene(name: str, scenes_dir: str | os.PathLike | None = None) -> SceneInfo:
    """The :class:`SceneInfo` of scene ``name`` (a catalogue name or an XML path).

    A path must resolve inside the scenes folder. Unknown names and paths outside the
    folder are :class:`CoreError` naming the scene and listing the known ones.
    """
    name = str(name)
    if name.endswith(".xml") or "/" in name or os.sep in name:
        root = scenes_folder(scenes_dir).resolve()
        path = Path(name)
        path = (path if path.is_absolute() else root / path).resolve()
        if root != path and root not in path.parents:
            raise CoreError(f"scene {name!r}: path is outside the scenes folder {root}")
        if not path.is_file():
            raise CoreError(f"scene {name!r}: no such file {path}")
        if not _NAME_RE.match(path.stem):
            raise CoreError(f"scene {name!r}: file name must use letters, digits, '_', '.', '-'")
        return SceneInfo(path.stem, "user", path)
    if not _NAME_RE.match(name):
        raise CoreError(f"scene {name!r}: invalid name (use letters, digits, '_', '.', '-')")
    scenes = {s.name: s for s in list_scenes(scenes_dir)}
    if name not in scenes:
        raise CoreError(f"unknown scene {name!r} (known scenes: {', '.join(scenes)})")
    return scenes[name]


def load_scene(info: SceneInfo):
    """Load a scene into Sionna RT with every object kept apart (``merge_shapes=False``).

    A file Mitsuba cannot parse is a :class:`CoreError` naming it.
    """
    from core.raytracing.sionna_rt import import_sionna_rt

    rt = import_sionna_rt()
    try:
        return rt.load_scene(str(info.path), merge_shapes=False)
    except Exception as exc:  # Mitsuba raises RuntimeError with a long, multi-line message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CoreError(f"scene {info.name!r}: cannot load {info.path} ({first[:300]})") from None


# -- geometry ----------------------------------------------------------------------------
def _convex_hull(xy: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull ring ``[P, 2]`` of points ``[N, 2]`` (monotone chain)."""
    pts = np.unique(np.round(xy, 3), axis=0)
    if len(pts) < 3:
        return pts

    def half(points):
        chain: list[np.ndarray] = []
        for p in points:
            while len(chain) >= 2:
                a, b = chain[-2], chain[-1]
                if (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) > 0:
                    break
                chain.pop()
            chain.append(p)
        return chain

    lower = half(pts)
    upper = half(pts[::-1])
    return np.array(lower[:-1] + upper[:-1], dtype=np.float64)


def building_name(object_name: str) -> str:
    """The building a scene object belongs to: its name without the ``-itu_<material>`` suffix."""
    return _MATERIAL_SUFFIX_RE.sub("", object_name)


def buildings_of(scene) -> list[Building]:
    """The buildings of a loaded Sionna scene (see the module docstring)."""
    groups: dict[str, list[np.ndarray]] = {}
    for obj_name, obj in scene.objects.items():
        vertices = np.asarray(obj.mi_mesh.vertex_positions_buffer(), dtype=np.float64).reshape(-1, 3)
        if len(vertices) == 0:
            continue
        groups.setdefault(_MATERIAL_SUFFIX_RE.sub("", obj_name), []).append(vertices)
    buildings = []
    for name, parts in groups.items():
        v = np.concatenate(parts)
        z_min, z_max = float(v[:, 2].min()), float(v[:, 2].max())
        if z_max - z_min < _FLAT_EXTENT_M or _GROUND_RE.match(name):
            continue
        buildings.append(Building(name, _convex_hull(v[:, :2]), z_max, z_min))
    return buildings


def scene_bbox(scene) -> tuple[float, float, float, float, float, float]:
    """``(x_min, y_min, z_min, x_max, y_max, z_max)`` of a loaded scene [m]."""
    bb = scene.mi_scene.bbox()
    lo, hi = [float(v) for v in bb.min], [float(v) for v in bb.max]
    return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


def scene_geometry(name: str, scenes_dir: str | os.PathLike | None = None) -> SceneGeometry:
    """Buildings, bounding box and site layout of scene ``name``, for drawing.

    Loads the scene meshes (a few seconds for a city) but traces no rays; cache the
    result with :meth:`SceneGeometry.to_dict`.
    """
    info = resolve_scene(name, scenes_dir)
    scene = load_scene(info)
    buildings = buildings_of(scene)
    bbox = scene_bbox(scene)
    sites = layout_for(info, buildings, bbox)
    return SceneGeometry(info.name, buildings, bbox, sites)


# -- site layout -------------------------------------------------------------------------
def automatic_layout(
    buildings: list[Building],
    bbox: tuple[float, float, float, float, float, float],
    num_sites: int = DEFAULT_NUM_SITES,
    area: tuple[float, float, float, float] | None = None,
    mast_height: float = DEFAULT_MAST_HEIGHT_M,
) -> list[dict[str, Any]]:
    """Spread ``num_sites`` rooftop sites over ``area`` by farthest-point sampling.

    Candidates are roof corners: for each building, the footprint-hull corner nearest
    the area centre, pushed 1 m out from the facade, at ``height + mast_height``
    (a mast at the roof centre would be shadowed by its own roof), for buildings inside ``area`` (default: the scene-centred square of
    side :data:`DEFAULT_AREA_SIZE_M`, clipped to the scene) that are at least as tall
    as the median building there. The first site is the candidate nearest the
    area centre; each next one maximises ``min distance to chosen sites`` x
    ``sqrt(height / max height)``, which spreads the sites and prefers high roofs.
    With no buildings the sites sit at 25 m on a ring of radius a quarter of the area.
    Deterministic: the same geometry always gives the same layout.
    """
    x0, y0, _, x1, y1, _ = bbox
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    if area is None:
        half = 0.5 * DEFAULT_AREA_SIZE_M
        area = (max(x0, cx - half), max(y0, cy - half), min(x1, cx + half), min(y1, cy + half))
    ax0, ay0, ax1, ay1 = area
    acx, acy = 0.5 * (ax0 + ax1), 0.5 * (ay0 + ay1)
    cand, heights = [], []
    for b in buildings:
        if len(b.footprint) < 3:
            continue
        c = b.footprint.mean(axis=0)
        if not (ax0 + 0.05 * (ax1 - ax0) <= c[0] <= ax1 - 0.05 * (ax1 - ax0)):
            continue
        if not (ay0 + 0.05 * (ay1 - ay0) <= c[1] <= ay1 - 0.05 * (ay1 - ay0)):
            continue
        # mount on the roof corner facing the area centre, 1 m out from the facade, so
        # the building's own roof does not shadow the street below
        k = int(np.argmin(np.hypot(b.footprint[:, 0] - acx, b.footprint[:, 1] - acy)))
        corner = b.footprint[k]
        out = corner - c
        out = out / max(float(np.hypot(*out)), 1e-9)
        p = corner + FACADE_OFFSET_M * out
        cand.append((p[0], p[1], b.height + mast_height))
        heights.append(b.height)
    if len(cand) < num_sites:
        radius = 0.25 * min(ax1 - ax0, ay1 - ay0)
        angles = np.arange(num_sites) * 2 * np.pi / num_sites + np.pi / 4
        chosen = [(acx + radius * np.cos(a), acy + radius * np.sin(a), 25.0) for a in angles]
    else:
        cand_arr = np.asarray(cand)
        keep = np.asarray(heights) >= np.median(heights)
        if keep.sum() >= num_sites:
            cand_arr = cand_arr[keep]
        weight = np.sqrt(cand_arr[:, 2] / cand_arr[:, 2].max())
        first = int(np.argmin(np.hypot(cand_arr[:, 0] - acx, cand_arr[:, 1] - acy)))
        idx = [first]
        dmin = np.hypot(cand_arr[:, 0] - cand_arr[first, 0], cand_arr[:, 1] - cand_arr[first, 1])
        while len(idx) < num_sites:
            nxt = int(np.argmax(dmin * weight))
            idx.append(nxt)
            dmin = np.minimum(dmin, np.hypot(cand_arr[:, 0] - cand_arr[nxt, 0], cand_arr[:, 1] - cand_arr[nxt, 1]))
        chosen = [tuple(cand_arr[i]) for i in idx]
    return [{"name": f"site{s}", "position": [round(float(v), 3) for v in p]} for s, p in enumerate(chosen)]


def _validate_sites(sites: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(sites, list) or not sites:
        raise ConfigError(f"{where}: 'sites' must be a non-empty list of {{name, position: [x, y, z]}}")
    out, names = [], set()
    for k, site in enumerate(sites):
        if not isinstance(site, dict) or "position" not in site:
            raise ConfigError(f"{where}: sites[{k}] must be a mapping with 'position: [x, y, z]'")
        pos = site["position"]
        if not (isinstance(pos, (list, tuple)) and len(pos) == 3 and all(isinstance(v, (int, float)) for v in pos)):
            raise ConfigError(f"{where}: sites[{k}].position must be three numbers [x, y, z], got {pos!r}")
        name = str(site.get("name", f"site{k}"))
        if name in names:
            raise ConfigError(f"{where}: duplicate site name {name!r}")
        names.add(name)
        extra = set(site) - {"name", "position"}
        if extra:
            raise ConfigError(f"{where}: sites[{k}] has unknown key(s) {sorted(extra)} (allowed: name, position)")
        out.append({"name": name, "position": [float(v) for v in pos]})
    if len(out) > 64:
        raise ConfigError(f"{where}: at most 64 sites, got {len(out)}")
    return out


def scene_sites_file(info: SceneInfo) -> Path | None:
    """A user scene's own site layout, ``<name>.sites.yaml`` beside its XML (None for a built-in scene)."""
    return info.path.with_name(f"{info.name}.sites.yaml") if info.source == "user" else None


def sites_override(scene: str | SceneInfo, config_dir: str | os.PathLike | None = None) -> list[dict[str, Any]] | None:
    """The sites of ``configs/sites/<scene>.yaml`` (``sites: [{name, position}]``), else of the user
    scene's own :func:`scene_sites_file` (when ``scene`` is a :class:`SceneInfo`), or None."""
    import yaml

    name = scene.name if isinstance(scene, SceneInfo) else str(scene)
    path = Path(config_dir or SITES_CONFIG_DIR) / f"{name}.yaml"
    if not path.is_file() and isinstance(scene, SceneInfo) and config_dir is None:
        path = scene_sites_file(scene) or path
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) - {"sites", "description"}:
        raise ConfigError(f"{path}: expected a mapping with key 'sites' (and optional 'description')")
    return _validate_sites(data.get("sites"), str(path))


def layout_for(scene: str | SceneInfo, buildings, bbox, area=None, num_sites=DEFAULT_NUM_SITES):
    """The YAML layout of ``scene`` (:func:`sites_override`), else :func:`automatic_layout`."""
    override = sites_override(scene)
    return override if override is not None else automatic_layout(buildings, bbox, num_sites, area)


def site_layout(
    name: str,
    scenes_dir: str | os.PathLike | None = None,
    area: tuple[float, float, float, float] | None = None,
    num_sites: int = DEFAULT_NUM_SITES,
) -> list[dict[str, Any]]:
    """The sites of scene ``name``: the YAML override if any, else :func:`automatic_layout`."""
    info = resolve_scene(name, scenes_dir)
    override = sites_override(info)
    if override is not None:
        return override
    scene = load_scene(info)
    return automatic_layout(buildings_of(scene), scene_bbox(scene), num_sites, area)
