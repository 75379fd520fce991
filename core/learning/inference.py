"""Using a trained run: load it, predict, refine, list runs. The API the app calls.

* :func:`load_run` -> :class:`LoadedRun` (config, model in eval mode, dataset, radio map,
  metrics history);
* :func:`predict` -> :class:`Prediction` (positions, sigma, confidence, errors and,
  on request, attention weights with the map-patch geometry);
* :func:`refine_prediction` -> :class:`RefinedPrediction` (test-time refinement with
  the run's refinement settings).

Run directories are read through :mod:`core.stores.run` (which also lists them). Outputs
are numpy arrays on the CPU. Missing or corrupt files, and a dataset or radio map that is
not the one the run was trained on, raise :class:`~core.errors.StoreError` naming them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core import resolve_path
from core.device import resolve_device
from core.errors import CoreError, StoreError
from core.learning.config import Config
from core.learning.data_loading import TensorData, build_tensors, map_input
from core.learning.metrics import position_errors
from core.learning.model import MapConditionedTransformer, build_model
from core.stores import run as run_store
from core.stores.dataset import MeasurementDataset
from core.stores.radio_map import RadioMap


@dataclass
class LoadedRun:
    """A run directory loaded for inference.

    run_dir: the directory; config: its resolved :class:`Config`; model: in eval mode on
    ``device``; dataset / radio_map: what it was trained on; metrics: metrics.jsonl as a
    DataFrame (empty if none); checkpoint: which file the weights came from.
    """

    run_dir: Path
    config: Config
    model: MapConditionedTransformer
    dataset: MeasurementDataset
    radio_map: RadioMap
    metrics: pd.DataFrame
    device: torch.device
    checkpoint: Path
    map_image: torch.Tensor
    _physics: Any = field(default=None, repr=False)

    @property
    def physics(self):
        """The run's :class:`~core.physics_loss.PhysicsLoss` (built on first use)."""
        if self._physics is None:
            from core.learning.training import make_physics_loss

            self._physics = make_physics_loss(self.config, self.radio_map, self.device, self.dataset)
        return self._physics

    @property
    def scene(self) -> str | None:
        """The scene of the run's dataset (and so of its radio map)."""
        return self.dataset.ref.scene

    def tensors(self, indices) -> TensorData:
        return build_tensors(self.dataset, self.radio_map, np.asarray(indices, dtype=np.int64),
                             self.model.spec.geometry_hint, self.config.physics_loss.observation)


@dataclass
class Prediction:
    """Model outputs for samples ``indices`` (numpy; ``N`` samples, metres)."""

    indices: np.ndarray  # [N] into the dataset
    xy: np.ndarray  # [N, 2] predicted position
    sigma: np.ndarray  # [N, 2] predicted std per axis
    confidence: np.ndarray  # [N] in [0, 1]
    true_xy: np.ndarray  # [N, 2] position at the last report
    error_m: np.ndarray  # [N]
    los: np.ndarray  # [N] serving site LOS at the last report
    num_reports: np.ndarray  # [N] valid reports
    #: {"temporal": [ [N, H, T, T] ] * layers, "cross": [ [N, H, T, P] ] * layers} or None
    attention: dict[str, list[np.ndarray]] | None = None
    patch_grid: tuple[int, int] | None = None  # (rows, cols); patch p = row * cols + col, row along +y
    patch_bounds: np.ndarray | None = None  # [P, 4] (x_min, y_min, x_max, y_max) of each patch [m]


