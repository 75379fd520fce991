"""Training: ``python -m core train --config configs/model.yaml [--set k=v ...] --out runs/NAME [--resume]``.

Loss per batch::

    L_total = L_coarse + lambda_fine * L_fine + lambda_phys(t) * L_phys

* ``L_coarse``: cross-entropy of the coarse logits against the cell of the true
  position (:func:`core.model.coarse_loss`), over the LABELLED walks of the batch;
* ``L_fine``: Gaussian NLL of the true in-cell offset under the fine head evaluated at
  the TRUE cell (:func:`core.model.fine_loss`), over the labelled walks;
* ``L_phys``: the physics term, an injected callable ``physics(xy [B, 2], batch) -> [B]``
  per-sample loss (:func:`make_physics_term`: by default :class:`SiteLikelihoodTerm`, the
  calibrated per-site robust NLL of the pooled reports), evaluated at the predicted position
  routed to the position head only (``ModelOutput.head_xy``), averaged over the samples with
  an observation, labelled or not. Each sample's gradient w.r.t. its position is clipped to
  ``physics_loss.per_sample_grad_clip`` (:func:`physics_term`). Computed only when
  ``physics_loss.lambda_phys > 0`` (no lookup at all otherwise).
  With ``physics_loss.coarse_weight > 0`` (site likelihood), ``L_phys`` also holds
  ``coarse_weight * L_coarse_phys``: the cross-entropy of the coarse logits to the map likelihood's
  posterior over the cells, computed once before training for the unlabelled train walks (all with
  ``coarse_on_labelled``) and averaged over them (:mod:`core.learning.coarse_physics`). It reaches
  the coarse head and the trunk, like ``L_coarse`` with a soft label; the one-off cost is logged.
  With ``physics_loss.mode_weight > 0`` it also holds ``mode_weight * L_mode``: on those unlabelled
  walks the fine head, evaluated at the posterior's most likely cell, regresses to the likelihood's
  best point in that cell (weighted by its q) -- the fine counterpart of the coarse term.
* ``lambda_phys(t)`` (:meth:`Config.lambda_at`): 0 for ``physics_loss.warmup_epochs``, then a
  linear ramp (per step) over ``physics_loss.ramp_epochs`` to ``lambda_phys``.

``data.label_fraction < 1`` keeps the labels of only that fraction of the train walks (drawn
with ``seed``); the others contribute the physics term alone. ``data.split: spatial`` holds out
whole map blocks for val and test (applied at load time). With the physics term off, unlabelled
walks are left out of the forward pass (they would contribute nothing).

Each epoch also measures, on one fixed train batch, the gradient norm of each term as it enters
``L_total`` at full weight (w.r.t. all model parameters) and the cosine between the supervised
(coarse + fine) and physics gradients (:func:`gradient_balance`), written to metrics.jsonl.

Run directory: :mod:`core.stores.run` (config.yaml, metrics.jsonl, best.pt, last.pt,
log.txt, status.json, lineage.json). A taken directory is refused unless ``--resume``
continues it or ``--force`` replaces it; with ``--force`` the new run is written beside
the old one and takes its place only when training ends (a failed run leaves the old one).

Data: the scene is the dataset's; its radio map is ``<physics_loss.radio_maps_dir>/<scene>.zarr``
and must be the map the dataset was made with (:mod:`core.stores.lineage`). With ``data.datasets``
one model trains on several scenes (docs/model.md, "Many scenes"): each sample carries its
``scene_index``, the model reads that scene's map (:class:`~core.learning.model.SceneMaps`, cells in
the scene's own bounds) and the physics term that scene's calibrated likelihood (:class:`SceneTerms`).

Seeded: parameters from ``seed``, batch order from ``(seed, epoch)``, and the torch
RNG state is checkpointed, so a resumed run equals an uninterrupted one.
Distributed: under ``torchrun --nproc_per_node N`` each rank takes every N-th sample of
the epoch's permutation; gradients are averaged by DistributedDataParallel (gloo on
CPU, nccl on CUDA). Every rank evaluates the whole val set, so early stopping agrees;
rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from core import resolve_path
from core.device import resolve_device
from core.errors import ConfigError, StoreError
from core.jobs import progress
from core.learning.coarse_physics import attach_cell_posterior, coarse_physics_term, mode_term
from core.learning.config import Config, config_from_dict, likelihood_config, load_config
from core.learning.data_loading import (
    TensorData,
    build_tensors,
    concat_tensors,
    labeled_mask,
    map_channels,
    map_input,
    num_site_embeddings,
    spatial_split,
    token_dim,
)
from core.learning.metrics import error_metrics, position_errors
from core.learning.model import MapConditionedTransformer, ModelSpec, SceneMaps, build_model, coarse_loss, fine_loss
from core.stores import run as run_store
from core.stores.atomic import atomic_path, atomic_write_text, check_writable
from core.stores.dataset import CELL_FEATURES, MeasurementDataset
from core.stores.lineage import check_map_of_dataset, map_path_for
from core.stores.radio_map import SITE_LAYERS, RadioMap

LOSS_TERMS = ("total", "coarse", "fine", "phys")


# -- data ---------------------------------------------------------------------------------
@dataclass
class SceneData:
    """One training scene: its dataset (``config.data`` applied), radio map and model input ``[C, S, S]``."""

    dataset: MeasurementDataset
    radio_map: RadioMap
    map_image: torch.Tensor

    @property
    def name(self) -> str | None:
        return self.dataset.ref.scene


@dataclass
class RunData:
    """Everything a run trains on: its scenes (index ``m`` = ``scene_index`` m) and the model's spec.
    ``dataset`` / ``radio_map`` / ``map_image`` are the first scene's (the single-scene API)."""

    scenes: list[SceneData]
    spec: ModelSpec

    @property
    def dataset(self) -> MeasurementDataset:
        return self.scenes[0].dataset

    @property
    def radio_map(self) -> RadioMap:
        return self.scenes[0].radio_map

    @property
    def map_image(self) -> torch.Tensor:
        return self.scenes[0].map_image

    @property
    def maps(self) -> SceneMaps:
        """Every scene's map and bounds, as the model reads them (``[M, C, S, S]``, ``[M, 4]``)."""
        return SceneMaps.stack([s.map_image for s in self.scenes], [s.radio_map.bounds for s in self.scenes])

    @property
    def scene_names(self) -> list[str | None]:
        return [s.name for s in self.scenes]


