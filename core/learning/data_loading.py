"""From a :class:`~core.dataset.MeasurementDataset` and its :class:`~core.radio_map.RadioMap` to model tensors.

Normalisation uses the MAP's statistics (:attr:`RadioMap.stats`), never batch or
dataset statistics, so a batch of one is normalised exactly like a batch of 4096:

    z_f = (x_f - mean_f) / std_f                 for scalar features (dB stays dB)
    (cos a, sin a)                               for angular features (AoA), never a linear z

Per report (token) the input vector is, in this order:

* for each of the K site slots: (z path_gain, z toa, cos aoa, sin aoa, present)   5K values
* serving cell: (z snr, z sinr, z throughput, z bler)                                4 values
* time before the last report, ``(t_last - t) / 10 s``                              1 value
* optional geometric anchors per site slot (``geometry_hint``): the site's (x, y) and
  ``site_xy - d * (cos aoa, sin aoa)`` with ``d = sqrt((c * toa)^2 - dh^2)`` the
  horizontal distance implied by the ToA, both scaled to [-1, 1] by the map bounds   4K values

Missing values are 0 (the report-mask and ``present`` flags tell the model). Site ids
go separately (embedded by the model), as ``slot * (S + 1) + id + 1`` (0 = no site).

The physics observation of a sample is the serving-site features in map order
(``MeasurementDataset.map_features``) of its LAST report, where the label is
(``observation="last"``), of its latest PRESENT report (``"latest"``, the default: the
last one, or the one before when it is missing; a walking UE moves well under a metre
per report), or the temporal aggregate over its reports (``"mean"``: masked mean,
circular for AoA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core.features import REPORT_WINDOW_S, feature_spec
from core.learning.groups import los_at_latest
from core.stores.dataset import CELL_FEATURES, SITE_FEATURES, MeasurementDataset
from core.stores.radio_map import RadioMap

SPEED_OF_LIGHT = 299_792_458.0  # m/s
TIME_SCALE_S = 10.0
UE_HEIGHT_M = 1.5  # assumed receiver height for the geometric anchor


@dataclass(frozen=True)
class Normalizer:
    """Map statistics per feature name: ``(mean, std)``; angular features use cos/sin."""

    mean: dict[str, float]
    std: dict[str, float]

    @classmethod
    def from_map(cls, radio_map: RadioMap) -> Normalizer:
        mean, std = {}, {}
        for name in radio_map.features:
            s = radio_map.stats[name]
            mean[name] = float(s.mean) if math.isfinite(s.mean) else 0.0
            std[name] = float(s.std) if math.isfinite(s.std) and s.std > 1e-6 else 1.0
        return cls(mean, std)

    def z(self, name: str, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` (identity for a feature the map lacks)."""
        return (x - self.mean.get(name, 0.0)) / self.std.get(name, 1.0)


@dataclass
class TensorData:
    """Model-ready tensors of ``N`` samples with ``T`` reports and ``K`` site slots.

    feats       float32 [N, T, D]   token inputs (see module doc)
    site_index  long    [N, T, K]   embedded site ids, 0 = none
    mask        bool    [N, T]      report present
    target_xy   float32 [N, 2]      UE position at the last report [m]
    observed    float32 [N, F]      physics observation in map units (NaN -> 0, see obs_mask)
    obs_mask    bool    [N, F]      observation present
    los         bool    [N]         serving site in LOS at the latest PRESENT report (core.learning.groups)
    num_reports long    [N]         number of present reports
    indices     long    [N]         indices into the source dataset
    labeled     bool    [N]         the label may be used (False: the walk gives only the physics term)
    obs_site_ids long   [N, K]      per-site observation (core.physics.observation): site of each slot, -1 none
    obs_site    float32 [N, K, 3]   (path_gain dB, toa ns, aoa deg), pooled over the report window; NaN none
    obs_weight  float32 [N, K, 3]   reports pooled into each value
    obs_cell    float32 [N, 4]      serving (snr, sinr, throughput, bler) of the latest report; NaN none
    phys_cells  long    [N, k]      optional (train, coarse physics term): the k most likely coarse cells
    phys_q      float32 [N, k]      ... and their map-likelihood posterior q (rows of 0: no coarse term);
                                    see core.learning.coarse_physics. None = absent (left out of batches)
    phys_xy     float32 [N, 2]      optional: the likelihood's mode in the most likely cell [m] (mode term)
    teach_cells long    [N, k]      optional (train, training.distill_from): the teachers' k most likely cells,
    teach_q     float32 [N, k]      ... their pooled probabilities, and
    teach_xy    float32 [N, 2]      ... their mean position [m] (core.learning.distill)
    scene_index long    [N]         the sample's scene: which map and physics term it is read against
                                    (0 with one scene; ``indices`` point into that scene's dataset)
    """

    feats: torch.Tensor
    site_index: torch.Tensor
    mask: torch.Tensor
    target_xy: torch.Tensor
    observed: torch.Tensor
    obs_mask: torch.Tensor
    los: torch.Tensor
    num_reports: torch.Tensor
    indices: torch.Tensor
    labeled: torch.Tensor
    obs_site_ids: torch.Tensor
    obs_site: torch.Tensor
    obs_weight: torch.Tensor
    obs_cell: torch.Tensor
    phys_cells: torch.Tensor | None = None
    phys_q: torch.Tensor | None = None
    phys_xy: torch.Tensor | None = None
    teach_cells: torch.Tensor | None = None
    teach_q: torch.Tensor | None = None
    teach_xy: torch.Tensor | None = None
    scene_index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.feats.shape[0]

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {name: getattr(self, name)[idx].to(device) for name in self.__dataclass_fields__
                if getattr(self, name) is not None}


