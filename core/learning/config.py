"""Training configuration: plain data, validated by pydantic, loaded from YAML.

The keys follow the reference design::

    seed: 0
    data:          {dataset | datasets, scene, holdout_scene, max_samples, label_fraction, split, spatial_blocks}
    model:         {preset, d_model, num_layers, num_heads, ...}   (preset + overrides)
    training:      {epochs, batch_size, learning_rate, ..., loss: {lambda_fine}}
    physics_loss:  {lambda_phys, warmup_epochs, ramp_epochs, per_sample_grad_clip,
                    radio_maps_dir, feature_weights, loss, huber_delta, observation,
                    coarse_weight, coarse_subgrid, coarse_temperature, coarse_topk, coarse_on_labelled,
                    mode_weight, mode_subgrid,
                    refinement: {enabled, num_steps, learning_rate, min_confidence_threshold, use_prior}}

Every section forbids unknown keys. :func:`load_config` turns any problem (unknown key,
bad value, bad YAML, bad ``--set``) into a :class:`~core.errors.ConfigError` whose
message names the key path, e.g. ``physics_loss.lambda_phys: Input should be
greater than or equal to 0``.

ONE switch turns the physics term on: ``physics_loss.lambda_phys`` (0 = off, no lookup at all;
:attr:`Config.physics_active`). The keys it replaced (``training.loss.use_physics_loss``,
``physics_loss.enabled``) are refused with a one-line error that says so (:data:`REMOVED_KEYS`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError
from core.features import FEATURES, REPORT_WINDOW_S

#: the largest weight a loss term may have (a typo such as 1e30 would overflow the loss, not train)
MAX_WEIGHT = 1000.0


class _Section(BaseModel):
    """A config section: unknown keys refused, every number FINITE (NaN and ±inf refused, e.g.
    ``training.learning_rate: Input should be a finite number``), checked again on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: Model presets: the default (``small``) trains on the default dataset in minutes on a 2-core CPU.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, num_layers=1, num_heads=2, grid_size=8, map_size=32, patch_size=8),
    "small": dict(d_model=64, num_layers=2, num_heads=4, grid_size=32, map_size=128, patch_size=16),
    "base": dict(d_model=256, num_layers=4, num_heads=8, grid_size=64, map_size=256, patch_size=16),
    "large": dict(d_model=512, num_layers=8, num_heads=8, grid_size=128, map_size=512, patch_size=16),
}


class DataConfig(_Section):
    #: the dataset trained on (one scene); with ``datasets`` set, replaced by the first of them
    dataset: str = "datasets/etoile"
    #: several datasets (one per scene) trained into ONE model (docs/model.md, "Many scenes"); None = ``[dataset]``;
    #: when set it overrides ``dataset``
    datasets: list[str] | None = Field(default=None, min_length=1)
    #: a scene kept out of training, only evaluated on (``python -m core evaluate --run RUN --scene SCENE``);
    #: its dataset is ``<folder of the first dataset>/<holdout_scene>``; it must not be a training scene
    holdout_scene: str | None = Field(default=None, min_length=1)
    #: optional, kept for old configs: the scene is the dataset's (attrs["scene"]) and its map
    #: ``<physics_loss.radio_maps_dir>/<scene>.zarr``; a scene given here must be that one, or training refuses
    scene: str | None = None
    #: use only the first N samples (quick experiments); None = all
    max_samples: int | None = Field(default=None, gt=0)
    #: fraction of the TRAIN walks that keep their label, drawn with ``seed`` (nested: with one
    #: seed the 5 % labelled walks are among the 20 %); the others contribute only the physics
    #: term. Validation and test stay fully labelled. 0: no label at all (a new city's unlabelled walks):
    #: needs ``training.init_from`` (the likelihood's calibration is transferred from that run) and the
    #: physics term, and trains a fixed number of epochs with no labelled validation
    #: (``training.model_selection: last``; docs/model.md, "Adapting to a new city")
    label_fraction: float = Field(default=1.0, ge=0.0, le=1.0)
    #: ``random``: the dataset's own split; ``spatial``: whole blocks of the map are held out for
    #: val and test (see :func:`core.learning.data_loading.spatial_split`), applied at load time
    split: Literal["random", "spatial"] = "random"
    #: the spatial split cuts the map into spatial_blocks x spatial_blocks blocks
    spatial_blocks: int = Field(default=4, ge=2, le=64)

    @field_validator("datasets")
    @classmethod
    def _distinct(cls, datasets):
        if datasets is not None:
            seen = set()
            for path in datasets:
                key = os.path.normpath(path)
                if key in seen:
                    raise ValueError(f"{path!r} is listed twice")
                seen.add(key)
        return datasets

    @model_validator(mode="after")
    def _first_is_dataset(self):
        """With ``datasets`` (which overrides ``dataset``, e.g. a preset's), ``dataset`` is its first entry."""
        if self.datasets is not None and self.dataset != self.datasets[0]:
            object.__setattr__(self, "dataset", self.datasets[0])
        return self

    @property
    def training_datasets(self) -> list[str]:
        """The datasets trained on, one per scene, in scene-index order."""
        return list(self.datasets) if self.datasets is not None else [self.dataset]


