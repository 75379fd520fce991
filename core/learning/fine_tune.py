"""Starting a run from another run's weights (``training.init_from``): fine-tuning, e.g. on a new city.

``training.init_from: runs/X`` names a run directory. :func:`check_init_from` (before any work) reads its
config and checkpoint (``best.pt``, else ``last.pt``) and refuses, with one line naming the key, a
directory that is no run, a checkpoint that cannot be read, or a model of another kind or size than this
config builds (:data:`ARCH_FIELDS`: the fields that shape the parameters or their meaning; the data-bound
ones -- map bounds, site slots -- are the new scene's, and the weights must still fit: :func:`load_weights`).
The new run starts from those weights with a fresh optimiser and schedule, and its ``lineage.json`` records
where they came from (:func:`lineage_record`: run, checkpoint file, epoch, sha256 of the file).

With ``data.label_fraction: 0`` (the new city's walks with no label at all) the physics term's likelihood
cannot be calibrated on labelled walks: :func:`transferred_calibrations` gives every training scene the
calibration transferred from the init run's stored ones
(:func:`core.physics.calibration.transfer_calibration`: per feature the median bias and scale over their
data-calibrated sites), exactly what a held-out scene gets at evaluation; and ``feature_weights: auto``
takes the init run's calibrated numbers (:func:`init_feature_weights`). No label of the new scene is read
for training, calibration or model selection (``training.model_selection: last``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import resolve_path
from core.errors import ConfigError, CoreError
from core.learning.config import Config

#: the model fields an init run must share with the config: kind and sizes (``ModelConfig.resolved``)
ARCH_FIELDS = ("kind", "d_model", "num_layers", "num_heads", "grid_size", "map_size", "patch_size", "mlp_ratio",
               "geometry_hint", "num_candidates", "fine_subgrid", "d_report")
KEY = "training.init_from"


@dataclass
class InitRun:
    """The run a new run starts from: its directory, checkpoint file and contents, config and training scenes."""

    run_dir: Path
    checkpoint: Path
    ckpt: dict[str, Any]
    config: Config
    scenes: list[str]


def check_init_from(config: Config) -> InitRun | None:
    """The run ``training.init_from`` names, checked (None when unset); a :class:`ConfigError` of one line
    naming the key otherwise: no run directory, an unreadable checkpoint or config, another model kind or
    size, or (``data.label_fraction: 0``) no stored calibration to transfer."""
    from core.stores import run as run_store

    given = config.training.init_from
    if given is None:
        return None
    run_dir = resolve_path(given)
    if not run_dir.is_dir():
        raise ConfigError(f"{KEY}: {given}: no such run directory")
    try:
        init_config = run_store.read_config(run_dir)
        path = run_store.checkpoint_path(run_dir)
        ckpt = run_store.load_checkpoint(path)
    except CoreError as exc:
        raise ConfigError(f"{KEY}: {exc}") from None
    spec = ckpt.get("spec")
    if not isinstance(spec, dict) or "model" not in ckpt:
        raise ConfigError(f"{KEY}: {path}: not a model checkpoint (no spec or weights)")
    have = {**spec, "kind": spec.get("kind", "memorizing")}
    want = config.model.resolved()
    diffs = [f"{k} {have.get(k)} (this config: {want[k]})" for k in ARCH_FIELDS if k in want and have.get(k) != want[k]]
    if diffs:
        raise ConfigError(f"{KEY}: {given} holds another model: {'; '.join(diffs)}; set model.* to its kind and sizes")
    lineage = run_store.read_lineage(run_dir) if (run_dir / run_store.LINEAGE).exists() else None
    init = InitRun(run_dir, path, ckpt, init_config, lineage.scene_names if lineage is not None else [])
    if config.data.label_fraction == 0 and not _source_calibrations(init):
        raise ConfigError(f"{KEY}: {given} has no stored likelihood calibration to transfer (data.label_fraction 0 "
                          "calibrates on no label of its own)")
    return init


def load_weights(model, init: InitRun) -> None:
    """Copy ``init``'s weights into ``model`` (strict); weights that do not fit are one line naming the key."""
    try:
        model.load_state_dict(init.ckpt["model"])
    except RuntimeError as exc:
        raise ConfigError(f"{KEY}: {init.checkpoint}: its weights do not fit this model "
                          f"({str(exc).splitlines()[-1].strip()})") from None


def lineage_record(init: InitRun, given: str) -> dict[str, Any]:
    """What ``lineage.json`` records of the init run: ``{"run", "path", "checkpoint", "epoch", "sha256", "scenes"}``."""
    digest = hashlib.sha256(init.checkpoint.read_bytes()).hexdigest()
    return {"run": given, "path": str(init.run_dir.resolve()), "checkpoint": init.checkpoint.name,
            "epoch": init.ckpt.get("epoch"), "sha256": f"sha256:{digest}", "scenes": list(init.scenes)}


def _source_calibrations(init: InitRun) -> list:
    """The init run's stored calibrations, one per training scene that has one (unreadable ones skipped)."""
    from core.learning.run_calibration import stored_calibrations

    return stored_calibrations(init.run_dir, init.scenes or [None])


def transferred_calibrations(init: InitRun, stores: list[tuple]) -> list:
    """One likelihood calibration per ``(dataset, radio map)`` of ``stores`` (the training scenes), transferred
    from ``init``'s stored ones onto that scene's map; ``meta`` records the scene's dataset and map (so evaluation
    reads it back instead of calibrating on labels), ``label_fraction`` 0 and the source run."""
    from core.physics.calibration import transfer_calibration

    sources = _source_calibrations(init)
    out = []
    for dataset, radio_map in stores:
        cal = transfer_calibration(sources, radio_map)
        cal.meta.update({"scene": dataset.ref.scene, "dataset": dataset.ref.to_dict(),
                         "radio_map": radio_map.ref.to_dict(), "label_fraction": 0.0,
                         "transferred_from_run": str(init.run_dir)})
        out.append(cal)
    return out


def init_feature_weights(config: Config, init: InitRun | None) -> Config:
    """``config`` with ``physics_loss.feature_weights: auto`` replaced by the init run's calibrated numbers when
    there is no labelled walk to calibrate them on (``data.label_fraction: 0``); else ``config`` unchanged."""
    from core.learning.config import config_from_dict

    p = config.physics_loss
    if init is None or config.data.label_fraction > 0 or p.feature_weights != "auto":
        return config
    weights = init.config.physics_loss.feature_weights
    data = config.to_dict()
    data["physics_loss"]["feature_weights"] = dict(weights) if isinstance(weights, dict) else None
    return config_from_dict(data, "config")


__all__ = ["ARCH_FIELDS", "InitRun", "check_init_from", "load_weights", "lineage_record", "transferred_calibrations",
           "init_feature_weights"]