#: what pads the per-site observation of a scene with fewer pooled sites than another (an empty slot)
_SLOT_FILL = {"obs_site_ids": -1, "obs_site": float("nan"), "obs_weight": 0.0}


def concat_tensors(parts: list[TensorData]) -> TensorData:
    """One :class:`TensorData` of the samples of ``parts`` (one per scene), in order, each part's
    ``scene_index`` set to its position in ``parts``. The pooled per-site observation (``obs_site*``,
    one slot per site heard) is padded with empty slots to the widest part. One part is returned as it is."""
    for m, part in enumerate(parts):
        part.scene_index = torch.full((len(part),), m, dtype=torch.long)
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for name in TensorData.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if any(v is None for v in values):
            fields[name] = None
            continue
        if name in _SLOT_FILL:
            width = max(v.shape[1] for v in values)
            values = [torch.cat([v, v.new_full((v.shape[0], width - v.shape[1], *v.shape[2:]), _SLOT_FILL[name])], 1)
                      for v in values]
        fields[name] = torch.cat(values)
    return TensorData(**fields)


def num_site_embeddings(dataset: MeasurementDataset) -> int:
    """Number of distinct site ids (``len(attrs["sites"])`` or the largest id + 1)."""
    n = len(dataset.attrs.get("sites") or [])
    return max(n, int(dataset.site_ids.max()) + 1, 1)


def site_positions(dataset: MeasurementDataset) -> np.ndarray | None:
    """float64 ``[S, 3]`` site positions from ``attrs["sites"]``, or None when unknown."""
    sites = dataset.attrs.get("sites") or []
    try:
        pos = np.array([s["position"] for s in sites], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    return pos if pos.ndim == 2 and pos.shape[1] == 3 and len(pos) else None


def circular_mean_deg(angles: np.ndarray, mask: np.ndarray, axis: int) -> np.ndarray:
    """Masked circular mean of ``angles`` [deg] along ``axis`` (NaN where nothing is valid)."""
    rad = np.deg2rad(np.where(mask, angles, 0.0))
    c = np.where(mask, np.cos(rad), 0.0).sum(axis)
    s = np.where(mask, np.sin(rad), 0.0).sum(axis)
    out = np.degrees(np.arctan2(s, c))
    return np.where(mask.any(axis), out, np.nan)


def physics_observation(dataset: MeasurementDataset, features: tuple[str, ...], mode: str = "latest",
                        window_s: float = 0.0) -> np.ndarray:
    """float32 ``[N, F]``: serving-site observation per sample in map feature order; NaN = missing.

    ``window_s > 0`` (mode ``"latest"``): the masked mean (circular for AoA) over the present reports
    within ``window_s`` of the latest present one -- the one report window every method pools over."""
    obs = dataset.map_features(features)  # [N, T, F]
    if mode == "last":
        return obs[:, -1, :]
    if mode == "latest":
        present = dataset.report_mask & np.isfinite(obs).any(-1)  # [N, T]
        latest = obs.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)
        if window_s <= 0:
            return obs[np.arange(len(obs)), latest, :]
        t = np.asarray(dataset.t, dtype=np.float64)
        t_last = t[np.arange(len(obs)), latest][:, None]
        present = present & (t <= t_last + 1e-9) & (t >= t_last - window_s - 1e-9)
        obs = np.where(present[..., None], obs, np.nan)
    valid = np.isfinite(obs)
    out = np.where(valid, obs, 0.0).sum(1) / np.maximum(valid.sum(1), 1)
    out = np.where(valid.any(1), out, np.nan)
    for f, name in enumerate(features):
        if feature_spec(name).angular:
            out[:, f] = circular_mean_deg(obs[..., f], valid[..., f], axis=1)
    return out.astype(np.float32)