class ModelConfig(_Section):
    """``preset`` picks the sizes; any field set here overrides the preset's value."""

    preset: Literal["tiny", "small", "base", "large"] = "small"
    d_model: int | None = Field(default=None, gt=0)
    num_layers: int | None = Field(default=None, gt=0)
    num_heads: int | None = Field(default=None, gt=0)
    #: the coarse head classifies over grid_size x grid_size cells of the map
    grid_size: int | None = Field(default=None, ge=2)
    #: the map is resampled to map_size x map_size pixels before patching
    map_size: int | None = Field(default=None, ge=4)
    #: patch edge in resampled pixels; map tokens = (map_size / patch_size)^2
    patch_size: int | None = Field(default=None, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    mlp_ratio: int = Field(default=4, ge=1)
    #: add per-site geometric anchors (site position minus ToA distance along AoA) to the tokens
    geometry_hint: bool = True
    #: "memorizing": site-id embeddings and absolute cell positions (core/learning/model.py); "agnostic": only
    #: measured-minus-map residuals per site and relative geometry, the same in every city (core/learning/agnostic.py)
    kind: Literal["memorizing", "agnostic"] = "memorizing"
    #: agnostic: candidate cells (map tokens) the transformer attends over
    num_candidates: int = Field(default=8, ge=1, le=4096)
    #: agnostic: the fine head scores fine_subgrid x fine_subgrid points per cell
    fine_subgrid: int = Field(default=6, ge=1, le=32)
    #: agnostic: width of the per-candidate report tokens and of the fine head
    d_report: int = Field(default=32, ge=4, le=1024)

    def resolved(self) -> dict[str, Any]:
        """The preset's sizes with this section's overrides applied."""
        sizes = dict(MODEL_PRESETS[self.preset])
        for key in sizes:
            value = getattr(self, key)
            if value is not None:
                sizes[key] = value
        if sizes["d_model"] % sizes["num_heads"]:
            raise ConfigError(f"model.d_model: {sizes['d_model']} is not divisible by model.num_heads={sizes['num_heads']}")
        if sizes["map_size"] % sizes["patch_size"]:
            raise ConfigError(f"model.patch_size: {sizes['patch_size']} does not divide model.map_size={sizes['map_size']}")
        sizes.update(dropout=self.dropout, mlp_ratio=self.mlp_ratio, geometry_hint=self.geometry_hint, kind=self.kind)
        if self.kind == "agnostic":
            sizes.update(num_candidates=self.num_candidates, fine_subgrid=self.fine_subgrid, d_report=self.d_report)
        return sizes


class LossConfig(_Section):
    #: weight of the Gaussian NLL of the in-cell offset
    lambda_fine: float = Field(default=1.0, ge=0.0, le=MAX_WEIGHT)


class TrainingConfig(_Section):
    epochs: int = Field(default=30, gt=0, le=100_000)
    batch_size: int = Field(default=256, gt=0, le=1_000_000)
    learning_rate: float = Field(default=2e-3, gt=0.0, le=1.0)
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0)
    warmup_epochs: int = Field(default=1, ge=0, le=100_000)
    grad_clip: float = Field(default=1.0, ge=0.0)
    #: stop when the val median has not improved for this many epochs (0 = never)
    early_stopping_patience: int = Field(default=8, ge=0)
    #: torch CPU threads per process (0 = torch default). 1: on a shared 2-core machine, OpenMP threads
    #: waiting on a busy core made steps ~10x slower than one thread (measured)
    num_threads: int = Field(default=1, ge=0, le=1024)
    #: a run directory whose checkpoint (best.pt, else last.pt) initialises the weights (fine-tuning, e.g. on a
    #: new city); its model kind and sizes must be this config's; recorded in lineage.json (core.learning.fine_tune)
    init_from: str | None = Field(default=None, min_length=1)
    #: which weights best.pt holds: ``val`` = the epoch with the best val median (early stopping on it);
    #: ``last`` = the last epoch's, a fixed epoch count, the val split never read (no labelled validation);
    #: None = ``last`` when ``data.label_fraction`` is 0, else ``val``
    model_selection: Literal["val", "last"] | None = None
    #: run directories (same dataset, map, split and grid) whose pooled predictions the network also learns
    #: from, once computed before training: knowledge distillation of an ensemble (core.learning.distill); [] = off
    distill_from: list[str] = Field(default_factory=list)
    #: the weight of that term (L_distill) in L_total
    distill_weight: float = Field(default=1.0, ge=0.0, le=1000.0)
    loss: LossConfig = LossConfig()