def load_stores(dataset_path, maps_dir, scene: str | None = None, key: str = "data.dataset"):
    """``(dataset, radio map)`` at ``dataset_path`` and ``<maps_dir>/<its scene>.zarr``, the map being the one
    the dataset was made with. A dataset that is missing or corrupt is a StoreError, prefixed with ``key``
    unless that is ``data.dataset`` (whose store is named alone, as for every single-scene run)."""
    try:
        dataset = MeasurementDataset.load(resolve_path(dataset_path))
    except StoreError as exc:
        if key == "data.dataset":
            raise
        raise StoreError(f"{key}: {exc}") from None
    radio_map = RadioMap.load(map_path_for(dataset.ref, maps_dir, scene))
    check_map_of_dataset(dataset.ref, dataset.radio_map_ref, radio_map.ref)
    return dataset, radio_map


def load_scene(config: Config) -> tuple[MeasurementDataset, RadioMap]:
    """The (first) dataset named by ``config`` and the radio map of its scene.

    The scene is the dataset's (``data.scene``, when set, must agree); the map is
    ``<physics_loss.radio_maps_dir>/<scene>.zarr`` and must be the one the dataset was made
    with: otherwise a one-line :class:`~core.errors.CoreError` names both stores.
    """
    maps_dir = resolve_path(config.physics_loss.radio_maps_dir)
    dataset, radio_map = load_stores(config.data.dataset, maps_dir, config.data.scene)
    return apply_data_config(config, dataset, radio_map), radio_map


def load_scenes(config: Config) -> list[tuple[MeasurementDataset, RadioMap]]:
    """``(dataset, radio map)`` of every training scene (``data.datasets``, or ``data.dataset`` alone), with
    ``config.data`` applied. Refused with one line naming the key: a dataset that is not there, two of one
    scene, a held-out scene that is also trained on, or scenes that do not fit one model
    (:func:`check_compatible`)."""
    if config.data.datasets is None:
        return [load_scene(config)]
    if config.data.scene is not None:
        raise ConfigError("data.scene: pins the one scene of data.dataset; with data.datasets each dataset names "
                          "its own scene, so drop data.scene")
    maps_dir = resolve_path(config.physics_loss.radio_maps_dir)
    scenes, names = [], {}
    for m, path in enumerate(config.data.datasets):
        key = f"data.datasets[{m}]"
        dataset, radio_map = load_stores(path, maps_dir, None, key)
        name = dataset.ref.scene
        if name in names:
            raise ConfigError(f"{key}: {path} is of scene {name!r}, like data.datasets[{names[name]}]: one dataset per scene")
        names[name] = m
        scenes.append((apply_data_config(config, dataset, radio_map), radio_map))
    check_compatible(scenes, [f"data.datasets[{m}]" for m in range(len(scenes))])
    return scenes


def check_holdout(config: Config, trained: list[str | None]) -> None:
    """Refuse a ``data.holdout_scene`` that is also a training scene (one line naming the key)."""
    held = config.data.holdout_scene
    if held is not None and held in trained:
        raise ConfigError(f"data.holdout_scene: {held!r} is also a training scene "
                          f"(data.datasets[{trained.index(held)}]); a held-out scene is never trained on")


def check_compatible(scenes, keys: list[str]) -> None:
    """Refuse training scenes one model cannot read: their map features (so map channels), site slots
    per report ``K`` and reports per walk ``T`` must be the first scene's (one line naming the key)."""
    ds0, map0 = scenes[0]
    for (dataset, radio_map), key in zip(scenes[1:], keys[1:]):
        if radio_map.features != map0.features:
            raise ConfigError(f"{key}: radio map {radio_map.source} has features {list(radio_map.features)}, "
                              f"{keys[0]}'s has {list(map0.features)}: every scene needs the same feature set")
        if dataset.num_sites_per_report != ds0.num_sites_per_report:
            raise ConfigError(f"{key}: {dataset.num_sites_per_report} site slots per report, "
                              f"{keys[0]} has {ds0.num_sites_per_report}")
        if dataset.num_reports != ds0.num_reports:
            raise ConfigError(f"{key}: {dataset.num_reports} reports per walk, {keys[0]} has {ds0.num_reports}")


def check_fits(spec: ModelSpec, dataset: MeasurementDataset, radio_map: RadioMap, key: str) -> None:
    """Refuse a scene a trained model cannot read (a held-out scene): other map channels, other site
    slots per report, or more reports per walk than the model's."""
    if map_channels(radio_map) != spec.map_channels:
        raise ConfigError(f"{key}: radio map {radio_map.source} has features {list(radio_map.features)} "
                          f"({map_channels(radio_map)} map channels), the model reads {spec.map_channels}")
    if token_dim(dataset.num_sites_per_report, spec.geometry_hint) != spec.token_dim:
        raise ConfigError(f"{key}: {dataset.num_sites_per_report} site slots per report do not fit the model")
    if dataset.num_reports > spec.num_reports:
        raise ConfigError(f"{key}: {dataset.num_reports} reports per walk, the model reads at most {spec.num_reports}")