def labeled_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """bool ``[n]``: which of ``n`` training walks keep their label.

    ``round(fraction * n)`` walks (at least one when ``fraction > 0``; none at 0), the first ones of a
    permutation drawn with ``seed``: deterministic, and nested across fractions for one seed (the 5 % are
    among the 20 %).
    """
    if fraction >= 1.0:
        return np.ones(n, dtype=bool)
    if fraction <= 0.0:
        return np.zeros(n, dtype=bool)
    keep = np.random.default_rng([int(seed), 0x1AB]).permutation(n)[: max(1, round(fraction * n))]
    out = np.zeros(n, dtype=bool)
    out[keep] = True
    return out


#: share of the samples the spatial split holds out for val and for test (like the shipped 80/10/10)
SPATIAL_HOLDOUT = 0.1
#: the blocks are visited in one fixed order (this seed), so every run sees the same spatial split
SPATIAL_SPLIT_SEED = 0


def spatial_split(xy: np.ndarray, bounds, blocks: int = 4) -> np.ndarray:
    """int8 ``[N]`` split (0 train, 1 val, 2 test) that holds out whole regions of the map.

    The map (``bounds`` = outer edges) is cut into ``blocks x blocks`` equal blocks; a sample
    belongs to the block of its label ``xy`` (its position at the last report). The blocks are
    visited in a fixed pseudo-random order (:data:`SPATIAL_SPLIT_SEED`): whole blocks go to test
    until it holds >= 10 % of the samples, then to val until it does, the rest to train. The
    result depends only on the positions, the bounds and ``blocks``: never on the run's seed, so
    every seed and every arm of a comparison is tested on the same UEs.
    """
    x_min, y_min, x_max, y_max = bounds
    xy = np.asarray(xy, dtype=np.float64)
    bx = np.clip(((xy[:, 0] - x_min) / (x_max - x_min) * blocks).astype(int), 0, blocks - 1)
    by = np.clip(((xy[:, 1] - y_min) / (y_max - y_min) * blocks).astype(int), 0, blocks - 1)
    block = by * blocks + bx
    split = np.zeros(len(xy), dtype=np.int8)
    target = SPATIAL_HOLDOUT * len(xy)
    counts = {1: 0, 2: 0}
    for b in np.random.default_rng(SPATIAL_SPLIT_SEED).permutation(blocks * blocks):
        members = block == b
        if not members.any():
            continue
        which = 2 if counts[2] < target else 1 if counts[1] < target else 0
        if which == 0:
            break
        split[members] = which
        counts[which] += int(members.sum())
    return split


def token_dim(k: int, geometry_hint: bool, kind: str = "memorizing") -> int:
    if kind == "agnostic":
        return 4 * k + 1  # core.learning.agnostic: raw (path gain, toa, aoa, present) per slot + time
    return 5 * k + len(CELL_FEATURES) + 1 + (4 * k if geometry_hint else 0)