class RefinementConfig(_Section):
    enabled: bool = False
    num_steps: int = Field(default=5, ge=0, le=10_000)
    learning_rate: float = Field(default=0.5, gt=0.0, le=100.0)
    #: only predictions with confidence below this move
    min_confidence_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    #: Gaussian prior at the network's prediction with its predicted sigma
    use_prior: bool = True
    #: the prior's shape when use_prior: "gaussian" N(xy, sigma^2) (sigma includes the coarse spread), or
    #: "heatmap": the network's most likely coarse cells as a mixture (core.physics.prior.heatmap_prior)
    prior: Literal["gaussian", "heatmap"] = "gaussian"
    #: the prior's sigma = this x the network's (its fine sigma for "heatmap"), floored at prior_min_sigma_m, in
    #: every search with the network's prior (MAP, network + whole walk); 1 = the network's as it is; `evaluate
    #: --prior-sigma-scale auto` chooses it on the val split (core.learning.prior_scale)
    prior_sigma_scale: float = Field(default=1.0, gt=0.0, le=100.0)
    #: the floor of that sigma [m] (an overconfident network cannot pin the search below it); `evaluate
    #: --prior-sigma-scale auto` chooses it on the val split with the scale (core.learning.prior_scale)
    prior_min_sigma_m: float = Field(default=1.0, gt=0.0, le=1000.0)
    #: starts of the MAP search from the exact scan of the likelihood alone (its best lattice points, as exhaustive
    #: map matching ranks them; core.physics.bounded_scan): 0 = off (the block-statistics global starts only)
    scan_starts: int = Field(default=0, ge=0, le=64)
    #: runner-up basins of the snapshot search (network + MAP's, or exhaustive search's without a network) the
    #: whole walk also starts from; each walk keeps the start whose whole-walk posterior ends lowest
    #: (core.physics.trajectory.runner_up_basins): 0 = off (the one start)
    walk_basins: int = Field(default=0, ge=0, le=16)


