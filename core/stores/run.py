"""The run-directory contract: what ``python -m core train`` writes and how it is read back.

Layout::

    <run>/
        config.yaml     the resolved, validated config (``feature_weights: auto`` as numbers)
        metrics.jsonl   one JSON object per finished epoch: epoch, lr, lambda_phys (applied at the
                        epoch's end), train_/val_ + total, coarse, fine, phys (loss units; phys null
                        when off), val_median_m, val_p90_m [m], epoch_s [s], grad_norm_coarse,
                        grad_norm_fine, grad_norm_phys, grad_norm_sup, grad_cos_sup_phys (gradient
                        balance on one fixed train batch; phys entries null when off); rewritten atomically
        best.pt         checkpoint of the best val median: model, spec, config, epoch, val
        last.pt         everything to resume: + optimizer, scheduler, rng, best_val_median_m, bad_epochs
        log.txt         human-readable log, appended
        status.json     {"state": running|done|stopped, "epoch", "epochs", "best_val_median_m" [m]}
        lineage.json    {"dataset": StoreRef, "radio_map": StoreRef}: the stores it was trained on (the first
                        scene's), "scenes": [{"scene", "dataset", "radio_map"}] every training scene in
                        scene-index order, "holdout_scene": the scene kept out of training (or null)
        calibration.json  the likelihood's per-site bias and scale (:class:`~core.physics.calibration.Calibration`),
                        calibrated on the train split at the true positions; ``meta`` records the
                        dataset and radio map (StoreRef dicts) it was made from. A run on several
                        scenes: the first scene's; ``calibration_<scene>.json`` each other scene's

Checkpoints hold only tensors and plain data (dict, list, tuple, str, int, float, bool,
None; ``spec`` and ``config`` as dicts): :func:`save_checkpoint` refuses anything else and
:func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, so loading a
checkpoint never runs pickled code.

metrics.jsonl has one rule for a broken line: every line holding a JSON object is a row;
any other non-blank line (a torn write, a stray edit) is skipped (:func:`read_metrics`).

``calibration.json`` is derived data, read and made by :mod:`core.learning.run_calibration`
(this module names the file: :func:`calibration_path`; :func:`write_calibration` stores it).

A directory that holds anything is taken (:func:`is_taken`): training refuses it unless it
resumes it (``last.pt`` needed) or replaces it (:func:`check_out_dir`).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import resolve_path
from core.errors import CoreError, StoreError
from core.learning.config import Config, load_config
from core.stores.atomic import atomic_path, atomic_write_text
from core.stores.lineage import StoreRef, map_path_for, store_ref

CONFIG, METRICS, BEST, LAST = "config.yaml", "metrics.jsonl", "best.pt", "last.pt"
LOG, STATUS, LINEAGE, CALIBRATION = "log.txt", "status.json", "lineage.json", "calibration.json"
FILES = (CONFIG, METRICS, BEST, LAST, LOG, STATUS, LINEAGE, CALIBRATION)


# -- the directory ---------------------------------------------------------------------------
def is_taken(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` exists and holds anything (a file that is not a directory counts)."""
    path = Path(run_dir)
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


def check_out_dir(run_dir: str | os.PathLike, resume: bool = False, force: bool = False) -> None:
    """Refuse to train into a taken ``run_dir`` unless resuming it (needs ``last.pt``) or
    replacing it (``force``). A missing or empty directory is always fine."""
    path = Path(run_dir)
    if resume and force:
        raise CoreError("--resume and --force exclude each other: continue the run or replace it")
    if not is_taken(path) or force:
        return
    if not path.is_dir():
        raise StoreError(f"run directory {path}: exists and is not a directory")
    if resume and not (path / LAST).exists():
        raise StoreError(f"run directory {path}: nothing to resume (no {LAST}); replace it with --force "
                         "or pick another directory")
    if not resume:
        held = ", ".join(sorted(p.name for p in path.iterdir())[:6])
        raise StoreError(f"run directory {path}: already holds a run ({held}); continue it with --resume, "
                         "replace it with --force, or pick another directory")


