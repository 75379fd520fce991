"""Loading a scene's stores and tensors for a run: the datasets and radio maps a config names, checked
against each other, with ``config.data`` applied, and the model's tensors of a split.

One scene (``data.dataset``) or several (``data.datasets``, docs/model.md "Many scenes"): a run's data is
a :class:`RunData` of :class:`SceneData` (index ``m`` = the samples' ``scene_index``) and the model's
:class:`~core.learning.model.ModelSpec`. A scene's radio map is ``<physics_loss.radio_maps_dir>/<scene>.zarr``
(:func:`core.stores.lineage.map_path_for`; where that folder has none, the map the dataset records, e.g. a corpus
city's) and must be the map its dataset was made with
(:func:`core.stores.lineage.check_map_of_dataset`). Every refusal is one line naming the config key.

Used by training (:mod:`core.learning.training`), inference (a trained run's scenes and held-out scenes),
the ablation and the baselines.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core import resolve_path
from core.errors import ConfigError, StoreError
from core.learning.config import Config
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
from core.learning.model import ModelSpec, SceneMaps
from core.stores.dataset import CELL_FEATURES, MeasurementDataset
from core.stores.lineage import check_map_of_dataset, map_path_for
from core.stores.radio_map import RadioMap


@dataclass
class SceneData:
    """One training scene: its dataset (``config.data`` applied), radio map and model input (:func:`scene_input`)."""

    dataset: MeasurementDataset
    radio_map: RadioMap
    map_image: Any

    @property
    def name(self) -> str | None:
        return self.dataset.ref.scene


def scene_input(radio_map: RadioMap, spec: ModelSpec):
    """What a model of ``spec`` reads of a scene's map: the memorizing model's resampled image ``[C, S, S]``
    (:func:`~core.learning.data_loading.map_input`) or the agnostic model's
    :class:`~core.learning.agnostic.SceneTable` (per-site layers at the cells' sub-points, relative geometry)."""
    if spec.kind == "agnostic":
        from core.learning.agnostic import scene_table

        return scene_table(radio_map, spec)
    return map_input(radio_map, spec.map_size)


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
    the dataset was made with; when ``maps_dir`` holds no map of the scene, the map the dataset records where
    that store is (a corpus city's ``<corpus>/radio_maps/<city>.zarr``, so corpus cities and the real scenes
    train together with one ``radio_maps_dir``). A dataset that is missing or corrupt is a StoreError, prefixed
    with ``key`` unless that is ``data.dataset`` (whose store is named alone, as for every single-scene run)."""
    try:
        dataset = MeasurementDataset.load(resolve_path(dataset_path))
    except StoreError as exc:
        if key == "data.dataset":
            raise
        raise StoreError(f"{key}: {exc}") from None
    path = map_path_for(dataset.ref, maps_dir, scene)
    recorded = dataset.radio_map_ref
    if not path.exists() and recorded is not None and recorded.path and resolve_path(recorded.path).exists():
        path = resolve_path(recorded.path)  # made with its map elsewhere (a corpus city): that map, where it is
    radio_map = RadioMap.load(path)
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
    if spec.kind != "agnostic" and map_channels(radio_map) != spec.map_channels:
        raise ConfigError(f"{key}: radio map {radio_map.source} has features {list(radio_map.features)} "
                          f"({map_channels(radio_map)} map channels), the model reads {spec.map_channels}")
    if token_dim(dataset.num_sites_per_report, spec.geometry_hint, spec.kind) != spec.token_dim:
        raise ConfigError(f"{key}: {dataset.num_sites_per_report} site slots per report do not fit the model")
    if dataset.num_reports > spec.num_reports:
        raise ConfigError(f"{key}: {dataset.num_reports} reports per walk, the model reads at most {spec.num_reports}")


def apply_data_config(config: Config, dataset: MeasurementDataset, radio_map: RadioMap) -> MeasurementDataset:
    """The dataset as ``config.data`` asks: the spatial split (when ``split: spatial``), then the
    first ``max_samples`` samples. A map ``correct-map`` fitted to THIS dataset's stored train split is refused
    with any other split (its test walks would include walks the map was fitted to)."""
    fitted = (radio_map.attrs.get("twin_correction") or {}).get("dataset") or {}
    if config.data.split != "random" and dataset.lineage is not None and fitted.get("id") == dataset.lineage.id:
        raise ConfigError(f"data.split: {config.data.split!r} with radio map {radio_map.source}, which correct-map "
                          f"fitted to the stored {radio_map.attrs['twin_correction'].get('fit_split')!r} split of "
                          f"this dataset: its test walks would include walks the map was fitted to; use "
                          "data.split: random, or correct the map with another dataset of the world")
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
        token_dim=token_dim(k, sizes["geometry_hint"], sizes["kind"]),
        num_site_embeddings=k * (n_sites + 1) + 1,
        num_reports=dataset.num_reports,
        map_channels=map_channels(radio_map),
        bounds=tuple(radio_map.bounds),
        report_window_s=float(config.physics_loss.report_window_s),
        **sizes,
    )


def spec_num_sites(spec: ModelSpec) -> int | None:
    """The site-id range ``S`` a model embeds (``num_site_embeddings = K * (S + 1) + 1``; None: the agnostic
    model embeds no site id)."""
    if spec.kind == "agnostic":
        return None
    k = (spec.token_dim - len(CELL_FEATURES) - 1) // (9 if spec.geometry_hint else 5)
    return (spec.num_site_embeddings - 1) // k - 1


def prepare(config: Config, dataset: MeasurementDataset | None = None, radio_map: RadioMap | None = None) -> RunData:
    """The run's data: every training scene (or the one ``dataset`` and ``radio_map`` given), each map
    resampled for the model, and the model's spec."""
    stores = [(dataset, radio_map)] if dataset is not None and radio_map is not None else load_scenes(config)
    check_holdout(config, [d.ref.scene for d, _ in stores])
    n_sites = max(num_site_embeddings(d) for d, _ in stores)
    spec = model_spec(config, *stores[0], num_sites=n_sites)
    return RunData([SceneData(d, r, scene_input(r, spec)) for d, r in stores], spec)


def scene_tensors(run: RunData, m: int, split: str, config: Config) -> TensorData:
    """Model tensors of scene ``m``'s ``split``; on the train split only ``data.label_fraction`` of its walks
    are labelled (drawn per scene)."""
    scene = run.scenes[m]
    idx = scene.dataset.indices(split)
    if len(idx) == 0:
        raise StoreError(f"dataset {scene.dataset.source or ''}: split {split!r} is empty")
    data = build_tensors(scene.dataset, scene.radio_map, idx, run.spec.geometry_hint, config.physics_loss.observation,
                         config.physics_loss.report_window_s, num_sites=spec_num_sites(run.spec), kind=run.spec.kind)
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