class PhysicsLossConfig(_Section):
    #: THE switch of the physics term: its weight once ramped in; 0 = off (no lookup at all)
    lambda_phys: float = Field(default=0.1, ge=0.0, le=MAX_WEIGHT)
    #: epochs trained on the supervised terms alone before the physics term starts
    warmup_epochs: float = Field(default=2.0, ge=0.0)
    #: epochs over which its weight then rises linearly (per step) from 0 to lambda_phys; 0 = at once
    ramp_epochs: float = Field(default=2.0, ge=0.0)
    #: each sample's physics gradient w.r.t. its predicted position is clipped to this norm
    #: [physics-loss units per metre] before it reaches the network; 0 = no clipping
    per_sample_grad_clip: float = Field(default=0.05, ge=0.0)
    radio_maps_dir: str = "radio_maps"
    #: what the physics term measures: "site" = the calibrated robust per-site NLL
    #: (core.physics.likelihood; scales and biases calibrated on the labelled train walks at
    #: their true positions and stored as calibration.json), "serving" = the legacy Huber loss
    #: against the serving-site map (feature_weights, loss, huber_delta and observation apply to it only)
    likelihood: Literal["site", "serving"] = "site"
    #: "site": the reports within this time [s] of the latest one are pooled per site
    report_window_s: float = Field(default=REPORT_WINDOW_S, ge=0.0)
    #: "site": per-site features in the likelihood (a subset of path_gain, toa, aoa)
    site_features: list[Literal["path_gain", "toa", "aoa"]] = Field(default=["path_gain", "toa", "aoa"], min_length=1)
    #: "site": serving-cell features in the likelihood: none by default (a UE derives them from the path
    #: gains the per-site features already count); "auto" = those the calibration shows to carry information
    #: of their own (scale at most half their spread over the map AND residuals independent of the serving
    #: path gain's, core.physics.calibration), or a list
    cell_features: list[Literal["snr", "sinr", "throughput", "bler"]] | Literal["auto"] = []
    #: "site": the robust penalty of a normalised residual z: cauchy log(1 + z^2), or huber (delta 2)
    penalty: Literal["cauchy", "huber"] = "cauchy"
    #: "site": at test time (MAP, exhaustive and whole-walk search) also charge the sites a report with a free
    #: slot did NOT hear where the map predicts them loud (core.physics.silence; its outlier share fitted on
    #: the labelled train walks); the training term does not use it. `evaluate --silence` switches it on.
    silence: bool = False
    #: per-feature weights; None = the defaults of core.features; "auto" = calibrated on the
    #: train split: w_f = (sigma_map,f / s_f)^2 with s_f the robust spread of the residual
    #: observed - map(true position), so that w_f z_f^2 = (residual / s_f)^2 (a noise-aware likelihood)
    feature_weights: dict[str, float] | Literal["auto"] | None = None
    loss: Literal["mse", "huber"] = "huber"
    huber_delta: float = Field(default=1.0, gt=0.0)
    #: which measurement the map is compared with: the serving-site features of the last
    #: report (where the label is), of the latest report present (the last one, or the one
    #: before when it is missing), or the temporal aggregate of all reports
    observation: Literal["last", "latest", "mean"] = "latest"
    #: weight of the COARSE physics term inside L_phys (``likelihood: site`` only): cross-entropy of the
    #: coarse logits to the map likelihood's posterior over the coarse cells, q(c) ∝ exp(-min_{p in c} NLL(p) / T),
    #: computed once before training (core.learning.coarse_physics); 0 = off (L_phys is the offset term alone)
    coarse_weight: float = Field(default=1.0, ge=0.0, le=MAX_WEIGHT)
    #: q scores each cell by the best of an s x s sub-grid of points in it
    coarse_subgrid: int = Field(default=4, ge=1, le=8)
    #: temperature T of q [nats]; 1 = the likelihood's own posterior (uniform prior over cells)
    coarse_temperature: float = Field(default=1.0, gt=0.0)
    #: only q's k most likely cells are stored per walk (renormalised)
    coarse_topk: int = Field(default=32, ge=1)
    #: also give the coarse term to LABELLED walks (default: unlabelled walks only -- a labelled walk's
    #: true cell is a better target than q, which errs where the likelihood is multimodal)
    coarse_on_labelled: bool = False
    #: weight of the MODE part inside L_phys: the fine head, at the posterior's most likely cell, regresses
    #: to the likelihood's best point there (core.learning.coarse_physics.mode_term); 0 = off
    mode_weight: float = Field(default=1.0, ge=0.0, le=MAX_WEIGHT)
    #: the mode is the best of an m x m sub-grid of points in that cell
    mode_subgrid: int = Field(default=8, ge=1, le=32)
    refinement: RefinementConfig = RefinementConfig()

    @field_validator("feature_weights")
    @classmethod
    def _known_features(cls, weights):
        if isinstance(weights, dict):
            for name, w in weights.items():
                if name not in FEATURES:
                    raise ValueError(f"unknown feature {name!r} (known: {', '.join(FEATURES)})")
                if w < 0:
                    raise ValueError(f"weight of {name!r} must be >= 0, got {w}")
        return weights


