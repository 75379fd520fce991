"""Report rows of whole walks -> one model sample per (walk, report time): the same dataset the stores hold.

A dataset sample (:mod:`core.stores.dataset`) is ``T`` consecutive reports of one UE with the label at the
last one. From a frame of report rows (:mod:`core.reports.format`, whole walks, in file order) this builds,
for EVERY report time ``r`` of every walk, the sample of the ``T`` reports ending at ``r`` (fewer at the
start of a walk: the earlier slots are absent, ``report_mask`` false), so the network, the MAP search and
the groups read it exactly as they read a dataset split (:func:`core.learning.data_loading.build_tensors`).

Per report ``r`` (the rows sharing ``walk_id`` and ``time_s``): slot ``k`` is its ``k``-th row naming a site
(at most ``K``), the serving cell and the truth are its first row's; the report is present when a row names a
site. Times become relative to the window's first report (float32 keeps sub-millisecond steps). A time
before a walk's first present report has no sample (nothing to localize from).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.learning.data_loading import UE_HEIGHT_M
from core.reports.format import CELL, MEASUREMENTS
from core.stores.dataset import MeasurementDataset

__all__ = ["ReportWindows", "Windows", "report_windows"]


class ReportWindows(MeasurementDataset):
    """A :class:`MeasurementDataset` of report windows read from a file (see the module doc).

    The file was checked by :func:`core.reports.reading.validate`, so only the shapes are checked here:
    unlike a store, a present report may lack a feature (NaN) and its serving cell (NaN)."""

    def validate(self) -> None:
        n, t = self.ue_xyz.shape[:2]
        assert self.t.shape == (n, t) and self.report_mask.shape == (n, t) and self.split.shape == (n,)

    def subset(self, idx: np.ndarray) -> ReportWindows:
        return ReportWindows(self.ue_xyz[idx], self.t[idx], self.report_mask[idx], self.site_ids[idx],
                             self.site_features[idx], self.cell_features[idx], self.los[idx], self.split[idx],
                             dict(self.attrs), None, None, self.source, self.lineage, self.radio_map_ref)


@dataclass
class Windows:
    """The samples of one chunk: ``dataset`` (``N`` windows), and per sample ``walk_id [N]``, ``time_s [N]``
    (the file's values of its last report), ``truth [N]`` (x_m, y_m given there), ``walk_end [N]`` (the walk's
    last report time), ``has_los`` (the file has a los column)."""

    dataset: ReportWindows
    walk_id: np.ndarray
    time_s: np.ndarray
    truth: np.ndarray
    walk_end: np.ndarray
    has_los: bool


def _column(df: pd.DataFrame, name: str, fill=np.nan) -> np.ndarray:
    if name in df:
        return df[name].to_numpy(dtype=np.float64, na_value=np.nan) if fill is not False else df[name].to_numpy()
    return np.full(len(df), fill, dtype=np.float64)


def report_windows(df: pd.DataFrame, site_index: dict[str, int], num_reports: int, num_slots: int,
                   attrs: dict, source: str | None = None) -> Windows:
    """The :class:`Windows` of ``df`` (rows of whole walks): ``site_index`` maps site names to the map's site
    ids, ``num_reports`` ``T`` and ``num_slots`` ``K`` are the run's, ``attrs`` the dataset attrs (sites, scene)."""
    walks = df["walk_id"].to_numpy(dtype=object)
    times = df["time_s"].to_numpy(dtype=np.float64)
    n_rows = len(df)
    new_walk = np.ones(n_rows, bool)
    new_walk[1:] = walks[1:] != walks[:-1]
    new_rep = new_walk.copy()
    new_rep[1:] |= times[1:] != times[:-1]
    rep = np.cumsum(new_rep) - 1  # [rows] report of each row
    n_rep = int(rep[-1]) + 1 if n_rows else 0
    first_row = np.flatnonzero(new_rep)  # [R]
    sid = df["site"].map(site_index).to_numpy(dtype=np.float64, na_value=np.nan)
    has_site = np.isfinite(sid)
    cs = np.cumsum(has_site)
    before = np.where(first_row > 0, cs[first_row - 1], 0)  # sites in the rows before each report
    slot = cs - 1 - before[rep]
    use = has_site & (slot < num_slots)
    site_ids = np.full((n_rep, num_slots), -1, np.int16)
    site_ids[rep[use], slot[use]] = sid[use].astype(np.int16)
    feats = np.full((n_rep, num_slots, len(MEASUREMENTS)), np.nan, np.float32)
    for f, c in enumerate(MEASUREMENTS):
        feats[rep[use], slot[use], f] = _column(df, c)[use]
    cells = np.stack([_column(df, c)[first_row] for c in CELL], -1).astype(np.float32)  # [R, 4]
    truth_xy = np.stack([_column(df, "x_m")[first_row], _column(df, "y_m")[first_row]], -1)  # [R, 2]
    los = (df["los"].fillna(False).to_numpy(dtype=bool)[first_row] if "los" in df else np.zeros(n_rep, bool))
    present = np.zeros(n_rep, bool)
    present[rep[use]] = True
    t_rep = times[first_row]
    walk_of_rep = np.cumsum(new_walk[first_row]) - 1
    walk_first = np.flatnonzero(new_walk[first_row])[walk_of_rep]  # [R] first report of the report's walk
    walk_last = np.r_[walk_first[1:] != walk_first[:-1], True]  # [R] the walk's last report

    src = np.arange(n_rep)[:, None] - (num_reports - 1) + np.arange(num_reports)[None, :]  # [R, T]
    inside = src >= walk_first[:, None]
    src = np.where(inside, src, walk_first[:, None])
    mask = inside & present[src]
    keep = mask.any(1)
    src, inside, mask = src[keep], inside[keep], mask[keep]
    r_end = np.flatnonzero(keep)
    t0 = t_rep[src[:, 0]]
    t_win = np.where(inside, t_rep[src] - t0[:, None], 0.0).astype(np.float32)
    xy = np.nan_to_num(truth_xy[src], nan=0.0)
    ue = np.concatenate([xy, np.full(xy.shape[:2] + (1,), UE_HEIGHT_M)], -1).astype(np.float32)
    m = mask[..., None]
    ds = ReportWindows(
        ue_xyz=ue, t=t_win, report_mask=mask, site_ids=np.where(m, site_ids[src], -1).astype(np.int16),
        site_features=np.where(m[..., None], feats[src], np.nan).astype(np.float32),
        cell_features=np.where(m, cells[src], np.nan).astype(np.float32), los=los[src] & mask,
        split=np.full(len(src), 2, np.int8), attrs=dict(attrs), source=source)
    return Windows(ds, walks[first_row][r_end], t_rep[r_end], np.isfinite(truth_xy[r_end]).all(1), walk_last[r_end],
                   "los" in df)
