"""Using a trained run: load it, predict, refine, list runs. The API the app calls.

* :func:`load_run` -> :class:`LoadedRun` (config, model in eval mode, dataset, radio map,
  metrics history);
* :func:`predict` -> :class:`Prediction` (positions, sigma, confidence, errors, the most
  likely coarse cells and, on request, attention weights with the map-patch geometry);
* :func:`calibrate_run`: the loaded scene's likelihood calibration (``calibration.json``, made and
  stored when missing or stale: the one call here that may write), set on ``LoadedRun.calibration``;
* :func:`refine_prediction` -> :class:`RefinedPrediction`: test-time MAP refinement of
  every sample (:class:`~core.physics.refinement.MapRefiner` on the run's calibrated
  likelihood, :func:`calibrate_run` first, with the network's Gaussian as prior and its next
  coarse cells as extra starts), with the path and per-term breakdowns before and after;
* :func:`refinement_surface`, :func:`residual_table`, :func:`serving_table`: what the
  Refinement inspector draws for one sample.

A run trained on several scenes is loaded for ONE scene at a time (``load_run(..., scene=NAME)``):
one of its training scenes, or a held-out scene it never saw (its dataset, its map, and a likelihood
calibration transferred from the training scenes: :func:`~core.physics.calibration.transfer_calibration`).

Run directories are read through :mod:`core.stores.run` (which also lists them). Outputs
are numpy arrays on the CPU. Missing or corrupt files, and a dataset or radio map that is
not the one the run was trained on, raise :class:`~core.errors.StoreError` naming them.
"""

from __future__ import annotations

import contextlib
import math
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
from core.learning.data_loading import TensorData, build_tensors
from core.learning.groups import ue_groups
from core.learning.kinds import build_model
from core.learning.metrics import position_errors
from core.learning.model import MapConditionedTransformer, SceneMaps
from core.learning.physics_terms import likelihood_config
from core.stores import run as run_store
from core.stores.dataset import MeasurementDataset
from core.stores.radio_map import RadioMap

#: coarse cells :func:`predict` returns by default (the chosen one and the next 3)
COARSE_TOP_K = 4


@dataclass
class LoadedRun:
    """A run directory loaded for inference.

    run_dir: the directory; config: its resolved :class:`Config`; model: in eval mode on
    ``device``; dataset / radio_map: the scene loaded (a training scene, by default the first, or a
    held-out one); metrics: metrics.jsonl as a DataFrame (empty if none); checkpoint: which file
    the weights came from. scene_index: the loaded scene's index among the training scenes (None:
    held out); trained_scenes: the training scenes' names, in scene-index order. foreign_dataset:
    a training scene evaluated on ANOTHER dataset of it (``--dataset``: e.g. the same walks traced in
    the realistic world), made with the trained map; its calibration is made in memory, never stored.
    map_override: ``{"recorded": ref, "used": ref}`` when the scene is read against ANOTHER map than the
    one its dataset records (``load_run(radio_map_override=PATH)``, ``evaluate --radio-map``: e.g. a
    k-path map); its calibration too is made in memory, never stored. None otherwise.
    """

    run_dir: Path
    config: Config
    model: MapConditionedTransformer  # or core.learning.agnostic.AgnosticTransformer (model.spec.kind)
    dataset: MeasurementDataset
    radio_map: RadioMap
    metrics: pd.DataFrame
    device: torch.device
    checkpoint: Path
    map_image: Any  # the model's scene input: an image [C, S, S] or an agnostic SceneTable
    scene_index: int | None = 0
    trained_scenes: tuple[str, ...] = ()
    foreign_dataset: bool = False
    map_override: dict | None = None
    #: the loaded scene's :class:`~core.physics.calibration.Calibration`: None until :func:`calibrate_run`
    calibration: Any = field(default=None, repr=False)
    _likelihood: Any = field(default=None, repr=False)
    _refiners: dict = field(default_factory=dict, repr=False)
    _variants: dict = field(default_factory=dict, repr=False)

    @property
    def held_out(self) -> bool:
        """Whether the loaded scene is not one the run was trained on."""
        return self.scene_index is None

    @property
    def maps(self) -> SceneMaps:
        """The loaded scene's map and bounds, as the model reads them (``M = 1``)."""
        return SceneMaps.stack([self.map_image], [self.radio_map.bounds]).to(self.map_image.device)

    @property
    def likelihood(self):
        """The calibrated :class:`~core.physics.likelihood.RobustLikelihood` of the run's map (built once, in
        memory, from :attr:`calibration`: :func:`calibrate_run` must have set it)."""
        if self.calibration is None:
            raise CoreError(f"run {self.run_dir}: no calibration loaded (calibrate_run(run) first)")
        if self._likelihood is None:
            from dataclasses import replace

            from core.physics.likelihood import RobustLikelihood

            config = likelihood_config(self.config.physics_loss)
            lik = RobustLikelihood(self.radio_map, self.calibration, replace(config, silence=False), device=self.device)
            if config.silence:
                lik = RobustLikelihood(lik.maps, self.calibration, config, silence=self._silence(lik.maps))
            self._likelihood = lik
        return self._likelihood

    def silence_threshold(self) -> float:
        """``G_thr`` [dB] of the silence term (:func:`~core.physics.silence.silence_threshold_db`); CoreError when
        the dataset records no sensitivity (every site is reported: silence says nothing) or its map no transmit
        power."""
        from core.physics.silence import silence_threshold_db

        threshold = silence_threshold_db(self.dataset, self.radio_map)
        if threshold is None:
            raise CoreError(f"silence: {self.dataset.ref.path or 'the dataset'} records no sensitivity "
                            "(--sensitivity-dbm off, or no measurement model: every site is reported, so silence "
                            "says nothing), or its map no transmit power")
        return threshold

    def silence_unavailable(self) -> str | None:
        """Why the silence term cannot be used on the loaded scene (:meth:`silence_threshold`'s one line), None
        when it can."""
        try:
            self.silence_threshold()
        except CoreError as exc:
            return str(exc)
        return None

    def with_silence(self, on: bool = True) -> LoadedRun:
        """This run with the likelihood's silence term on (or off): ``physics_loss.silence`` set in a COPY of the
        config, never in this run's (two users of one cached run each see their own choice).

        ``self`` when its config already says so; else a shallow copy sharing the model, dataset, map and
        calibration (:func:`calibrate_run` first), with its own config, :attr:`likelihood` (built here, so that
        a copy of it with another dataset, a report window, keeps the silence fitted on this scene) and refiners,
        made once per run and flag. CoreError (:meth:`silence_threshold`) when on and the dataset records no
        sensitivity.
        """
        import copy
        import dataclasses

        on = bool(on)
        if bool(self.config.physics_loss.silence) == on:
            return self
        if on:
            self.silence_threshold()
        made = self._variants.get(on)
        if made is None or made.dataset is not self.dataset or made.radio_map is not self.radio_map:
            calibrate_run(self)
            config = copy.deepcopy(self.config)
            config.physics_loss.silence = on
            made = dataclasses.replace(self, config=config, _likelihood=None, _refiners={}, _variants={})
            made.likelihood  # noqa: B018 -- built now (see the docstring)
            self._variants[on] = made
        return made

    def _silence(self, maps):
        """The silence term of the loaded scene (:mod:`core.physics.silence`): its outlier share fitted on the
        train split's labelled walks, the default for a held-out scene (no labels)."""
        from core.physics.silence import Silence, fit_silence

        threshold = self.silence_threshold()
        if self.held_out:
            return Silence(threshold)
        return fit_silence(self.dataset, maps, self.calibration, threshold, split="train")

    def refiner(self, search=None):
        """A :class:`~core.physics.refinement.MapRefiner` over :attr:`likelihood` for ``search``
        (a MapSearchConfig; None: :func:`map_search_config` of the run), one per config."""
        from core.physics.refinement import MapRefiner

        search = search or map_search_config(self.config)
        if search not in self._refiners:
            self._refiners[search] = MapRefiner(self.likelihood, search)
        return self._refiners[search]

    @property
    def scene(self) -> str | None:
        """The scene of the run's dataset (and so of its radio map)."""
        return self.dataset.ref.scene

    def tensors(self, indices) -> TensorData:
        from core.learning.scene_data import spec_num_sites

        return build_tensors(self.dataset, self.radio_map, np.asarray(indices, dtype=np.int64),
                             self.model.spec.geometry_hint, self.config.physics_loss.observation,
                             self.config.physics_loss.report_window_s, num_sites=spec_num_sites(self.model.spec),
                             kind=self.model.spec.kind)