def build_tensors(
    dataset: MeasurementDataset,
    radio_map: RadioMap,
    indices: np.ndarray | None = None,
    geometry_hint: bool = True,
    observation: str = "latest",
    report_window_s: float = REPORT_WINDOW_S,
    num_sites: int | None = None,
    kind: str = "memorizing",
) -> TensorData:
    """Model tensors of ``dataset[indices]`` normalised with ``radio_map``'s statistics.

    ``num_sites``: the site-id range of the model's embeddings (default the dataset's own,
    :func:`num_site_embeddings`); a model trained on several scenes uses their largest. Site ids
    at or above it (a held-out scene with more sites) share embeddings modulo ``num_sites``.

    ``kind="agnostic"`` (:mod:`core.learning.agnostic`): ``feats [N, T, 4K + 1]`` holds each slot's RAW
    measurement (path gain dB, ToA ns, AoA deg, present; 0 when absent) and the time before the last
    report [s]; ``site_index`` is the site id + 1 (0 = empty slot): the model compares each slot with
    that site's map layers, in physical units, and embeds no id."""
    from core.physics.observation import site_observation

    if indices is None:
        indices = np.arange(dataset.num_samples)
    indices = np.asarray(indices, dtype=np.int64)
    ds = dataset.subset(indices)
    n = ds.num_samples
    mask = ds.report_mask
    sf = ds.site_features.astype(np.float64)  # [N, T, K, 3]
    present = np.isfinite(sf).all(-1) & (ds.site_ids >= 0) & mask[..., None]  # [N, T, K]

    if kind == "agnostic":
        feats, site_index = _agnostic_inputs(ds, sf, present)
    else:
        feats, site_index = _memorizing_inputs(ds, radio_map, sf, present, mask, geometry_hint,
                                               num_site_embeddings(dataset) if num_sites is None else int(num_sites))
    obs = physics_observation(ds, radio_map.features, observation)
    obs_mask = np.isfinite(obs)
    # LOS of the serving site at the latest PRESENT report (a missing last report says nothing about LOS)
    los = los_at_latest(ds.los, mask)
    site_obs = site_observation(ds, None, "latest", window_s=report_window_s)
    return TensorData(
        feats=torch.from_numpy(feats.astype(np.float32)),
        site_index=torch.from_numpy(site_index),
        mask=torch.from_numpy(mask.copy()),
        target_xy=torch.from_numpy(ds.labels.astype(np.float32).copy()),
        observed=torch.from_numpy(np.where(obs_mask, obs, 0.0).astype(np.float32)),
        obs_mask=torch.from_numpy(obs_mask),
        los=torch.from_numpy(los.copy()),
        num_reports=torch.from_numpy(mask.sum(1).astype(np.int64)),
        indices=torch.from_numpy(indices),
        labeled=torch.ones(n, dtype=torch.bool),
        obs_site_ids=site_obs.site_ids.long(),
        obs_site=site_obs.site.float(),
        obs_weight=(torch.ones_like(site_obs.site) if site_obs.weight is None else site_obs.weight).float(),
        obs_cell=site_obs.cell.float(),
        scene_index=torch.zeros(n, dtype=torch.long),
    )


