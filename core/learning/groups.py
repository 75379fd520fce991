"""The groups of test UEs every table reports: ONE definition, used by evaluate, the ablation and the scripts.

For UE ``n`` with reports ``t = 0..T-1`` (present where ``report_mask``), the latest present
report is ``t* = max{t : present}`` (the label is at ``T - 1``; ``t* < T - 1`` when the last
report is missing). Groups, as boolean masks ``[N]``:

* ``all``;
* ``los`` / ``nlos``: the serving site of report ``t*`` has / has not a line-of-sight path
  (``dataset.los[n, t*]``). A missing last report says nothing about LOS: reading LOS at
  ``T - 1`` (as the tables did before) put every UE whose last report was dropped into NLOS
  (412 of the 580 "NLOS" etoile test UEs);
* ``last_missing``: the last report is missing (``t* < T - 1``), whatever its LOS;
* ``sites_1``, ``sites_2``, ``sites_3``, ``sites_4+``: the number of distinct sites heard in
  the present reports within ``window_s`` of report ``t*`` -- exactly the sites every method's
  pooled observation holds (:func:`core.physics.observation.site_observation`, the one report
  window :data:`core.features.REPORT_WINDOW_S` unless the run's config says otherwise). A UE
  with no present report is in none of them;
* ``sparse`` / ``dense``: fewer than ``sparse_below`` (5) present reports / the rest.

:func:`worst_share` is the share of the squared error carried by the worst ``fraction`` (2 %)
of UEs: ``sum_{n in worst} e_n^2 / sum_n e_n^2``, the part of the RMSE the tail is.
"""

from __future__ import annotations

import numpy as np

from core.features import REPORT_WINDOW_S

__all__ = ["GROUPS", "GROUP_LABELS", "latest_present", "los_at_latest", "sites_heard", "ue_groups", "worst_share"]

#: every group, in report order
GROUPS: tuple[str, ...] = ("all", "los", "nlos", "last_missing", "sites_1", "sites_2", "sites_3", "sites_4+",
                           "sparse", "dense")
#: readable names of the groups
GROUP_LABELS: dict[str, str] = {
    "all": "all", "los": "LOS (latest present report)", "nlos": "NLOS (latest present report)",
    "last_missing": "last report missing", "sites_1": "1 site heard", "sites_2": "2 sites heard",
    "sites_3": "3 sites heard", "sites_4+": "≥ 4 sites heard", "sparse": "sparse (< 5 reports)",
    "dense": "dense (≥ 5 reports)",
}
SPARSE_BELOW = 5


def latest_present(report_mask) -> np.ndarray:
    """int ``[N]``: index of each row's last present report (the last index when none is)."""
    present = np.asarray(report_mask, dtype=bool)
    return present.shape[1] - 1 - np.argmax(present[:, ::-1], axis=1)


def los_at_latest(los, report_mask) -> np.ndarray:
    """bool ``[N]``: LOS of the serving site at the latest PRESENT report (False when no report is present).

    ``los``, ``report_mask``: ``[N, T]`` (a dataset's, rows already selected)."""
    present = np.asarray(report_mask, dtype=bool)
    t = latest_present(present)
    rows = np.arange(len(present))
    return np.asarray(los, dtype=bool)[rows, t] & present[rows, t]


def sites_heard(dataset, indices=None, window_s: float = REPORT_WINDOW_S) -> np.ndarray:
    """int ``[N]``: distinct sites in the present reports within ``window_s`` of the latest present one."""
    idx = np.arange(dataset.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    present = np.asarray(dataset.report_mask[idx], dtype=bool)
    t = np.asarray(dataset.t[idx], dtype=np.float64)
    rows = np.arange(len(idx))
    t_last = t[rows, latest_present(present)]
    use = present & (t <= t_last[:, None] + 1e-9) & (t >= t_last[:, None] - window_s - 1e-9)  # [N, T]
    ids = np.where(use[..., None], np.asarray(dataset.site_ids[idx], dtype=np.int64), -1).reshape(len(idx), -1)
    ids = np.sort(ids, axis=1)
    new = (ids >= 0) & np.concatenate([np.ones((len(idx), 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)
    return new.sum(axis=1)


def ue_groups(dataset, indices=None, window_s: float = REPORT_WINDOW_S,
              sparse_below: int = SPARSE_BELOW) -> dict[str, np.ndarray]:
    """``{group: bool [N]}`` for samples ``indices`` of a MeasurementDataset (see the module doc)."""
    idx = np.arange(dataset.num_samples) if indices is None else np.asarray(indices, dtype=np.int64)
    present = np.asarray(dataset.report_mask[idx], dtype=bool)
    los = los_at_latest(dataset.los[idx], present)
    any_report = present.any(axis=1)
    heard = sites_heard(dataset, idx, window_s)
    n_reports = present.sum(axis=1)
    return {
        "all": np.ones(len(idx), dtype=bool),
        "los": los,
        "nlos": any_report & ~los,
        "last_missing": ~present[:, -1] if present.shape[1] else np.zeros(len(idx), bool),
        "sites_1": heard == 1, "sites_2": heard == 2, "sites_3": heard == 3, "sites_4+": heard >= 4,
        "sparse": n_reports < sparse_below,
        "dense": n_reports >= sparse_below,
    }


def worst_share(errors, fraction: float = 0.02) -> float:
    """Share (0..1) of ``sum e^2`` carried by the ``ceil(fraction N)`` largest errors (NaN for none or all 0)."""
    e = np.sort(np.asarray(errors, dtype=np.float64).ravel())[::-1]
    total = float(np.sum(e * e))
    if e.size == 0 or total <= 0:
        return float("nan")
    k = int(np.ceil(fraction * e.size))
    return float(np.sum(e[:k] ** 2) / total)