def apply_data_config(config: Config, dataset: MeasurementDataset, radio_map: RadioMap) -> MeasurementDataset:
    """The dataset as ``config.data`` asks: the spatial split (when ``split: spatial``), then the
    first ``max_samples`` samples."""
    if config.data.split == "spatial":
        split = spatial_split(dataset.labels, radio_map.bounds, config.data.spatial_blocks)
        dataset = dataclasses.replace(dataset, split=split)
    if config.data.max_samples is not None and config.data.max_samples < dataset.num_samples:
        dataset = dataset.subset(np.arange(config.data.max_samples))
    return dataset


def model_spec(config: Config, dataset: MeasurementDataset, radio_map: RadioMap,
               num_sites: int | None = None) -> ModelSpec:
    """The model of ``config`` for data like ``dataset`` (the first scene: its bounds are the default frame);
    ``num_sites``: the site ids to embed (default the dataset's; many scenes: their largest)."""
    sizes = config.model.resolved()
    k = dataset.num_sites_per_report
    n_sites = num_site_embeddings(dataset) if num_sites is None else num_sites
    return ModelSpec(
        token_dim=token_dim(k, sizes["geometry_hint"]),
        num_site_embeddings=k * (n_sites + 1) + 1,
        num_reports=dataset.num_reports,
        map_channels=map_channels(radio_map),
        bounds=tuple(radio_map.bounds),
        **sizes,
    )


def spec_num_sites(spec: ModelSpec) -> int:
    """The site-id range ``S`` a model embeds (``num_site_embeddings = K * (S + 1) + 1``)."""
    k = (spec.token_dim - len(CELL_FEATURES) - 1) // (9 if spec.geometry_hint else 5)
    return (spec.num_site_embeddings - 1) // k - 1


def prepare(config: Config, dataset: MeasurementDataset | None = None, radio_map: RadioMap | None = None) -> RunData:
    """The run's data: every training scene (or the one ``dataset`` and ``radio_map`` given), each map
    resampled for the model, and the model's spec."""
    stores = [(dataset, radio_map)] if dataset is not None and radio_map is not None else load_scenes(config)
    check_holdout(config, [d.ref.scene for d, _ in stores])
    n_sites = max(num_site_embeddings(d) for d, _ in stores)
    spec = model_spec(config, *stores[0], num_sites=n_sites)
    return RunData([SceneData(d, r, map_input(r, spec.map_size)) for d, r in stores], spec)


def scene_tensors(run: RunData, m: int, split: str, config: Config) -> TensorData:
    """Model tensors of scene ``m``'s ``split``; on the train split only ``data.label_fraction`` of its walks
    are labelled (drawn per scene)."""
    scene = run.scenes[m]
    idx = scene.dataset.indices(split)
    if len(idx) == 0:
        raise StoreError(f"dataset {scene.dataset.source or ''}: split {split!r} is empty")
    data = build_tensors(scene.dataset, scene.radio_map, idx, run.spec.geometry_hint, config.physics_loss.observation,
                         config.physics_loss.report_window_s, num_sites=spec_num_sites(run.spec))
    if split == "train":
        data.labeled = torch.from_numpy(labeled_mask(len(idx), config.data.label_fraction, config.seed))
    return data


def tensors(run: RunData, split: str, config: Config) -> TensorData:
    """Model tensors of ``split`` of every scene, concatenated (``scene_index`` says whose)."""
    return concat_tensors([scene_tensors(run, m, split, config) for m in range(len(run.scenes))])


def labeled_train_indices(dataset: MeasurementDataset, config: Config) -> np.ndarray:
    """Dataset indices of the train walks whose labels ``config`` lets training use."""
    idx = dataset.indices("train")
    return idx[labeled_mask(len(idx), config.data.label_fraction, config.seed)]


def calibrated_weights(dataset: MeasurementDataset, radio_map: RadioMap, observation: str = "latest",
                       indices: np.ndarray | None = None) -> dict[str, float]:
    """``feature_weights: auto``: ``w_f ∝ (sigma_map,f / s_f)^2`` from the TRAIN split (or from the
    labelled walks ``indices``: the calibration needs the true positions).

    ``s_f = 1.4826 * median |r_f - median r_f|`` (a robust std) of the residual
    ``r = observed - map(true position)`` (AoA wrapped), so the physics loss's
    ``w_f (r_f / sigma_map,f)^2 = (r_f / s_f)^2``: each feature counts by how well the
    map predicts it, like a Gaussian likelihood with the measured spread. The weights are
    then scaled to the same sum as the default weights.
    """
    from core.features import feature_spec
    from core.learning.data_loading import physics_observation
    from core.physics.physics_loss import PhysicsLoss, guarded_sigma, resolve_weights

    idx = dataset.indices("train") if indices is None else indices
    sub = dataset.subset(idx)
    obs = physics_observation(sub, radio_map.features, observation)
    mask = np.isfinite(obs)
    loss = PhysicsLoss(radio_map, loss="mse")
    with torch.no_grad():
        res = loss(torch.from_numpy(sub.labels.astype(np.float32)), torch.from_numpy(np.where(mask, obs, 0.0)),
                   mask=torch.from_numpy(mask)).residual.double().numpy()
    weights = {}
    for f, name in enumerate(radio_map.features):
        r = res[mask[:, f], f]
        st = radio_map.stats[name]
        sigma_map = guarded_sigma(st.mean, st.std, feature_spec(name).angular)
        spread = 1.4826 * float(np.median(np.abs(r - np.median(r)))) if r.size else float("inf")
        spread = max(spread, 1e-3 * sigma_map)
        weights[name] = float(min((sigma_map / spread) ** 2, 1e6)) if np.isfinite(spread) else 0.0
    # Same total as the default weights: the relative weights carry the noise model, while
    # the loss keeps the magnitude that lambda_phys was chosen for.
    scale = sum(resolve_weights(radio_map.features, None)) / max(sum(weights.values()), 1e-12)
    return {name: w * scale for name, w in weights.items()}


