"""The UE groups every table reports, on hand-made walks (core.learning.groups)."""

import numpy as np

from core.learning.groups import GROUPS, los_at_latest, sites_heard, ue_groups
from core.stores.dataset import MeasurementDataset


def walks() -> MeasurementDataset:
    """Four walks of 4 reports 0.5 s apart, 3 slots:

    0: LOS at report 2, last report missing            -> LOS (latest present), last missing, 2 sites heard
    1: NLOS at every present report, last present      -> NLOS, 1 site (site 3 heard only 2 s before)
    2: LOS at the last report, sites 0, 1, 2 and 4     -> LOS, 4 sites over the 1 s window
    3: NLOS, its last two reports missing              -> NLOS, last missing, 3 sites
    """
    n, t_len, k = 4, 4, 3
    present = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    ids = np.full((n, t_len, k), -1, np.int16)
    ids[0, 2, :2] = [0, 1]
    ids[0, 1, :1] = [0]  # 0.5 s before: the same site again, counted once
    ids[1, 0, 0] = 3  # 1.5 s before the last: outside the 1 s window
    ids[1, 2, 0] = 2
    ids[1, 3, 0] = 2
    ids[2, 2, :3] = [0, 1, 2]
    ids[2, 3, :3] = [4, 1, 0]
    ids[3, 1, :3] = [0, 1, 2]
    los = np.zeros((n, t_len), bool)
    los[0, 2] = True  # the latest PRESENT report of walk 0
    los[2, 3] = True
    ids[present & (ids[..., 0] < 0), 0] = 0  # every present report has a serving site: site 0 (no new site)
    ids[~present] = -1
    feats = np.where(ids[..., None] >= 0, 1.0, np.nan).astype(np.float32).repeat(3, -1)
    return MeasurementDataset(
        ue_xyz=np.zeros((n, t_len, 3), np.float32), t=np.tile(np.arange(t_len) * 0.5, (n, 1)).astype(np.float32),
        report_mask=present, site_ids=ids, site_features=feats,
        cell_features=np.where(present[..., None], 1.0, np.nan).astype(np.float32).repeat(4, -1), los=los & present,
        split=np.zeros(n, np.int8), attrs={"sites": [{"position": [0.0, 0.0, 20.0]}] * 5})


def test_groups_by_the_latest_present_report_and_sites_heard():
    ds = walks()
    g = ue_groups(ds, window_s=1.0)
    assert tuple(g) == GROUPS
    assert g["los"].tolist() == [True, False, True, False]  # walk 0: its last report is missing, the latest is LOS
    assert g["nlos"].tolist() == [False, True, False, True]
    assert g["last_missing"].tolist() == [True, False, False, True]
    assert sites_heard(ds, window_s=1.0).tolist() == [2, 1, 4, 3]
    assert sites_heard(ds, window_s=2.0).tolist() == [2, 2, 4, 3]  # site 3, 1.5 s before walk 1's last report
    assert g["sites_1"].tolist() == [False, True, False, False] and g["sites_2"].tolist() == [True, False, False, False]
    assert g["sites_4+"].tolist() == [False, False, True, False] and g["sites_3"].tolist() == [False, False, False, True]
    assert g["sparse"].all()  # < 5 present reports everywhere
    # the old reading (LOS at the last report) called walk 0 NLOS
    assert not (ds.los[0, -1] & ds.report_mask[0, -1])
    assert los_at_latest(ds.los, ds.report_mask)[0]
    sub = ue_groups(ds, np.array([2, 0]), window_s=1.0)
    assert sub["sites_4+"].tolist() == [True, False] and sub["last_missing"].tolist() == [False, True]
