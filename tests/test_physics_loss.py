"""Physics loss: values by hand, normalisation from map statistics, AoA, masks, Huber, scenes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.features import feature_spec
from core.physics.lookup import PreparedMaps
from core.physics.physics_loss import PhysicsLoss, aggregate_reports
from core.physics.synthetic import analytic_radio_map
from core.stores.radio_map import RadioMap

FEATS = ["path_gain", "toa", "aoa", "bler"]


def small_map() -> RadioMap:
    """A 2 x 3 map with known values; cell centres at x = 1, 3, 5 and y = 1, 3."""
    pg = np.array([[-80.0, -70.0, -60.0], [-90.0, -85.0, -75.0]])
    toa = np.array([[100.0, 200.0, 300.0], [150.0, 250.0, 350.0]])
    aoa = np.array([[10.0, 20.0, 30.0], [170.0, -170.0, 0.0]])
    bler = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    return RadioMap(np.stack([pg, toa, aoa, bler]).astype(np.float32), FEATS, (0.0, 0.0, 6.0, 4.0))


def loss64(rm, **kw) -> PhysicsLoss:
    return PhysicsLoss(PreparedMaps(rm, dtype=torch.float64), **kw)


def test_zero_at_the_truth_and_positive_elsewhere():
    rm = analytic_radio_map(height=16, width=24, bounds=(-48.0, -32.0, 48.0, 32.0))
    loss = loss64(rm)
    xy = torch.tensor([[3.0, 4.0], [-20.0, 10.0], [30.0, -15.0]], dtype=torch.float64)
    observed = loss.maps.lookup(xy)
    out = loss(xy, observed)
    assert out.total.item() < 1e-18 and out.per_sample.abs().max().item() < 1e-18
    assert loss(xy + 2.0, observed).total.item() > 1e-3


def test_hand_computed_mse_uses_map_statistics():
    rm = small_map()
    loss = loss64(rm)
    xy = torch.tensor([[1.0, 1.0], [3.0, 3.0]], dtype=torch.float64)  # cell centres: (0,0) and (1,1)
    observed = torch.tensor([[-78.0, 110.0, 15.0, 0.15], [-85.0, 250.0, 175.0, 0.5]], dtype=torch.float64)
    out = loss(xy, observed)
    sigma = {f: rm.stats[f].std for f in FEATS}
    weight = {f: feature_spec(f).default_weight for f in FEATS}
    map_vals = [[-80.0, 100.0, 10.0, 0.1], [-85.0, 250.0, -170.0, 0.5]]
    rho = np.zeros((2, 4))
    for n in range(2):
        for f, name in enumerate(FEATS):
            r = observed[n, f].item() - map_vals[n][f]
            if name == "aoa":
                r = (r + 180.0) % 360.0 - 180.0  # 175 - (-170) = 345 -> -15
            rho[n, f] = (r / sigma[name]) ** 2
    per_sample = (rho * np.array([weight[f] for f in FEATS])).sum(axis=1)
    np.testing.assert_allclose(out.per_sample.detach().numpy(), per_sample, rtol=1e-5)
    np.testing.assert_allclose(out.total.item(), per_sample.mean(), rtol=1e-5)
    for f, name in enumerate(FEATS):
        np.testing.assert_allclose(out.per_feature[name].item(), rho[:, f].mean(), rtol=1e-5)
    np.testing.assert_allclose(out.residual[1, 2].item(), -15.0, atol=1e-4)
    np.testing.assert_allclose(out.residual[0].numpy(), [2.0, 10.0, 5.0, 0.05], atol=1e-4)


def test_aoa_residual_wraps_across_the_seam():
    aoa = np.full((2, 2), -179.0, dtype=np.float32)
    rm = RadioMap(aoa[None], ["aoa"], (0.0, 0.0, 2.0, 2.0))
    loss = loss64(rm, normalize=False)
    xy = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    out = loss(xy, torch.tensor([[179.0]], dtype=torch.float64))
    np.testing.assert_allclose(out.residual[0, 0].item(), -2.0, atol=1e-6)  # not 358
    np.testing.assert_allclose(out.total.item(), 0.3 * 4.0, rtol=1e-6)


def test_huber_matches_hand_values():
    values = np.zeros((2, 3, 3), dtype=np.float32)
    rm = RadioMap(values, ["path_gain", "snr"], (0.0, 0.0, 3.0, 3.0))
    loss = loss64(rm, loss="huber", huber_delta=1.5, normalize=False, weights={"path_gain": 1.0, "snr": 2.0})
    xy = torch.full((3, 2), 1.5, dtype=torch.float64)
    observed = torch.tensor([[0.5, -1.0], [3.0, 0.0], [-4.0, 2.0]], dtype=torch.float64)

    def huber(r, d=1.5):
        return 0.5 * r * r if abs(r) <= d else d * (abs(r) - 0.5 * d)

    expected = [huber(a) + 2.0 * huber(b) for a, b in observed.tolist()]
    out = loss(xy, observed)
    np.testing.assert_allclose(out.per_sample.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(out.per_feature["snr"].item(), np.mean([huber(-1.0), 0.0, huber(2.0)]), rtol=1e-12)
    # Huber equals half the MSE inside delta
    mse = loss64(rm, normalize=False, weights={"path_gain": 1.0, "snr": 2.0})
    small = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    np.testing.assert_allclose(loss(xy[:1], small).total.item(), 0.5 * mse(xy[:1], small).total.item(), rtol=1e-12)


def test_mask_drops_entries_and_nan_does_not_poison():
    rm = small_map()
    loss = PhysicsLoss(rm)
    xy = torch.tensor([[1.0, 1.0], [3.0, 3.0], [4.0, 2.0]], requires_grad=True)
    observed = torch.tensor(
        [[-78.0, float("nan"), 15.0, 0.15], [float("nan")] * 4, [-70.0, 210.0, float("nan"), 0.3]]
    )
    mask = torch.isfinite(observed)
    out = loss(xy, observed, mask=mask)
    out.total.backward()
    assert torch.isfinite(out.total) and torch.isfinite(xy.grad).all()
    assert out.per_sample[1].item() == 0.0 and xy.grad[1].abs().max().item() == 0.0
    # the empty sample is not in the denominator: total = mean over the two samples with data
    np.testing.assert_allclose(out.total.item(), out.per_sample.detach()[[0, 2]].mean().item(), rtol=1e-6)
    assert (out.residual[~mask] == 0).all()
    # masked entries change nothing: dropping them equals computing without them
    full = observed.clone()
    full[~mask] = 12345.0
    again = loss(xy.detach(), full, mask=mask)
    torch.testing.assert_close(again.per_sample, out.per_sample.detach())
    # without a mask, NaN marks missing observations
    implicit = loss(xy.detach(), observed)
    torch.testing.assert_close(implicit.per_sample, out.per_sample.detach())
    torch.testing.assert_close(implicit.total, out.total.detach())
    # a feature with no valid entry averages to 0, not NaN
    none = torch.zeros_like(mask)
    empty = loss(xy.detach(), observed, mask=none)
    assert empty.total.item() == 0.0 and all(v.item() == 0.0 for v in empty.per_feature.values())


def test_batch_of_one_uses_map_statistics_not_batch_statistics():
    rm = analytic_radio_map(height=16, width=24, bounds=(-48.0, -32.0, 48.0, 32.0))
    loss = PhysicsLoss(rm)
    rng = np.random.default_rng(0)
    xy = torch.from_numpy(rng.uniform(-40, 40, size=(8, 2))).float()
    observed = loss.maps.lookup(xy + 3.0)
    batch = loss(xy, observed)
    for n in range(8):
        one = loss(xy[n : n + 1], observed[n : n + 1])
        assert torch.isfinite(one.total)
        torch.testing.assert_close(one.total, batch.per_sample[n], rtol=1e-6, atol=1e-8)


def test_weights_defaults_override_and_unknown_name():
    rm = small_map()
    assert PhysicsLoss(rm).weights == {f: feature_spec(f).default_weight for f in FEATS}
    with pytest.raises(CoreError, match="'rsrp'"):
        PhysicsLoss(rm, weights={"rsrp": 1.0})
    with pytest.raises(CoreError, match="'toa'"):
        PhysicsLoss(rm, weights={"toa": -1.0})
    with pytest.raises(CoreError, match="huber"):
        PhysicsLoss(rm, loss="l1")
    only_toa = loss64(rm, weights={"path_gain": 0.0, "aoa": 0.0, "bler": 0.0, "toa": 2.0})
    xy = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    observed = torch.tensor([[0.0, 110.0, 99.0, 0.9]], dtype=torch.float64)
    np.testing.assert_allclose(only_toa(xy, observed).total.item(), 2.0 * (10.0 / rm.stats["toa"].std) ** 2, rtol=1e-6)


def test_normalize_false_is_raw_units():
    rm = small_map()
    loss = loss64(rm, normalize=False, weights={"path_gain": 1.0, "toa": 0.0, "aoa": 0.0, "bler": 0.0})
    out = loss(torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.tensor([[-77.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    np.testing.assert_allclose(out.total.item(), 9.0, rtol=1e-9)


def test_constant_feature_has_a_guarded_sigma():
    values = np.stack([np.full((3, 3), 5.0), np.arange(9.0).reshape(3, 3)]).astype(np.float32)
    rm = RadioMap(values, ["snr", "sinr"], (0.0, 0.0, 3.0, 3.0))
    out = PhysicsLoss(rm)(torch.tensor([[1.5, 1.5]]), torch.tensor([[5.5, 4.0]]))
    assert torch.isfinite(out.total) and out.total.item() > 0


def test_gradcheck_float64_through_the_loss():
    rm = analytic_radio_map(height=16, width=24, bounds=(-48.0, -32.0, 48.0, 32.0))
    for kind in ("mse", "huber"):
        loss = loss64(rm, loss=kind)
        rng = np.random.default_rng(1)
        xy = torch.from_numpy(rng.uniform(-40, 40, size=(6, 2))).requires_grad_(True)
        observed = loss.maps.lookup(xy.detach() + 4.0)
        assert torch.autograd.gradcheck(lambda p: loss(p, observed).total, (xy,))


def test_gradient_points_toward_the_truth():
    rm = analytic_radio_map(height=32, width=48, bounds=(-96.0, -64.0, 96.0, 64.0))
    loss = PhysicsLoss(rm)
    truth = torch.tensor([[10.0, 5.0]])
    observed = loss.maps.lookup(truth)
    xy = (truth + torch.tensor([[6.0, -4.0]])).requires_grad_(True)
    loss(xy, observed).total.backward()
    assert torch.dot(-xy.grad[0], truth[0] - xy.detach()[0]) > 0


def test_multi_scene_loss_equals_per_scene_loss():
    a = analytic_radio_map(height=12, width=16, bounds=(0.0, 0.0, 64.0, 48.0))
    b = analytic_radio_map(height=12, width=16, bounds=(-200.0, 100.0, -120.0, 160.0))
    multi = loss64([a, b])
    xy = torch.tensor([[10.0, 10.0], [-150.0, 130.0], [50.0, 40.0], [-130.0, 110.0]], dtype=torch.float64)
    scene = torch.tensor([0, 1, 0, 1])
    observed = multi.maps.lookup(xy + 2.0, scene)
    out = multi(xy, observed, scene_index=scene)
    assert torch.isfinite(out.per_sample).all() and (out.per_sample > 0).all()
    # with pooled statistics: compare against single-scene losses using the same sigma
    for s, rm in enumerate([a, b]):
        single = loss64(rm)
        single.inv_sigma_lin.copy_(multi.inv_sigma_lin)
        single.inv_sigma_ang.copy_(multi.inv_sigma_ang)
        single.coef_lin.copy_(multi.coef_lin)
        single.coef_ang.copy_(multi.coef_ang)
        sel = scene == s
        torch.testing.assert_close(single(xy[sel], observed[sel]).per_sample, out.per_sample[sel], rtol=1e-9, atol=1e-12)
    with pytest.raises(CoreError, match="scene_index"):
        multi(xy, observed)


def test_points_in_holes_score_zero_without_nan():
    full = analytic_radio_map(height=10, width=10, bounds=(0.0, 0.0, 50.0, 50.0))
    values = full.values.copy()
    valid = np.ones((10, 10), dtype=bool)
    valid[3:6, 4:7] = False
    values[:, ~valid] = -np.inf
    loss = PhysicsLoss(RadioMap(values, full.features, full.bounds, valid=valid))
    xy = torch.tensor([[27.5, 22.5], [5.0, 5.0]], requires_grad=True)
    observed = PhysicsLoss(full).maps.lookup(torch.tensor([[20.0, 20.0], [8.0, 8.0]]))
    out = loss(xy, observed)
    out.total.backward()
    assert out.per_sample[0].item() == 0.0 and out.per_sample[1].item() > 0
    assert torch.isfinite(xy.grad).all() and out.coverage.tolist() == [0.0, 1.0]


def test_shape_errors_name_the_argument():
    loss = PhysicsLoss(small_map())
    with pytest.raises(CoreError, match="observed"):
        loss(torch.zeros(2, 2), torch.zeros(2, 3))
    with pytest.raises(CoreError, match="mask"):
        loss(torch.zeros(2, 2), torch.zeros(2, 4), mask=torch.ones(2, 4))
    with pytest.raises(CoreError, match="pred_xy"):
        loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_aggregate_reports_masked_and_circular_mean():
    nan = float("nan")
    obs = torch.tensor(
        [
            [[-80.0, 179.0, 1.0], [-90.0, -179.0, 3.0], [nan, nan, nan]],
            [[-70.0, 10.0, 2.0], [-50.0, 30.0, 100.0], [-60.0, 20.0, 4.0]],
        ]
    )
    mask = torch.tensor([[True, True, False], [True, False, True]])
    agg, valid = aggregate_reports(obs, mask, features=("path_gain", "aoa", "snr"))
    assert valid.all()
    np.testing.assert_allclose(agg[0, 0].item(), -85.0)
    assert abs(abs(agg[0, 1].item()) - 180.0) < 1e-3  # 179 and -179 average to 180, not 0
    np.testing.assert_allclose(agg[0, 2].item(), 2.0)
    np.testing.assert_allclose(agg[1].tolist(), [-65.0, 15.0, 3.0], atol=1e-4)
    # per-entry mask [N, T, F]; a feature with no valid report -> 0 and invalid
    m3 = torch.isfinite(obs)
    m3[1, :, 2] = False
    agg3, valid3 = aggregate_reports(obs, m3, features=("path_gain", "aoa", "snr"))
    assert not valid3[1, 2] and agg3[1, 2].item() == 0.0 and torch.isfinite(agg3).all()
    np.testing.assert_allclose(agg3[1, 0].item(), -60.0)
    with pytest.raises(CoreError):
        aggregate_reports(obs, torch.ones(2, 2, dtype=torch.bool), features=("path_gain", "aoa", "snr"))


def test_sigma_for_aoa_is_the_circular_std():
    rm = analytic_radio_map(height=16, width=24, bounds=(-48.0, -32.0, 48.0, 32.0))
    loss = PhysicsLoss(rm)
    assert math.isclose(loss.sigma_by_feature["aoa"], rm.stats["aoa"].std, rel_tol=1e-9)
    assert math.isclose(loss.sigma_by_feature["toa"], rm.stats["toa"].std, rel_tol=1e-9)
