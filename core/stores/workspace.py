"""What exists for each scene: radio maps, measurement dataset and training runs.

A :class:`Workspace` is a root folder laid out as the repository is::

    <root>/radio_maps/<scene>.zarr     radio map (python -m core generate-maps)
    <root>/radio_maps/corrected/<scene>.zarr   its corrected copy (python -m core correct-map)
    <root>/datasets/<scene>/           measurement dataset (python -m core make-dataset)
    <root>/runs/<name>/                training runs (python -m core train / ablate)
    <root>/assets/default_run/         the shipped model (other shipped runs: assets/<name>/ with a config.yaml)
    <root>/configs/*.yaml              training presets
    <root>/corpus/                     the procedural-city corpus (make-corpus): datasets/<city>, radio_maps/<city>.zarr
    <root>/scenes/                     the user's Mitsuba XML scenes

The root defaults to the repository; ``CORE_WORKSPACE`` moves it (tests use a tmp
folder), and ``CORE_RADIO_MAPS_DIR``, ``CORE_DATASETS_DIR``, ``CORE_RUNS_DIR`` and
``CORE_SCENES_DIR`` move single folders. Jobs run with the root as their working
directory, so the relative paths in their commands are the ones shown here.

Status checks are cheap (they read the store's ``zarr.json`` metadata, never the
arrays) so a page can list every scene at once; loading validates fully.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from core import REPO_ROOT
from core.errors import CoreError
from core.stores.lineage import corrected_map_path, map_path, map_paths, map_scene, store_ref
from core.stores.run import RunInfo, list_runs
from core.stores.zarr_group import read_attrs

DEFAULT_SCENE = "etoile"
#: a run name: one plain folder name under the runs folder (never ``.``, ``..``, a path or a hidden name)
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PRESETS = ("baseline", "model", "strong_physics", "agnostic")
#: the city corpus folder of a workspace (``make corpus``; core/raytracing/corpus.py)
CORPUS_FOLDER = "corpus"


@dataclass(frozen=True)
class StoreStatus:
    """``state`` is ``ok``, ``missing`` or ``corrupt``; ``message`` says why when not ok."""

    path: Path
    state: str
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "ok"


@dataclass(frozen=True)
class SceneStatus:
    name: str
    radio_map: StoreStatus
    dataset: StoreStatus
    runs: tuple[RunInfo, ...]


def store_status(path: str | os.PathLike, kind: str) -> StoreStatus:
    """Whether the Zarr store at ``path`` exists and claims to be a ``kind`` store
    (``radio_map`` or ``measurement_dataset``)."""
    path = Path(path)
    if not path.exists():
        return StoreStatus(path, "missing", f"{path} does not exist")
    try:
        attrs = read_attrs(path)
    except (OSError, ValueError) as exc:
        return StoreStatus(path, "corrupt", f"{path}: unreadable store metadata ({type(exc).__name__})")
    if attrs.get("kind") != kind:
        return StoreStatus(path, "corrupt", f"{path}: not a {kind.replace('_', ' ')} store (kind={attrs.get('kind')!r})")
    return StoreStatus(path, "ok")


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset folder: its scene, its world (``oracle``, ``realistic``...) with a one-line summary,
    and its :class:`StoreStatus`."""

    path: Path
    scene: str
    world: str
    world_summary: str
    status: StoreStatus

    @classmethod
    def read(cls, path: Path) -> DatasetEntry:
        """The entry of the dataset folder ``path``, from its metadata only (a store that records no world,
        or no measurement model at all, is of the oracle world)."""
        from core.stores.dataset import recorded_measurement_model
        from core.stores.world_model import ORACLE

        status = store_status(path, "measurement_dataset")
        scene, world = path.name, ORACLE
        if status.ok:
            try:
                scene = store_ref(path, "dataset").scene or path.name
                model = recorded_measurement_model(path)
                world = model.world if model is not None else ORACLE
            except CoreError as exc:
                return cls(path, scene, "unknown", f"unreadable world record ({exc})", status)
        return cls(path, scene, world.name, world.summary(), status)

    @property
    def label(self) -> str:
        """``<folder> — <world>`` for a picker."""
        return f"{self.path.name} — {self.world}"


