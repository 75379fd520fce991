"""The physics term of the training loss, behind one interface: ``physics(xy [B, 2], batch) -> [B]``
per-sample losses and ``physics.active(batch) -> bool [B]`` (the samples with an observation).

* :class:`SiteLikelihoodTerm` (``physics_loss.likelihood: site``, the default): the calibrated per-site
  robust NLL [nats] of the pooled reports (:class:`core.physics.likelihood.RobustLikelihood`), calibrated
  on the LABELLED train walks (:func:`core.physics.calibration.calibrate`: their true positions are needed);
* :class:`ServingMapTerm` (``likelihood: serving``): the legacy serving-map loss
  (:class:`core.physics.physics_loss.PhysicsLoss`), with ``feature_weights: auto`` calibrated by
  :func:`calibrated_weights`: ``w_f ∝ (sigma_map,f / s_f)^2``;
* :class:`SceneTerms`: several scenes' terms, each sample evaluated with its own scene's.

:func:`physics_term` is the batch mean with each sample's gradient w.r.t. its position clipped to
``physics_loss.per_sample_grad_clip``; :mod:`core.learning.losses` adds it to ``L_total``.
"""

from __future__ import annotations

import numpy as np
import torch

from core.errors import ConfigError
from core.learning.config import Config, PhysicsLossConfig, config_from_dict
from core.learning.scene_data import RunData, labeled_train_indices
from core.stores.dataset import MeasurementDataset
from core.stores.radio_map import SITE_LAYERS, RadioMap


def likelihood_config(p: PhysicsLossConfig):
    """The :class:`~core.physics.likelihood.LikelihoodConfig` of a run's ``physics_loss`` section."""
    from core.physics.likelihood import LikelihoodConfig

    cells = p.cell_features if p.cell_features == "auto" else tuple(p.cell_features)
    return LikelihoodConfig(site_features=tuple(p.site_features), cell_features=cells, penalty=p.penalty,
                            silence=p.silence)


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


def make_physics_term(config: Config, radio_map: RadioMap, device: torch.device, dataset=None, calibration=None):
    """The physics term as training sees it: ``physics(xy [B, 2], batch) -> [B]`` per-sample losses and
    ``physics.active(batch) -> bool [B]`` (samples with an observation). Everything in training is built
    on this interface only.

    ``physics_loss.likelihood: site`` (default) calibrates the per-site likelihood on the LABELLED train
    walks of ``dataset`` (their true positions are needed); the calibration is ``physics.calibration``.
    ``calibration``: one given instead (``data.label_fraction: 0``: transferred from the init run, never made
    from labels; :mod:`core.learning.fine_tune`); with no labelled walk and none given, refused.
    """
    if config.physics_loss.likelihood == "serving":
        return ServingMapTerm(make_physics_loss(config, radio_map, device, dataset))
    from core.physics.calibration import calibrate
    from core.physics.likelihood import RobustLikelihood

    if dataset is None:
        raise ConfigError("physics_loss.likelihood: 'site' needs the dataset to calibrate on")
    if not all(name in radio_map.layers for name in SITE_LAYERS):
        raise ConfigError(f"physics_loss.likelihood: 'site' needs per-site layers, which {radio_map.source} lacks")
    if calibration is None:
        labelled = labeled_train_indices(dataset, config)
        if len(labelled) == 0:
            raise ConfigError("data.label_fraction: no labelled train walk to calibrate the likelihood on "
                              "(label_fraction 0 transfers the calibration of training.init_from)")
        calibration = calibrate(dataset.subset(labelled), radio_map, split=None)
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


def make_scene_physics(config: Config, run: RunData, device: torch.device, calibrations: list | None = None):
    """The physics term of every scene of ``run`` (:func:`make_physics_term` each, calibrated on its own
    labelled train walks, or given ``calibrations``, one per scene): that term itself for one scene, a
    :class:`SceneTerms` for several."""
    given = calibrations if calibrations is not None else [None] * len(run.scenes)
    terms = [make_physics_term(config, s.radio_map, device, s.dataset, c) for s, c in zip(run.scenes, given)]
    return terms[0] if len(terms) == 1 else SceneTerms(terms)


def scene_terms(physics) -> list:
    """The per-scene terms of ``physics`` (a single term is scene 0's)."""
    return physics.terms if isinstance(physics, SceneTerms) else [physics]


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