def read_config(run_dir: str | os.PathLike) -> Config:
    """The run's validated config; a :class:`StoreError` names ``config.yaml`` otherwise."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise StoreError(f"{path}: missing (not a run directory?)")
    try:
        return load_config(path)
    except CoreError as exc:
        raise StoreError(f"{path}: {exc}") from None


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """``best.pt``, else ``last.pt``; a :class:`StoreError` when neither exists."""
    run_dir = Path(run_dir)
    for name in (BEST, LAST):
        if (run_dir / name).exists():
            return run_dir / name
    raise StoreError(f"{run_dir / BEST}: missing (no checkpoint in the run directory)")


def input_stores(run_dir: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(dataset, radio map)`` paths that the run's config leads to, from metadata only
    (None when the config or the dataset cannot be read)."""
    try:
        config = read_config(run_dir)
        dataset = resolve_path(config.data.dataset)
        return dataset, map_path_for(store_ref(dataset, "dataset"), resolve_path(config.physics_loss.radio_maps_dir))
    except CoreError:
        return None


# -- metrics, status, log ------------------------------------------------------------------------
def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` in file order ([] when absent); a line that is not a
    JSON object is skipped."""
    try:
        text = (Path(run_dir) / METRICS).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_metrics(run_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(dict(row)) + "\n" for row in rows))


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``status.json`` as a dict ({} when absent or unreadable)."""
    try:
        status = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def write_status(run_dir: str | os.PathLike, state: str, epoch: int, epochs: int, best_val_median_m: float) -> None:
    best = best_val_median_m if math.isfinite(best_val_median_m) else None
    atomic_write_text(Path(run_dir) / STATUS, json.dumps(
        {"state": state, "epoch": epoch, "epochs": epochs, "best_val_median_m": best}))


def append_log(run_dir: str | os.PathLike, line: str) -> None:
    with open(Path(run_dir) / LOG, "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


# -- lineage --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunLineage:
    """The dataset and radio map a run was trained on (either None when not recorded); ``scenes``: the
    ``(dataset, radio map)`` of every training scene in scene-index order (the first is ``dataset``,
    ``radio_map``); ``holdout_scene``: the scene its config keeps out of training."""

    dataset: StoreRef | None
    radio_map: StoreRef | None
    scenes: tuple[tuple[StoreRef | None, StoreRef | None], ...] = ()
    holdout_scene: str | None = None

    @property
    def scene_names(self) -> list[str]:
        """The training scenes' names, in scene-index order."""
        return [d.scene for d, _ in self.scenes if d is not None and d.scene]


def write_lineage(run_dir: str | os.PathLike, dataset: StoreRef, radio_map: StoreRef,
                  scenes: Iterable[tuple[StoreRef, StoreRef]] = (), holdout_scene: str | None = None) -> None:
    """Record the stores a run trains on: the first scene's ``dataset`` and ``radio_map``, and every
    training scene's (``scenes``; default the first alone)."""
    scenes = list(scenes) or [(dataset, radio_map)]
    atomic_write_text(Path(run_dir) / LINEAGE, json.dumps(
        {"dataset": dataset.to_dict(), "radio_map": radio_map.to_dict(),
         "scenes": [{"scene": d.scene, "dataset": d.to_dict(), "radio_map": r.to_dict()} for d, r in scenes],
         "holdout_scene": holdout_scene}, indent=2) + "\n")


def read_lineage(run_dir: str | os.PathLike) -> RunLineage | None:
    """``lineage.json``; None for a run written before runs recorded it."""
    path = Path(run_dir) / LINEAGE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise StoreError(f"{path}: not a JSON object")
    first = (StoreRef.from_dict(raw.get("dataset")), StoreRef.from_dict(raw.get("radio_map")))
    scenes = raw.get("scenes")
    scenes = tuple((StoreRef.from_dict(s.get("dataset")), StoreRef.from_dict(s.get("radio_map")))
                   for s in scenes if isinstance(s, dict)) if isinstance(scenes, list) else ()
    held = raw.get("holdout_scene")
    return RunLineage(*first, scenes or (first,), held if isinstance(held, str) else None)


def check_lineage(run_dir: str | os.PathLike, dataset: StoreRef, radio_map: StoreRef, index: int = 0) -> None:
    """Refuse ``dataset`` or ``radio_map`` when the run recorded another save of it (of training scene ``index``)."""
    recorded = read_lineage(run_dir)
    if recorded is None or index >= len(recorded.scenes):
        return
    was_dataset, was_map = recorded.scenes[index]
    for label, was, now in (("dataset", was_dataset, dataset), ("radio map", was_map, radio_map)):
        if was is not None and was.id and was.id != now.id:
            raise StoreError(f"run {run_dir} was trained on {label} {was.describe()}, but its config now leads to "
                             f"{label} {now.describe()}: train it again on these stores, or restore that one")


# -- evaluations ----------------------------------------------------------------------------------
def evaluation_path(run_dir: str | os.PathLike, split: str, scene: str | None = None, refine: bool = False) -> Path:
    """``<run>/eval_<split>[_<scene>][_refine].json``: what ``evaluate`` writes (``scene``: ``--scene``)."""
    return Path(run_dir) / f"eval_{split}{f'_{scene}' if scene else ''}{'_refine' if refine else ''}.json"


# -- calibration ----------------------------------------------------------------------------------
def calibration_path(run_dir: str | os.PathLike, scene: str | None = None) -> Path:
    """``<run>/calibration.json`` (the first scene's), or ``<run>/calibration_<scene>.json`` for another scene."""
    return Path(run_dir) / (CALIBRATION if scene is None else f"calibration_{scene}.json")


def write_calibration(run_dir: str | os.PathLike, calibration, scene: str | None = None) -> Path:
    """Write ``calibration`` to :func:`calibration_path` atomically; returns the path."""
    return calibration.save(calibration_path(run_dir, scene))


# -- checkpoints ----------------------------------------------------------------------------------
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    import torch

    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise StoreError(f"{where}: key {key!r} is a {type(key).__name__}, not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    else:
        raise StoreError(f"{where} is a {type(value).__module__}.{type(value).__name__}: checkpoints hold only "
                         "tensors and plain data")


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (tensors and plain data only) to ``path`` atomically."""
    import torch

    _check_plain(payload, f"checkpoint {path}")
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)


def load_checkpoint(path: str | os.PathLike, device: Any = "cpu") -> dict[str, Any]:
    """A checkpoint of this project (a dict with ``model`` and ``spec``), tensors on ``device``.

    Read with ``weights_only=True``: a file holding any other pickled object is refused with a
    :class:`StoreError` that names the object's class; unreadable files are reported as corrupt.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise StoreError(f"{path}: refused: it holds a pickled Python object ({found.group(1)}), and checkpoints "
                             "load with weights_only (tensors and plain data only)") from None
        raise StoreError(f"{path}: corrupt checkpoint (not a torch file of tensors and plain data)") from None
    except Exception as exc:
        raise StoreError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        raise StoreError(f"{path}: not a checkpoint of this project (no model/spec)")
    return ckpt


# -- listing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """What the app lists about a run; numbers come from the validated config.

    ``state``: running | done | stopped (status.json), else done / no-checkpoint.
    ``lambda_phys``: the λ_phys applied once ramped in (0 = the physics term was off; None when the
    config is invalid, and ``problem`` says why). ``label_fraction`` and ``split``: the data it
    was trained on. ``epochs``: planned epochs. ``scene``: the (first) training scene; ``scenes``: every
    training scene; ``holdout_scene``: the scene its config keeps out of training (None: none).
    """

    name: str
    path: Path
    scene: str | None
    dataset: str | None
    state: str
    epochs_done: int
    epochs: int | None
    best_val_median_m: float | None
    lambda_phys: float | None
    has_checkpoint: bool
    label_fraction: float | None = None
    split: str | None = None
    last_epoch_s: float | None = None
    config: Config | None = field(default=None, repr=False)
    problem: str = ""
    scenes: tuple[str, ...] = ()
    holdout_scene: str | None = None


def _run_scene(run_dir: Path, config: Config | None) -> str | None:
    """The scene of the run's dataset: recorded in lineage.json, else read from the dataset."""
    try:
        lineage = read_lineage(run_dir)
    except StoreError:
        lineage = None
    if lineage is not None and lineage.dataset is not None and lineage.dataset.scene:
        return lineage.dataset.scene
    if config is None:
        return None
    try:
        return store_ref(resolve_path(config.data.dataset), "dataset").scene or config.data.scene
    except StoreError:
        return config.data.scene


def _run_scenes(run_dir: Path, config: Config | None, first: str | None) -> tuple[str, ...]:
    """Every training scene of the run: recorded in lineage.json, else the first one alone."""
    try:
        lineage = read_lineage(run_dir)
    except StoreError:
        lineage = None
    if lineage is not None and lineage.scene_names:
        return tuple(lineage.scene_names)
    return (first,) if first else ()


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_info(run_dir: str | os.PathLike, name: str | None = None) -> RunInfo:
    """Summarise ``run_dir`` (never raises for a half-written or broken run)."""
    path = Path(run_dir)
    try:
        config, problem = read_config(path), ""
    except StoreError as exc:
        config, problem = None, str(exc)
    status, metrics = read_status(path), read_metrics(path)
    medians = [m for m in (_number(r.get("val_median_m")) for r in metrics) if m is not None]
    best = _number(status.get("best_val_median_m"))
    has_ckpt = (path / BEST).exists() or (path / LAST).exists()
    lam = config.physics_loss.lambda_phys if config is not None else None
    scene = _run_scene(path, config)
    return RunInfo(
        name=name or path.name, path=path, scene=scene,
        dataset=config.data.dataset if config else None,
        state=str(status.get("state") or ("done" if has_ckpt else "no-checkpoint")),
        epochs_done=len(metrics), epochs=config.training.epochs if config else None,
        best_val_median_m=best if best is not None else (min(medians) if medians else None),
        lambda_phys=lam, has_checkpoint=has_ckpt, label_fraction=config.data.label_fraction if config else None,
        split=config.data.split if config else None,
        last_epoch_s=_number(metrics[-1].get("epoch_s")) if metrics else None, config=config, problem=problem,
        scenes=_run_scenes(path, config, scene), holdout_scene=config.data.holdout_scene if config else None,
    )


def _run_dirs(runs_dir: Path) -> list[Path]:
    """Folders of ``runs_dir`` with a config (newest first), each followed by its sub-runs."""
    if not runs_dir.is_dir():
        return []
    found = []
    dirs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for d in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True):
        if (d / CONFIG).exists():
            found.append(d)
        found += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CONFIG).exists())
    return found


def list_runs(runs_dir: str | os.PathLike, extra: Iterable[str | os.PathLike] = (),
              relative_to: str | os.PathLike | None = None) -> list[RunInfo]:
    """Every run directory (a folder with ``config.yaml``) in ``runs_dir``, and one level
    deeper (the variants of an ablation), newest first; then each of ``extra`` that is a run.

    A run is named by its path relative to ``relative_to`` (default ``runs_dir``) when inside
    it, else by the path as given.
    """
    runs_dir = Path(runs_dir)
    base = Path(relative_to) if relative_to is not None else runs_dir
    candidates = _run_dirs(runs_dir) + [Path(e) for e in extra if (Path(e) / CONFIG).exists()]
    infos, seen = [], set()
    for path in candidates:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            name = str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            name = str(path)
        infos.append(run_info(path, name))
    return infos