@dataclass
class Prediction:
    """Model outputs for samples ``indices`` (numpy; ``N`` samples, metres)."""

    indices: np.ndarray  # [N] into the dataset
    xy: np.ndarray  # [N, 2] predicted position
    sigma: np.ndarray  # [N, 2] predicted std per axis
    confidence: np.ndarray  # [N] in [0, 1]
    true_xy: np.ndarray  # [N, 2] position at the last report
    error_m: np.ndarray  # [N]
    los: np.ndarray  # [N] serving site LOS at the latest present report
    num_reports: np.ndarray  # [N] valid reports
    #: the UE groups of every table, ``{group: bool [N]}`` (:func:`core.learning.groups.ue_groups`, the run's window)
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    #: the ``k`` most likely coarse cells, most likely first (the first is the one ``xy`` lies in):
    coarse_xy: np.ndarray | None = None  # [N, k, 2] their centres [m]
    coarse_prob: np.ndarray | None = None  # [N, k] their softmax probabilities
    #: [N, 2] the fine head's own std inside the chosen cell [m] (``sigma`` adds the coarse spread)
    fine_sigma: np.ndarray | None = None
    #: {"temporal": [ [N, H, T, T] ] * layers, "cross": [ [N, H, T, P] ] * layers} or None
    attention: dict[str, list[np.ndarray]] | None = None
    patch_grid: tuple[int, int] | None = None  # (rows, cols); patch p = row * cols + col, row along +y
    patch_bounds: np.ndarray | None = None  # [P, 4] (x_min, y_min, x_max, y_max) of each patch [m]
    #: with ``return_distribution=True`` (:func:`predict`), the network's distribution from coarse to fine:
    #: ``cell_prob [N, G, G]`` the probability of each of its ``G x G`` coarse cells (softmax of the coarse logits,
    #: unitless, sums to 1 per sample; the chosen cell is its argmax); cell ``(i, j)``: row ``i`` along +y,
    #: column ``j`` along +x of ``cell_bounds [4]`` (x_min, y_min, x_max, y_max) [m], the loaded map's bounds,
    #: each cell ``(x_max - x_min) / G`` by ``(y_max - y_min) / G`` m
    cell_prob: np.ndarray | None = None
    cell_bounds: np.ndarray | None = None
    #: agnostic model only (else None): ``[N, s, s]`` the fine head's weights over the ``s x s`` sub-points of the
    #: chosen cell (softmax, sums to 1); sub-point ``(a, b)`` lies at the cell centre + ``((b + 0.5) / s - 0.5,
    #: (a + 0.5) / s - 0.5)`` times the cell size (:func:`subpoint_xy`)
    subpoint_prob: np.ndarray | None = None