@dataclass(frozen=True)
class Workspace:
    root: Path
    radio_maps_dir: Path
    datasets_dir: Path
    runs_dir: Path
    scenes_dir: Path
    assets_dir: Path
    configs_dir: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None) -> Workspace:
        """The workspace at ``root`` (default ``$CORE_WORKSPACE`` or the repository)."""
        root = Path(root or os.environ.get("CORE_WORKSPACE") or REPO_ROOT).resolve()

        def folder(env: str, default: str) -> Path:
            value = os.environ.get(env)
            return Path(value).resolve() if value else root / default

        configs = root / "configs" if (root / "configs").is_dir() else REPO_ROOT / "configs"
        return cls(root, folder("CORE_RADIO_MAPS_DIR", "radio_maps"), folder("CORE_DATASETS_DIR", "datasets"),
                   folder("CORE_RUNS_DIR", "runs"), folder("CORE_SCENES_DIR", "scenes"), root / "assets", configs)

    def rel(self, path: str | os.PathLike) -> str:
        """``path`` relative to the root when inside it (as commands show it), else absolute."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    # -- paths ---------------------------------------------------------------------------
    def map_path(self, scene: str) -> Path:
        return map_path(self.radio_maps_dir, scene)

    def corrected_map_path(self, scene: str) -> Path:
        """``<radio_maps>/corrected/<scene>.zarr``: the scene's twin corrected by ``python -m core correct-map``
        (:func:`core.stores.lineage.corrected_map_path`)."""
        return corrected_map_path(self.radio_maps_dir, scene)

    def dataset_path(self, scene: str, world: str = "oracle", variant: str | None = None) -> Path:
        """``<datasets>/<scene>`` for the oracle world (the map's own), ``<datasets>/<scene>_<world>`` for another
        world of the same scene (``make-dataset --world realistic``), each with ``_<variant>`` for another dataset of
        that world (``seed1``: walks of another ``--seed``; ``merged``: ``merge-datasets``): THE path builder of a
        dataset."""
        name = scene if world == "oracle" else f"{scene}_{world}"
        return self.datasets_dir / (f"{name}_{variant}" if variant else name)

    def run_path(self, name: str) -> Path:
        """``<runs>/<name>``, where a run named ``name`` is written; a name that is not a plain folder name
        (``.``, ``..``, a path, a hidden or empty name, spaces) is a one-line :class:`CoreError`."""
        if not RUN_NAME.fullmatch(name):
            raise CoreError(f"Run name {name!r} is not a plain folder name: use letters, digits, '-', '_' and '.', "
                            f"starting with a letter or digit (the run is written to {self.rel(self.runs_dir)}/<name>)")
        return self.runs_dir / name

    def preset_path(self, preset: str) -> Path:
        if preset not in PRESETS:
            raise CoreError(f"unknown training preset {preset!r} (use {', '.join(PRESETS)})")
        return self.configs_dir / f"{preset}.yaml"

    @property
    def corpus_dir(self) -> Path:
        """The workspace's city corpus (``make corpus``, ``python -m core make-corpus --out corpus``)."""
        return self.root / CORPUS_FOLDER

    def corpus_datasets(self) -> dict[str, Path]:
        """``{city: <corpus>/datasets/<city>}`` for every corpus city whose dataset store is there and readable,
        by city number (what a run can train on, beside the real scenes; metadata only)."""
        folder = self.corpus_dir / "datasets"
        if not folder.is_dir():
            return {}
        found = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
                 and store_status(p, "measurement_dataset").ok]
        number = lambda p: (int(m.group(1)) if (m := re.search(r"(\d+)$", p.name)) else -1, p.name)  # noqa: E731
        return {p.name: p for p in sorted(found, key=number)}

    def scene_map_path(self, scene: str, dataset: str | os.PathLike | None = None) -> Path:
        """The map a run reads for ``scene`` (as training does, :func:`core.learning.scene_data.load_stores`):
        ``<radio_maps>/<scene>.zarr``, or, where that is missing, the map ``dataset`` records where that store is
        (a corpus city's ``<corpus>/radio_maps/<city>.zarr``)."""
        from core.stores.lineage import recorded_map_path

        path = self.map_path(scene)
        if path.exists() or dataset is None:
            return path
        try:
            recorded = recorded_map_path(dataset)
        except CoreError:
            return path
        return recorded if recorded is not None and recorded.exists() else path

    def default_run_path(self) -> Path:
        return self.assets_dir / "default_run"

    def shipped_run_paths(self) -> list[Path]:
        """The runs shipped read-only under ``assets/`` (a folder with ``config.yaml``): the default run first,
        then the others by name (``assets/agnostic_many``: the scene-agnostic model on four scenes, munich
        held out, with its held-out evaluation)."""
        others = sorted(p.parent for p in self.assets_dir.glob("*/config.yaml") if p.parent != self.default_run_path())
        return [self.default_run_path(), *others]

    # -- what exists --------------------------------------------------------------------
    def scene_names(self) -> list[str]:
        """Known scenes: the catalogue of :mod:`core.raytracing.scenes` (if available) plus every
        scene that has a map or a dataset here; the default scene first."""
        names: set[str] = set()
        try:
            from core.raytracing.scenes import list_scenes

            names.update(info.name for info in list_scenes(self.scenes_dir if self.scenes_dir.is_dir() else None))
        except ImportError:
            pass
        except CoreError:
            pass
        if self.radio_maps_dir.is_dir():
            names.update(map_scene(p) for p in map_paths(self.radio_maps_dir))
        names.update(entry.scene for entry in self.datasets())
        names.add(DEFAULT_SCENE)
        return sorted(names, key=lambda n: (n != DEFAULT_SCENE, n))

    def datasets(self, scene: str | None = None) -> list[DatasetEntry]:
        """The dataset folders here (only ``scene``'s if given): the scene each was measured in (its
        attrs; the folder name when it records none or is unreadable) and its world, the oracle
        dataset ``<datasets>/<scene>`` of each scene first. Reads metadata only."""
        if not self.datasets_dir.is_dir():
            return []
        found = [DatasetEntry.read(p) for p in self.datasets_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        return sorted((e for e in found if scene is None or e.scene == scene),
                      key=lambda e: (e.scene, e.path.name != e.scene, e.path.name))

    def runs(self, scene: str | None = None) -> list[RunInfo]:
        """Training runs (``runs/*``, an ablation's variants, and the shipped runs: :meth:`shipped_run_paths`),
        newest first, named by their path from the root; only those trained on ``scene`` (one of
        their scenes) if given."""
        infos = list_runs(self.runs_dir, self.shipped_run_paths(), relative_to=self.root)
        return [r for r in infos if scene is None or r.scene == scene or scene in r.scenes]

    def scenes_with_dataset(self) -> list[str]:
        """The scenes whose dataset store is there and readable (what a run can train on)."""
        return [name for name in self.scene_names() if store_status(self.dataset_path(name), "measurement_dataset").ok]

    def training_overrides(self, scenes: list[str], holdout: str | None, portable,
                           picked: dict[str, Path] | None = None) -> dict[str, str]:
        """The config overrides that train on ``scenes`` (their datasets, ``portable(path)`` each: ``picked[scene]``
        where given, e.g. another world of it, else :meth:`dataset_path`) and keep ``holdout`` out:
        ``data.dataset`` for one scene, ``data.datasets`` (a YAML list) for several.
        A held-out scene that is also trained on, or no scene, is a CoreError (one line)."""
        if not scenes:
            raise CoreError("pick at least one training scene")
        if holdout is not None and holdout in scenes:
            raise CoreError(f"the held-out scene {holdout!r} is also a training scene: a held-out scene is never "
                            "trained on; pick another, or leave it out of the training scenes")
        paths = [portable((picked or {}).get(name) or self.dataset_path(name)) for name in scenes]
        out = {"data.dataset": paths[0]} if len(paths) == 1 else {"data.datasets": json.dumps(paths)}
        if holdout is not None:
            out["data.holdout_scene"] = holdout
        return out

    def ablations(self) -> list[Path]:
        """Ablation output folders (those holding a results table): ``runs/*`` and the shipped
        ``assets/ablation*`` (the measured étoile ablation), the user's own first."""
        found = []
        for folder, pattern in ((self.runs_dir, "*"), (self.assets_dir, "ablation*")):
            if folder.is_dir():
                hits = {p.parent for name in ("table.csv", "cdf.json") for p in folder.glob(f"{pattern}/{name}")}
                found += sorted(p for p in hits if not p.name.startswith("."))
        return found

    def scene_status(self, scene: str) -> SceneStatus:
        return SceneStatus(scene, store_status(self.map_path(scene), "radio_map"),
                           store_status(self.dataset_path(scene), "measurement_dataset"), tuple(self.runs(scene)))


# -- scene geometry, cached on disk --------------------------------------------------------
_GEOMETRY_SCRIPT = (
    "import json, sys\n"
    "from core.stores.atomic import atomic_write_text\n"
    "from core.raytracing.scenes import scene_geometry\n"
    "g = scene_geometry(sys.argv[1], sys.argv[2] or None)\n"
    "atomic_write_text(sys.argv[3], json.dumps(g.to_dict()))\n"
)


def geometry_cache_dir() -> Path:
    """Where drawn scene geometry is cached: next to the jobs database (git-ignored)."""
    db = os.environ.get("CORE_JOBS_DB")
    return (Path(db).resolve().parent if db else REPO_ROOT / ".jobs") / "geometry"


def cached_scene_geometry(scene: str, scenes_dir: str | os.PathLike | None = None, timeout_s: float = 600.0):
    """:func:`core.scenes.scene_geometry` of ``scene``, cached as JSON in :func:`geometry_cache_dir`.

    The scene meshes are read in a separate process, so the app never loads Mitsuba
    itself (memory, and a crash there cannot take the app down). The cache is reused
    while it is newer than the scene's XML file.
    """
    import subprocess
    import sys

    from core.raytracing.scenes import SceneGeometry, resolve_scene

    info = resolve_scene(scene, scenes_dir)
    cache = geometry_cache_dir() / f"{info.name}.json"
    # stale when the scene, the geometry code or the scene's site override is newer
    sources = [Path(info.path), REPO_ROOT / "core" / "raytracing" / "scenes.py", REPO_ROOT / "configs" / "sites" / f"{info.name}.yaml"]
    newest = max((p.stat().st_mtime for p in sources if p.exists()), default=0.0)
    try:
        if cache.stat().st_mtime >= newest:
            return SceneGeometry.from_dict(json.loads(cache.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    cache.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.run([sys.executable, "-c", _GEOMETRY_SCRIPT, info.name, str(scenes_dir or ""), str(cache)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CoreError(f"scene {scene}: reading its geometry took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), f"exit status {proc.returncode}")
        raise CoreError(f"scene {scene}: could not read its geometry ({last.strip()})")
    return SceneGeometry.from_dict(json.loads(cache.read_text()))
