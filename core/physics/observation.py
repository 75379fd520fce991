"""One measurement report per sample, as tensors: what the likelihood compares with the map.

A :class:`SiteObservation` holds, for ``B`` samples, ``K`` site slots (site ids into the
map's sites, -1 for an empty slot; measured path gain [dB], ToA [ns] and AoA [deg], NaN
where absent), the serving cell's (snr, sinr, throughput, bler) and optionally a weight
per slot and feature: the number of reports averaged into it (the likelihood divides the
variance by it). :func:`site_observation` takes it from a
:class:`~core.stores.dataset.MeasurementDataset`:

* ``report="last"``: the label's report (possibly missing: then all NaN / -1);
* ``report="latest"`` (default): the last PRESENT report;
* ``report="latest"`` with ``window_s > 0``: the present reports whose time is within
  ``window_s`` of the latest one, POOLED per site (one slot per site heard, in site-id
  order)::

      o_s,pg  = mean_r pg_r,s        o_s,toa = mean_r toa_r,s        (over the reports r hearing s)
      o_s,aoa = atan2(mean_r sin aoa_r,s, mean_r cos aoa_r,s)          (circular mean)
      n_s,f   = #{r : feature f of site s present in report r}         weight [B, S, 3]

  With independent noise of std ``sigma`` per report the mean has std ``sigma / sqrt(n)``.
  The UE keeps moving meanwhile (0.5-1.5 m/s in the shipped data), so the pooled
  position lags the label's by about ``speed * window_s / 2``: keep the window short.
  The one window every method uses is :data:`core.features.REPORT_WINDOW_S`.
  The serving-cell features are the latest report's.

``room [B]`` records whether the latest present report had a free slot: then every site it
did not report was below the sensitivity there (:mod:`core.physics.silence`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from core.errors import CoreError

__all__ = ["SiteObservation", "site_observation"]


class SiteObservation(NamedTuple):
    """Measurement reports of ``B`` samples (tensors; ``K`` slots).

    site_ids: integer ``[B, K]`` into the map's sites, -1 for an empty slot.
    site: float ``[B, K, 3]`` (path_gain [dB], toa [ns], aoa [deg]); NaN where absent.
    cell: float ``[B, 4]`` (snr, sinr, throughput, bler), NaN where absent; or None.
    weight: float ``[B, K, 3]`` reports averaged into each value (>= 1 where present), or
        None (1 everywhere).
    room: bool ``[B]`` the latest report had a free slot (so the sites it lacks were not heard), or
        None (unknown: no silence term).
    """

    site_ids: torch.Tensor
    site: torch.Tensor
    cell: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    room: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.site_ids.shape[0]

    def take(self, idx) -> SiteObservation:
        pick = lambda v: None if v is None else v[idx]  # noqa: E731
        return SiteObservation(self.site_ids[idx], self.site[idx], pick(self.cell), pick(self.weight), pick(self.room))


def _latest(present: np.ndarray) -> np.ndarray:
    """``[N]`` index of the last present report (the last slot when none is)."""
    t_len = present.shape[1]
    return t_len - 1 - np.argmax(present[:, ::-1], axis=1)


def site_observation(dataset, indices=None, report: str = "latest", window_s: float = 0.0) -> SiteObservation:
    """The reports of ``dataset[indices]`` as a :class:`SiteObservation` (float32); see the module doc.

    ``window_s`` [s] > 0 pools the present reports within that time of the latest one
    (``report="latest"`` only); 0 takes one report.
    """
    idx = np.arange(dataset.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    present = dataset.report_mask[idx]
    if report == "last":
        t = np.full(len(idx), present.shape[1] - 1)
    elif report == "latest":
        t = _latest(present)
    else:
        raise CoreError(f"site_observation: report must be 'last' or 'latest', got {report!r}")
    if not (window_s >= 0):
        raise CoreError(f"site_observation: window_s must be >= 0 s, got {window_s}")
    if window_s > 0 and report != "latest":
        raise CoreError("site_observation: pooling (window_s > 0) needs report='latest'")
    rows = np.arange(len(idx))
    ok = present[rows, t]
    cell = np.where(ok[:, None], dataset.cell_features[idx, t], np.nan)
    latest_ids = np.where(ok[:, None], dataset.site_ids[idx, t], -1)
    room = torch.from_numpy(ok & ((latest_ids >= 0).sum(1) < latest_ids.shape[1]))
    if window_s > 0:
        ids, site, weight = _pooled(dataset, idx, present, t, window_s)
        return SiteObservation(torch.from_numpy(ids), torch.from_numpy(site), torch.from_numpy(cell.astype(np.float32)),
                               torch.from_numpy(weight), room)
    site = np.where(ok[:, None, None], dataset.site_features[idx, t], np.nan)
    return SiteObservation(torch.from_numpy(latest_ids.astype(np.int64)), torch.from_numpy(site.astype(np.float32)),
                           torch.from_numpy(cell.astype(np.float32)), room=room)


def _num_sites(dataset, ids: np.ndarray) -> int:
    sites = dataset.attrs.get("sites") or []
    return max(len(sites), int(ids.max()) + 1 if ids.size else 0)


def _pooled(dataset, idx: np.ndarray, present: np.ndarray, latest: np.ndarray, window_s: float):
    """``(site_ids [N, S] int64, site [N, S, 3] float32, weight [N, S, 3] float32)`` pooled per site."""
    times = np.asarray(dataset.t[idx], dtype=np.float64)  # [N, T]
    rows = np.arange(len(idx))
    t_last = times[rows, latest]
    use = present & (times <= t_last[:, None] + 1e-9) & (times >= t_last[:, None] - window_s - 1e-9)  # [N, T]
    ids = np.asarray(dataset.site_ids[idx])  # [N, T, K]
    feats = np.asarray(dataset.site_features[idx], dtype=np.float64)  # [N, T, K, 3]
    s_n = _num_sites(dataset, ids)
    n, t_len, k = ids.shape
    take = use[..., None] & (ids >= 0)  # [N, T, K]
    flat_row = np.broadcast_to(rows[:, None, None], ids.shape)[take]
    flat_site = ids[take]
    vals = feats[take]  # [M, 3]
    finite = np.isfinite(vals)
    ang = np.deg2rad(np.where(finite[:, 2], vals[:, 2], 0.0))
    comps = np.stack([np.where(finite[:, 0], vals[:, 0], 0.0), np.where(finite[:, 1], vals[:, 1], 0.0),
                      np.cos(ang), np.sin(ang)], 1)  # [M, 4]
    cnt_cols = finite[:, [0, 1, 2, 2]].astype(np.float64)
    sums = np.zeros((n, s_n, 4))
    counts = np.zeros((n, s_n, 4))
    np.add.at(sums, (flat_row, flat_site), comps * cnt_cols)
    np.add.at(counts, (flat_row, flat_site), cnt_cols)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
    site = np.stack([mean[..., 0], mean[..., 1], np.rad2deg(np.arctan2(mean[..., 3], mean[..., 2]))], -1)
    weight = counts[..., :3]
    site[weight == 0] = np.nan
    heard = (weight > 0).any(-1)  # [N, S]
    site_ids = np.where(heard, np.arange(s_n)[None, :], -1).astype(np.int64)
    return site_ids, site.astype(np.float32), weight.astype(np.float32)