def load_run(run_dir: str | os.PathLike, device: str | torch.device = "cpu",
             stores: tuple[MeasurementDataset, RadioMap] | None = None, scene: str | None = None,
             dataset_path: str | os.PathLike | None = None,
             radio_map_override: str | os.PathLike | None = None) -> LoadedRun:
    """Load ``run_dir`` (best.pt, else last.pt) with the dataset and radio map of one scene.

    ``scene``: one of the run's training scenes (default: the first) or a held-out scene, whose
    dataset is ``dataset_path`` (default :func:`holdout_dataset_path`) and map the one it was made
    with. A training scene's dataset and map must be the ones it was trained on (the ids in its
    ``lineage.json``), and the map the one the dataset was made with; with ``dataset_path`` a training
    scene is read from another dataset of that scene (another world, say), whose map must be the
    trained one (``LoadedRun.foreign_dataset``). ``stores``: the
    ``(dataset, radio map)`` as loaded from disk, to skip loading them again (many runs on one
    scene); the run's ``data`` settings (split, sample cap) are applied to them as at training.
    ``radio_map_override``: a map store to read the scene against INSTEAD of its dataset's (explicit;
    :func:`~core.stores.lineage.check_map_override`: same scene, sites, propagation, and here the same
    bounds and grid), after every lineage check has passed on the recorded stores; recorded in
    ``LoadedRun.map_override``.
    """
    from core.learning.scene_data import apply_data_config, check_fits, scene_input
    from core.stores.lineage import check_map_of_dataset

    run_dir = resolve_path(run_dir)
    if not run_dir.is_dir():
        raise StoreError(f"{run_dir}: no such run directory")
    config = run_store.read_config(run_dir)
    ckpt_path = run_store.checkpoint_path(run_dir)
    device = resolve_device(device)
    ckpt = run_store.load_checkpoint(ckpt_path, device)
    trained = trained_scenes(run_dir, config)
    index = 0 if scene is None else (trained.index(scene) if scene in trained else None)
    foreign = index is not None and dataset_path is not None
    if stores is None:
        dataset, radio_map = _scene_stores(config, index, scene, dataset_path)
    else:
        check_map_of_dataset(stores[0].ref, stores[0].radio_map_ref, stores[1].ref)
        dataset, radio_map = apply_data_config(config, *stores), stores[1]
    if index is not None:
        run_store.check_lineage(run_dir, None if foreign else dataset.ref, radio_map.ref, index)
    override = None
    if radio_map_override is not None:
        radio_map, override = _override_map(dataset, radio_map, radio_map_override)
    model = build_model(ckpt["spec"], config.seed)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise StoreError(f"{ckpt_path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    if index is None:
        check_fits(model.spec, dataset, radio_map, f"--scene {scene}")
    elif index == 0 and tuple(model.spec.bounds) != tuple(radio_map.bounds):
        raise StoreError(f"{ckpt_path}: trained on a map with bounds {model.spec.bounds}, but "
                         f"{radio_map.source} has {radio_map.bounds}")
    metrics = pd.DataFrame(run_store.read_metrics(run_dir))
    return LoadedRun(run_dir, config, model, dataset, radio_map, metrics, device, ckpt_path,
                     scene_input(radio_map, model.spec).to(device), index, tuple(trained), foreign, override)


def _override_map(dataset: MeasurementDataset, recorded: RadioMap, path) -> tuple[RadioMap, dict]:
    """``(the map at path, {"recorded", "used"} refs)``: another map of the same physics and grid (see load_run)."""
    from core.stores.lineage import check_map_override

    used = RadioMap.load(resolve_path(path))
    check_map_override(dataset.ref, used.ref)
    if tuple(used.bounds) != tuple(recorded.bounds) or used.shape != recorded.shape:
        raise StoreError(f"--radio-map {used.ref.describe()}: bounds {used.bounds} and grid {used.shape} differ from "
                         f"{recorded.ref.describe()}'s ({recorded.bounds}, {recorded.shape})")
    return used, {"recorded": recorded.ref.to_dict(), "used": used.ref.to_dict()}


def trained_scenes(run_dir: str | os.PathLike, config: Config) -> list[str]:
    """The run's training scenes in scene-index order: from its lineage.json, else its datasets' metadata."""
    from core.stores.lineage import store_ref

    lineage = run_store.read_lineage(run_dir)
    if lineage is not None and lineage.scene_names:
        return lineage.scene_names
    return [store_ref(resolve_path(p), "dataset").scene or "" for p in config.data.training_datasets]


def holdout_dataset_path(config: Config, scene: str) -> Path:
    """Where a held-out scene's dataset is: ``<folder of the first training dataset>/<scene>`` (the
    workspace layout, ``datasets/<scene>``)."""
    return resolve_path(config.data.training_datasets[0]).parent / scene


def _scene_stores(config: Config, index: int | None, scene: str | None, dataset_path) -> tuple[MeasurementDataset, RadioMap]:
    """``(dataset with config.data applied, radio map)`` of training scene ``index``, or of held-out ``scene``."""
    from core.learning.scene_data import apply_data_config, load_scene, load_stores
    from core.stores.lineage import maps_folder_of

    if index == 0 and config.data.datasets is None and dataset_path is None:
        return load_scene(config)
    maps_dir = resolve_path(config.physics_loss.radio_maps_dir)
    if index is not None and dataset_path is None:
        path, key = config.data.training_datasets[index], f"data.datasets[{index}]"
    else:  # a held-out scene's, or another dataset of a training scene: the map its dataset records, where it is
        path, key = dataset_path or holdout_dataset_path(config, scene), f"--scene {scene}"
        maps_dir = maps_folder_of(resolve_path(path), maps_dir)
    dataset, radio_map = load_stores(path, maps_dir, None, key)
    if (index is None or dataset_path is not None) and dataset.ref.scene != scene:
        raise CoreError(f"--scene {scene}: dataset {dataset.ref.describe()} is of scene {dataset.ref.scene!r}")
    return apply_data_config(config, dataset, radio_map), radio_map


def calibrate_run(run: LoadedRun):
    """The loaded scene's likelihood calibration, set on ``run.calibration`` and returned (the one call that
    may calibrate and write a file; a no-op once set).

    A training scene's is the stored ``calibration[_<scene>].json`` when it was made from these stores,
    else calibrated on the train split and stored (:func:`core.learning.run_calibration.ensure_calibration`);
    a held-out scene's is transferred from the training scenes' (:func:`_transferred_calibration`).
    """
    from core.learning.run_calibration import ensure_calibration

    if run.calibration is None:
        if run.held_out:
            run.calibration = _transferred_calibration(run)
        elif run.config.data.label_fraction == 0 and not run.foreign_dataset:  # trained with no label: none read now
            run.calibration = _unlabelled_run_calibration(run)
        else:
            name = None if run.scene_index == 0 else run.trained_scenes[run.scene_index]
            run.calibration = ensure_calibration(run.run_dir, run.dataset, run.radio_map, name,
                                                 store=not (run.foreign_dataset or run.map_override))
    return run.calibration


def _unlabelled_run_calibration(run: LoadedRun):
    """A run trained with ``data.label_fraction: 0``: its stored calibration when made from these stores, else
    the one transferred again from its ``training.init_from`` run -- never calibrated on this scene's labels."""
    from core.learning.fine_tune import check_init_from, transferred_calibrations
    from core.learning.run_calibration import made_from, read_calibration

    name = None if run.scene_index == 0 else run.trained_scenes[run.scene_index]
    with contextlib.suppress(StoreError):
        stored = read_calibration(run.run_dir, name)
        if stored is not None and made_from(stored, run.dataset.ref, run.radio_map.ref):
            return stored
    return transferred_calibrations(check_init_from(run.config), [(run.dataset, run.radio_map)])[0]


def _transferred_calibration(run: LoadedRun):
    """The held-out scene's likelihood calibration: transferred from the training scenes' stored
    calibrations (the first scene's is made and stored when missing), never from this scene's labels."""
    from core.learning.run_calibration import stored_calibrations
    from core.physics.calibration import transfer_calibration

    sources = stored_calibrations(run.run_dir, run.trained_scenes)
    if not sources:
        first = load_run(run.run_dir, run.device, scene=run.trained_scenes[0] if run.trained_scenes else None)
        sources.append(calibrate_run(first))
    cal = transfer_calibration(sources, run.radio_map)
    cal.meta.update({"scene": run.scene, "dataset": run.dataset.ref.to_dict(), "radio_map": run.radio_map.ref.to_dict()})
    return cal


@contextlib.contextmanager
def cpu_threads(run: LoadedRun):
    """Run with the run's ``training.num_threads`` torch CPU threads (restored after).

    On a CPU device only, and only when set (> 0). One thread is the default because on
    a shared 2-core CPU every elementwise op of a multi-threaded pass waits for a busy
    core: the MAP search of 2,000 samples took 31 s with 2 threads under load, 0.7 s with 1.
    """
    n = int(run.config.training.num_threads or 0)
    old = torch.get_num_threads()
    if run.device.type != "cpu" or n <= 0 or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def patch_bounds(spec, bounds) -> tuple[tuple[int, int], np.ndarray]:
    """``((rows, cols), [P, 4])``: map patches in scene metres, row-major, row along +y."""
    rows, cols = spec.patch_grid
    x_min, y_min, x_max, y_max = bounds
    px, py = (x_max - x_min) / cols, (y_max - y_min) / rows
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    return (rows, cols), np.stack([x_min + c * px, y_min + r * py, x_min + (c + 1) * px, y_min + (r + 1) * py], 1)


#: samples per network pass in :func:`predict`, per device type. On the CPU, 256 keeps a pass's activations in
#: cache: 0.26 ms per sample against 0.41 ms at 1024 (agnostic model, one thread, the 2-core CPU; outputs
#: identical bit for bit); ``python -m core bench inference --batch-sizes`` measures it.
PREDICT_BATCH = {"cpu": 256, "cuda": 1024}


def predict(run: LoadedRun, indices, return_attention: bool = False, batch_size: int | None = None,
            top_k: int = COARSE_TOP_K, return_distribution: bool = False) -> Prediction:
    """Predict samples ``indices`` (dataset indices) of ``run`` (with :func:`cpu_threads`), ``batch_size`` at a
    time (default :data:`PREDICT_BATCH` for the run's device type; the outputs do not depend on it).

    ``top_k``: how many of the most likely coarse cells to return (``coarse_xy``,
    ``coarse_prob``; at most ``G * G``). ``return_distribution``: also the network's whole distribution
    (``cell_prob [N, G, G]``, ``cell_bounds``, and the agnostic model's ``subpoint_prob [N, s, s]``;
    ``4 G²`` bytes per sample, so for a few samples).
    """
    batch_size = batch_size or PREDICT_BATCH.get(run.device.type, 1024)
    with cpu_threads(run):
        return _predict(run, indices, return_attention, batch_size, top_k, return_distribution)


def subpoint_xy(prediction: Prediction, row: int, grid_size: int) -> np.ndarray:
    """``[s, s, 2]`` positions [m] of the sub-points of sample row ``row``'s chosen cell (the cells of a
    ``grid_size x grid_size`` grid over ``prediction.cell_bounds``), laid out as ``subpoint_prob``."""
    if prediction.subpoint_prob is None or prediction.cell_prob is None:
        raise CoreError("subpoint_xy: the prediction has no sub-point weights (an agnostic run, return_distribution)")
    s = prediction.subpoint_prob.shape[-1]
    x_min, y_min, x_max, y_max = (float(v) for v in prediction.cell_bounds)
    w, h = (x_max - x_min) / grid_size, (y_max - y_min) / grid_size
    i, j = np.unravel_index(int(np.argmax(prediction.cell_prob[row])), prediction.cell_prob[row].shape)
    u = (np.arange(s) + 0.5) / s - 0.5
    cx, cy = x_min + (j + 0.5) * w, y_min + (i + 0.5) * h
    return np.stack(np.meshgrid(cx + u * w, cy + u * h, indexing="xy"), -1)  # [a (y), b (x), 2]


@torch.no_grad()
def _predict(run: LoadedRun, indices, return_attention: bool, batch_size: int, top_k: int,
             return_distribution: bool = False) -> Prediction:
    indices = np.atleast_1d(np.asarray(indices, dtype=np.int64))
    if indices.size and (indices.min() < 0 or indices.max() >= run.dataset.num_samples):
        raise CoreError(f"predict: indices must be in [0, {run.dataset.num_samples}), got {indices.min()}..{indices.max()}")
    data = run.tensors(indices)
    parts: dict[str, list] = {"xy": [], "sigma": [], "confidence": [], "coarse_xy": [], "coarse_prob": [],
                              "fine_sigma": []}
    g2 = run.model.spec.grid_size ** 2
    top_k = int(min(max(top_k, 1), g2))
    attention: dict[str, list[list[np.ndarray]]] = {}
    maps = run.maps  # the loaded scene's map and bounds: positions in its frame
    frame = run.model.frame(maps)
    agnostic = run.model.spec.kind == "agnostic"
    if return_distribution:
        parts["cell_prob"] = []
        if agnostic:
            parts["subpoint_prob"] = []
    g = run.model.spec.grid_size
    for start in range(0, len(data), batch_size):
        b = data.batch(torch.arange(start, min(start + batch_size, len(data))), run.device)
        out = run.model(b["feats"], b["site_index"], b["mask"], maps,
                        return_attention=return_attention or (return_distribution and agnostic))
        prob_all = out.logits.softmax(-1)
        prob, cells = prob_all.topk(top_k, dim=-1)
        out_np = {"xy": out.xy, "sigma": out.sigma, "confidence": out.confidence, "coarse_prob": prob,
                  "coarse_xy": run.model.cell_centre(cells.reshape(-1), frame).reshape(*cells.shape, 2),
                  "fine_sigma": (0.5 * out.logvar).exp() * frame.cell_wh}
        if return_distribution:
            out_np["cell_prob"] = prob_all.reshape(-1, g, g)
            if agnostic:
                w = out.attention["subpoint_weights"][0]
                s = int(round(w.shape[-1] ** 0.5))
                out_np["subpoint_prob"] = w.reshape(-1, s, s)
        for k in parts:
            parts[k].append(out_np[k].cpu().numpy())
        if return_attention:
            for key, layers in out.attention.items():
                attention.setdefault(key, []).append([w.cpu().numpy() for w in layers])
    s = run.model.spec.fine_subgrid
    empty = {"xy": (0, 2), "sigma": (0, 2), "confidence": (0,), "coarse_xy": (0, top_k, 2), "coarse_prob": (0, top_k),
             "fine_sigma": (0, 2), "cell_prob": (0, g, g), "subpoint_prob": (0, s, s)}
    cat = {k: (np.concatenate(v) if v else np.zeros(empty[k], np.float32)) for k, v in parts.items()}
    true_xy = data.target_xy.numpy()
    pred = Prediction(
        indices=indices, xy=cat["xy"], sigma=cat["sigma"], confidence=cat["confidence"], true_xy=true_xy,
        error_m=position_errors(cat["xy"], true_xy), los=data.los.numpy(), num_reports=data.num_reports.numpy(),
        coarse_xy=cat["coarse_xy"], coarse_prob=cat["coarse_prob"], fine_sigma=cat["fine_sigma"],
        groups=ue_groups(run.dataset, indices, run.config.physics_loss.report_window_s),
        cell_prob=cat.get("cell_prob"), subpoint_prob=cat.get("subpoint_prob"),
        cell_bounds=np.asarray(run.radio_map.bounds, dtype=np.float64) if return_distribution else None,
    )
    if return_attention:  # per key, per layer: the batches concatenated
        pred.attention = {key: [np.concatenate([c[layer] for c in chunks]) for layer in range(len(chunks[0]))]
                          for key, chunks in attention.items()}
        if "cross" in pred.attention:  # the memorizing model's map patches
            pred.patch_grid, pred.patch_bounds = patch_bounds(run.model.spec, run.radio_map.bounds)
    return pred


# -- MAP refinement ------------------------------------------------------------------------------
#: extra search centres: the most likely coarse cells after the chosen one
DEFAULT_TOP_K = 3
#: the prior's sigma when the config turns the prior off (``use_prior: false``): flat over any map [m]
FLAT_PRIOR_SIGMA_M = 1.0e4
#: stages of :attr:`RefinedPrediction.path` before the polish steps
PATH_STAGES = ("network", "best start", "pattern search")
SOURCES = ("window", "centre", "global", "scan")
#: the columns of :func:`residual_table`
RESIDUAL_COLUMNS = ("site", "reports", "path at network", "path at MAP",
                    *(f"{f} σ {w}" for f in ("path_gain", "toa", "aoa") for w in ("network", "MAP")),
                    "NLL network", "NLL MAP")


def map_search_config(config: Config):
    """The :class:`~core.physics.refinement.MapSearchConfig` of a run's config.

    From ``physics_loss.refinement``: ``num_steps`` -> ``polish_steps`` (Adam steps after
    the pattern search), ``scan_starts`` -> ``scan_top`` (starts from the exact scan),
    ``prior_min_sigma_m`` -> ``min_sigma_m`` (the network prior's sigma floor).
    Everything else: the MapSearchConfig defaults (``learning_rate`` was the old gradient
    refinement's step from the raw estimate; the polish starts from a 0.5 m pattern search,
    so its own 0.25 m default stays).
    """
    from core.physics.refinement import MapSearchConfig

    r = config.physics_loss.refinement
    return MapSearchConfig(polish_steps=int(r.num_steps), scan_top=int(r.scan_starts),
                           min_sigma_m=float(r.prior_min_sigma_m))


def walk_config(config: Config):
    """The :class:`~core.physics.trajectory.WalkConfig` of a run's config: ``physics_loss.refinement.walk_basins``
    -> ``basins`` (runner-up basins of the snapshot search the whole walk also starts from); the rest its defaults."""
    from core.physics.trajectory import WalkConfig

    return WalkConfig(basins=int(config.physics_loss.refinement.walk_basins))


@dataclass
class RefinedPrediction:
    """MAP refinement of a :class:`Prediction` (numpy; ``N`` samples, ``K`` slots, ``M`` starts,
    ``P = polish_steps + 3`` path points). Positions in metres, NLLs in nats.

    xy ``[N, 2]`` the MAP estimate; start_xy ``[N, 2]`` the network's mean ``mu``;
    prior_sigma ``[N, 2]`` the prior's sigma (the network's, or :data:`FLAT_PRIOR_SIGMA_M`).
    path ``[P, N, 2]``: ``mu``, the winning start's best grid point, the pattern search's
    end, then each polish step (labels ``path_labels``); path_posterior ``[P, N]``
    ``J = NLL + prior_nll`` there. ``xy`` is the best point of the polish (not always its
    last). starts ``[N, M, 2]``, start_posterior ``[N, M]`` each start's best grid point
    (``start_labels``: "window", "centre 1".., "global 1".., "scan 1".., NaN posterior when not refined);
    source ``[N]`` the winner's kind (index into :data:`SOURCES`), start_index ``[N]`` its column.
    posterior_*, nll_*, prior_* ``[N]`` at ``mu`` (``_before``) and at ``xy`` (``_after``).
    site_ids ``[N, K]`` the observation's slots (-1 empty), weight ``[N, K, 3]`` reports
    averaged into each value; per slot and feature (path_gain, toa, aoa) at ``mu`` / at
    ``xy``: site_nats ``[N, K, 3]`` the NLL terms, site_z signed residuals in sigma units
    ``(measured - bias - map) / (scale / sqrt(n))`` (AoA: the chord, signed by the wrapped
    angle; NaN where absent), residual the same in feature units (dB, ns, deg),
    covered ``[N, K]`` whether the site has a path there. cell_nats / cell_z ``[N, F_c]``
    for the serving features ``cell_features``. refined ``[N]`` bool: searched (all,
    unless a confidence threshold gates it).
    """

    indices: np.ndarray
    xy: np.ndarray
    start_xy: np.ndarray
    prior_sigma: np.ndarray
    path: np.ndarray
    path_labels: tuple[str, ...]
    path_posterior: np.ndarray
    starts: np.ndarray
    start_posterior: np.ndarray
    start_labels: tuple[str, ...]
    source: np.ndarray
    start_index: np.ndarray
    posterior_before: np.ndarray
    posterior_after: np.ndarray
    nll_before: np.ndarray
    nll_after: np.ndarray
    prior_before: np.ndarray
    prior_after: np.ndarray
    refined: np.ndarray
    site_ids: np.ndarray
    weight: np.ndarray
    site_nats_before: np.ndarray
    site_nats_after: np.ndarray
    site_z_before: np.ndarray
    site_z_after: np.ndarray
    residual_before: np.ndarray
    residual_after: np.ndarray
    covered_before: np.ndarray
    covered_after: np.ndarray
    cell_features: tuple[str, ...]
    cell_nats_before: np.ndarray
    cell_nats_after: np.ndarray
    cell_z_before: np.ndarray
    cell_z_after: np.ndarray
    error_before_m: np.ndarray
    error_after_m: np.ndarray
    threshold: float | None
    top_k: int
    window_s: float
    use_prior: bool
    search: Any
    seconds: float
    #: the prior used when it is not the Gaussian of ``start_xy`` / ``prior_sigma`` (a PositionPrior: the heatmap)
    prior: Any = None
    #: "gaussian", "heatmap" or "flat"
    prior_kind: str = "gaussian"
    #: ``[N]`` [nats] the silence term (the sites a report with a free slot did not hear,
    #: :mod:`core.physics.silence`) in ``nll_before`` / ``nll_after``; 0 without it
    silence_before: np.ndarray | None = None
    silence_after: np.ndarray | None = None

    def source_name(self, i: int) -> str:
        """Which start won for sample row ``i`` ("window", "centre 2", "global 1"; "not refined")."""
        return self.start_labels[int(self.start_index[i])] if self.refined[i] else "not refined"


def _signed_z(terms) -> tuple[np.ndarray, np.ndarray]:
    """``(site_z [B, K, 3], cell_z [B, F_c])`` signed by the residuals, NaN where absent."""
    z = np.where(terms.present.cpu().numpy(), np.sign(terms.residual.cpu().numpy()) * terms.z.cpu().numpy(), np.nan)
    cz = np.sign(terms.cell_residual.cpu().numpy()) * terms.cell_z.cpu().numpy()
    return z, cz


def _start_labels(n_centres: int, n_global: int, n_scan: int = 0) -> tuple[str, ...]:
    return ("window", *(f"centre {i + 1}" for i in range(n_centres)), *(f"global {i + 1}" for i in range(n_global)),
            *(f"scan {i + 1}" for i in range(n_scan)))


def refine_prediction(run: LoadedRun, prediction: Prediction, threshold: float | None = None,
                      top_k: int | None = None, window_s: float | None = None, search=None,
                      use_prior: bool | None = None, prior: str | None = None,
                      sigma_scale: float | None = None) -> RefinedPrediction:
    """MAP refinement (:class:`~core.physics.refinement.MapRefiner`) of every sample of ``prediction``.

    Posterior ``J(p) = NLL(p | reports) + prior_nll(p)``: the run's calibrated robust
    likelihood (:attr:`LoadedRun.likelihood`) of the sample's reports pooled over the last
    ``window_s`` seconds (default the run's ``physics_loss.report_window_s``), and the network's Gaussian
    ``N(mean, sigma^2)`` with its outlier floor as the prior (``use_prior``: default the
    config's ``physics_loss.refinement.use_prior``; off: a flat prior; ``prior``: "gaussian" or "heatmap",
    the network's likely cells as a mixture, :func:`network_prior`; default the config's; ``sigma_scale``: the
    network's sigma times this, default the config's ``physics_loss.refinement.prior_sigma_scale``). Starts: the
    window around the mean, the ``top_k`` next most likely coarse cells (default
    :data:`DEFAULT_TOP_K`) and the global scan's blocks. ``threshold``: refine only samples
    with confidence below it (None: all). ``search``: a MapSearchConfig (default
    :func:`map_search_config`). Batched (the refiner works in chunks).
    """
    from core.physics.observation import site_observation

    search = search or map_search_config(run.config)
    top_k = DEFAULT_TOP_K if top_k is None else max(0, int(top_k))
    window_s = run.config.physics_loss.report_window_s if window_s is None else float(window_s)
    use_prior = run.config.physics_loss.refinement.use_prior if use_prior is None else bool(use_prior)
    kind = run.config.physics_loss.refinement.prior if prior is None else prior
    scale = run.config.physics_loss.refinement.prior_sigma_scale if sigma_scale is None else float(sigma_scale)
    calibrate_run(run)
    refiner = run.refiner(search)
    n = len(prediction.indices)
    obs = site_observation(run.dataset, prediction.indices, window_s=window_s)
    sigma = prediction.sigma * np.float32(scale) if use_prior else np.full((n, 2), FLAT_PRIOR_SIGMA_M, np.float32)
    centres = None
    if top_k and prediction.coarse_xy is not None and prediction.coarse_xy.shape[1] > 1:
        centres = torch.as_tensor(prediction.coarse_xy[:, 1:1 + top_k])
    mixture = network_prior(run, prediction, refiner, scale) if use_prior and kind == "heatmap" else None
    with cpu_threads(run):
        res = refiner(torch.as_tensor(prediction.xy), torch.as_tensor(sigma), obs, centres=centres,
                      confidence=None if threshold is None else torch.as_tensor(prediction.confidence),
                      threshold=threshold, prior=mixture)
    out = _refined(res, prediction, obs, sigma, threshold, 0 if centres is None else centres.shape[1],
                   window_s, use_prior, search)
    out.prior, out.prior_kind = mixture, kind if use_prior else "flat"
    return out


def network_prior(run: LoadedRun, prediction: Prediction, refiner, sigma_scale: float = 1.0):
    """The network's heatmap as the MAP prior (:func:`~core.physics.prior.heatmap_prior`): its
    ``COARSE_TOP_K`` most likely coarse cells with their probabilities, the chosen one at the fine head's
    estimate and spread (times ``sigma_scale``), the others at their centres with sigma = cell width / sqrt(12)."""
    from core.physics.prior import heatmap_prior

    if prediction.coarse_prob is None or prediction.fine_sigma is None:
        raise CoreError("heatmap prior: the prediction has no coarse probabilities or fine sigma")
    maps, c = refiner.lik.maps, refiner.config
    t = lambda a: torch.as_tensor(a).to(device=maps.device, dtype=maps.dtype)  # noqa: E731
    cell = run.model.frame(run.maps).cell_wh.to(device=maps.device, dtype=maps.dtype)  # [1, 2] metres
    cell_sigma = (cell / math.sqrt(12.0)).expand(len(prediction.indices), 2)
    return heatmap_prior(t(prediction.xy), t(prediction.fine_sigma * sigma_scale), t(prediction.coarse_xy[:, 1:]),
                         t(prediction.coarse_prob), cell_sigma, refiner.area, c.outlier_prob, c.min_sigma_m)


def _refined(res, prediction: Prediction, obs, sigma, threshold, n_centres: int, window_s: float, use_prior: bool,
             search) -> RefinedPrediction:
    """A :class:`RefinedPrediction` from a :class:`~core.physics.refinement.MapResult`."""
    npy = lambda t: t.detach().cpu().numpy()  # noqa: E731
    n = len(prediction.indices)
    xy = npy(res.xy)
    rows = np.arange(n)
    m = res.starts.shape[1]
    n_scan = min(search.scan_top, max(0, m - 1 - n_centres))
    n_global = max(0, m - 1 - n_centres - n_scan) if res.start_posterior.shape[1] == m else 0
    labels = _start_labels(n_centres, n_global, n_scan)[:m] if m > 1 else ("window",)
    start_j = npy(res.start_posterior)
    source, rank = npy(res.source).astype(np.int64), npy(res.source_rank)
    first = np.array([0, 1, 1 + n_centres, 1 + n_centres + n_global])  # each kind's first column
    col = (first[source] + np.where(source == 0, 0, rank)).clip(0, m - 1)
    win_j = np.where(npy(res.refined), start_j[rows, col], npy(res.posterior_start))
    path = np.concatenate([prediction.xy[None].astype(np.float64), npy(res.coarse_xy)[None], npy(res.path)], 0)
    path_j = np.concatenate([npy(res.posterior_start)[None], win_j[None], npy(res.path_posterior)], 0)
    zb, czb = _signed_z(res.terms_before)
    za, cza = _signed_z(res.terms_after)
    weight = np.ones(obs.site.shape, np.float32) if obs.weight is None else obs.weight.numpy()
    tb, ta = res.terms_before, res.terms_after
    return RefinedPrediction(
        indices=prediction.indices, xy=xy, start_xy=prediction.xy, prior_sigma=np.asarray(sigma, np.float32),
        path=path, path_labels=PATH_STAGES + tuple(f"polish {i + 1}" for i in range(path.shape[0] - 3)),
        path_posterior=path_j, starts=npy(res.starts), start_posterior=start_j, start_labels=labels,
        source=source.astype(np.int8), start_index=col, posterior_before=npy(res.posterior_start),
        posterior_after=npy(res.posterior), nll_before=npy(res.nll_start), nll_after=npy(res.nll),
        prior_before=npy(res.prior_nll_start), prior_after=npy(res.prior_nll), refined=npy(res.refined),
        site_ids=obs.site_ids.numpy(), weight=np.where(obs.site_ids.numpy()[..., None] >= 0, weight, 0.0),
        site_nats_before=npy(tb.site), site_nats_after=npy(ta.site), site_z_before=zb, site_z_after=za,
        residual_before=np.where(npy(tb.present), npy(tb.residual), np.nan),
        residual_after=np.where(npy(ta.present), npy(ta.residual), np.nan),
        covered_before=npy(tb.coverage) > 0.5, covered_after=npy(ta.coverage) > 0.5,
        cell_features=tuple(tb.cell_features), cell_nats_before=npy(tb.cell), cell_nats_after=npy(ta.cell),
        cell_z_before=czb, cell_z_after=cza, error_before_m=prediction.error_m,
        error_after_m=position_errors(xy, prediction.true_xy), threshold=threshold, top_k=n_centres,
        window_s=window_s, use_prior=use_prior, search=search, seconds=float(res.seconds),
        silence_before=npy(tb.silence), silence_after=npy(ta.silence),
    )


def refinement_surface(run: LoadedRun, refined: RefinedPrediction, row: int, half_m: float | None = None,
                       centre=None, step_m: float | None = None):
    """The likelihood surfaces (:func:`~core.physics.surface.likelihood_surface`) of sample
    row ``row`` of ``refined``: the same observation and prior as its MAP search.

    ``centre``: ``(x, y)`` [m] (default the network's mean); ``half_m``: half-width [m]
    (default the search window, ``search.window_m``).
    """
    from core.physics.observation import site_observation
    from core.physics.prior import position_prior
    from core.physics.surface import likelihood_surface

    if not 0 <= row < len(refined.indices):
        raise CoreError(f"refinement surface: row {row} is not in [0, {len(refined.indices)})")
    calibrate_run(run)
    refiner, c = run.refiner(refined.search), refined.search
    obs = site_observation(run.dataset, refined.indices[row:row + 1], window_s=refined.window_s)
    dt, dev = run.likelihood.maps.dtype, run.likelihood.maps.device
    if refined.prior is not None:  # the heatmap the search used
        prior = refined.prior.take(slice(row, row + 1))
    else:
        prior = position_prior(torch.as_tensor(refined.start_xy[row:row + 1], dtype=dt, device=dev),
                               torch.as_tensor(refined.prior_sigma[row:row + 1], dtype=dt, device=dev), refiner.area,
                               c.outlier_prob, c.min_sigma_m)
    centre = refined.start_xy[row] if centre is None else centre
    with cpu_threads(run):
        return likelihood_surface(run.likelihood, obs, centre, float(half_m or c.window_m), step_m, prior)


def residual_table(run: LoadedRun, refined: RefinedPrediction, row: int) -> pd.DataFrame:
    """Per reported site of sample row ``row``: the residuals at the network's estimate and at
    the MAP estimate in sigma units (``(measured - bias - map) / (scale / sqrt(n))``, signed),
    so dB, ns and degrees compare at a glance, and the slot's NLL [nats] at both.

    Columns: ``site``, ``reports`` (n averaged), ``path at network`` / ``path at MAP``
    (whether the map has a path from the site there), ``<feature> σ network`` /
    ``<feature> σ MAP`` for path_gain, toa, aoa, ``NLL network`` / ``NLL MAP``. One row per
    occupied slot (the serving features: :func:`serving_table`).
    """
    from core.physics.calibration import SITE_FEATURES

    names = calibrate_run(run).site_names
    rows = []
    for k, s in enumerate(refined.site_ids[row]):
        if s < 0:
            continue
        r = {"site": names[s] if s < len(names) else f"site {s}",
             "reports": int(refined.weight[row, k].max()),
             "path at network": bool(refined.covered_before[row, k]), "path at MAP": bool(refined.covered_after[row, k])}
        for f, feat in enumerate(SITE_FEATURES):
            r[f"{feat} σ network"] = float(refined.site_z_before[row, k, f])
            r[f"{feat} σ MAP"] = float(refined.site_z_after[row, k, f])
        r["NLL network"] = float(refined.site_nats_before[row, k].sum())
        r["NLL MAP"] = float(refined.site_nats_after[row, k].sum())
        rows.append(r)
    return pd.DataFrame(rows, columns=list(RESIDUAL_COLUMNS))


def serving_table(refined: RefinedPrediction, row: int) -> pd.DataFrame:
    """The serving-cell features the likelihood uses, for sample row ``row``: columns
    ``feature``, ``σ network``, ``σ MAP`` (signed residual over scale) and ``NLL network``,
    ``NLL MAP`` [nats]."""
    return pd.DataFrame([{"feature": f, "σ network": float(refined.cell_z_before[row, c]),
                          "σ MAP": float(refined.cell_z_after[row, c]),
                          "NLL network": float(refined.cell_nats_before[row, c]),
                          "NLL MAP": float(refined.cell_nats_after[row, c])}
                         for c, f in enumerate(refined.cell_features)],
                        columns=["feature", "σ network", "σ MAP", "NLL network", "NLL MAP"])


def walk_prediction(run: LoadedRun, prediction: Prediction | None = None, start=None, indices=None, config=None,
                    refined: RefinedPrediction | None = None):
    """The whole-walk estimate (:mod:`core.physics.trajectory`) of the walks of ``prediction``
    (or of ``indices`` without a network), with the run's calibrated likelihood.

    With a ``prediction``: the network's Gaussian (and outlier floor, as in the MAP search) is the
    prior on the last position and ``start [N, 2]`` (default the network's mean) the start; ``refined``
    (network + MAP's :class:`RefinedPrediction` of the same samples, instead of ``start``): its estimate is
    the start and, with ``config.basins``, its search's runner-up basins
    (:func:`~core.physics.trajectory.runner_up_basins`) the other starts. Without: the exhaustive-scan
    snapshot start (and its runner-up basins), no prior. ``config``: default :func:`walk_config` of the
    run. Returns the :class:`~core.physics.trajectory.WalkResult` (tensors on the run's device).
    """
    from core.physics.prior import position_prior
    from core.physics.trajectory import runner_up_basins, whole_walk

    refiner = run.refiner()
    window_s = run.config.physics_loss.report_window_s
    config = config or walk_config(run.config)
    with cpu_threads(run):
        if prediction is None:
            return whole_walk(run.dataset, indices, refiner, config, window_s=window_s)
        dt, dev = run.likelihood.maps.dtype, run.likelihood.maps.device
        c = refiner.config
        sigma = prediction.sigma * run.config.physics_loss.refinement.prior_sigma_scale
        prior = position_prior(torch.as_tensor(prediction.xy, dtype=dt, device=dev),
                               torch.as_tensor(sigma, dtype=dt, device=dev), refiner.area, c.outlier_prob, c.min_sigma_m)
        others = None
        if refined is not None:
            start = refined.xy
            if config.basins:
                others = runner_up_basins(*(torch.as_tensor(a, dtype=dt, device=dev) for a in (
                    refined.xy, refined.posterior_after, refined.starts, refined.start_posterior)),
                    config.basins, config.basin_margin_nats, config.basin_separation_m)
        start = prediction.xy if start is None else start
        return whole_walk(run.dataset, prediction.indices, refiner, config, window_s=window_s,
                          start=torch.as_tensor(np.asarray(start), dtype=dt, device=dev), prior=prior,
                          alternatives=others)


def bounds(run: LoadedRun, indices, window_s: float | None = None):
    """The Cramér–Rao bounds (:mod:`core.physics.bound`) of samples ``indices`` at their true positions:
    ``({kind: cov [N, 2, 2] m^2}, NoiseModel)`` for every kind of
    :data:`~core.physics.bound.BOUND_KINDS`, the window ``window_s`` (default the run's
    ``report_window_s``); the noise of the dataset's measurement model (else the run's calibration).
    None when the map has no per-site layers."""
    from core.physics.bound import noise_model, position_bounds

    if "site_toa" not in run.radio_map.layers:
        return None
    w = run.config.physics_loss.report_window_s if window_s is None else float(window_s)
    calibration = calibrate_run(run)  # the likelihood's maps; the noise where the dataset records none
    noise = noise_model(run.dataset, None if run.dataset.measurement_model else calibration)
    with cpu_threads(run):
        out = position_bounds(run.likelihood.maps, run.dataset, np.asarray(indices), noise, w)
    return {k: v.cov.cpu().numpy() for k, v in out.items()}, noise