class Config(_Section):
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    physics_loss: PhysicsLossConfig = PhysicsLossConfig()

    @model_validator(mode="after")
    def _unlabelled(self):
        """``data.label_fraction: 0`` trains on the physics term alone: it needs that term, a run to transfer the
        likelihood's calibration from, and no labelled validation."""
        if self.data.label_fraction > 0:
            return self
        if self.physics_loss.lambda_phys <= 0:
            raise ValueError("data.label_fraction: 0 (no labelled walk) with physics_loss.lambda_phys 0 leaves "
                             "nothing to train on")
        if self.training.init_from is None:
            raise ValueError("data.label_fraction: 0 (no labelled walk) needs training.init_from: the likelihood's "
                             "calibration is transferred from that run, never made from this scene's labels")
        if self.training.model_selection == "val":
            raise ValueError("data.label_fraction: 0 needs training.model_selection: last (choosing on the val "
                             "median would read labels)")
        return self

    @property
    def selection(self) -> str:
        """``training.model_selection`` resolved: ``last`` with no labelled walk, else ``val`` unless set."""
        chosen = self.training.model_selection
        return chosen if chosen is not None else ("last" if self.data.label_fraction == 0 else "val")

    @property
    def physics_active(self) -> bool:
        """Whether the physics term is computed at all during training (``lambda_phys > 0``)."""
        return self.physics_loss.lambda_phys > 0

    def lambda_at(self, epoch_progress: float) -> float:
        """λ_phys applied after ``epoch_progress`` epochs (fractional): 0 during the warm-up, then a
        linear ramp over ``ramp_epochs`` to ``lambda_phys``."""
        p = self.physics_loss
        since = epoch_progress - p.warmup_epochs
        if since < 0:
            return 0.0
        return p.lambda_phys * (min(since / p.ramp_epochs, 1.0) if p.ramp_epochs > 0 else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


#: keys that were removed, and what replaced them (refused with one line saying so)
REMOVED_KEYS: dict[tuple[str, ...], str] = {
    ("training", "loss", "use_physics_loss"): "physics_loss.lambda_phys (0 = off) is the one switch of the physics term",
    ("physics_loss", "enabled"): "physics_loss.lambda_phys (0 = off) is the one switch of the physics term",
}


def _check_removed(data: dict[str, Any], source: str) -> None:
    for path, replacement in REMOVED_KEYS.items():
        node: Any = data
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            raise ConfigError(f"{source}: {'.'.join(path)}: removed; {replacement}")


def _format_error(exc: ValidationError, source: str) -> str:
    first = exc.errors()[0]
    # a union's tag (e.g. "dict[str,float]") is no key of the config: leave it out of the path
    path = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and "[" in p)) or "<root>"
    msg = first["msg"]
    if first["type"] == "value_error" and not first["loc"]:  # a whole-config rule: its message names the keys
        return f"{source}: {first['ctx']['error']}"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{source}: {path}: {msg}{extra}"


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``"section.key=value"`` to nested ``data`` in place; ``value`` is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.problem})") from None
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    if isinstance(data, dict):
        _check_removed(data, source)
    try:
        config = Config.model_validate(data or {})
        config.model.resolved()
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None
    return config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read the YAML at ``path`` (or the defaults), apply ``section.key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.exists():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    if overrides:
        source += " (with --set)"
    return config_from_dict(data, source)
