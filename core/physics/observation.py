"""One measurement report per sample, as tensors: what the likelihood compares with the map.

A :class:`SiteObservation` holds, for ``B`` samples, the ``K`` site slots of ONE report
(site ids into the map's sites, -1 for an empty slot; measured path gain [dB], ToA [ns]
and AoA [deg], NaN where absent) and the serving cell's (snr, sinr, throughput, bler).
:func:`site_observation` takes it from a :class:`~core.stores.dataset.MeasurementDataset`:
the label's report (``report="last"``) or the last present one (``"latest"``, default).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from core.errors import CoreError

__all__ = ["SiteObservation", "site_observation"]


class SiteObservation(NamedTuple):
    """One measurement report per sample (tensors; ``B`` samples, ``K`` slots).

    site_ids: integer ``[B, K]`` into the map's sites, -1 for an empty slot.
    site: float ``[B, K, 3]`` (path_gain [dB], toa [ns], aoa [deg]); NaN where absent.
    cell: float ``[B, 4]`` (snr, sinr, throughput, bler), NaN where absent; or None.
    """

    site_ids: torch.Tensor
    site: torch.Tensor
    cell: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.site_ids.shape[0]

    def take(self, idx) -> SiteObservation:
        return SiteObservation(self.site_ids[idx], self.site[idx], None if self.cell is None else self.cell[idx])


def site_observation(dataset, indices=None, report: str = "latest") -> SiteObservation:
    """The report of each sample of ``dataset[indices]`` as a :class:`SiteObservation` (float32).

    ``report``: "last" (the label's report, possibly missing: then all NaN / -1) or
    "latest" (the last PRESENT report: the label's, or the one before when it is missing).
    """
    idx = np.arange(dataset.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    present = dataset.report_mask[idx]
    t_len = present.shape[1]
    if report == "last":
        t = np.full(len(idx), t_len - 1)
    elif report == "latest":
        t = t_len - 1 - np.argmax(present[:, ::-1], axis=1)
    else:
        raise CoreError(f"site_observation: report must be 'last' or 'latest', got {report!r}")
    rows = np.arange(len(idx))
    ok = present[rows, t]
    ids = np.where(ok[:, None], dataset.site_ids[idx, t], -1)
    site = np.where(ok[:, None, None], dataset.site_features[idx, t], np.nan)
    cell = np.where(ok[:, None], dataset.cell_features[idx, t], np.nan)
    return SiteObservation(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(site.astype(np.float32)),
                           torch.from_numpy(cell.astype(np.float32)))