@dataclass
class RefinedPrediction:
    """Refinement of a :class:`Prediction` (numpy; ``S`` steps)."""

    xy: np.ndarray  # [N, 2] final positions
    path: np.ndarray  # [S+1, N, 2] positions per step, start included
    loss: np.ndarray  # [S+1, N] objective per step (physics + prior)
    physics: np.ndarray  # [S+1, N] physics part
    refined: np.ndarray  # [N] bool, the samples that moved
    residual_before: np.ndarray  # [N, F] observed - map(p) at the start (feature units, AoA wrapped)
    residual_after: np.ndarray  # [N, F] at the end
    features: tuple[str, ...]
    error_before_m: np.ndarray  # [N]
    error_after_m: np.ndarray  # [N]
    steps: int
    lr: float
    threshold: float


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
             stores: tuple[MeasurementDataset, RadioMap] | None = None) -> LoadedRun:
    """Load ``run_dir`` (best.pt, else last.pt) with its dataset and radio map.

    The dataset and map its config leads to must be the ones it was trained on (the ids in
    its ``lineage.json``), and the map the one the dataset was made with. ``stores``: the
    ``(dataset, radio map)`` as loaded from disk, to skip loading them again (many runs on one
    scene); the run's ``data`` settings (split, sample cap) are applied to them as at training.
    """
    from core.learning.training import apply_data_config, load_scene
    from core.stores.lineage import check_map_of_dataset

    run_dir = resolve_path(run_dir)
    if not run_dir.is_dir():
        raise StoreError(f"{run_dir}: no such run directory")
    config = run_store.read_config(run_dir)
    ckpt_path = run_store.checkpoint_path(run_dir)
    device = resolve_device(device)
    ckpt = run_store.load_checkpoint(ckpt_path, device)
    if stores is None:
        dataset, radio_map = load_scene(config)
    else:
        check_map_of_dataset(stores[0].ref, stores[0].radio_map_ref, stores[1].ref)
        dataset, radio_map = apply_data_config(config, *stores), stores[1]
    run_store.check_lineage(run_dir, dataset.ref, radio_map.ref)
    model = build_model(ckpt["spec"], config.seed)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise StoreError(f"{ckpt_path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    if tuple(model.spec.bounds) != tuple(radio_map.bounds):
        raise StoreError(f"{ckpt_path}: trained on a map with bounds {model.spec.bounds}, but "
                         f"{radio_map.source} has {radio_map.bounds}")
    metrics = pd.DataFrame(run_store.read_metrics(run_dir))
    return LoadedRun(run_dir, config, model, dataset, radio_map, metrics, device, ckpt_path,
                     map_input(radio_map, model.spec.map_size).to(device))


def patch_bounds(spec, bounds) -> tuple[tuple[int, int], np.ndarray]:
    """``((rows, cols), [P, 4])``: map patches in scene metres, row-major, row along +y."""
    rows, cols = spec.patch_grid
    x_min, y_min, x_max, y_max = bounds
    px, py = (x_max - x_min) / cols, (y_max - y_min) / rows
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    return (rows, cols), np.stack([x_min + c * px, y_min + r * py, x_min + (c + 1) * px, y_min + (r + 1) * py], 1)


@torch.no_grad()
def predict(run: LoadedRun, indices, return_attention: bool = False, batch_size: int = 1024) -> Prediction:
    """Predict samples ``indices`` (dataset indices) of ``run``."""
    indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
    if indices.size and (indices.min() < 0 or indices.max() >= run.dataset.num_samples):
        raise CoreError(f"predict: indices must be in [0, {run.dataset.num_samples}), got {indices.min()}..{indices.max()}")
    data = run.tensors(indices)
    parts: dict[str, list] = {"xy": [], "sigma": [], "confidence": []}
    temporal: list[list[np.ndarray]] = []
    cross: list[list[np.ndarray]] = []
    for start in range(0, len(data), batch_size):
        b = data.batch(torch.arange(start, min(start + batch_size, len(data))), run.device)
        out = run.model(b["feats"], b["site_index"], b["mask"], run.map_image, return_attention=return_attention)
        for k in parts:
            parts[k].append(getattr(out, k).cpu().numpy())
        if return_attention:
            temporal.append([w.cpu().numpy() for w in out.attention["temporal"]])
            cross.append([w.cpu().numpy() for w in out.attention["cross"]])
    cat = {k: (np.concatenate(v) if v else np.zeros((0, 2) if k != "confidence" else (0,), np.float32))
           for k, v in parts.items()}
    true_xy = data.target_xy.numpy()
    pred = Prediction(
        indices=indices, xy=cat["xy"], sigma=cat["sigma"], confidence=cat["confidence"], true_xy=true_xy,
        error_m=position_errors(cat["xy"], true_xy), los=data.los.numpy(), num_reports=data.num_reports.numpy(),
    )
    if return_attention:
        layers = run.model.spec.num_layers
        pred.attention = {
            "temporal": [np.concatenate([c[layer] for c in temporal]) for layer in range(layers)],
            "cross": [np.concatenate([c[layer] for c in cross]) for layer in range(layers)],
        }
        pred.patch_grid, pred.patch_bounds = patch_bounds(run.model.spec, run.radio_map.bounds)
    return pred


def refine_prediction(run: LoadedRun, prediction: Prediction, steps: int | None = None, lr: float | None = None,
                      threshold: float | None = None) -> RefinedPrediction:
    """Refine ``prediction`` on the run's physics loss; ``None`` takes the config's refinement settings."""
    from core.physics.refinement import refine

    r = run.config.physics_loss.refinement
    steps = r.num_steps if steps is None else int(steps)
    lr = r.learning_rate if lr is None else float(lr)
    threshold = r.min_confidence_threshold if threshold is None else float(threshold)
    data = run.tensors(prediction.indices)
    dev = run.device
    res = refine(
        torch.as_tensor(prediction.xy, device=dev), data.observed.to(dev), run.physics, steps=steps, lr=lr,
        confidence=torch.as_tensor(prediction.confidence, device=dev), threshold=threshold,
        prior_sigma=torch.as_tensor(prediction.sigma, device=dev).clamp_min(1e-3) if r.use_prior else None,
        mask=data.obs_mask.to(dev),
    )
    xy = res.xy.cpu().numpy()
    return RefinedPrediction(
        xy=xy, path=res.path.cpu().numpy(), loss=res.loss.cpu().numpy(), physics=res.physics.cpu().numpy(),
        refined=res.refined.cpu().numpy(), residual_before=res.residual_start.cpu().numpy(),
        residual_after=res.residual_end.cpu().numpy(), features=tuple(res.features),
        error_before_m=prediction.error_m, error_after_m=position_errors(xy, prediction.true_xy),
        steps=steps, lr=lr, threshold=threshold,
    )