def _agnostic_inputs(ds: MeasurementDataset, sf: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(feats [N, T, 4K + 1], site_index [N, T, K])`` of the agnostic model (see :func:`build_tensors`)."""
    n, t_len, k = ds.site_ids.shape
    per_site = np.concatenate([sf, present[..., None].astype(np.float64)], -1)  # pg dB, toa ns, aoa deg, present
    per_site = np.where(present[..., None], per_site, 0.0).reshape(n, t_len, 4 * k)
    tau = (ds.t[:, -1:].astype(np.float64) - ds.t)[..., None]  # [s] before the last report
    feats = np.concatenate([per_site, tau], -1)
    feats = np.where(np.isfinite(feats), feats, 0.0)
    feats[~ds.report_mask] = 0.0
    site_index = np.where(ds.site_ids >= 0, ds.site_ids.astype(np.int64) + 1, 0)
    return feats, site_index


def _memorizing_inputs(ds: MeasurementDataset, radio_map: RadioMap, sf: np.ndarray, present: np.ndarray,
                       mask: np.ndarray, geometry_hint: bool, n_sites: int) -> tuple[np.ndarray, np.ndarray]:
    """``(feats [N, T, D], site_index [N, T, K])`` of the memorizing model (the module doc's token layout)."""
    norm = Normalizer.from_map(radio_map)
    n, t_len, k = ds.site_ids.shape
    pg = norm.z("path_gain", sf[..., SITE_FEATURES.index("path_gain")])
    toa = norm.z("toa", sf[..., SITE_FEATURES.index("toa")])
    aoa = np.deg2rad(sf[..., SITE_FEATURES.index("aoa")])
    per_site = np.stack([pg, toa, np.cos(aoa), np.sin(aoa)], -1)  # [N, T, K, 4]
    per_site = np.where(present[..., None], per_site, 0.0)
    per_site = np.concatenate([per_site, present[..., None].astype(np.float64)], -1).reshape(n, t_len, 5 * k)

    cf = ds.cell_features.astype(np.float64)
    cells = np.stack([norm.z(name, cf[..., i]) for i, name in enumerate(CELL_FEATURES)], -1)
    cells = np.where(np.isfinite(cells) & mask[..., None], cells, 0.0)

    t_last = ds.t[:, -1:].astype(np.float64)
    tau = ((t_last - ds.t) / TIME_SCALE_S)[..., None]
    parts = [per_site, cells, tau]

    if geometry_hint:
        parts.append(_geometric_anchors(ds, radio_map, present))
    feats = np.concatenate(parts, -1)
    feats = np.where(np.isfinite(feats), feats, 0.0)
    feats[~mask] = 0.0

    ids = np.where(ds.site_ids >= 0, ds.site_ids.astype(np.int64) % n_sites, -1)
    slot = np.arange(k)[None, None, :]
    site_index = np.where(ids >= 0, slot * (n_sites + 1) + ids + 1, 0)

    return feats, site_index


def _geometric_anchors(ds: MeasurementDataset, radio_map: RadioMap, present: np.ndarray) -> np.ndarray:
    """``[N, T, 4K]``: per slot, site (x, y) and the ToA/AoA anchor, scaled to [-1, 1] by the map bounds."""
    n, t_len, k = ds.site_ids.shape
    pos = site_positions(ds)
    if pos is None:
        return np.zeros((n, t_len, 4 * k))
    ids = np.clip(ds.site_ids.astype(np.int64), 0, len(pos) - 1)
    site = pos[ids]  # [N, T, K, 3]
    sf = ds.site_features.astype(np.float64)
    d3 = sf[..., SITE_FEATURES.index("toa")] * 1e-9 * SPEED_OF_LIGHT
    dh = site[..., 2] - UE_HEIGHT_M
    d = np.sqrt(np.clip(d3**2 - dh**2, 0.0, None))
    aoa = np.deg2rad(sf[..., SITE_FEATURES.index("aoa")])
    anchor = site[..., :2] - d[..., None] * np.stack([np.cos(aoa), np.sin(aoa)], -1)
    x_min, y_min, x_max, y_max = radio_map.bounds
    centre = np.array([(x_min + x_max) / 2, (y_min + y_max) / 2])
    half = np.array([(x_max - x_min) / 2, (y_max - y_min) / 2])
    out = np.concatenate([(site[..., :2] - centre) / half, np.clip((anchor - centre) / half, -2, 2)], -1)
    out = np.where(present[..., None] & np.isfinite(out), out, 0.0)
    return out.reshape(n, t_len, 4 * k)


def map_input(radio_map: RadioMap, size: int) -> torch.Tensor:
    """float32 ``[C, size, size]``: the whole map, normalised and resampled for the patch encoder.

    Channels: z-scored scalar features, cos/sin for angular ones, then the coverage
    fraction. Holes are 0 before pooling and pooling is coverage-weighted (a masked
    area average), so uncovered cells never leak -inf/NaN. AoA is averaged as cos/sin.
    """
    norm = Normalizer.from_map(radio_map)
    valid = radio_map.valid
    chans = []
    for f, name in enumerate(radio_map.features):
        v = np.where(valid, radio_map.values[f].astype(np.float64), 0.0)  # holes may hold NaN/-inf
        if feature_spec(name).angular:
            rad = np.deg2rad(v)
            chans += [np.cos(rad), np.sin(rad)]
        else:
            chans.append(norm.z(name, v))
    x = np.stack(chans)
    x = np.where(valid[None] & np.isfinite(x), x, 0.0)
    x = torch.from_numpy(x.astype(np.float32))[None]
    w = torch.from_numpy(valid.astype(np.float32))[None, None]
    num = F.adaptive_avg_pool2d(x * w, size)
    den = F.adaptive_avg_pool2d(w, size)
    out = torch.where(den > 0, num / den.clamp_min(1e-6), torch.zeros_like(num))
    return torch.cat([out, den], 1)[0]


def map_channels(radio_map: RadioMap) -> int:
    return sum(2 if feature_spec(n).angular else 1 for n in radio_map.features) + 1
