"""Exhaustive map matching (core.physics.exhaustive): the calibrated likelihood over the whole map, no network."""

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.learning.groups import latest_present
from core.physics.calibration import calibrate
from core.physics.exhaustive import ExhaustiveMatcher
from core.physics.likelihood import RobustLikelihood
from core.physics.observation import site_observation
from core.physics.synthetic import analytic_radio_map, synthetic_dataset


def test_finds_the_truth_on_a_noiseless_map_with_no_start():
    m = analytic_radio_map(height=32, width=32, bounds=(-64.0, -64.0, 64.0, 64.0))
    ds = synthetic_dataset(m, 120, seed=4, noise=False)
    lik = RobustLikelihood(m, calibrate(ds, m, split="train"))
    test = np.arange(ds.num_samples)
    obs = site_observation(ds, test)  # the latest present report, where the UE was then
    truth = ds.ue_xyz[test, latest_present(ds.report_mask[test]), :2]
    matcher = ExhaustiveMatcher(lik, top=4, step_m=8.0)
    res = matcher(obs)
    err = np.linalg.norm(res.xy.numpy() - truth, axis=1)
    assert np.median(err) < 0.5 and np.percentile(err, 95) < 2.0  # 4 m cells, an 8 m scan: found, then refined
    # the coarse scan alone is only as good as its grid; the fine search is what reaches the truth
    coarse = np.linalg.norm(matcher.scan(obs)[:, 0].numpy() - truth, axis=1)
    assert np.median(coarse) > 2.0 and np.median(err) < 0.25 * np.median(coarse)
    # the answer's NLL is the truth's up to the search's resolution (0.5 m steps, then a short polish)
    nll_truth = lik(torch.as_tensor(truth, dtype=lik.maps.dtype), obs)
    assert float((res.nll - nll_truth).median()) < 0.5
    with pytest.raises(CoreError, match="top"):
        ExhaustiveMatcher(lik, top=0)