def resolve_config(config: Config, dataset: MeasurementDataset, radio_map: RadioMap) -> Config:
    """``config`` with ``feature_weights: auto`` replaced by numbers calibrated on the labelled train walks."""
    if config.physics_loss.feature_weights != "auto":
        return config
    data = config.to_dict()
    data["physics_loss"]["feature_weights"] = calibrated_weights(dataset, radio_map, config.physics_loss.observation,
                                                                 labeled_train_indices(dataset, config))
    return config_from_dict(data, "resolved config")


def make_physics_loss(config: Config, radio_map: RadioMap, device: torch.device, dataset=None):
    """The run's physics loss object (also what test-time refinement minimises)."""
    from core.physics.physics_loss import PhysicsLoss

    if config.physics_loss.feature_weights == "auto":
        if dataset is None:
            raise ConfigError("physics_loss.feature_weights: 'auto' needs the dataset to calibrate on")
        config = resolve_config(config, dataset, radio_map)
    p = config.physics_loss
    return PhysicsLoss(radio_map, weights=p.feature_weights, loss=p.loss, huber_delta=p.huber_delta).to(device)


class SiteLikelihoodTerm:
    """The calibrated per-site robust NLL [nats] of a batch's pooled reports at positions ``xy [B, 2] -> [B]``."""

    def __init__(self, likelihood):
        self.likelihood = likelihood
        self.calibration = likelihood.calibration

    def __call__(self, xy: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from core.physics.observation import SiteObservation

        obs = SiteObservation(batch["obs_site_ids"], batch["obs_site"], batch["obs_cell"], batch["obs_weight"])
        return self.likelihood(xy, obs).to(xy.dtype)

    @staticmethod
    def active(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["obs_site_ids"] >= 0).any(1)


class ServingMapTerm:
    """The legacy serving-map loss (:class:`~core.physics.physics_loss.PhysicsLoss`) per sample ``[B]``."""

    calibration = None

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, xy: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(xy, batch["observed"], mask=batch["obs_mask"]).per_sample

    @staticmethod
    def active(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["obs_mask"].any(1)


def make_physics_term(config: Config, radio_map: RadioMap, device: torch.device, dataset=None):
    """The physics term as training sees it: ``physics(xy [B, 2], batch) -> [B]`` per-sample losses and
    ``physics.active(batch) -> bool [B]`` (samples with an observation). Everything in training is built
    on this interface only.

    ``physics_loss.likelihood: site`` (default) calibrates the per-site likelihood on the LABELLED train
    walks of ``dataset`` (their true positions are needed); the calibration is ``physics.calibration``.
    """
    if config.physics_loss.likelihood == "serving":
        return ServingMapTerm(make_physics_loss(config, radio_map, device, dataset))
    from core.physics.calibration import calibrate
    from core.physics.likelihood import RobustLikelihood

    if dataset is None:
        raise ConfigError("physics_loss.likelihood: 'site' needs the dataset to calibrate on")
    if not all(name in radio_map.layers for name in SITE_LAYERS):
        raise ConfigError(f"physics_loss.likelihood: 'site' needs per-site layers, which {radio_map.source} lacks")
    calibration = calibrate(dataset.subset(labeled_train_indices(dataset, config)), radio_map, split=None)
    calibration.meta.update({"dataset": dataset.ref.to_dict(), "radio_map": radio_map.ref.to_dict(),
                             "label_fraction": config.data.label_fraction})
    return SiteLikelihoodTerm(RobustLikelihood(radio_map, calibration, likelihood_config(config.physics_loss),
                                               device=device))


class SceneTerms:
    """The physics terms of ``M`` scenes behind the one interface: ``physics(xy [B, 2], batch) -> [B]``
    evaluates each sample with its own scene's term (``batch["scene_index"]``), so every lookup reads
    the map of the sample's scene. ``calibrations``: each scene's (None for the serving-map loss)."""

    def __init__(self, terms: list):
        self.terms = terms
        self.calibrations = [t.calibration for t in terms]
        self.calibration = self.calibrations[0]
        self.active = terms[0].active  # a static test of the batch's observation, the same for every scene

    def __call__(self, xy: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        scene = batch["scene_index"]
        out = torch.zeros(len(xy), dtype=xy.dtype, device=xy.device)
        for m, term in enumerate(self.terms):
            sel = scene == m
            if bool(sel.any()):
                out[sel] = term(xy[sel], {k: v[sel] for k, v in batch.items()}).to(xy.dtype)
        return out


def make_scene_physics(config: Config, run: RunData, device: torch.device):
    """The physics term of every scene of ``run`` (:func:`make_physics_term` each, calibrated on its own
    labelled train walks): that term itself for one scene, a :class:`SceneTerms` for several."""
    terms = [make_physics_term(config, s.radio_map, device, s.dataset) for s in run.scenes]
    return terms[0] if len(terms) == 1 else SceneTerms(terms)


def scene_terms(physics) -> list:
    """The per-scene terms of ``physics`` (a single term is scene 0's)."""
    return physics.terms if isinstance(physics, SceneTerms) else [physics]


# -- losses -------------------------------------------------------------------------------
def physics_term(physics, xy: torch.Tensor, batch: dict[str, torch.Tensor], clip: float) -> torch.Tensor:
    """Mean of the per-sample physics losses at ``xy`` over the samples with an observation.

    With gradients on, each sample's gradient ``g_n = dL_n/dxy_n`` is computed first (one
    backward through the callable alone, on a detached copy of ``xy``) and clipped to norm
    ``clip`` (0 = off); the returned value is the mean of ``L_n`` and its gradient w.r.t.
    ``xy_n`` is exactly the clipped ``g_n`` / (number of samples with an observation).
    """
    active = physics.active(batch)
    n_active = active.sum().clamp(min=1)
    if not (torch.is_grad_enabled() and xy.requires_grad):
        return (physics(xy, batch) * active).sum() / n_active
    leaf = xy.detach().requires_grad_(True)
    per = physics(leaf, batch) * active
    grad = torch.autograd.grad(per.sum(), leaf, allow_unused=True)[0] if per.requires_grad else None
    grad = torch.zeros_like(leaf) if grad is None else grad
    if clip > 0:
        grad = grad * (clip / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    # value: sum_n L_n; gradient w.r.t. xy_n: the clipped g_n
    surrogate = per.detach().sum() + (grad * (xy - xy.detach())).sum()
    return surrogate / n_active


def _supervised(out, target_cell: torch.Tensor, target_offset: torch.Tensor, labeled: torch.Tensor):
    """``(L_coarse, L_fine)`` over the labelled samples (0, still in the graph, when there are none)."""
    if bool(labeled.all()):
        return (coarse_loss(out.logits, target_cell),
                fine_loss(out.target_offset_pred, out.target_logvar, target_offset))
    if not bool(labeled.any()):
        zero = 0.0 * (out.logits.sum() + out.target_offset_pred.sum() + out.target_logvar.sum())
        return zero, zero
    return (coarse_loss(out.logits[labeled], target_cell[labeled]),
            fine_loss(out.target_offset_pred[labeled], out.target_logvar[labeled], target_offset[labeled]))


def _mode_targets(net, batch: dict[str, torch.Tensor], labeled: torch.Tensor, config: Config, frame):
    """``(cell [B], offset [B, 2], weight [B])`` of the mode term for the UNLABELLED walks of the batch
    with a posterior (weight ``q(c*)``, 0 elsewhere), or None when the term is off or absent."""
    if config.physics_loss.mode_weight <= 0 or "phys_xy" not in batch:
        return None
    cell, offset = net.cell_of(batch["phys_xy"], frame)
    weight = torch.where(labeled, 0.0, batch["phys_q"][:, 0])
    return cell, offset, weight


def compute_losses(model, batch: dict[str, torch.Tensor], map_image: torch.Tensor, config: Config, physics=None,
                   lambda_phys: float | None = None):
    """Loss terms of one batch: ``(dict name -> scalar tensor, ModelOutput)``; ``phys`` is None when off.

    ``map_image``: one map ``[C, S, S]`` or the run's :class:`SceneMaps` (each sample reads the map of
    its ``batch["scene_index"]``; cells and offsets are in its scene's frame).
    ``lambda_phys``: the weight applied to ``phys`` in ``total`` (default: the config's, fully ramped).
    """
    net = model.module if hasattr(model, "module") else model
    scene = batch.get("scene_index")
    frame = net.frame(map_image, scene)
    target_cell, target_offset = net.cell_of(batch["target_xy"], frame)
    use_physics = physics is not None and config.physics_active
    labeled = batch.get("labeled", torch.ones_like(target_cell, dtype=torch.bool))
    mode = _mode_targets(net, batch, labeled, config, frame) if use_physics else None
    fine_cell = target_cell if mode is None else torch.where(mode[2] > 0, mode[0], target_cell)
    out = model(batch["feats"], batch["site_index"], batch["mask"], map_image, target_cell=fine_cell,
                head_xy=use_physics, scene_index=scene)
    coarse, fine = _supervised(out, target_cell, target_offset, labeled)
    terms: dict[str, Any] = {"coarse": coarse, "fine": fine, "phys": None}
    total = coarse + config.training.loss.lambda_fine * fine
    if use_physics:
        terms["phys"] = physics_term(physics, out.head_xy, batch, config.physics_loss.per_sample_grad_clip)
        cw = config.physics_loss.coarse_weight
        if cw > 0 and "phys_q" in batch:  # the coarse term (train walks with a precomputed posterior)
            terms["phys_coarse"] = coarse_physics_term(out.logits, batch["phys_cells"], batch["phys_q"])
            terms["phys"] = terms["phys"] + cw * terms["phys_coarse"]
        if mode is not None:  # the mode term: the fine head at the posterior's best cell, to its best point
            terms["phys_mode"] = mode_term(out.target_offset_pred, out.target_logvar, mode[1], mode[2])
            terms["phys"] = terms["phys"] + config.physics_loss.mode_weight * terms["phys_mode"]
        lam = config.physics_loss.lambda_phys if lambda_phys is None else lambda_phys
        if lam > 0:
            total = total + lam * terms["phys"]
    terms["total"] = total
    return terms, out


def gradient_balance(model, batch: dict[str, torch.Tensor], map_image: torch.Tensor, config: Config,
                     physics=None) -> dict[str, float | None]:
    """Gradient norms of the terms as they enter ``L_total`` at full weight (``coarse``,
    ``lambda_fine * fine``, ``lambda_phys * phys``) w.r.t. all model parameters, of the supervised
    sum, and the cosine between the supervised and the physics gradient (None when off).
    The RNG state is left as it was (a resumed run stays identical)."""
    params = [p for p in model.parameters() if p.requires_grad]
    image = map_image.images if isinstance(map_image, SceneMaps) else map_image
    devices = [image.device] if image.device.type == "cuda" else []
    weights = {"coarse": 1.0, "fine": config.training.loss.lambda_fine, "phys": config.physics_loss.lambda_phys}
    flat: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=devices):
        terms, _ = compute_losses(model, batch, map_image, config, physics)
        for name, weight in weights.items():
            if terms[name] is None:
                continue
            grads = torch.autograd.grad(weight * terms[name], params, retain_graph=True, allow_unused=True)
            flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    sup = flat["coarse"] + flat["fine"]
    row: dict[str, float | None] = {f"grad_norm_{k}": float(flat[k].norm()) if k in flat else None
                                    for k in ("coarse", "fine", "phys")}
    row["grad_norm_sup"] = float(sup.norm())
    phys = flat.get("phys")
    ok = phys is not None and float(phys.norm()) > 0 and float(sup.norm()) > 0
    row["grad_cos_sup_phys"] = float(F.cosine_similarity(sup, phys, dim=0)) if ok else None
    return row


@torch.no_grad()
def predict_tensors(model, data: TensorData, map_image: torch.Tensor, device, batch_size: int = 1024,
                    config: Config | None = None, physics=None, lambda_phys: float | None = None) -> dict[str, Any]:
    """Model outputs over ``data`` (eval mode): numpy ``xy, sigma, confidence``
    plus mean loss terms when ``config`` is given (``total`` with ``lambda_phys`` applied)."""
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    keys = ("xy", "sigma", "confidence")
    outs: dict[str, list] = {k: [] for k in keys}
    sums = {k: 0.0 for k in LOSS_TERMS}
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        batch = data.batch(idx, device)
        if config is not None:
            terms, out = compute_losses(net, batch, map_image, config, physics, lambda_phys)
            for k in LOSS_TERMS:
                if terms[k] is not None:
                    sums[k] += float(terms[k]) * len(idx)
        else:
            out = net(batch["feats"], batch["site_index"], batch["mask"], map_image,
                      scene_index=batch.get("scene_index"))
        for k in keys:
            outs[k].append(getattr(out, k).float().cpu())
    net.train(was_training)
    result = {k: torch.cat(v).numpy() for k, v in outs.items()}
    if config is not None:
        result["losses"] = {k: (sums[k] / len(data) if (k != "phys" or physics is not None) else None) for k in LOSS_TERMS}
    return result


# -- schedule -------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps then cosine decay to 0.02 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress_ = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress_))


# -- distributed ----------------------------------------------------------------------------
def _dist_setup(device: torch.device) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return rank, world, device


# -- the loop ---------------------------------------------------------------------------------
@dataclass
class _Loop:
    """One training loop: model (``net`` is its DDP wrapper when distributed), optimiser,
    data, and the progress so far (``best`` val median [m], epochs without improvement)."""

    config: Config
    run: RunData
    device: torch.device
    rank: int
    world: int
    model: MapConditionedTransformer
    optimizer: torch.optim.Optimizer
    scheduler: Any
    physics: Any
    train_data: TensorData
    val_data: TensorData
    maps: SceneMaps  # every scene's map [M, C, S, S] and bounds [M, 4], on the device
    steps_per_epoch: int
    diag_batch: dict[str, torch.Tensor]  # the fixed train batch the gradient balance is measured on
    coarse_prior: dict[str, float] | None = None  # the coarse term's one-off posterior: walks, seconds
    net: Any = None
    start_epoch: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _build_loop(config: Config, run: RunData, device: torch.device, rank: int, world: int) -> _Loop:
    t = config.training
    parts = [scene_tensors(run, m, "train", config) for m in range(len(run.scenes))]
    val_data = tensors(run, "val", config)
    model = build_model(run.spec, config.seed).to(device)
    physics = make_scene_physics(config, run, device) if config.physics_active else None
    prior = _attach_posteriors(run, parts, physics, config)
    train_data = concat_tensors(parts)
    per_rank = len(train_data) // world
    steps_per_epoch = max(1, per_rank // t.batch_size + int(per_rank % t.batch_size > 0))
    total_steps, warmup = steps_per_epoch * t.epochs, steps_per_epoch * t.warmup_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    diag_batch = train_data.batch(torch.arange(min(t.batch_size, len(train_data))), device)
    return _Loop(config, run, device, rank, world, model, optimizer, scheduler, physics, train_data, val_data,
                 run.maps.to(device), steps_per_epoch, diag_batch, coarse_prior=prior)


def _attach_posteriors(run: RunData, parts: list[TensorData], physics, config: Config) -> dict[str, float] | None:
    """The coarse term's one-off posterior (:func:`attach_cell_posterior`) into each scene's train tensors
    ``parts``, with that scene's likelihood and bounds; None when the term is off, else ``{"walks", "seconds"}``."""
    terms = scene_terms(physics) if physics is not None else []
    if not (terms and isinstance(terms[0], SiteLikelihoodTerm) and config.physics_loss.coarse_weight > 0):
        return None
    total = {"walks": 0, "seconds": 0.0}
    for scene, term, part in zip(run.scenes, terms, parts):
        info = attach_cell_posterior(part, term.likelihood, tuple(scene.radio_map.bounds), run.spec.grid_size, config)
        total = {k: total[k] + info[k] for k in total}
    return total


def _restore(loop: _Loop, out: Path) -> None:
    """Continue from ``out/last.pt``: weights, optimiser, schedule, RNG and the metrics so far."""
    ckpt = run_store.load_checkpoint(out / run_store.LAST, loop.device)
    loop.model.load_state_dict(ckpt["model"])
    loop.optimizer.load_state_dict(ckpt["optimizer"])
    loop.scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    loop.start_epoch, loop.best, loop.bad_epochs = ckpt["epoch"], ckpt["best_val_median_m"], ckpt["bad_epochs"]
    loop.history = [row for row in run_store.read_metrics(out) if row.get("epoch", 0) <= loop.start_epoch]


def _wrap_distributed(loop: _Loop) -> None:
    loop.net = loop.model
    if loop.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        loop.net = DDP(loop.model, device_ids=[loop.device.index] if loop.device.type == "cuda" else None)


def _start_run_dir(loop: _Loop, out: Path) -> None:
    """Write the run's config, lineage and first log line (rank 0)."""
    config, physics, scenes = loop.config, loop.physics, loop.run.scenes
    run_store.write_lineage(out, loop.run.dataset.ref, loop.run.radio_map.ref,
                            [(s.dataset.ref, s.radio_map.ref) for s in scenes], config.data.holdout_scene)
    for m, term in enumerate(scene_terms(physics) if physics is not None else []):
        if term.calibration is not None:  # the first scene's is calibration.json, as for one scene
            run_store.write_calibration(out, term.calibration, None if m == 0 else scenes[m].name)
    atomic_write_text(out / run_store.CONFIG, config.to_yaml())
    params = sum(p.numel() for p in loop.model.parameters())
    p, labeled = config.physics_loss, int(loop.train_data.labeled.sum())
    phys = (f"on (lambda={p.lambda_phys:g} after {p.warmup_epochs:g} warm-up + {p.ramp_epochs:g} ramp epochs, "
            f"per-sample gradient clip {p.per_sample_grad_clip:g})" if physics else "off")
    if loop.coarse_prior is not None:
        phys += (f"; coarse term weight {p.coarse_weight:g}, mode term weight {p.mode_weight:g}: posterior over the cells of "
                 f"{loop.coarse_prior['walks']} walks in {loop.coarse_prior['seconds']:.1f} s (once)")
    run_store.append_log(out, f"train {len(loop.train_data)} ({labeled} labelled) val {len(loop.val_data)} samples, "
                              f"split {config.data.split}, {params} parameters, physics {phys}, "
                              f"{_describe_scenes(loop.run)}, "
                              f"device {loop.device}, world {loop.world}, epochs {loop.start_epoch}->{config.training.epochs}")


def _describe_scenes(run: RunData) -> str:
    """``dataset …, map …`` of the one scene, or ``N scenes: name (dataset …, map …), …``."""
    parts = [f"dataset {s.dataset.ref.describe()}, map {s.radio_map.ref.describe()}" for s in run.scenes]
    if len(parts) == 1:
        return parts[0]
    return f"{len(parts)} scenes: " + "; ".join(f"{s.name} ({p})" for s, p in zip(run.scenes, parts))


def _train_epoch(loop: _Loop, epoch: int) -> tuple[dict[str, float], int]:
    """One pass over this rank's share of the train split: ``(summed loss terms, samples seen)``; λ_phys
    follows :meth:`Config.lambda_at` step by step."""
    t = loop.config.training
    loop.net.train()
    gen = torch.Generator().manual_seed(loop.config.seed * 100_003 + epoch)
    perm = torch.randperm(len(loop.train_data), generator=gen)
    per_rank = len(perm) // loop.world
    perm = perm[loop.rank * per_rank : (loop.rank + 1) * per_rank] if loop.world > 1 else perm
    sums, seen = {k: 0.0 for k in LOSS_TERMS}, 0
    labeled = loop.train_data.labeled
    skip_unlabeled = loop.physics is None and not bool(labeled.all())  # they would contribute nothing
    for step, s in enumerate(range(0, len(perm), t.batch_size)):
        idx = perm[s : s + t.batch_size]
        if skip_unlabeled and bool(labeled[idx].any()):
            idx = idx[labeled[idx]]
        batch = loop.train_data.batch(idx, loop.device)
        lam = loop.config.lambda_at(epoch + step / loop.steps_per_epoch)
        terms, _ = compute_losses(loop.net, batch, loop.maps, loop.config, loop.physics, lam)
        loop.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(loop.model.parameters(), t.grad_clip)
        loop.optimizer.step()
        loop.scheduler.step()
        for k in LOSS_TERMS:
            if terms[k] is not None:
                sums[k] += float(terms[k].detach()) * len(idx)
        seen += len(idx)
        if loop.is_main:
            progress.report((epoch + (step + 1) / loop.steps_per_epoch) / t.epochs, f"epoch {epoch + 1}/{t.epochs}")
    return sums, max(seen, 1)


def _validate(loop: _Loop, lambda_phys: float) -> tuple[dict[str, float | None], dict[str, float]]:
    """``(mean val loss terms, val error metrics)`` of the current model (``total`` with ``lambda_phys``)."""
    val = predict_tensors(loop.net, loop.val_data, loop.maps, loop.device, config=loop.config,
                          physics=loop.physics, lambda_phys=lambda_phys)
    return val["losses"], error_metrics(position_errors(val["xy"], loop.val_data.target_xy.numpy()))


def _epoch_row(loop: _Loop, epoch: int, sums: dict[str, float], n_seen: int, val_losses: dict[str, float | None],
               val: dict[str, float], epoch_s: float, grads: dict[str, float | None]) -> dict[str, Any]:
    """The epoch's metrics row (see :mod:`core.stores.run`)."""
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": loop.optimizer.param_groups[0]["lr"],
                           "lambda_phys": loop.config.lambda_at(epoch + 1) if loop.physics is not None else 0.0}
    for k in LOSS_TERMS:
        row[f"train_{k}"] = sums[k] / n_seen if (k != "phys" or loop.physics is not None) else None
    for k in LOSS_TERMS:
        row[f"val_{k}"] = val_losses[k]
    row.update(val_median_m=val["median_m"], val_p90_m=val["p90_m"], epoch_s=epoch_s, **grads)
    return row


def _save_epoch(loop: _Loop, out: Path, row: dict[str, Any], improved: bool, val: dict[str, Any]) -> None:
    """Checkpoints, metrics, log line and status after an epoch (rank 0)."""
    meta = {"spec": asdict(loop.run.spec), "config": loop.config.to_dict(), "epoch": row["epoch"]}
    if improved:
        run_store.save_checkpoint(out / run_store.BEST, {**meta, "model": loop.model.state_dict(), "val": val})
    run_store.save_checkpoint(out / run_store.LAST, {
        **meta, "model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(), "rng": torch.get_rng_state(),
        "best_val_median_m": loop.best, "bad_epochs": loop.bad_epochs})
    run_store.write_metrics(out, loop.history)
    run_store.append_log(out, f"epoch {row['epoch']}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "epoch"))
    run_store.write_status(out, "running", row["epoch"], loop.config.training.epochs, loop.best)


def _run_epochs(loop: _Loop, out: Path, max_epochs: int | None, bar) -> bool:
    """Train from ``loop.start_epoch``; returns whether early stopping ended the run."""
    t = loop.config.training
    for epochs_this_call, epoch in enumerate(range(loop.start_epoch, t.epochs)):
        if max_epochs is not None and epochs_this_call >= max_epochs:
            break
        t0 = time.perf_counter()
        grads = gradient_balance(loop.model, loop.diag_batch, loop.maps, loop.config, loop.physics)
        sums, n_seen = _train_epoch(loop, epoch)
        val_losses, val = _validate(loop, loop.config.lambda_at(epoch + 1))
        row = _epoch_row(loop, epoch, sums, n_seen, val_losses, val, time.perf_counter() - t0, grads)
        loop.history.append(row)
        improved = val["median_m"] < loop.best
        loop.best, loop.bad_epochs = (val["median_m"], 0) if improved else (loop.best, loop.bad_epochs + 1)
        if loop.is_main:
            _save_epoch(loop, out, row, improved, val)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_total']:.3f}", val_med=f"{val['median_m']:.2f}m")
        if t.early_stopping_patience > 0 and loop.bad_epochs >= t.early_stopping_patience:
            if loop.is_main:
                run_store.append_log(out, f"early stop: val median has not improved for {loop.bad_epochs} epochs")
            return True
    return False


def train(config: Config, out_dir: str | os.PathLike, resume: bool = False, device: str | torch.device = "auto",
          run_data: RunData | None = None, show_progress: bool = True, max_epochs: int | None = None) -> dict[str, Any]:
    """Train ``config`` into ``out_dir``; returns ``{"best_val_median_m", "epochs_run", "stopped_early", ...}``.

    A taken ``out_dir`` is refused unless ``resume`` (then ``last.pt`` must be there, and the
    run's recorded dataset and map must be the ones ``config`` leads to).
    ``max_epochs`` stops after that many epochs in this call (tests interrupt a run with it).
    """
    rank, world, device = _dist_setup(resolve_device(device))
    out = Path(out_dir)
    if rank == 0:
        run_store.check_out_dir(out, resume=resume)
    if config.training.num_threads and device.type == "cpu":
        torch.set_num_threads(max(1, config.training.num_threads // world))
    run = run_data or prepare(config)
    if config.physics_active:  # calibrate "auto" weights now, so the run's config.yaml holds the numbers
        config = resolve_config(config, run.dataset, run.radio_map)
    loop = _build_loop(config, run, device, rank, world)
    if resume and (out / run_store.LAST).exists():
        for m, scene in enumerate(run.scenes):
            run_store.check_lineage(out, scene.dataset.ref, scene.radio_map.ref, m)
        _restore(loop, out)
    _wrap_distributed(loop)
    if loop.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume and loop.start_epoch == 0:
            run_store.append_log(out, f"--resume: no {out / run_store.LAST}, starting from scratch")
        _start_run_dir(loop, out)
    bar = None
    if show_progress and loop.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.training.epochs, initial=loop.start_epoch, desc="train", unit="epoch")
    stopped_early = _run_epochs(loop, out, max_epochs, bar)
    if bar is not None:
        bar.close()
    _finish(loop, out, stopped_early)
    return {"best_val_median_m": loop.best, "epochs_run": len(loop.history), "stopped_early": stopped_early,
            "history": loop.history, "rank": rank, "world": world, "coarse_prior": loop.coarse_prior}


def _finish(loop: _Loop, out: Path, stopped_early: bool) -> None:
    epochs, history = loop.config.training.epochs, loop.history
    done_epochs = history[-1]["epoch"] if history else 0
    finished = stopped_early or done_epochs >= epochs
    if loop.is_main:
        run_store.write_status(out, "done" if finished else "stopped", done_epochs, epochs, loop.best)
        progress.report(1.0 if finished else done_epochs / epochs, "training done")
    if loop.world > 1:
        import torch.distributed as dist

        dist.barrier()

# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/model.yaml", help="YAML config (default: configs/model.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (YAML value); repeatable")
    parser.add_argument("--out", required=True, help="run directory, e.g. runs/NAME")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in OUT from its last.pt")
    mode.add_argument("--force", action="store_true",
                      help="replace the run in OUT: the new run takes its place when training ends")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    config = load_config(resolve_path(args.config), args.overrides)
    out = Path(args.out)
    run_store.check_out_dir(out, resume=args.resume, force=args.force)
    check_writable(out / run_store.STATUS if args.resume else out, "--out")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    # --force: rank 0 writes the new run beside the old one; it replaces the old one when training ends
    target = atomic_path(out) if args.force and rank0 else contextlib.nullcontext(out)
    with target as out_dir:
        result = train(config, out_dir, resume=args.resume, device=args.device, show_progress=not args.no_progress)
    if result["rank"] == 0:
        print(f"best val median {result['best_val_median_m']:.2f} m after {result['epochs_run']} epochs -> {out}")
    return 0


__all__ = ["train", "compute_losses", "predict_tensors", "prepare", "load_scene", "config_from_dict"]
