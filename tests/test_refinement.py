"""Batched test-time refinement on analytic maps (free space: known truth)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import CoreError
from core.physics.lookup import PreparedMaps
from core.physics.physics_loss import PhysicsLoss
from core.physics.refinement import refine
from core.physics.synthetic import analytic_features, analytic_radio_map

RM = analytic_radio_map()  # 64 x 96 cells of 2 m, bounds (-96, -64, 96, 64), three sites
SITES = np.array([s["position"] for s in RM.attrs["sites"]])
LOSS = PhysicsLoss(RM)


def scenario(n=64, offset=4.0, seed=0):
    """Truth, a start ``offset`` metres away in a random direction, exact observations at the truth."""
    rng = np.random.default_rng(seed)
    truth = rng.uniform([-80, -50], [80, 50], size=(n, 2))
    angle = rng.uniform(0, 2 * np.pi, n)
    start = truth + offset * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    observed = torch.tensor(analytic_features(truth, SITES), dtype=torch.float32)
    return truth, torch.tensor(start, dtype=torch.float32), observed


def test_moves_toward_the_truth():
    truth, start, observed = scenario()
    with torch.no_grad():
        out = refine(start, observed, LOSS, steps=20, lr=0.5)
    before = np.linalg.norm(start.numpy() - truth, axis=1)
    after = np.linalg.norm(out.xy.numpy() - truth, axis=1)
    assert after.mean() < 0.5 * before.mean()
    assert (after < before).mean() > 0.9
    assert out.loss[-1].mean() < 0.2 * out.loss[0].mean()
    # the default 5 steps already help
    five = refine(start, observed, LOSS)
    assert np.linalg.norm(five.xy.numpy() - truth, axis=1).mean() < before.mean()


def test_shapes_start_and_no_grad():
    _, start, observed = scenario(n=7)
    with torch.no_grad():
        out = refine(start, observed, LOSS, steps=3)
    assert out.xy.shape == (7, 2) and out.path.shape == (4, 7, 2) and out.loss.shape == (4, 7)
    assert out.physics.shape == (4, 7) and out.refined.shape == (7,) and out.refined.all()
    assert out.residual_start.shape == (7, 7) and out.residual_end.shape == (7, 7)
    assert torch.equal(out.path[0], start) and torch.equal(out.path[-1], out.xy)
    assert not out.xy.requires_grad and torch.isfinite(out.loss).all()
    assert out.residual_end.abs().mean() < out.residual_start.abs().mean()
    # the loss recorded at each step is the physics loss at that path point
    np.testing.assert_allclose(
        out.physics[2].numpy(), LOSS(out.path[2], observed).per_sample.detach().numpy(), rtol=1e-5, atol=1e-7
    )


def test_confidence_gate_leaves_confident_samples_bit_identical():
    _, start, observed = scenario(n=32)
    start = start.double() + 1e-9  # float64 input, float32 maps: still bit-identical
    confidence = torch.linspace(0, 1, 32)
    out = refine(start, observed, LOSS, steps=5, confidence=confidence, threshold=0.5)
    moved = confidence < 0.5
    assert torch.equal(out.refined, moved)
    assert out.xy.dtype == torch.float64
    assert torch.equal(out.xy[~moved], start[~moved])
    assert torch.equal(out.path[:, ~moved], start[~moved].expand(6, -1, -1))
    assert (out.xy[moved] != start[moved]).any(dim=1).all()
    assert torch.equal(out.loss[:, ~moved], out.loss[:1, ~moved].expand(6, -1))
    # nobody below the threshold: nothing moves
    still = refine(start, observed, LOSS, confidence=torch.ones(32))
    assert torch.equal(still.xy, start) and not still.refined.any()


def test_prior_keeps_refinement_from_drifting():
    rng = np.random.default_rng(1)
    truth, start, _ = scenario(n=32, offset=0.0, seed=2)
    angle = rng.uniform(0, 2 * np.pi, 32)
    elsewhere = np.clip(truth + 25 * np.stack([np.cos(angle), np.sin(angle)], axis=1), [-90, -60], [90, 60])
    misleading = torch.tensor(analytic_features(elsewhere, SITES), dtype=torch.float32)
    free = refine(start, misleading, LOSS, steps=40)
    tied = refine(start, misleading, LOSS, steps=40, prior_sigma=torch.full((32,), 0.5))
    drift_free = (free.xy - start).norm(dim=1)
    drift_tied = (tied.xy - start).norm(dim=1)
    assert drift_free.mean() > 8.0
    assert drift_tied.max() < 1.0
    # [N, 2] sigma: a loose x and a tight y let it drift along x only
    aniso = refine(start, misleading, LOSS, steps=40, prior_sigma=torch.tensor([[100.0, 0.2]]).expand(32, 2))
    d = (aniso.xy - start).abs()
    assert d[:, 1].max() < 0.5 and d[:, 0].mean() > d[:, 1].mean()
    # the recorded objective includes the prior
    assert (tied.loss >= tied.physics - 1e-7).all()


def test_stays_inside_the_bounds():
    start = torch.tensor([[-95.5, 63.5], [95.0, -63.0]])
    far = np.array([[-150.0, 120.0], [150.0, -120.0]])  # observations of points beyond the map
    observed = torch.tensor(analytic_features(far, SITES), dtype=torch.float32)
    out = refine(start, observed, LOSS, steps=20, lr=2.0)
    x_min, y_min, x_max, y_max = RM.bounds
    assert (out.path[..., 0] >= x_min).all() and (out.path[..., 0] <= x_max).all()
    assert (out.path[..., 1] >= y_min).all() and (out.path[..., 1] <= y_max).all()


def test_accepts_maps_prepared_maps_and_scenes():
    truth, start, observed = scenario(n=8)
    by_map = refine(start, observed, RM, steps=3)
    by_prepared = refine(start, observed, PreparedMaps(RM), steps=3)
    by_loss = refine(start, observed, LOSS, steps=3)
    torch.testing.assert_close(by_map.xy, by_loss.xy)
    torch.testing.assert_close(by_prepared.xy, by_loss.xy)
    # two scenes in one batch: scene 1 is the same map shifted by (1000, 0)
    from core.stores.radio_map import RadioMap

    shifted = RadioMap(RM.values, RM.features, (904.0, -64.0, 1096.0, 64.0))
    multi = PhysicsLoss([RM, shifted])
    scene = torch.tensor([0, 1] * 4)
    start2 = start + torch.stack([scene * 1000.0, torch.zeros(8)], dim=1)
    out = refine(start2, observed, multi, steps=3, scene_index=scene)
    torch.testing.assert_close(out.xy - torch.stack([scene * 1000.0, torch.zeros(8)], dim=1), by_loss.xy, atol=2e-3, rtol=0)


def test_masked_observations_and_batch_of_one():
    truth, start, observed = scenario(n=4)
    observed[0, 1:] = float("nan")
    mask = torch.isfinite(observed)
    out = refine(start, observed, LOSS, mask=mask, steps=5)
    assert torch.isfinite(out.xy).all() and torch.isfinite(out.loss).all()
    one = refine(start[:1], observed[:1], LOSS, mask=mask[:1])
    assert one.xy.shape == (1, 2) and torch.isfinite(one.xy).all()


def test_inputs_untouched_and_steps_zero():
    _, start, observed = scenario(n=5)
    pred = start.clone().requires_grad_(True)
    before = start.clone()
    out = refine(pred, observed, LOSS, steps=0)
    assert torch.equal(out.xy, before) and out.path.shape == (1, 5, 2)
    out = refine(pred, observed, LOSS, steps=2)
    assert torch.equal(pred.detach(), before) and pred.grad is None
    with pytest.raises(CoreError, match="prior_sigma"):
        refine(start, observed, LOSS, prior_sigma=torch.zeros(5))
    with pytest.raises(CoreError, match="confidence"):
        refine(start, observed, LOSS, confidence=torch.zeros(3))
    with pytest.raises(CoreError, match="steps"):
        refine(start, observed, LOSS, steps=-1)
